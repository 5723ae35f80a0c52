"""Evaluation runs over HTTP, for staff: start one, follow its progress, read its metrics."""

from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import generics, serializers, status
from rest_framework.response import Response

from evaluation import selectors, services
from evaluation.models import METRICS, EvaluationRun, EvaluationSet
from ingestion.api import STAFF


class RunInput(serializers.Serializer):
    corpus = serializers.SlugField()
    set = serializers.CharField(max_length=100)
    retrieval_only = serializers.BooleanField(default=False)
    judge_model = serializers.CharField(max_length=200, required=False, default="")


class RunOutput(serializers.ModelSerializer):
    corpus = serializers.SlugRelatedField(
        source="evaluation_set.corpus", slug_field="slug", read_only=True
    )
    set = serializers.CharField(source="evaluation_set.name", read_only=True)
    items = serializers.IntegerField(source="items_total")
    metrics = serializers.SerializerMethodField()
    by_language = serializers.JSONField(source="metrics_by_language")

    class Meta:
        model = EvaluationRun
        fields = [
            "id",
            "corpus",
            "set",
            "status",
            "items",
            "items_done",
            "items_failed",
            "retrieval_only",
            "judge_model",
            "settings",
            "metrics",
            "by_language",
            "judge",
            "created_at",
            "started_at",
            "finished_at",
        ]

    @extend_schema_field(
        {"type": "object", "properties": {k: {"type": "number", "nullable": True} for k in METRICS}}
    )
    def get_metrics(self, run) -> dict:
        return selectors.run_summary(run)["metrics"]


class RunList(generics.ListCreateAPIView):
    """Evaluation runs, newest first (`?corpus=<slug>` filters); POST starts one: each item
    goes through the workers at batch priority."""

    permission_classes = STAFF
    serializer_class = RunOutput

    def get_queryset(self):
        rows = EvaluationRun.objects.select_related("evaluation_set__corpus")
        if corpus := self.request.query_params.get("corpus"):
            rows = rows.filter(evaluation_set__corpus__slug=corpus)
        return rows

    @extend_schema(request=RunInput, responses={202: RunOutput})
    def post(self, request):
        data = RunInput(data=request.data)
        data.is_valid(raise_exception=True)
        evaluation_set = (
            EvaluationSet.objects.select_related("corpus")
            .filter(corpus__slug=data.validated_data["corpus"], name=data.validated_data["set"])
            .first()
        )
        if evaluation_set is None:
            return Response({"set": ["No such set in this corpus."]}, status=400)
        try:
            run = services.run_start(
                evaluation_set=evaluation_set,
                retrieval_only=data.validated_data["retrieval_only"],
                judge_model=data.validated_data["judge_model"],
                created_by=request.user,
            )
        except ValueError as exc:
            return Response({"set": [str(exc)]}, status=400)
        return Response(RunOutput(run).data, status=status.HTTP_202_ACCEPTED)


class RunDetail(generics.RetrieveAPIView):
    permission_classes = STAFF
    serializer_class = RunOutput
    queryset = EvaluationRun.objects.select_related("evaluation_set__corpus")
