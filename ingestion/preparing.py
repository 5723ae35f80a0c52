"""The prepare pipeline (CPU worker): fetch URL documents, parse and chunk, replace the
documents' chunk rows and vectors, then queue the first embedding batch of each corpus.

Up to RMASSIMO_PREPARE_GROUP jobs are prepared by one task, so that small documents share
embedding batches and their rows are written in one transaction.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import PurePath

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import transaction
from django.db.models import Case, FloatField, PositiveIntegerField, Value, When
from django.utils import timezone

from core import vectorstore
from ingestion import embedding, fetching, jobs, parsing
from ingestion.models import Chunk, Document, IngestionJob

logger = logging.getLogger(__name__)


@dataclass
class _Prepared:
    job: IngestionJob
    parsed: parsing.Parsed
    pieces: list[parsing.ChunkText]
    seconds: float


def jobs_prepare(*, job_ids: list[int], delivery: str = "") -> None:
    """Fetch, parse and chunk documents, then queue the first embedding batch of each corpus.

    Documents are prepared together so that their chunks share embedding batches (a folder
    of small files fills the batches a GPU embeds) and their rows are written in one
    transaction. `delivery` is the broker's message id: the same id again means the worker
    that held the message died, and its jobs start over.
    """
    claimed = jobs.jobs_claim(job_ids=job_ids, delivery=delivery)
    if len(claimed) < len(job_ids):
        logger.info("ingestion jobs %s: %d not waiting for this message", job_ids, len(job_ids))
    max_attempts = settings.RMASSIMO_JOB_MAX_ATTEMPTS
    ready: list[_Prepared] = []
    for job in claimed:
        if job.attempts > max_attempts:
            jobs.job_fail(
                job_id=job.pk,
                run=job.run,
                message=(
                    f"Gave up after {max_attempts} attempts (RMASSIMO_JOB_MAX_ATTEMPTS): the "
                    "worker stopped each time while preparing this document. Check the "
                    "worker's log; the file may be too large or crash the parser."
                ),
            )
            continue
        prepared = _read_and_chunk(job)
        if prepared is not None:
            ready.append(prepared)
    if not ready:
        return
    try:
        stored = _store_chunks(ready)
    except Exception:
        # Anything unforeseen fails these jobs with a reason rather than leaving them
        # running with nobody working on them.
        logger.exception("ingestion jobs %s failed while storing chunks", job_ids)
        for prepared in ready:
            jobs.job_fail(job_id=prepared.job.pk, run=prepared.job.run, message=jobs.INTERNAL_ERROR)
        return
    plans: dict[int, list[tuple[int, int, int]]] = {}
    for prepared in stored:
        job = prepared.job
        plans.setdefault(job.document.corpus_id, []).append((job.pk, job.run, len(prepared.pieces)))
    for plan in plans.values():
        embedding.queue_batches(plan, first_only=True)


def _read_and_chunk(job: IngestionJob) -> _Prepared | None:
    """The document's text in chunks; None when the job failed or found nothing new."""
    started = time.monotonic()
    document = job.document
    try:
        data, content_type = _document_bytes(document)
        if document.is_url:
            digest = hashlib.sha256(data).hexdigest()
            if document.status != Document.Status.REMOVED and digest == document.indexed_hash:
                jobs.job_skip(job=job, started=started)
                return None
            _store_fetched(document, data, digest)
        parsed = parsing.parse(data, name=document.source, content_type=content_type)
        pieces = parsing.chunk(parsed.pages)
        if not pieces:
            raise parsing.ParseError("The file has no text to index.")
    except parsing.ParseError as exc:
        jobs.job_fail(job_id=job.pk, run=job.run, message=str(exc))
        return None
    except OSError as exc:
        jobs.job_fail(
            job_id=job.pk, run=job.run, message=f"The stored file could not be read: {exc}"
        )
        return None
    except SoftTimeLimitExceeded:
        jobs.job_fail(job_id=job.pk, run=job.run, message=jobs.TOO_LONG)
        return None
    except Exception:
        logger.exception("ingestion job %s failed while preparing", job.pk)
        jobs.job_fail(job_id=job.pk, run=job.run, message=jobs.INTERNAL_ERROR)
        return None
    return _Prepared(job=job, parsed=parsed, pieces=pieces, seconds=time.monotonic() - started)


def _store_chunks(ready: list[_Prepared]) -> list[_Prepared]:
    """Replace the chunk rows (and any vectors) of the prepared documents; the ones stored."""
    failed: list[tuple[_Prepared, str]] = []
    # Milvus first, outside the transaction, so no row lock is held while it answers.
    # Delete-then-insert per document: no chunk of an older version survives (a batch of
    # an older run checks its run under the corpus' lock, and this delete waits for it).
    history = _documents_with_history([p.job for p in ready])
    cleared = []
    for prepared in ready:
        job = prepared.job
        if job.run > 1 or job.document_id in history:
            try:
                with jobs.vectors_writing(job.document.corpus_id):
                    # Superseded meanwhile: the vectors are a newer version's now.
                    if not _still_running(job):
                        continue
                    vectorstore.delete_document(job.document.corpus_id, job.document_id)
            except vectorstore.VectorStoreError as exc:
                failed.append((prepared, str(exc)))
                continue
        cleared.append(prepared)
    stored: list[_Prepared] = []
    with transaction.atomic():
        # The documents' locks order this against a newer job, a removal or a delete;
        # taken in id order, so two groups never wait on each other in a circle.
        alive = set(
            Document.objects.select_for_update()
            .filter(pk__in=[p.job.document_id for p in cleared])
            .exclude(status=Document.Status.REMOVED)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        current = set(
            IngestionJob.objects.filter(
                jobs.runs_q((p.job.pk, p.job.run) for p in cleared),
                status=IngestionJob.Status.RUNNING,
            ).values_list("pk", flat=True)
        )
        stored = [p for p in cleared if p.job.document_id in alive and p.job.pk in current]
        Chunk.objects.filter(
            document_id__in=[
                p.job.document_id
                for p in stored
                if p.job.run > 1 or p.job.document_id in history
            ]
        ).delete()
        Chunk.objects.bulk_create(
            [
                Chunk(
                    document_id=p.job.document_id,
                    job=p.job,
                    index=i,
                    text=piece.text,
                    page=piece.page,
                    start=piece.start,
                    end=piece.end,
                )
                for p in stored
                for i, piece in enumerate(p.pieces)
            ],
            batch_size=1000,
        )
        if stored:
            _update_stored(stored)
    for prepared, reason in failed:
        jobs.job_fail(job_id=prepared.job.pk, run=prepared.job.run, message=reason)
    return stored


def _still_running(job: IngestionJob) -> bool:
    return IngestionJob.objects.filter(
        pk=job.pk, run=job.run, status=IngestionJob.Status.RUNNING
    ).exists()


def _update_stored(stored: list[_Prepared]) -> None:
    by_job = {p.job.pk: p for p in stored}
    IngestionJob.objects.filter(pk__in=by_job).update(
        chunks_total=Case(
            *(
                When(pk=pk, then=Value(len(p.pieces), output_field=PositiveIntegerField()))
                for pk, p in by_job.items()
            ),
            output_field=PositiveIntegerField(),
        ),
        prepare_seconds=Case(
            *(
                When(pk=pk, then=Value(round(p.seconds, 3), output_field=FloatField()))
                for pk, p in by_job.items()
            ),
            output_field=FloatField(),
        ),
        chunks_done=0,
        heartbeat_at=timezone.now(),
    )
    # One update per kind of document (a few), not one per document.
    kinds: dict[tuple[int | None, str], list[int]] = {}
    for p in stored:
        kinds.setdefault((p.parsed.page_count, p.parsed.mime_type), []).append(p.job.document_id)
    for (page_count, mime_type), documents in kinds.items():
        Document.objects.filter(pk__in=documents).update(
            status=Document.Status.INDEXING, page_count=page_count, mime_type=mime_type
        )
    for p in stored:
        document = p.job.document
        if (
            document.is_url
            and p.parsed.title
            and document.title == fetching.url_title(document.source)
        ):
            Document.objects.filter(pk=document.pk).update(title=p.parsed.title[:300])


def _documents_with_history(held: list[IngestionJob]) -> set[int]:
    """Documents that may have vectors from an earlier job (one that stored chunks).

    Vectors are written only by batches, and batches are queued only after chunk rows are
    stored (chunks_total > 0). A document without such a job, on its job's first run, has
    nothing to delete or sweep: deleting by filter is the slowest call Milvus Lite has
    (tens of ms), and skipping it for new documents is most of a bulk load.
    """
    return set(
        IngestionJob.objects.filter(
            document_id__in=[j.document_id for j in held], chunks_total__gt=0
        )
        .exclude(pk__in=[j.pk for j in held])
        .values_list("document_id", flat=True)
    )


def _document_bytes(document: Document) -> tuple[bytes, str]:
    if document.is_url:
        fetched = fetching.fetch(document.source)
        return fetched.data, fetched.content_type
    if not document.file:
        raise parsing.ParseError("The document has no stored file; add the file again.")
    parsing.check_size(document.file.size)
    with document.file.open("rb") as handle:
        return handle.read(), ""


def _store_fetched(document: Document, data: bytes, digest: str) -> None:
    if document.content_hash == digest and document.file:
        return
    name = PurePath(document.source.split("?", 1)[0].rstrip("/")).name or "index"
    old = document.file.name if document.file else ""
    storage = document.file.storage
    document.file.save(name[:100], ContentFile(data), save=False)
    new = document.file.name
    try:
        # Not in a transaction: the update is committed when it returns.
        saved = Document.objects.filter(pk=document.pk).update(
            file=new, content_hash=digest, size=len(data)
        )
    except BaseException:
        storage.delete(new)
        raise
    if not saved:
        # The document was deleted meanwhile: no row names the new file.
        storage.delete(new)
        return
    document.content_hash = digest
    # Only now that no row names it any more.
    if old and old != new:
        storage.delete(old)
