"""Reads for evaluation: a run as the command and API print it, and two runs compared."""

from __future__ import annotations

from evaluation.models import LOWER_IS_BETTER, METRICS, EvaluationResult, EvaluationRun


def run_summary(run: EvaluationRun) -> dict:
    """`evaluate run --json`: {"run", "items", "metrics"} (a public shape), plus the failed
    items' count, the metrics per language and the judge's figures when one was asked."""
    summary = {
        "run": run.pk,
        "items": run.items_total,
        "metrics": {key: run.metrics.get(key) for key in METRICS},
        "failed": run.items_failed,
        "by_language": {
            lang: {key: values.get(key) for key in METRICS}
            for lang, values in run.metrics_by_language.items()
        },
    }
    if run.judge:
        summary["judge"] = run.judge
    return summary


def compare(a: EvaluationRun, b: EvaluationRun) -> dict:
    """Metric deltas (b − a) and the items whose verdict changed between the two runs."""
    rows = []
    for key in METRICS:
        before, after = a.metrics.get(key), b.metrics.get(key)
        delta = round(after - before, 4) if before is not None and after is not None else None
        better = None
        if delta:
            better = (delta < 0) if key in LOWER_IS_BETTER else (delta > 0)
        rows.append({"metric": key, "a": before, "b": after, "delta": delta, "better": better})

    def verdicts(run):
        return {
            r.item_id or r.question: r
            for r in EvaluationResult.objects.filter(run=run, status=EvaluationResult.Status.DONE)
        }

    first, second = verdicts(a), verdicts(b)
    fixed, broken = [], []
    for key, after in second.items():
        before = first.get(key)
        if before is None or before.right == after.right:
            continue
        (fixed if after.right else broken).append(
            {"question": after.question, "a": before, "b": after}
        )
    return {"metrics": rows, "fixed": fixed, "broken": broken}
