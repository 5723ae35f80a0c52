"""What `GET /api/v1/workers/` and the admin page show."""

from __future__ import annotations

import time
from datetime import timedelta

from django.db.models import Count, Q, Sum
from django.utils import timezone

from chat.models import Question
from workers import health

TOKENS_WINDOW_S = 60


def gpu_workers() -> list[dict]:
    """One entry per GPU worker: online, health, current job, jobs done, tokens/s, queues."""
    since = timezone.now() - timedelta(seconds=TOKENS_WINDOW_S)
    recent = {
        row["worker"]: row
        for row in Question.objects.filter(status=Question.Status.DONE, finished_at__gte=since)
        .values("worker")
        .annotate(tokens=Sum("completion_tokens"), ms=Sum("generation_ms"), n=Count("id"))
    }
    entries = [w for w in health.workers() if w["gpu"] != "cpu"]
    all_queues = sorted({q for w in entries for q in w["queues"]})
    depths = health.queue_depths(all_queues) if all_queues else {}
    now = time.time()
    for entry in entries:
        row = recent.get(entry["name"])
        entry["tokens_per_s"] = (
            round(row["tokens"] / (row["ms"] / 1000), 1)
            if row and row["tokens"] and row["ms"]
            else 0.0
        )
        entry["answers_last_minute"] = row["n"] if row else 0
        entry["queues"] = [{"name": q, "depth": depths.get(q, 0)} for q in entry["queues"]]
        if entry["current_job"]:
            entry["current_job"]["running_s"] = round(now - entry["current_job"]["since"], 1)
    return entries


FLEET_WINDOW_S = 3600
FLEET_STEP_S = 60
FIRST_TOKEN_STEP_S = 300


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (k - low), 3)


def fleet_history(*, now: float | None = None) -> dict:
    """The last hour of the fleet for the admin's fleet page, in one-minute steps: each
    card's busy share, queue depths, first-token p50/p95 (five-minute steps), model loads
    and failures."""
    from ingestion.models import IngestionJob
    from workers import fleet

    now = time.time() if now is None else now
    since = now - FLEET_WINDOW_S
    start = int(since // FLEET_STEP_S) * FLEET_STEP_S
    steps = [start + i * FLEET_STEP_S for i in range(int((now - start) // FLEET_STEP_S) + 1)]
    index = {step: i for i, step in enumerate(steps)}
    since_dt = timezone.now() - timedelta(seconds=FLEET_WINDOW_S)

    def slot(ts: float) -> int | None:
        return index.get(int(ts // FLEET_STEP_S) * FLEET_STEP_S)

    # Busy share: the seconds of each minute a card spent answering.
    busy: dict[str, list[float]] = {}
    rows = Question.objects.filter(started_at__isnull=False, started_at__lte=timezone.now()).filter(
        Q(finished_at__gte=since_dt) | Q(finished_at__isnull=True, status=Question.Status.RUNNING)
    )
    for gpu, started, finished in rows.values_list("gpu", "started_at", "finished_at"):
        if not gpu:
            continue
        series = busy.setdefault(gpu, [0.0] * len(steps))
        begin = max(started.timestamp(), start)
        end = min(finished.timestamp() if finished else now, now)
        while begin < end:
            step_end = (int(begin // FLEET_STEP_S) + 1) * FLEET_STEP_S
            i = slot(begin)
            if i is not None:
                series[i] += min(end, step_end) - begin
            begin = step_end
    busy = {
        gpu: [round(min(1.0, s / FLEET_STEP_S), 3) for s in series] for gpu, series in busy.items()
    }

    # First token, as the asker waits for it, in five-minute steps.
    ft_start = int(since // FIRST_TOKEN_STEP_S) * FIRST_TOKEN_STEP_S
    ft_steps = list(range(ft_start, int(now) + 1, FIRST_TOKEN_STEP_S))
    waits: dict[int, list[float]] = {step: [] for step in ft_steps}
    done = Question.objects.filter(
        status=Question.Status.DONE, first_token_at__gte=since_dt
    ).values_list("created_at", "first_token_at")
    for created, first in done:
        step = int(first.timestamp() // FIRST_TOKEN_STEP_S) * FIRST_TOKEN_STEP_S
        if step in waits:
            waits[step].append((first - created).total_seconds())

    # Loads and failures per minute.
    loads = [0] * len(steps)
    for event in fleet.load_events(since=start):
        i = slot(event["at"])
        if i is not None:
            loads[i] += 1
    failed_questions = [0] * len(steps)
    for (finished,) in Question.objects.filter(
        status=Question.Status.FAILED, finished_at__gte=since_dt
    ).values_list("finished_at"):
        i = slot(finished.timestamp())
        if i is not None:
            failed_questions[i] += 1
    failed_jobs = [0] * len(steps)
    for (finished,) in IngestionJob.objects.filter(
        status=IngestionJob.Status.FAILED, finished_at__gte=since_dt
    ).values_list("finished_at"):
        i = slot(finished.timestamp())
        if i is not None:
            failed_jobs[i] += 1

    samples = fleet.queue_samples(since=since)
    queue_names = sorted({name for s in samples for name in s["depths"]})
    return {
        "now": now,
        "since": since,
        "busy": {"x": steps, "series": dict(sorted(busy.items()))},
        "queues": {
            "x": [s["at"] for s in samples],
            "series": {q: [s["depths"].get(q) for s in samples] for q in queue_names},
        },
        "first_token": {
            "x": ft_steps,
            "p50": [_percentile(waits[s], 0.5) for s in ft_steps],
            "p95": [_percentile(waits[s], 0.95) for s in ft_steps],
            "count": [len(waits[s]) for s in ft_steps],
        },
        "events": {
            "x": steps,
            "loads": loads,
            "failed_questions": failed_questions,
            "failed_jobs": failed_jobs,
        },
        "workers": [
            {k: w[k] for k in ("name", "gpu", "online", "healthy", "health_error")}
            for w in health.workers()
        ],
    }
