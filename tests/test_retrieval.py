"""Retrieval: dense + BM25 fused by RRF when the corpus has an embedding model, BM25 alone when
it has none (Corpus.embed_model 'none' or RMASSIMO_EMBED_MODEL empty), and answers whose
sources name the page of a PDF with a snippet of it."""

from __future__ import annotations

import pytest
from django.conf import settings

from core import llm, vectorstore
from ingestion import services
from ingestion.models import Corpus, Document
from tests.corpus import DOCS, build_corpus
from tests.ingestion_helpers import make_pdf, private_worker, wait_job
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def ask(client, corpus: Corpus, text: str) -> dict:
    response = client.post("/api/v1/questions/", {"text": text, "corpus": corpus.slug})
    assert response.status_code == 202, response.content
    question = response.json()["id"]

    def final():
        data = client.get(f"/api/v1/questions/{question}/").json()
        return data if data["status"] in ("done", "failed", "cancelled") else None

    result = wait_for(final, timeout=30, what=f"question {question}")
    assert result["status"] == "done", result["error"]
    return result


def embed_calls(stub) -> list[dict]:
    return [c for c in stub.calls if c["path"] == "/api/embed"]


def test_hybrid_fuses_dense_and_bm25_results(live):
    corpus = build_corpus(
        "hybrid",
        {
            "lexical.txt": "Zanzibar cloves and nutmeg fill the spice market stalls.",
            "semantic.txt": "Granite cliffs rise above the quiet northern fjord water.",
            "filler.txt": "Bicycles crowd the canal bridges of the old town.",
        },
    )
    assert vectorstore.has_dense(corpus.pk)
    lexical = Document.objects.get(source="lexical.txt").pk
    semantic = Document.objects.get(source="semantic.txt").pk
    # The words point at one document, the vector at another: each side alone finds only
    # its own, the fusion of both ranks both on top.
    vector = llm.embed_query(
        "granite cliffs fjord water northern",
        model=settings.RMASSIMO_EMBED_MODEL,
        base_url=live.url,
    )
    query = dict(text="Zanzibar cloves nutmeg", embedding=vector, top_k=2)
    bm25 = vectorstore.search(corpus.pk, mode="bm25", **query)
    dense = vectorstore.search(corpus.pk, mode="dense", **query)
    hybrid = vectorstore.search(corpus.pk, **query)
    assert [h.document_id for h in bm25] == [lexical]  # BM25 matches words only
    assert dense[0].document_id == semantic
    assert {h.document_id for h in hybrid} == {lexical, semantic}
    assert vectorstore.HYBRID_RANKER == "RRFRanker" and vectorstore.HYBRID_RANKER_PARAMS == {
        "k": 60
    }


def test_questions_on_a_hybrid_corpus_embed_the_question(live, api):
    corpus = build_corpus("dense")
    assert api.owner.get("/api/v1/corpora/").json()[0]["retrieval"] == "hybrid"
    live.reset_calls()
    result = ask(api.owner, corpus, "When did Vesuvius bury Pompeii?")
    assert result["sources"][0]["title"] == "volcanoes"
    assert len(embed_calls(live)) == 1  # the question, for the dense side


def test_corpus_without_embedding_model_uses_bm25_alone(live, api):
    corpus = build_corpus("lexical", embed_model="none")
    assert all(d.status == "indexed" for d in Document.objects.filter(corpus=corpus))
    assert not vectorstore.has_dense(corpus.pk)
    assert vectorstore.count(corpus.pk) == len(DOCS)
    assert api.owner.get("/api/v1/corpora/").json()[0]["retrieval"] == "bm25"
    result = ask(api.owner, corpus, "Which defence answers e4 with c5?")
    assert result["sources"][0]["title"] == "chess"
    assert "Sicilian" in result["sources"][0]["text"]
    assert not embed_calls(live)  # neither while indexing nor for the question
    assert Corpus.objects.get(pk=corpus.pk).embed_dim is None


def test_empty_embed_model_setting_means_bm25_alone(worker, ollama, stub, var_dir, api):
    with private_worker(
        "bm25@tests",
        ollama_url=ollama.url,
        log_dir=var_dir / "logs",
        env={"RMASSIMO_EMBED_MODEL": ""},
    ):
        corpus = build_corpus("nomodel")
        assert not vectorstore.has_dense(corpus.pk)
        assert vectorstore.count(corpus.pk) == len(DOCS)
        result = ask(api.owner, corpus, "How is a sourdough starter fed?")
    assert result["sources"][0]["title"] == "bakery"
    assert not embed_calls(stub)


def test_answer_about_a_pdf_cites_the_right_page(live, api):
    corpus, _ = services.corpus_get_or_create(slug="atlas")
    pdf = make_pdf(
        [
            "The Po valley is the largest plain of Italy, farmed for rice and maize.",
            "Mount Etna in Sicily is the most active volcano in Europe; its lava reaches "
            "the villages on its slopes every few years.",
            "The Dolomites are limestone peaks in the eastern Alps, loved by climbers.",
        ]
    )
    job = services.document_add(corpus=corpus, source="atlas.pdf", data=pdf, title="Atlas").job
    assert wait_job(job.pk).status == "done"
    result = ask(api.owner, corpus, "Which volcano in Sicily is the most active?")
    source = result["sources"][0]
    assert source["title"] == "Atlas" and source["page"] == 2
    assert "Mount Etna" in source["text"]
    assert source["document"] == job.document_id
    pages = {s["page"] for s in result["sources"]}
    assert pages <= {1, 2, 3}
