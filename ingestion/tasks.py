from celery import shared_task

from ingestion import services


@shared_task(name="ingestion.tasks.prepare_job")
def prepare_job(job_id: int) -> None:
    services.job_prepare(job_id=job_id)


@shared_task(name="ingestion.tasks.embed_batch")
def embed_batch(job_id: int, start: int, end: int) -> None:
    services.job_embed_batch(job_id=job_id, start=start, end=end)
