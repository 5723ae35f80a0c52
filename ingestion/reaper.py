"""The ingestion reaper: puts back jobs whose message or worker was lost, as chat.reaper
does questions, so that no job waits for a person to press "retry".

- `queued` for longer than RMASSIMO_REQUEUE_AFTER_S while the `cpu` queue holds fewer
  messages than there are such jobs: messages were lost (Redis restarted);
- `running` with no sign of life for RMASSIMO_JOB_STALL_AFTER while no embedding batch
  waits in the broker: the worker holding it died, or its batches were lost. It starts
  again from the beginning; the start counts in its attempts, so a document that kills
  its worker each time ends failed after RMASSIMO_JOB_MAX_ATTEMPTS.
Duplicates are harmless: the prepare step claims a job only once.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from ingestion.models import IngestionJob
from workers import health

logger = logging.getLogger(__name__)


def requeue_stale_jobs(*, now=None) -> dict:
    from ingestion.tasks import prepare_jobs

    now = now or timezone.now()
    waiting = list(
        IngestionJob.objects.filter(
            status=IngestionJob.Status.QUEUED,
            heartbeat_at__lt=now - timedelta(seconds=settings.RMASSIMO_REQUEUE_AFTER_S),
        ).values_list("pk", flat=True)
    )
    depths = health.queue_depths(["cpu", "batch"])
    if depths["cpu"] >= len(waiting):
        waiting = []
    stalled = []
    if not depths["batch"]:
        stalled = list(
            IngestionJob.objects.filter(
                status=IngestionJob.Status.RUNNING,
                heartbeat_at__lt=now - timedelta(seconds=settings.RMASSIMO_JOB_STALL_AFTER),
            ).values_list("pk", flat=True)
        )
        IngestionJob.objects.filter(pk__in=stalled, status=IngestionJob.Status.RUNNING).update(
            status=IngestionJob.Status.QUEUED, task_id="", heartbeat_at=now
        )
    IngestionJob.objects.filter(pk__in=waiting).update(heartbeat_at=now)
    for job_id in [*waiting, *stalled]:
        prepare_jobs.apply_async(args=[[job_id]])
    if waiting or stalled:
        logger.warning("ingestion reaper: %d requeued, %d stalled", len(waiting), len(stalled))
    return {"requeued": len(waiting), "stalled": len(stalled)}
