"""A corpus' retrieval mode, as the API reports it, is how its questions are searched."""

from __future__ import annotations

from ingestion import services
from ingestion.models import Document
from tests.corpus import ingest
from tests.ingestion_helpers import wait_job


def test_a_bm25_only_corpus_ingested_again_with_an_embedding_model_stays_bm25(live, api):
    corpus, _ = services.corpus_get_or_create(slug="keywords-first")
    corpus.embed_model = "none"
    corpus.save()
    ingest(corpus, {"notes.txt": "Vesuvius buried Pompeii under ash in 79 AD."})

    def mode() -> str:
        rows = api.owner.get("/api/v1/corpora/").json()
        rows = rows["results"] if isinstance(rows, dict) else rows
        return next(row["retrieval"] for row in rows if row["slug"] == "keywords-first")

    assert mode() == "bm25"
    # Given an embedding model and ingested again, its index keeps the shape it was built
    # with (no dense field), so its questions are still searched by BM25 alone.
    corpus.embed_model = ""
    corpus.save()
    document = Document.objects.get(corpus=corpus)
    wait_job(services.document_ingest(document=document, force=True).pk)
    assert Document.objects.get(pk=document.pk).status == Document.Status.INDEXED
    assert mode() == "bm25"
