"""Reads for corpora, documents and ingestion jobs."""

from django.db.models import Count, Q, QuerySet

from ingestion.models import Corpus, Document, IngestionJob


def corpora() -> QuerySet[Corpus]:
    return Corpus.objects.annotate(
        document_count=Count("documents", filter=Q(documents__status=Document.Status.INDEXED))
    )


def corpus_by_slug(slug: str) -> Corpus | None:
    return Corpus.objects.filter(slug=slug).first()


def jobs() -> QuerySet[IngestionJob]:
    return IngestionJob.objects.select_related("document__corpus")
