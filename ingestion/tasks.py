"""Thin tasks: take ids, call one service."""

from celery import shared_task

from ingestion import services


@shared_task(name="ingestion.tasks.prepare_job", bind=True)
def prepare_job(self, job_id: int) -> None:
    # The message id tells a redelivery (its worker died) from a second copy.
    services.job_prepare(job_id=job_id, delivery=self.request.id or "")


@shared_task(name="ingestion.tasks.prepare_jobs", bind=True)
def prepare_jobs(self, job_ids: list[int]) -> None:
    services.jobs_prepare(job_ids=job_ids, delivery=self.request.id or "")


@shared_task(name="ingestion.tasks.embed_batch")
def embed_batch(
    job_id: int | None = None,
    start: int = 0,
    end: int = 0,
    run: int | None = None,
    *,
    ranges: list[list[int]] | None = None,
    plan: list[list[int]] | None = None,
) -> None:
    """One batch: `ranges` [[job, run, start, end], ...] across documents, or one range."""
    if ranges is None:
        ranges = [[job_id, run, start, end]]
    services.job_embed_batch(ranges=ranges, plan=plan)
