"""What `GET /api/v1/workers/` and the admin page show."""

from __future__ import annotations

import time
from datetime import timedelta

from django.db.models import Count, Sum
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
