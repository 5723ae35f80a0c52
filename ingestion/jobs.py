"""The states of an ingestion job, and every change of them.

queued -> running (claimed by a prepare task) -> done | failed | skipped; a failed or
stalled job can be queued again. Every start bumps `run`; writes made on behalf of a run
(progress, completion, failure) match it, so a step left over from an earlier run does
nothing.

Recovery. Messages are acknowledged late, so the broker hands a job's message to another
worker when the one holding it dies. The prepare step claims a job that is queued, or one
that is running under the very message being delivered again (its `task_id`): the broker
only redelivers a message whose worker is gone, so the earlier attempt is dead and the job
resumes from the start. Each start counts in `attempts`; past RMASSIMO_JOB_MAX_ATTEMPTS the
job fails with a reason instead of looping on a document that kills its worker. A failed
job, or one that shows no sign of life for RMASSIMO_JOB_STALL_AFTER seconds, can be queued
again with `services.job_retry` (the admin's "retry" action).
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import (
    Case,
    Count,
    Exists,
    F,
    FloatField,
    OuterRef,
    PositiveIntegerField,
    Q,
    Subquery,
    Value,
    When,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from core import locks, metrics, vectorstore
from ingestion.models import Chunk, Corpus, Document, IngestionJob
from workers import identity

logger = logging.getLogger(__name__)

ACTIVE = (IngestionJob.Status.QUEUED, IngestionJob.Status.RUNNING)


INTERNAL_ERROR = "An internal error stopped this job; the worker's log has the details."


TOO_LONG = "A step of this job ran past the task time limit and was stopped."


def job_fail(*, job_id: int, message: str, run: int | None = None) -> bool:
    with transaction.atomic():
        # The document's lock first, as every writer takes them.
        list(
            Document.objects.select_for_update(of=("self",))
            .filter(jobs__pk=job_id)
            .values_list("pk")
        )
        jobs = IngestionJob.objects.filter(pk=job_id, status__in=ACTIVE)
        if run is not None:
            jobs = jobs.filter(run=run)
        changed = jobs.update(
            status=IngestionJob.Status.FAILED, error=message, finished_at=timezone.now()
        )
        if changed:
            Document.objects.filter(jobs__pk=job_id).exclude(status=Document.Status.REMOVED).update(
                status=Document.Status.FAILED, error=message
            )
    if changed:
        _count(IngestionJob.objects.filter(pk=job_id), "failed")  # metrics
    return bool(changed)


def jobs_claim(*, job_ids: list[int], delivery: str) -> list[IngestionJob]:
    """The jobs this call now holds: queued ones, and running ones under this very message.

    The broker only hands a message out again once the worker holding it is gone, so a
    job running under the message being delivered has nobody working on it.
    """
    token = delivery or uuid.uuid4().hex
    waiting = Q(status=IngestionJob.Status.QUEUED)
    if delivery:
        waiting |= Q(status=IngestionJob.Status.RUNNING, task_id=delivery)
    now = timezone.now()
    IngestionJob.objects.filter(waiting, pk__in=job_ids).exclude(
        document__status=Document.Status.REMOVED
    ).update(
        status=IngestionJob.Status.RUNNING,
        started_at=now,
        heartbeat_at=now,
        finished_at=None,
        worker=identity.worker_name(),
        task_id=token,
        attempts=F("attempts") + 1,
        run=F("run") + 1,
        chunks_done=0,
        error="",
    )
    held = IngestionJob.objects.select_related("document__corpus").filter(
        pk__in=job_ids, status=IngestionJob.Status.RUNNING, task_id=token
    )
    return sorted(held, key=lambda job: job_ids.index(job.pk))


def job_skip(*, job: IngestionJob, started: float) -> None:
    skipped = IngestionJob.objects.filter(
        pk=job.pk, status=IngestionJob.Status.RUNNING, run=job.run
    ).update(
        status=IngestionJob.Status.SKIPPED,
        finished_at=timezone.now(),
        prepare_seconds=round(time.monotonic() - started, 3),
    )
    if skipped:
        _count(IngestionJob.objects.filter(pk=job.pk), "skipped")  # metrics
    Document.objects.filter(pk=job.document_id).update(status=Document.Status.INDEXED, error="")


def jobs_supersede(*, document: Document) -> None:
    # Their steps check the job's status before each write, so they stop where they are.
    superseded = IngestionJob.objects.filter(document=document, status__in=ACTIVE).update(
        status=IngestionJob.Status.FAILED,
        error="Superseded: a newer version of the document was added.",
        finished_at=timezone.now(),
    )
    if superseded:
        metrics.ingestion_job(corpus=_slug(document.corpus_id), outcome="failed", count=superseded)


def job_create_failed(*, document: Document, message: str) -> IngestionJob:
    now = timezone.now()
    Document.objects.filter(pk=document.pk).update(status=Document.Status.FAILED, error=message)
    document.refresh_from_db()
    metrics.ingestion_job(corpus=document.corpus.slug, outcome="failed")
    return IngestionJob.objects.create(
        document=document,
        status=IngestionJob.Status.FAILED,
        error=message,
        started_at=now,
        finished_at=now,
    )


def jobs_record_progress(*, runs: dict[int, int], rows: list[Chunk], embed_seconds: float) -> int:
    """Count each job's embedded chunks from its rows; returns how many jobs are current."""
    share = {job_id: 0 for job_id in runs}
    for r in rows:
        share[r.job_id] += 1
    embedded = (
        Chunk.objects.filter(job=OuterRef("pk"), indexed=True)
        .values("job")
        .annotate(n=Count("pk"))
        .values("n")
    )
    current = IngestionJob.objects.filter(runs_q(runs.items()), status=IngestionJob.Status.RUNNING)
    return current.update(
        chunks_done=Coalesce(Subquery(embedded), 0),
        embed_seconds=F("embed_seconds")
        + Case(
            *(
                When(pk=job_id, then=Value(round(embed_seconds * n / len(rows), 4)))
                for job_id, n in share.items()
            ),
            default=Value(0.0),
            output_field=FloatField(),
        ),
        heartbeat_at=timezone.now(),
    )


def jobs_finish_complete(*, corpus_id: int, runs: list[tuple[int, int]]) -> None:
    """Jobs whose every chunk is embedded are done, and their documents indexed."""
    complete_q = Q(
        runs_q(runs), status=IngestionJob.Status.RUNNING, chunks_done__gte=F("chunks_total")
    )
    documents = list(IngestionJob.objects.filter(complete_q).values_list("document_id", flat=True))
    if not documents:
        return
    earlier = IngestionJob.objects.filter(
        document=OuterRef("document"), chunks_total__gt=0
    ).exclude(pk=OuterRef("pk"))
    now = timezone.now()
    with transaction.atomic():
        # Documents first, then jobs: the order every writer locks them in. Under the
        # lock, a job superseded meanwhile is no longer running and is left out.
        list(
            Document.objects.select_for_update()
            .filter(pk__in=documents)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        complete = list(
            IngestionJob.objects.filter(complete_q).annotate(has_history=Exists(earlier))
        )
        if not complete:
            return
        IngestionJob.objects.filter(pk__in=[j.pk for j in complete]).update(
            status=IngestionJob.Status.DONE, finished_at=now, heartbeat_at=now
        )
        Document.objects.filter(pk__in=[j.document_id for j in complete]).update(
            status=Document.Status.INDEXED,
            indexed_hash=F("content_hash"),
            chunk_count=Case(
                *(When(pk=j.document_id, then=Value(j.chunks_done)) for j in complete),
                output_field=PositiveIntegerField(),
            ),
            error="",
        )
    _count_done(corpus_id, complete)  # metrics
    for job in complete:
        if job.run == 1 and not job.has_history:
            continue
        # A batch of an earlier, longer version that passed its run check before this
        # version started leaves chunks past the end: none may outlive the version now
        # indexed. Unless a newer version started meanwhile: these indexes are its own.
        try:
            with vectors_writing(corpus_id):
                if _newest(job):
                    vectorstore.delete_document(
                        corpus_id, job.document_id, from_chunk=job.chunks_done
                    )
        except vectorstore.VectorStoreError:
            logger.warning("job %s: could not sweep chunks past %s", job.pk, job.chunks_done)
    if not IngestionJob.objects.filter(document__corpus_id=corpus_id, status__in=ACTIVE).exists():
        # The corpus' last job is done: what it wrote is searched through the indexes
        # from now on (once per bulk load, not once per batch).
        try:
            vectorstore.flush(corpus_id)
        except vectorstore.VectorStoreError:
            logger.warning("corpus %s: could not flush its collection", corpus_id)


def vectors_writing(corpus_id: int):
    """Held by every write of a corpus' vectors together with its check that the version it
    writes for is still current (a Redis lock, never a row lock: no row stays locked while
    Milvus answers).

    Vector ids are `<document>:<chunk>` whatever the version, so two versions of a document
    would otherwise cross: a batch of version 1 checks that its run is current, version 2
    is added, prepared and embedded, then version 1's upsert lands over version 2's vectors.
    Under the lock, whatever starts after a check writes after the write it guards.
    """
    return locks.held(f"vectors:{corpus_id}")


def _slug(corpus_id: int) -> str:
    return Corpus.objects.filter(pk=corpus_id).values_list("slug", flat=True).first() or ""


def _count_done(corpus_id: int, complete: list[IngestionJob]) -> None:
    if not metrics.ENABLED:
        return
    slug = _slug(corpus_id)
    metrics.ingestion_job(corpus=slug, outcome="done", count=len(complete))
    metrics.ingestion_documents(corpus=slug, count=len(complete))
    metrics.ingestion_chunks(corpus=slug, count=sum(job.chunks_done for job in complete))


def _count(jobs, outcome: str) -> None:
    if metrics.ENABLED:
        for slug in jobs.values_list("document__corpus__slug", flat=True):
            metrics.ingestion_job(corpus=slug, outcome=outcome)


def _newest(job: IngestionJob) -> bool:
    """The job is done with this run and no newer job of its document exists."""
    done = IngestionJob.objects.filter(pk=job.pk, run=job.run, status=IngestionJob.Status.DONE)
    newer = IngestionJob.objects.filter(document_id=job.document_id, pk__gt=job.pk)
    return done.exists() and not newer.exists()


def runs_q(runs) -> Q:
    """Jobs by (id, run): a job started again since has another run and does not match."""
    matched = Q(pk__in=[])
    for job_id, run in runs:
        matched |= Q(pk=job_id, run=run)
    return matched


def _stalled_before() -> datetime:
    return timezone.now() - timedelta(seconds=settings.RMASSIMO_JOB_STALL_AFTER)


def retryable_jobs() -> Q:
    """Failed jobs, and active ones with no sign of life for RMASSIMO_JOB_STALL_AFTER."""
    stalled = _stalled_before()
    return Q(status=IngestionJob.Status.FAILED) | Q(
        Q(heartbeat_at__lt=stalled) | Q(heartbeat_at__isnull=True, created_at__lt=stalled),
        status__in=ACTIVE,
    )
