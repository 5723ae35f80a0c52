"""Writes for corpora and documents: adding, ingesting again, retrying, removing and
deleting, as the admin, the API and commands make them.

A new job is queued for the prepare pipeline (ingestion.preparing) once its transaction
commits; the embed pipeline (ingestion.embedding) follows; job states change only through
ingestion.jobs.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePath

from django.conf import settings
from django.core.files.base import ContentFile, File
from django.core.files.storage import Storage
from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from core import metrics, vectorstore
from ingestion import fetching, parsing, selectors
from ingestion.jobs import (
    ACTIVE,
    job_create_failed,
    jobs_supersede,
    retryable_jobs,
    vectors_writing,
)
from ingestion.models import Chunk, Corpus, Document, IngestionJob

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


def document_add(
    *, corpus: Corpus, source: str, data: bytes = b"", title: str = "", upload: File | None = None
) -> Added:
    """Store a document's bytes (or an `upload`, streamed) and queue its ingestion, unless
    they are already indexed.

    Bad input never raises here: it ends as a failed job with the reason, like anything
    the worker finds wrong later, so every caller reports failures the same way.
    """
    with _storing() as files:
        item = NewDocument(source=source, data=data, title=title, upload=upload)
        added, created = _add(corpus, item, files)
        if created:
            _queue_prepare([added.job.pk])
    return added


@dataclass
class _Files:
    """The files a transaction stores and replaces."""

    saved: list[tuple[Storage, str]] = field(default_factory=list)

    def store(self, document: Document, name: str, content: File) -> None:
        """Save the document's file under `name`; the one it had goes once this commits."""
        old, storage = (document.file.name if document.file else ""), document.file.storage
        document.file.save(name, content, save=False)
        self.saved.append((storage, document.file.name))
        if old:
            # A rollback brings back the row that names it: it must still be there.
            transaction.on_commit(lambda: storage.delete(old))


@contextmanager
def _storing() -> Iterator[_Files]:
    """A transaction that stores document files: kept if it commits, deleted again if it
    rolls back, so no file is left that no row names.

    Durable: it must be the outermost transaction, or a rollback of an enclosing one would
    happen after this block and leave the files behind.
    """
    files = _Files()
    committed = False

    def commit() -> None:
        nonlocal committed
        committed = True

    try:
        with transaction.atomic(durable=True):
            # First of the commit's callbacks: one that fails after it (queueing the jobs)
            # comes after the commit, and the rows that name the files are there.
            transaction.on_commit(commit)
            yield files
    except BaseException:
        if committed:
            raise
        for storage, name in files.saved:
            try:
                storage.delete(name)
            except OSError:
                logger.warning("could not delete %s after a rollback", name)
        raise


@dataclass(frozen=True)
class NewDocument:
    source: str
    data: bytes = b""
    title: str = ""
    # Instead of `data`: an uploaded file (on disk past a few MB). It is hashed and copied
    # to storage a chunk at a time, never read whole into memory.
    upload: File | None = None

    @property
    def size(self) -> int:
        return self.upload.size if self.upload is not None else len(self.data)

    def digest(self) -> str:
        if self.upload is None:
            return hashlib.sha256(self.data).hexdigest()
        digest = hashlib.sha256()
        for piece in self.upload.chunks():
            digest.update(piece)
        return digest.hexdigest()

    def content(self) -> File:
        return self.upload if self.upload is not None else ContentFile(self.data)


def documents_add(*, corpus: Corpus, documents: list[NewDocument]) -> list[Added]:
    """Add many documents in one transaction, as `document_add` does one.

    New documents are inserted in bulk, and their jobs are prepared in groups of
    RMASSIMO_PREPARE_GROUP, so that small documents share embedding batches.
    """
    latest = {d.source: d for d in documents}  # a source given twice: its last bytes
    results: dict[str, Added] = {}
    queued: list[int] = []
    with _storing() as files:
        known = set(
            Document.objects.filter(corpus=corpus, source__in=list(latest)).values_list(
                "source", flat=True
            )
        )
        fresh: list[Document] = []
        for item in latest.values():
            if item.source in known or item.size > settings.RMASSIMO_UPLOAD_MAX_BYTES:
                added, created = _add(corpus, item, files)
                results[item.source] = added
                if created:
                    queued.append(added.job.pk)
                continue
            name = PurePath(item.source).name or "document"
            document = Document(
                corpus=corpus,
                source=item.source,
                title=item.title or PurePath(name).stem,
                content_hash=item.digest(),
                size=item.size,
            )
            files.store(document, name, item.content())
            fresh.append(document)
        Document.objects.bulk_create(fresh, batch_size=500)
        now = timezone.now()
        jobs = IngestionJob.objects.bulk_create(
            [IngestionJob(document=d, heartbeat_at=now) for d in fresh], batch_size=500
        )
        for document, job in zip(fresh, jobs, strict=True):
            results[document.source] = Added(document=document, job=job)
            queued.append(job.pk)
        _queue_prepare(queued)
    return [results[d.source] for d in documents]


def _add(corpus: Corpus, item: NewDocument, files: _Files) -> tuple[Added, bool]:
    """The document's new state; True when a new job was created (to be queued)."""
    source, title = item.source, item.title
    digest = item.digest()
    name = PurePath(source).name or "document"
    document, _ = Document.objects.select_for_update().get_or_create(
        corpus=corpus, source=source, defaults={"title": title or PurePath(name).stem}
    )
    if document.status == Document.Status.INDEXED and document.indexed_hash == digest:
        return Added(document=document, job=None), False
    active = selectors.active_job(document)
    if active is not None and document.content_hash == digest:
        return Added(document=document, job=active), False  # the same bytes are on their way
    try:
        parsing.check_size(item.size)
    except parsing.ParseError as exc:
        # The bytes are not kept; the document's earlier version, if any, stays indexed.
        failed = job_create_failed(document=document, message=str(exc))
        return Added(document=document, job=failed), False
    if document.content_hash != digest or not document.file:
        files.store(document, name, item.content())
    document.content_hash = digest
    document.size = item.size
    document.title = title or document.title
    document.status = Document.Status.PENDING
    document.error = ""
    document.save()
    jobs_supersede(document=document)
    job = IngestionJob.objects.create(document=document, heartbeat_at=timezone.now())
    return Added(document=document, job=job), True


def _queue_prepare(job_ids: list[int]) -> None:
    """Queue preparing steps once the transaction commits, in groups of jobs."""
    from ingestion.tasks import prepare_jobs

    size = max(1, settings.RMASSIMO_PREPARE_GROUP)
    groups = [job_ids[i : i + size] for i in range(0, len(job_ids), size)]

    def send() -> None:
        for group in groups:
            prepare_jobs.apply_async(args=[group])

    if groups:
        transaction.on_commit(send)


def document_add_url(*, corpus: Corpus, url: str, title: str = "") -> Added:
    """Queue the ingestion of the document at `url`; the CPU worker fetches it.

    Whether the content changed is only known once fetched: an unchanged page ends its
    job as skipped, with no new vectors.
    """
    url = url.strip()
    with transaction.atomic():
        document, _ = Document.objects.select_for_update().get_or_create(
            corpus=corpus, source=url, defaults={"title": title or fetching.url_title(url)}
        )
        if title and document.title != title:
            document.title = title
            document.save(update_fields=["title", "updated_at"])
        try:
            fetching.check_url(url)
        except parsing.ParseError as exc:
            failed = job_create_failed(document=document, message=str(exc))
            return Added(document=document, job=failed)
        active = selectors.active_job(document)
        if active is not None:
            return Added(document=document, job=active)
        job = job_create(document=document)
    return Added(document=document, job=job)


def document_ingest(*, document: Document, force: bool = False) -> IngestionJob | None:
    """Queue a job for a document already added; None when it is indexed and not forced."""
    with transaction.atomic():
        document = Document.objects.select_for_update().get(pk=document.pk)
        if not force and document.status == Document.Status.INDEXED:
            return None
        active = selectors.active_job(document)
        if active is not None:
            return active
        if not document.file and not document.is_url:
            return job_create_failed(
                document=document, message="The document has no stored file; add the file again."
            )
        Document.objects.filter(pk=document.pk).update(
            status=Document.Status.PENDING,
            error="",
            indexed_hash="" if force else F("indexed_hash"),
        )
        return job_create(document=document)


def job_create(*, document: Document) -> IngestionJob:
    job = IngestionJob.objects.create(document=document, heartbeat_at=timezone.now())
    _queue_prepare([job.pk])
    return job


def job_retry(*, job: IngestionJob) -> bool:
    """Queue a failed or stalled job again from the start; False when it is neither.

    The newest job of a document is the one retried: an older failed job whose document
    has been ingested since stays as the record it is.
    """
    with transaction.atomic():
        document = Document.objects.select_for_update().filter(pk=job.document_id).first()
        if document is None or document.status == Document.Status.REMOVED:
            return False
        newest = document.jobs.order_by("-created_at", "-pk").first()
        if newest is None or newest.pk != job.pk:
            return False
        if not document.file and not document.is_url:
            return False
        changed = IngestionJob.objects.filter(retryable_jobs(), pk=job.pk).update(
            status=IngestionJob.Status.QUEUED,
            attempts=0,
            error="",
            task_id="",
            worker="",
            chunks_done=0,
            finished_at=None,
            heartbeat_at=timezone.now(),
        )
        if not changed:
            return False
        Document.objects.filter(pk=document.pk).update(status=Document.Status.PENDING, error="")
        _queue_prepare([job.pk])
    return True


def jobs_retry(*, jobs: QuerySet[IngestionJob]) -> int:
    return sum(job_retry(job=job) for job in jobs.filter(retryable_jobs()))


def document_remove_from_index(*, document: Document) -> None:
    """Take a document out of retrieval; it stays listed and can be ingested again."""
    # Milvus first: if it is unreachable nothing has changed and the error says so.
    vectorstore.delete_document(document.corpus_id, document.pk)
    with transaction.atomic():
        Document.objects.select_for_update().filter(pk=document.pk).first()
        stopped = IngestionJob.objects.filter(document=document, status__in=ACTIVE).update(
            status=IngestionJob.Status.FAILED,
            error="Stopped: the document was removed from the index.",
            finished_at=timezone.now(),
        )
        if stopped:
            metrics.ingestion_job(corpus=document.corpus.slug, outcome="failed", count=stopped)
        Chunk.objects.filter(document=document).delete()
        Document.objects.filter(pk=document.pk).update(
            status=Document.Status.REMOVED, indexed_hash="", chunk_count=0, error=""
        )
    # Again, once committed: a batch that was embedding meanwhile may have written some.
    _delete_vectors_on_commit(document.corpus_id, document.pk, while_removed=True)


def _delete_vectors_on_commit(
    corpus_id: int, document_id: int, *, while_removed: bool = False
) -> None:
    """Delete a document's vectors once the transaction commits (an enclosing one's, if
    any: no row stays locked while Milvus answers), under the corpus' lock: after any
    batch that passed its run check before the commit. One that checks later finds its job
    stopped or gone and writes nothing."""

    def delete() -> None:
        with vectors_writing(corpus_id):
            removed = Document.objects.filter(pk=document_id, status=Document.Status.REMOVED)
            if while_removed and not removed.exists():
                return  # ingested again meanwhile: the vectors are the new version's
            vectorstore.delete_document(corpus_id, document_id)

    transaction.on_commit(delete, robust=True)


def document_delete(*, document: Document) -> None:
    """Delete a document, its file, its jobs and every vector it had."""
    corpus_id, document_id = document.corpus_id, document.pk
    vectorstore.delete_document(corpus_id, document_id)
    with transaction.atomic():
        locked = Document.objects.select_for_update().filter(pk=document_id).first()
        if locked is None:
            return
        name = locked.file.name if locked.file else ""
        storage = locked.file.storage
        locked.delete()
        if name:
            transaction.on_commit(lambda: storage.delete(name))
    # Again, once committed: a batch that was embedding meanwhile may have written some.
    _delete_vectors_on_commit(corpus_id, document_id)


def documents_delete(*, documents: QuerySet[Document]) -> int:
    count = 0
    for document in documents:
        document_delete(document=document)
        count += 1
    return count


def corpus_delete(*, corpus: Corpus) -> None:
    """Delete a corpus with its documents, their files and its whole collection."""
    corpus_id = corpus.pk
    with transaction.atomic():
        names = [
            name
            for name in Document.objects.filter(corpus=corpus).values_list("file", flat=True)
            if name
        ]
        storage = Document._meta.get_field("file").storage
        corpus.delete()  # a corpus with conversations is protected: nothing happens then
        transaction.on_commit(lambda: [storage.delete(name) for name in names])
        # Once committed, an enclosing transaction's commit included: no row stays locked
        # while Milvus answers, and a rollback keeps the vectors of the corpus it restores.
        transaction.on_commit(lambda: vectorstore.drop_corpus(corpus_id))
