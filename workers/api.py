"""GET /api/v1/workers/: the GPU workers and what they are doing."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from workers import selectors


class QueueOutput(serializers.Serializer):
    name = serializers.CharField()
    depth = serializers.IntegerField()


class CurrentJobOutput(serializers.Serializer):
    task = serializers.CharField()
    id = serializers.CharField()
    args = serializers.ListField(child=serializers.JSONField())
    since = serializers.FloatField()
    running_s = serializers.FloatField()


class WorkerOutput(serializers.Serializer):
    name = serializers.CharField()
    gpu = serializers.CharField()
    host = serializers.CharField()
    online = serializers.BooleanField()
    healthy = serializers.BooleanField()
    health_error = serializers.CharField()
    last_seen = serializers.FloatField(allow_null=True)
    started_at = serializers.FloatField(allow_null=True)
    current_job = CurrentJobOutput(allow_null=True)
    jobs_done = serializers.IntegerField()
    tokens_per_s = serializers.FloatField()
    answers_last_minute = serializers.IntegerField()
    queues = QueueOutput(many=True)
    ollama_url = serializers.CharField(help_text="Shown to staff only.")


class WorkerList(APIView):
    @extend_schema(responses={200: WorkerOutput(many=True)})
    def get(self, request):
        entries = selectors.gpu_workers()
        if not request.user.is_staff:
            # Internal addresses are for the people who run the servers.
            for entry in entries:
                entry["ollama_url"] = ""
        return Response(WorkerOutput(entries, many=True).data)
