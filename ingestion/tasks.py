"""Thin tasks: take ids, call one pipeline step."""

from celery import shared_task

from ingestion import embedding, preparing


@shared_task(name="ingestion.tasks.prepare_jobs", bind=True)
def prepare_jobs(self, job_ids: list[int]) -> None:
    # The message id tells a redelivery (its worker died) from a second copy.
    preparing.jobs_prepare(job_ids=job_ids, delivery=self.request.id or "")


@shared_task(name="ingestion.tasks.embed_batch")
def embed_batch(*, ranges: list[list[int]], plan: list[list[int]] | None = None) -> None:
    """One batch: `ranges` [[job, run, start, end], ...] across the documents of a corpus."""
    embedding.job_embed_batch(ranges=ranges, plan=plan)
