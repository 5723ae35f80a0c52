"""Thin tasks: take ids, call one pipeline step. Each kind has its own time limit."""

from celery import shared_task
from django.conf import settings

from ingestion import embedding, preparing, reaper
from workers.celery import HOUSEKEEPING_LIMIT_S, limits


@shared_task(
    name="ingestion.tasks.prepare_jobs", bind=True, **limits(settings.RMASSIMO_PREPARE_TIME_LIMIT)
)
def prepare_jobs(self, job_ids: list[int]) -> None:
    # The message id tells a redelivery (its worker died) from a second copy.
    preparing.jobs_prepare(job_ids=job_ids, delivery=self.request.id or "")


@shared_task(name="ingestion.tasks.embed_batch", **limits(settings.RMASSIMO_EMBED_TIME_LIMIT))
def embed_batch(*, ranges: list[list[int]], plan: list[list[int]] | None = None) -> None:
    """One batch: `ranges` [[job, run, start, end], ...] across the documents of a corpus."""
    embedding.job_embed_batch(ranges=ranges, plan=plan)


@shared_task(name="ingestion.tasks.reap_jobs", **limits(HOUSEKEEPING_LIMIT_S))
def reap_jobs() -> dict:
    return reaper.requeue_stale_jobs()
