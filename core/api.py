"""Service status over HTTP."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from core import context_processors
from workers.models import may_see_details


class StatusOutput(serializers.Serializer):
    llm = serializers.CharField(help_text="The backend and model that answer.")
    retrieval = serializers.ChoiceField(choices=["hybrid", "bm25"])
    banner = serializers.CharField(
        allow_blank=True, help_text="A sentence for the chat; empty when Ollama is used normally."
    )


class Status(APIView):
    """Which model answers and how passages are found (the chat's banner, as data)."""

    @extend_schema(responses=StatusOutput)
    def get(self, request):
        status = context_processors.status(staff=may_see_details(request.user))
        return Response(StatusOutput(status).data)
