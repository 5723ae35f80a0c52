"""The shapes of a question's sources and timings, the same over REST and the websocket."""

from __future__ import annotations

from rest_framework import serializers

from chat.models import Question


class SourceSerializer(serializers.Serializer):
    document = serializers.IntegerField()
    title = serializers.CharField()
    page = serializers.IntegerField(allow_null=True)
    score = serializers.FloatField()
    text = serializers.CharField()
    # Answers saved before citations were marked read as citing nothing.
    cited = serializers.BooleanField(
        default=False, help_text="Whether the answer cites this passage as [n] (n: its place)."
    )


class TimingsSerializer(serializers.Serializer):
    queued_at = serializers.DateTimeField(allow_null=True)
    started_at = serializers.DateTimeField(allow_null=True)
    first_token_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    wait_ms = serializers.FloatField(allow_null=True)
    retrieval_ms = serializers.FloatField(allow_null=True)
    first_token_ms = serializers.FloatField(allow_null=True)
    total_ms = serializers.FloatField(allow_null=True)
    generation_ms = serializers.FloatField(allow_null=True)
    prompt_tokens = serializers.IntegerField(allow_null=True)
    completion_tokens = serializers.IntegerField(allow_null=True)
    tokens_per_s = serializers.FloatField(allow_null=True)


def timings(question: Question) -> dict:
    return dict(TimingsSerializer(question.timings).data)
