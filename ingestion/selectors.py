"""Reads for corpora, documents and ingestion jobs."""

from django.db.models import Count, OuterRef, Q, QuerySet, Subquery

from core import llm, vectorstore
from ingestion.models import Corpus, Document, IngestionJob


def corpora() -> QuerySet[Corpus]:
    return Corpus.objects.annotate(
        document_count=Count("documents", filter=Q(documents__status=Document.Status.INDEXED))
    )


def corpus_retrieval(corpus: Corpus) -> str:
    """"hybrid" or "bm25": how the corpus' questions are really searched.

    An embedding model is not enough: a collection first built without one stays BM25 only
    when its documents are ingested again (see docs/corpus.md).
    """
    if not embed_model(corpus):
        return "bm25"
    try:
        return "bm25" if vectorstore.bm25_only(corpus.pk) else "hybrid"
    except vectorstore.VectorStoreError:
        return "hybrid"  # the vector store cannot say now; the setting can


def corpus_by_slug(slug: str) -> Corpus | None:
    return Corpus.objects.filter(slug=slug).first()


def embed_model(corpus: Corpus) -> str:
    """The embedding model the corpus' vectors come from, or "" when retrieval is BM25
    alone: always so with the embedded backend, which runs without Ollama."""
    if llm.backend().embedded:
        return ""
    return corpus.configured_embed_model


def documents(*, corpus: Corpus | None = None) -> QuerySet[Document]:
    """Documents with their newest job's id and status (`last_job_id`, `last_job_status`)."""
    newest = IngestionJob.objects.filter(document=OuterRef("pk")).order_by("-created_at", "-pk")
    rows = Document.objects.select_related("corpus").annotate(
        last_job_id=Subquery(newest.values("pk")[:1]),
        last_job_status=Subquery(newest.values("status")[:1]),
    )
    if corpus is not None:
        rows = rows.filter(corpus=corpus)
    return rows


def jobs() -> QuerySet[IngestionJob]:
    return IngestionJob.objects.select_related("document__corpus")


def active_job(document: Document) -> IngestionJob | None:
    """The document's queued or running job, if any."""
    return (
        document.jobs.filter(
            status__in=(IngestionJob.Status.QUEUED, IngestionJob.Status.RUNNING)
        )
        .order_by("-created_at")
        .first()
    )


def job_embed_model(job_id: int) -> str:
    """The embedding model an ingestion job's chunks are embedded with ("" for none)."""
    job = IngestionJob.objects.select_related("document__corpus").filter(pk=job_id).first()
    return job.document.corpus.configured_embed_model if job else ""
