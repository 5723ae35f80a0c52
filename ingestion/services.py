"""Writes for corpora and documents, and the steps of an ingestion job.

A job: `job_prepare` (CPU worker) parses and chunks the document, replaces its chunk rows
and its vectors, then queues the first embedding batch; `job_embed_batch` (GPU workers)
embeds and upserts one batch. The first batch fixes the collection's shape and fans out
the rest, so no two workers race to create a collection. Progress is counted from the
chunk rows, so a redelivered batch changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
from dataclasses import dataclass
from pathlib import PurePath

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from core import llm, vectorstore
from ingestion import parsing
from ingestion.models import Chunk, Corpus, Document, IngestionJob
from workers import identity

logger = logging.getLogger(__name__)


def corpus_get_or_create(*, slug: str, name: str = "", language: str = "") -> tuple[Corpus, bool]:
    defaults = {"name": name or slug.replace("-", " ").title()}
    if language:
        defaults["language"] = language
    return Corpus.objects.get_or_create(slug=slug, defaults=defaults)


@dataclass(frozen=True)
class Added:
    document: Document
    job: IngestionJob | None  # None when the same bytes are already indexed

    @property
    def skipped(self) -> bool:
        return self.job is None


def document_add(*, corpus: Corpus, source: str, data: bytes, title: str = "") -> Added:
    """Store a document's bytes and queue its ingestion, unless they are already indexed."""
    if len(data) > settings.RMASSIMO_UPLOAD_MAX_BYTES:
        raise parsing.ParseError(
            f"The file is {len(data)} bytes, over the limit of "
            f"{settings.RMASSIMO_UPLOAD_MAX_BYTES} bytes (RMASSIMO_UPLOAD_MAX_BYTES)."
        )
    digest = hashlib.sha256(data).hexdigest()
    name = PurePath(source).name or "document"
    with transaction.atomic():
        document, _ = Document.objects.select_for_update().get_or_create(
            corpus=corpus, source=source, defaults={"title": title or PurePath(name).stem}
        )
        if document.status == Document.Status.INDEXED and document.indexed_hash == digest:
            return Added(document=document, job=None)
        if document.content_hash != digest or not document.file:
            if document.file:
                document.file.delete(save=False)
            document.file.save(name, ContentFile(data), save=False)
        document.content_hash = digest
        document.size = len(data)
        document.mime_type = mimetypes.guess_type(name)[0] or ""
        document.title = title or document.title
        document.status = Document.Status.PENDING
        document.error = ""
        document.save()
        job = job_create(document=document)
    return Added(document=document, job=job)


def job_create(*, document: Document) -> IngestionJob:
    from ingestion.tasks import prepare_job

    job = IngestionJob.objects.create(document=document)
    transaction.on_commit(lambda: prepare_job.apply_async(args=[job.pk]))
    return job


def job_fail(*, job_id: int, message: str) -> None:
    with transaction.atomic():
        changed = IngestionJob.objects.filter(
            pk=job_id, status__in=[IngestionJob.Status.QUEUED, IngestionJob.Status.RUNNING]
        ).update(status=IngestionJob.Status.FAILED, error=message, finished_at=timezone.now())
        if changed:
            Document.objects.filter(jobs__pk=job_id).update(
                status=Document.Status.FAILED, error=message
            )


def job_prepare(*, job_id: int) -> None:
    claimed = IngestionJob.objects.filter(pk=job_id, status=IngestionJob.Status.QUEUED).update(
        status=IngestionJob.Status.RUNNING,
        started_at=timezone.now(),
        worker=identity.worker_name(),
        attempts=F("attempts") + 1,
    )
    if not claimed:
        return
    job = IngestionJob.objects.select_related("document__corpus").get(pk=job_id)
    document = job.document
    try:
        with document.file.open("rb") as handle:
            data = handle.read()
        pages = parsing.parse(data, name=document.source)
        pieces = parsing.chunk(pages)
        if not pieces:
            raise parsing.ParseError("The file has no text to index.")
    except parsing.ParseError as exc:
        job_fail(job_id=job_id, message=str(exc))
        return
    except OSError as exc:
        job_fail(job_id=job_id, message=f"The stored file could not be read: {exc}")
        return

    try:
        # Delete-then-insert per document: no chunk of an older version survives.
        vectorstore.delete_document(document.corpus_id, document.pk)
    except vectorstore.VectorStoreError as exc:
        job_fail(job_id=job_id, message=str(exc))
        return
    with transaction.atomic():
        Chunk.objects.filter(document=document).delete()
        Chunk.objects.bulk_create(
            Chunk(
                document=document,
                job=job,
                index=i,
                text=p.text,
                page=p.page,
                start=p.start,
                end=p.end,
            )
            for i, p in enumerate(pieces)
        )
        IngestionJob.objects.filter(pk=job_id).update(chunks_total=len(pieces), chunks_done=0)
        Document.objects.filter(pk=document.pk).update(
            status=Document.Status.INDEXING,
            page_count=max((p.number or 0 for p in pages), default=0) or None,
        )
        transaction.on_commit(lambda: _queue_batches(job_id, len(pieces), first_only=True))


def _queue_batches(job_id: int, total: int, *, first_only: bool) -> None:
    from ingestion.tasks import embed_batch

    size = settings.RMASSIMO_EMBED_BATCH
    starts = range(0, total, size)
    if first_only:
        embed_batch.apply_async(args=[job_id, 0, min(size, total)])
        return
    for start in starts[1:]:
        embed_batch.apply_async(args=[job_id, start, min(start + size, total)])


def job_embed_batch(*, job_id: int, start: int, end: int) -> None:
    job = (
        IngestionJob.objects.select_related("document__corpus")
        .filter(pk=job_id, status=IngestionJob.Status.RUNNING)
        .first()
    )
    if job is None:
        return  # finished, failed or superseded: a late or repeated batch does nothing
    document = job.document
    corpus = document.corpus
    rows = list(Chunk.objects.filter(job=job, index__gte=start, index__lt=end).order_by("index"))
    if not rows:
        return
    chunks = [
        vectorstore.Chunk(
            document_id=document.pk,
            index=r.index,
            text=r.text,
            title=document.title,
            page=r.page,
            start=r.start,
            end=r.end,
        )
        for r in rows
    ]
    model = corpus.effective_embed_model
    try:
        embeddings = None
        if model:
            embeddings = llm.embed_texts(
                [c.text for c in chunks], model=model, base_url=identity.ollama_url()
            )
        vectorstore.upsert_chunks(corpus.pk, chunks, embeddings)
    except (llm.LLMError, vectorstore.VectorStoreError) as exc:
        job_fail(job_id=job_id, message=str(exc))
        return
    if embeddings and corpus.embed_dim != len(embeddings[0]):
        Corpus.objects.filter(pk=corpus.pk).update(embed_dim=len(embeddings[0]))

    Chunk.objects.filter(pk__in=[r.pk for r in rows]).update(indexed=True)
    done = Chunk.objects.filter(job=job, indexed=True).count()
    IngestionJob.objects.filter(pk=job_id, status=IngestionJob.Status.RUNNING).update(
        chunks_done=done
    )
    if start == 0 and job.chunks_total > end:
        _queue_batches(job_id, job.chunks_total, first_only=False)
    if done >= job.chunks_total:
        _job_finish(job, done)


def _job_finish(job: IngestionJob, done: int) -> None:
    with transaction.atomic():
        finished = IngestionJob.objects.filter(
            pk=job.pk, status=IngestionJob.Status.RUNNING
        ).update(status=IngestionJob.Status.DONE, finished_at=timezone.now(), chunks_done=done)
        if finished:
            Document.objects.filter(pk=job.document_id).update(
                status=Document.Status.INDEXED,
                indexed_hash=F("content_hash"),
                chunk_count=done,
                error="",
            )


def document_remove_from_index(*, document: Document) -> None:
    vectorstore.delete_document(document.corpus_id, document.pk)
    Chunk.objects.filter(document=document).delete()
    Document.objects.filter(pk=document.pk).update(
        status=Document.Status.REMOVED, indexed_hash="", chunk_count=0
    )


def document_delete(*, document: Document) -> None:
    vectorstore.delete_document(document.corpus_id, document.pk)
    if document.file:
        document.file.delete(save=False)
    document.delete()
