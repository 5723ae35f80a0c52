"""GET /api/v1/workers/: the GPU workers and what they are doing."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from workers import selectors
from workers.models import may_see_details


class QueueOutput(serializers.Serializer):
    name = serializers.CharField()
    depth = serializers.IntegerField()


class CurrentJobOutput(serializers.Serializer):
    task = serializers.CharField()
    id = serializers.CharField(help_text="Empty unless you may see workers' details.")
    args = serializers.ListField(
        child=serializers.JSONField(), help_text="Empty unless you may see workers' details."
    )
    since = serializers.FloatField()
    running_s = serializers.FloatField()


_DETAIL = "Shown to staff with the permission to view GPU workers; empty otherwise."


class WorkerOutput(serializers.Serializer):
    name = serializers.CharField()
    gpu = serializers.CharField()
    host = serializers.CharField(help_text=_DETAIL)
    pid = serializers.IntegerField(allow_null=True, help_text=_DETAIL)
    online = serializers.BooleanField()
    healthy = serializers.BooleanField()
    health_error = serializers.CharField(help_text=_DETAIL)
    last_seen = serializers.FloatField(allow_null=True)
    started_at = serializers.FloatField(allow_null=True)
    current_job = CurrentJobOutput(allow_null=True)
    jobs_done = serializers.IntegerField(help_text="Jobs done since this worker started.")
    llm = serializers.CharField(help_text="The model that answers in this worker.")
    tokens_per_s = serializers.FloatField()
    answers_last_minute = serializers.IntegerField()
    queues = QueueOutput(many=True)
    models = serializers.ListField(
        child=serializers.CharField(), help_text="Models pulled on its Ollama (/api/tags)."
    )
    loaded = serializers.ListField(
        child=serializers.CharField(), help_text="Models loaded on its Ollama now (/api/ps)."
    )
    serving = serializers.CharField(
        help_text="The chat model whose questions it takes now (placement); empty: any."
    )
    ollama_url = serializers.CharField(help_text=_DETAIL)


def _without_details(entry: dict) -> dict:
    """What every user may know: which GPUs there are, whether they work, how busy."""
    job = entry["current_job"]
    if job:
        # The arguments are another user's question id; the task id leads to them.
        job = {**job, "id": "", "args": []}
    return {
        **entry,
        "host": "",
        "pid": None,
        "health_error": "",
        "ollama_url": "",
        "current_job": job,
    }


class WorkerList(APIView):
    @extend_schema(responses={200: WorkerOutput(many=True)})
    def get(self, request):
        entries = selectors.gpu_workers()
        if not may_see_details(request.user):
            entries = [_without_details(entry) for entry in entries]
        return Response(WorkerOutput(entries, many=True).data)
