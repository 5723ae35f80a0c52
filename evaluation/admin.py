"""Evaluation in the Django admin: sets and their items (edited here or imported), runs with
their progress and metrics, and two runs side by side."""

from django.contrib import admin, messages
from django.db.models import Count
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.text import Truncator

from evaluation import selectors, services
from evaluation.models import (
    METRICS,
    EvaluationItem,
    EvaluationResult,
    EvaluationRun,
    EvaluationSet,
)


def _metric(value) -> str:
    return "-" if value is None else f"{value:.3f}"


class ItemInline(admin.TabularInline):
    model = EvaluationItem
    extra = 0
    fields = ["position", "question", "language", "answerable", "documents", "page", "facts"]


@admin.register(EvaluationSet)
class EvaluationSetAdmin(admin.ModelAdmin):
    list_display = ["name", "corpus", "item_count", "updated_at"]
    list_filter = ["corpus"]
    search_fields = ["name", "corpus__slug", "items__question"]
    inlines = [ItemInline]
    actions = ["run_full", "run_retrieval_only"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(item_count=Count("items"))

    @admin.display(description="items", ordering="item_count")
    def item_count(self, obj) -> int:
        return obj.item_count

    def _start(self, request, queryset, *, retrieval_only: bool) -> None:
        for evaluation_set in queryset:
            try:
                run = services.run_start(
                    evaluation_set=evaluation_set,
                    retrieval_only=retrieval_only,
                    created_by=request.user,
                )
            except ValueError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                continue
            self.message_user(
                request, f"Run {run.pk} of {evaluation_set} queued ({run.items_total} items)."
            )

    def has_run_permission(self, request) -> bool:
        return request.user.has_perm("evaluation.add_evaluationrun")

    @admin.action(description="Run the selected sets (retrieval and answers)", permissions=["run"])
    def run_full(self, request, queryset):
        self._start(request, queryset, retrieval_only=False)

    @admin.action(description="Run the selected sets (retrieval only)", permissions=["run"])
    def run_retrieval_only(self, request, queryset):
        self._start(request, queryset, retrieval_only=True)


class ResultInline(admin.TabularInline):
    model = EvaluationResult
    extra = 0
    max_num = 0
    can_delete = False
    fields = [
        "question",
        "language",
        "status",
        "right",
        "abstained",
        "relevance",
        "figures",
        "answer_short",
        "error",
    ]
    readonly_fields = fields

    @admin.display(description="metrics")
    def figures(self, result) -> str:
        return ", ".join(
            f"{key} {_metric(value)}"
            for key, value in result.metrics.items()
            if key in METRICS and value is not None
        )

    @admin.display(description="answer")
    def answer_short(self, result) -> str:
        return Truncator(result.answer).chars(160)


@admin.register(EvaluationRun)
class EvaluationRunAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "evaluation_set",
        "status",
        "progress",
        "retrieval_only",
        "hit_at_1",
        "mrr",
        "created_at",
    ]
    list_filter = ["status", "evaluation_set__corpus", "retrieval_only"]
    actions = ["compare"]
    readonly_fields = [
        "evaluation_set",
        "status",
        "progress",
        "retrieval_only",
        "judge_model",
        "settings",
        "metrics_table",
        "judge",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
    ]
    fields = readonly_fields
    inlines = [ResultInline]

    def has_add_permission(self, request) -> bool:
        return False  # runs start from a set (its action), the command or the API

    @admin.display(description="progress")
    def progress(self, run) -> str:
        failed = f", {run.items_failed} failed" if run.items_failed else ""
        return f"{run.items_done} / {run.items_total}{failed}"

    @admin.display(description="hit@1")
    def hit_at_1(self, run) -> str:
        return _metric(run.metrics.get("hit@1"))

    @admin.display(description="MRR")
    def mrr(self, run) -> str:
        return _metric(run.metrics.get("mrr"))

    @admin.display(description="metrics")
    def metrics_table(self, run) -> str:
        languages = sorted(run.metrics_by_language)
        head = format_html_join(
            "", "<th>{}</th>", ((lang,) for lang in ["metric", "all", *languages])
        )
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td>{}</tr>",
            (
                (
                    key,
                    _metric(run.metrics.get(key)),
                    format_html_join(
                        "",
                        "<td>{}</td>",
                        ((_metric(run.metrics_by_language[lang].get(key)),) for lang in languages),
                    ),
                )
                for key in METRICS
            ),
        )
        return format_html("<table><tr>{}</tr>{}</table>", head, rows)

    @admin.action(description="Compare the two selected runs")
    def compare(self, request, queryset):
        ids = sorted(queryset.values_list("pk", flat=True))
        if len(ids) != 2:
            self.message_user(request, "Select exactly two runs to compare.", messages.ERROR)
            return None
        url = reverse("admin:evaluation_evaluationrun_compare")
        return HttpResponseRedirect(f"{url}?a={ids[0]}&b={ids[1]}")

    def get_urls(self):
        return [
            path(
                "compare/",
                self.admin_site.admin_view(self.compare_view),
                name="evaluation_evaluationrun_compare",
            ),
            *super().get_urls(),
        ]

    def compare_view(self, request):
        if not self.has_view_permission(request):
            return HttpResponseRedirect(reverse("admin:index"))
        try:
            a_id, b_id = int(request.GET.get("a", "")), int(request.GET.get("b", ""))
        except ValueError:
            self.message_user(request, "Two run ids are needed (?a=&b=).", messages.ERROR)
            return HttpResponseRedirect(reverse("admin:evaluation_evaluationrun_changelist"))
        a = get_object_or_404(EvaluationRun.objects.select_related("evaluation_set"), pk=a_id)
        b = get_object_or_404(EvaluationRun.objects.select_related("evaluation_set"), pk=b_id)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Run {a.pk} and run {b.pk}",
            "a": a,
            "b": b,
            "comparison": selectors.compare(a, b),
        }
        return TemplateResponse(request, "admin/evaluation/compare.html", context)
