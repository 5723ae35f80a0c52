"""Reads for corpora, documents and ingestion jobs."""

from django.db.models import Count, OuterRef, Q, QuerySet, Subquery

from ingestion.models import Corpus, Document, IngestionJob


def corpora() -> QuerySet[Corpus]:
    return Corpus.objects.annotate(
        document_count=Count("documents", filter=Q(documents__status=Document.Status.INDEXED))
    )


def corpus_by_slug(slug: str) -> Corpus | None:
    return Corpus.objects.filter(slug=slug).first()


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
