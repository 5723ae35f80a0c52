"""The embed pipeline (GPU workers): embed and upsert one batch of RMASSIMO_EMBED_BATCH
chunks, which may span several small documents of a corpus.

The first batch of a plan fixes the collection's shape and fans out the rest, so the
batches of one plan do not all try to create the collection (two plans of one corpus may:
`vectorstore.store` serialises creation). Progress is counted from the chunk rows, so a
redelivered batch changes nothing.
"""

from __future__ import annotations

import logging
import time

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db.models import Q

from core import llm, vectorstore
from ingestion import jobs, selectors
from ingestion.models import Chunk, Corpus, Document, IngestionJob
from workers import identity

logger = logging.getLogger(__name__)

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


def queue_batches(plan: list[tuple[int, int, int]], *, first_only: bool) -> None:
    """The first batch of a plan goes alone: it may create the corpus' collection, and the
    others would only wait for that; it queues them once done."""
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
    held = {
        job.pk: job
        for job in IngestionJob.objects.select_related("document__corpus").filter(
            pk__in={r[0] for r in ranges}, status=IngestionJob.Status.RUNNING
        )
    }
    live = [
        (job_id, run, start, end)
        for job_id, run, start, end in ranges
        if job_id in held and run == held[job_id].run
    ]
    if live:
        try:
            _embed(held, live)
        except Exception:
            # Anything unforeseen fails these jobs with a reason rather than leaving them
            # running with nobody working on them.
            logger.exception("embedding batch %s failed", live)
            for job_id, run, _, _ in live:
                jobs.job_fail(job_id=job_id, run=run, message=jobs.INTERNAL_ERROR)
    if plan:
        # Later batches wait for the first, which made sure the collection exists.
        queue_batches([tuple(p) for p in plan], first_only=False)


def _embed(held: dict[int, IngestionJob], live: list[Range]) -> None:
    selected = Q()
    for job_id, _, start, end in live:
        selected |= Q(job_id=job_id, index__gte=start, index__lt=end)
    rows = list(Chunk.objects.filter(selected).order_by("job_id", "index"))
    if not rows:
        return
    corpus = held[live[0][0]].document.corpus
    runs = {job_id: run for job_id, run, _, _ in live}
    chunks = [
        vectorstore.Chunk(
            document_id=r.document_id,
            index=r.index,
            text=r.text,
            title=held[r.job_id].document.title,
            page=r.page,
            start=r.start,
            end=r.end,
        )
        for r in rows
    ]
    model = selectors.embed_model(corpus)
    embed_seconds = 0.0
    try:
        embeddings = None
        if model:
            embed_started = time.monotonic()
            embeddings = llm.embed_texts(
                [c.text for c in chunks], model=model, base_url=identity.ollama_url()
            )
            embed_seconds = time.monotonic() - embed_started
        with jobs.vectors_writing(corpus.pk):
            # Embedding takes a while: a newer version of a document may have started
            # meanwhile, and its vectors share these ids. The check and the upsert are one
            # step under the corpus' lock, which every newer version's writes (its prepare
            # step's delete, its batches) wait for: a version that starts after the check
            # writes after this upsert, and a check made after it started skips its rows.
            current = set(
                IngestionJob.objects.filter(
                    jobs.runs_q(runs.items()), status=IngestionJob.Status.RUNNING
                ).values_list("pk", flat=True)
            )
            if current != set(runs):
                keep = [i for i, r in enumerate(rows) if r.job_id in current]
                rows = [rows[i] for i in keep]
                chunks = [chunks[i] for i in keep]
                embeddings = [embeddings[i] for i in keep] if embeddings else embeddings
                runs = {job_id: run for job_id, run in runs.items() if job_id in current}
                if not rows:
                    return
            vectorstore.upsert_chunks(corpus.pk, chunks, embeddings)
    except (llm.LLMError, vectorstore.VectorStoreError) as exc:
        for job_id, run in runs.items():
            jobs.job_fail(job_id=job_id, run=run, message=str(exc))
        return
    except SoftTimeLimitExceeded:
        for job_id, run in runs.items():
            jobs.job_fail(job_id=job_id, run=run, message=jobs.TOO_LONG)
        return
    if embeddings and corpus.embed_dim != len(embeddings[0]):
        Corpus.objects.filter(pk=corpus.pk).update(embed_dim=len(embeddings[0]))

    Chunk.objects.filter(pk__in=[r.pk for r in rows]).update(indexed=True)
    if jobs.jobs_record_progress(runs=runs, rows=rows, embed_seconds=embed_seconds) < len(runs):
        # A job stopped meanwhile: vectors written for a document deleted or removed
        # meanwhile go too (its own deletes wait for this batch's upsert and catch it; this
        # is for one whose delete failed).
        documents = {r.document_id for r in rows}
        with jobs.vectors_writing(corpus.pk):
            kept = set(
                Document.objects.filter(pk__in=documents)
                .exclude(status=Document.Status.REMOVED)
                .values_list("pk", flat=True)
            )
            for document_id in documents - kept:
                vectorstore.delete_document(corpus.pk, document_id)
    jobs.jobs_finish_complete(corpus_id=corpus.pk, runs=list(runs.items()))
