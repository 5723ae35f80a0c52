"""Writes for corpora and documents, and the steps of an ingestion job.

A job: `jobs_prepare` (CPU worker, up to RMASSIMO_PREPARE_GROUP jobs a task) fetches URL
documents, parses and chunks, replaces the documents' chunk rows and vectors, then queues
the first embedding batch; `job_embed_batch` (GPU workers) embeds and upserts one batch of
RMASSIMO_EMBED_BATCH chunks, which may span several small documents. The first batch fixes
the collection's shape and fans out the rest, so no two workers race to create a
collection. Progress is counted from the chunk rows, so a redelivered batch changes nothing.

Recovery. Messages are acknowledged late, so the broker hands a job's message to another
worker when the one holding it dies. `jobs_prepare` claims a job that is queued, or one that
is running under the very message being delivered again (its `task_id`): the broker only
redelivers a message whose worker is gone, so the earlier attempt is dead and the job
resumes from the start. Each start counts in `attempts`; past RMASSIMO_JOB_MAX_ATTEMPTS the
job fails with a reason instead of looping on a document that kills its worker. A failed
job, or one that shows no sign of life for RMASSIMO_JOB_STALL_AFTER seconds, can be queued
again with `job_retry` (the admin's "retry" action). Every start bumps `run`; batches carry
it, so a batch left over from an earlier run does nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import PurePath

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.files.base import ContentFile
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
    QuerySet,
    Subquery,
    Value,
    When,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from core import llm, vectorstore
from ingestion import fetching, parsing
from ingestion.models import Chunk, Corpus, Document, IngestionJob
from workers import identity

logger = logging.getLogger(__name__)

ACTIVE = (IngestionJob.Status.QUEUED, IngestionJob.Status.RUNNING)
_INTERNAL = "An internal error stopped this job; the worker's log has the details."
_TOO_LONG = "A step of this job ran past the task time limit and was stopped."


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
    """Store a document's bytes and queue its ingestion, unless they are already indexed.

    Bad input never raises here: it ends as a failed job with the reason, like anything
    the worker finds wrong later, so every caller reports failures the same way.
    """
    with transaction.atomic():
        added, created = _add(corpus, NewDocument(source=source, data=data, title=title))
        if created:
            _queue_prepare([added.job.pk])
    return added


@dataclass(frozen=True)
class NewDocument:
    source: str
    data: bytes
    title: str = ""


def documents_add(*, corpus: Corpus, documents: list[NewDocument]) -> list[Added]:
    """Add many documents in one transaction, as `document_add` does one.

    New documents are inserted in bulk, and their jobs are prepared in groups of
    RMASSIMO_PREPARE_GROUP, so that small documents share embedding batches.
    """
    latest = {d.source: d for d in documents}  # a source given twice: its last bytes
    results: dict[str, Added] = {}
    queued: list[int] = []
    with transaction.atomic():
        known = set(
            Document.objects.filter(corpus=corpus, source__in=list(latest)).values_list(
                "source", flat=True
            )
        )
        fresh: list[Document] = []
        for item in latest.values():
            if item.source in known or len(item.data) > settings.RMASSIMO_UPLOAD_MAX_BYTES:
                added, created = _add(corpus, item)
                results[item.source] = added
                if created:
                    queued.append(added.job.pk)
                continue
            name = PurePath(item.source).name or "document"
            document = Document(
                corpus=corpus,
                source=item.source,
                title=item.title or PurePath(name).stem,
                content_hash=hashlib.sha256(item.data).hexdigest(),
                size=len(item.data),
            )
            document.file.save(name, ContentFile(item.data), save=False)
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


def _add(corpus: Corpus, item: NewDocument) -> tuple[Added, bool]:
    """The document's new state; True when a new job was created (to be queued)."""
    data, source, title = item.data, item.source, item.title
    digest = hashlib.sha256(data).hexdigest()
    name = PurePath(source).name or "document"
    document, _ = Document.objects.select_for_update().get_or_create(
        corpus=corpus, source=source, defaults={"title": title or PurePath(name).stem}
    )
    if document.status == Document.Status.INDEXED and document.indexed_hash == digest:
        return Added(document=document, job=None), False
    active = _active_job(document)
    if active is not None and document.content_hash == digest:
        return Added(document=document, job=active), False  # the same bytes are on their way
    try:
        parsing.check_size(len(data))
    except parsing.ParseError as exc:
        # The bytes are not kept; the document's earlier version, if any, stays indexed.
        return Added(document=document, job=_job_failed_at_once(document, str(exc))), False
    if document.content_hash != digest or not document.file:
        if document.file:
            document.file.delete(save=False)
        document.file.save(name, ContentFile(data), save=False)
    document.content_hash = digest
    document.size = len(data)
    document.title = title or document.title
    document.status = Document.Status.PENDING
    document.error = ""
    document.save()
    _supersede(document)
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
            corpus=corpus, source=url, defaults={"title": title or _url_title(url)}
        )
        if title and document.title != title:
            document.title = title
            document.save(update_fields=["title", "updated_at"])
        try:
            fetching.check_url(url)
        except parsing.ParseError as exc:
            return Added(document=document, job=_job_failed_at_once(document, str(exc)))
        active = _active_job(document)
        if active is not None:
            return Added(document=document, job=active)
        job = job_create(document=document)
    return Added(document=document, job=job)


def _url_title(url: str) -> str:
    path = PurePath(url.split("?", 1)[0].rstrip("/"))
    return path.stem if path.stem and "://" not in path.name else url[:300]


def document_ingest(*, document: Document, force: bool = False) -> IngestionJob | None:
    """Queue a job for a document already added; None when it is indexed and not forced."""
    with transaction.atomic():
        document = Document.objects.select_for_update().get(pk=document.pk)
        if not force and document.status == Document.Status.INDEXED:
            return None
        active = _active_job(document)
        if active is not None:
            return active
        if not document.file and not document.is_url:
            return _job_failed_at_once(
                document, "The document has no stored file; add the file again."
            )
        Document.objects.filter(pk=document.pk).update(
            status=Document.Status.PENDING,
            error="",
            indexed_hash="" if force else F("indexed_hash"),
        )
        return job_create(document=document)


def _supersede(document: Document) -> None:
    # Their steps check the job's status before each write, so they stop where they are.
    IngestionJob.objects.filter(document=document, status__in=ACTIVE).update(
        status=IngestionJob.Status.FAILED,
        error="Superseded: a newer version of the document was added.",
        finished_at=timezone.now(),
    )


def _active_job(document: Document) -> IngestionJob | None:
    return document.jobs.filter(status__in=ACTIVE).order_by("-created_at").first()


def job_create(*, document: Document) -> IngestionJob:
    job = IngestionJob.objects.create(document=document, heartbeat_at=timezone.now())
    _queue_prepare([job.pk])
    return job


def _job_failed_at_once(document: Document, message: str) -> IngestionJob:
    now = timezone.now()
    Document.objects.filter(pk=document.pk).update(status=Document.Status.FAILED, error=message)
    document.refresh_from_db()
    return IngestionJob.objects.create(
        document=document,
        status=IngestionJob.Status.FAILED,
        error=message,
        started_at=now,
        finished_at=now,
    )


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
    return bool(changed)


def _claim(job_ids: list[int], delivery: str) -> list[IngestionJob]:
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


def job_prepare(*, job_id: int, delivery: str = "") -> None:
    jobs_prepare(job_ids=[job_id], delivery=delivery)


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
    jobs = _claim(job_ids, delivery)
    if len(jobs) < len(job_ids):
        logger.info("ingestion jobs %s: %d not waiting for this message", job_ids, len(job_ids))
    max_attempts = settings.RMASSIMO_JOB_MAX_ATTEMPTS
    ready: list[_Prepared] = []
    for job in jobs:
        if job.attempts > max_attempts:
            job_fail(
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
            job_fail(job_id=prepared.job.pk, run=prepared.job.run, message=_INTERNAL)
        return
    plans: dict[int, list[tuple[int, int, int]]] = {}
    for prepared in stored:
        job = prepared.job
        plans.setdefault(job.document.corpus_id, []).append((job.pk, job.run, len(prepared.pieces)))
    for plan in plans.values():
        _queue_batches(plan, first_only=True)


def _read_and_chunk(job: IngestionJob) -> _Prepared | None:
    """The document's text in chunks; None when the job failed or found nothing new."""
    started = time.monotonic()
    document = job.document
    try:
        data, content_type = _document_bytes(document)
        if document.is_url:
            digest = hashlib.sha256(data).hexdigest()
            if document.status != Document.Status.REMOVED and digest == document.indexed_hash:
                _job_skip(job, started)
                return None
            _store_fetched(document, data, digest)
        parsed = parsing.parse(data, name=document.source, content_type=content_type)
        pieces = parsing.chunk(parsed.pages)
        if not pieces:
            raise parsing.ParseError("The file has no text to index.")
    except parsing.ParseError as exc:
        job_fail(job_id=job.pk, run=job.run, message=str(exc))
        return None
    except OSError as exc:
        job_fail(job_id=job.pk, run=job.run, message=f"The stored file could not be read: {exc}")
        return None
    except SoftTimeLimitExceeded:
        job_fail(job_id=job.pk, run=job.run, message=_TOO_LONG)
        return None
    except Exception:
        logger.exception("ingestion job %s failed while preparing", job.pk)
        job_fail(job_id=job.pk, run=job.run, message=_INTERNAL)
        return None
    return _Prepared(job=job, parsed=parsed, pieces=pieces, seconds=time.monotonic() - started)


def _store_chunks(ready: list[_Prepared]) -> list[_Prepared]:
    """Replace the chunk rows (and any vectors) of the prepared documents; the ones stored."""
    failed: list[tuple[_Prepared, str]] = []
    with transaction.atomic():
        # The documents' locks order this against a newer job, a removal or a delete;
        # taken in id order, so two groups never wait on each other in a circle.
        alive = set(
            Document.objects.select_for_update()
            .filter(pk__in=[p.job.document_id for p in ready])
            .exclude(status=Document.Status.REMOVED)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        current = set(
            IngestionJob.objects.filter(
                _runs_q((p.job.pk, p.job.run) for p in ready), status=IngestionJob.Status.RUNNING
            ).values_list("pk", flat=True)
        )
        ready = [p for p in ready if p.job.document_id in alive and p.job.pk in current]
        if not ready:
            return []
        history = _documents_with_history([p.job for p in ready])
        stored = []
        for prepared in ready:
            job = prepared.job
            if job.run == 1 and job.document_id not in history:
                stored.append(prepared)
                continue
            try:
                # Delete-then-insert per document: no chunk of an older version survives.
                vectorstore.delete_document(job.document.corpus_id, job.document_id)
            except vectorstore.VectorStoreError as exc:
                failed.append((prepared, str(exc)))
                continue
            Chunk.objects.filter(document_id=job.document_id).delete()
            stored.append(prepared)
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
        job_fail(job_id=prepared.job.pk, run=prepared.job.run, message=reason)
    return stored


def _update_stored(stored: list[_Prepared]) -> None:
    jobs = {p.job.pk: p for p in stored}
    IngestionJob.objects.filter(pk__in=jobs).update(
        chunks_total=Case(
            *(
                When(pk=pk, then=Value(len(p.pieces), output_field=PositiveIntegerField()))
                for pk, p in jobs.items()
            ),
            output_field=PositiveIntegerField(),
        ),
        prepare_seconds=Case(
            *(
                When(pk=pk, then=Value(round(p.seconds, 3), output_field=FloatField()))
                for pk, p in jobs.items()
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
        if document.is_url and p.parsed.title and document.title == _url_title(document.source):
            Document.objects.filter(pk=document.pk).update(title=p.parsed.title[:300])


def _runs_q(runs) -> Q:
    """Jobs by (id, run): a job started again since has another run and does not match."""
    matched = Q(pk__in=[])
    for job_id, run in runs:
        matched |= Q(pk=job_id, run=run)
    return matched


def _documents_with_history(jobs: list[IngestionJob]) -> set[int]:
    """Documents that may have vectors from an earlier job (one that stored chunks).

    Vectors are written only by batches, and batches are queued only after chunk rows are
    stored (chunks_total > 0). A document without such a job, on its job's first run, has
    nothing to delete or sweep: deleting by filter is the slowest call Milvus Lite has
    (tens of ms), and skipping it for new documents is most of a bulk load.
    """
    return set(
        IngestionJob.objects.filter(
            document_id__in=[j.document_id for j in jobs], chunks_total__gt=0
        )
        .exclude(pk__in=[j.pk for j in jobs])
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
    document.file.save(name[:100], ContentFile(data), save=False)
    Document.objects.filter(pk=document.pk).update(
        file=document.file.name, content_hash=digest, size=len(data)
    )
    document.content_hash = digest
    if old and old != document.file.name:
        document.file.storage.delete(old)


def _job_skip(job: IngestionJob, started: float) -> None:
    IngestionJob.objects.filter(pk=job.pk, status=IngestionJob.Status.RUNNING, run=job.run).update(
        status=IngestionJob.Status.SKIPPED,
        finished_at=timezone.now(),
        prepare_seconds=round(time.monotonic() - started, 3),
    )
    Document.objects.filter(pk=job.document_id).update(status=Document.Status.INDEXED, error="")


# An embedding batch is a list of ranges [job id, run, start, end): consecutive chunks of
# the jobs of one corpus, RMASSIMO_EMBED_BATCH of them, across documents.
Range = tuple[int, int, int, int]


def _batches(plan: list[tuple[int, int, int]]) -> list[list[Range]]:
    size = settings.RMASSIMO_EMBED_BATCH
    batches: list[list[Range]] = []
    current: list[Range] = []
    room = size
    for job_id, run, total in plan:
        start = 0
        while start < total:
            end = min(total, start + room)
            current.append((job_id, run, start, end))
            room -= end - start
            start = end
            if room == 0:
                batches.append(current)
                current, room = [], size
    if current:
        batches.append(current)
    return batches


def _queue_batches(plan: list[tuple[int, int, int]], *, first_only: bool) -> None:
    """The first batch of a plan goes alone: it may create the corpus' collection, which
    two workers must not race to do; it queues the others once done."""
    from ingestion.tasks import embed_batch

    batches = _batches(plan)
    if not batches:
        return
    if first_only:
        embed_batch.apply_async(
            kwargs={"ranges": [list(r) for r in batches[0]], "plan": [list(p) for p in plan]}
        )
        return
    for ranges in batches[1:]:
        embed_batch.apply_async(kwargs={"ranges": [list(r) for r in ranges]})


def job_embed_batch(*, ranges: list[Range], plan: list[tuple[int, int, int]] | None = None) -> None:
    """Embed and upsert one batch of chunks, which may span several documents of a corpus.

    Idempotent: vector ids are fixed and progress is counted from the chunk rows, so a
    redelivered batch changes nothing. A range whose job finished, failed or was started
    again (another run) is left alone.
    """
    jobs = {
        job.pk: job
        for job in IngestionJob.objects.select_related("document__corpus").filter(
            pk__in={r[0] for r in ranges}, status=IngestionJob.Status.RUNNING
        )
    }
    # A range without a run (a message from before runs existed) takes the current one.
    live = [
        (job_id, jobs[job_id].run, start, end)
        for job_id, run, start, end in ranges
        if job_id in jobs and run in (None, jobs[job_id].run)
    ]
    if live:
        try:
            _embed(jobs, live)
        except Exception:
            # Anything unforeseen fails these jobs with a reason rather than leaving them
            # running with nobody working on them.
            logger.exception("embedding batch %s failed", live)
            for job_id, run, _, _ in live:
                job_fail(job_id=job_id, run=run, message=_INTERNAL)
    if plan:
        # Later batches wait for the first, which made sure the collection exists.
        _queue_batches([tuple(p) for p in plan], first_only=False)


def _embed(jobs: dict[int, IngestionJob], live: list[Range]) -> None:
    selected = Q()
    for job_id, _, start, end in live:
        selected |= Q(job_id=job_id, index__gte=start, index__lt=end)
    rows = list(Chunk.objects.filter(selected).order_by("job_id", "index"))
    if not rows:
        return
    corpus = jobs[live[0][0]].document.corpus
    runs = {job_id: run for job_id, run, _, _ in live}
    chunks = [
        vectorstore.Chunk(
            document_id=r.document_id,
            index=r.index,
            text=r.text,
            title=jobs[r.job_id].document.title,
            page=r.page,
            start=r.start,
            end=r.end,
        )
        for r in rows
    ]
    model = corpus.effective_embed_model
    embed_seconds = 0.0
    try:
        embeddings = None
        if model:
            embed_started = time.monotonic()
            embeddings = llm.embed_texts(
                [c.text for c in chunks], model=model, base_url=identity.ollama_url()
            )
            embed_seconds = time.monotonic() - embed_started
        vectorstore.upsert_chunks(corpus.pk, chunks, embeddings)
    except (llm.LLMError, vectorstore.VectorStoreError) as exc:
        for job_id, run in runs.items():
            job_fail(job_id=job_id, run=run, message=str(exc))
        return
    except SoftTimeLimitExceeded:
        for job_id, run in runs.items():
            job_fail(job_id=job_id, run=run, message=_TOO_LONG)
        return
    if embeddings and corpus.embed_dim != len(embeddings[0]):
        Corpus.objects.filter(pk=corpus.pk).update(embed_dim=len(embeddings[0]))

    Chunk.objects.filter(pk__in=[r.pk for r in rows]).update(indexed=True)
    if _record_progress(runs, rows, embed_seconds) < len(runs):
        # A job stopped meanwhile: vectors written for a document deleted or removed
        # meanwhile go too.
        documents = {r.document_id for r in rows}
        kept = set(
            Document.objects.filter(pk__in=documents)
            .exclude(status=Document.Status.REMOVED)
            .values_list("pk", flat=True)
        )
        for document_id in documents - kept:
            vectorstore.delete_document(corpus.pk, document_id)
    _finish_complete(corpus.pk, list(runs.items()))


def _record_progress(runs: dict[int, int], rows: list[Chunk], embed_seconds: float) -> int:
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
    current = IngestionJob.objects.filter(_runs_q(runs.items()), status=IngestionJob.Status.RUNNING)
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


def _finish_complete(corpus_id: int, runs: list[tuple[int, int]]) -> None:
    """Jobs whose every chunk is embedded are done, and their documents indexed."""
    complete_q = Q(
        _runs_q(runs), status=IngestionJob.Status.RUNNING, chunks_done__gte=F("chunks_total")
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
    for job in complete:
        if job.run == 1 and not job.has_history:
            continue
        # A batch of an earlier, longer version that slipped past its run check would
        # leave chunks past the end: none may outlive the version now indexed.
        try:
            vectorstore.delete_document(corpus_id, job.document_id, from_chunk=job.chunks_done)
        except vectorstore.VectorStoreError:
            logger.warning("job %s: could not sweep chunks past %s", job.pk, job.chunks_done)
    if not IngestionJob.objects.filter(document__corpus_id=corpus_id, status__in=ACTIVE).exists():
        # The corpus' last job is done: what it wrote is searched through the indexes
        # from now on (once per bulk load, not once per batch).
        try:
            vectorstore.flush(corpus_id)
        except vectorstore.VectorStoreError:
            logger.warning("corpus %s: could not flush its collection", corpus_id)


def _stalled_before() -> datetime:
    return timezone.now() - timedelta(seconds=settings.RMASSIMO_JOB_STALL_AFTER)


def retryable_jobs() -> Q:
    """Failed jobs, and active ones with no sign of life for RMASSIMO_JOB_STALL_AFTER."""
    stalled = _stalled_before()
    return Q(status=IngestionJob.Status.FAILED) | Q(
        Q(heartbeat_at__lt=stalled) | Q(heartbeat_at__isnull=True, created_at__lt=stalled),
        status__in=ACTIVE,
    )


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
        IngestionJob.objects.filter(document=document, status__in=ACTIVE).update(
            status=IngestionJob.Status.FAILED,
            error="Stopped: the document was removed from the index.",
            finished_at=timezone.now(),
        )
        Chunk.objects.filter(document=document).delete()
        Document.objects.filter(pk=document.pk).update(
            status=Document.Status.REMOVED, indexed_hash="", chunk_count=0, error=""
        )
    # Again, after the commit: a batch that was embedding meanwhile may have written some.
    vectorstore.delete_document(document.corpus_id, document.pk)


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
    # A batch that was embedding meanwhile finds its job gone and cleans up after itself
    # from now on; this catches one that wrote just before the commit.
    vectorstore.delete_document(corpus_id, document_id)


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
    vectorstore.drop_corpus(corpus_id)
