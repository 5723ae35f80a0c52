"""What the pages say about the workers is true: the model that answers in each, counters
of the current run, a way there from the admin's index, in English and Italian."""

from __future__ import annotations

import time

import pytest
from django.test import Client, override_settings

from core import llm
from ingestion.models import Corpus
from tests import processes
from workers import health

pytestmark = pytest.mark.django_db(transaction=True)

NAME = "labels@tests"


def entry() -> dict | None:
    return next((w for w in health.workers() if w["name"] == NAME), None)


def test_a_restarted_worker_counts_from_zero_and_names_its_model(var_dir, milvus, monkeypatch):
    # What an earlier run of the same worker left in Redis (kept there for a day).
    earlier = time.time() - 3600
    with monkeypatch.context() as as_worker:
        as_worker.setenv("RMASSIMO_WORKER_NAME", NAME)
        as_worker.setenv("RMASSIMO_WORKER_GPU", "gpu9")
        health.beat(queues=["gpu.9"])
        health.client().hset(
            f"rmassimo:worker:{NAME}", mapping={"jobs_done": 41, "started_at": earlier}
        )
    assert entry()["jobs_done"] == 41

    worker_started = time.time()
    worker = processes.Worker(
        name=NAME,
        queues=["gpu.9"],
        gpu="gpu9",
        ollama_url="http://127.0.0.1:9",  # no Ollama: the embedded model answers
        log_dir=var_dir / "logs",
        extra_env={"RMASSIMO_LLM_BACKEND": "embedded", "CUDA_VISIBLE_DEVICES": ""},
    )
    try:
        processes.wait_for(
            lambda: entry()["last_seen"] > worker_started, what="the worker's own heartbeat"
        )
        now = entry()
    finally:
        worker.stop()
    assert now["jobs_done"] == 0
    assert now["started_at"] > earlier + 3000
    assert now["llm"] == "SmolLM2-135M-Instruct.Q4_1.gguf (embedded, llama.cpp)"


def test_the_workers_page_is_linked_from_the_admin_and_speaks_italian(admin_user):
    page = Client()
    page.force_login(admin_user)
    index = page.get("/admin/").content.decode()
    assert 'href="/admin/workers/"' in index
    italian = page.get("/admin/workers/", HTTP_ACCEPT_LANGUAGE="it").content.decode()
    assert "Risponde con" in italian and "Answers with" not in italian


def test_the_banner_speaks_the_pages_language_and_the_corpus_names_its_model(admin_user):
    Corpus.objects.create(slug="demo", name="Demo")
    llm.forget_backend()
    try:
        with override_settings(RMASSIMO_LLM_BACKEND="embedded"):
            page = Client()
            page.force_login(admin_user)
            english = page.get("/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
            italian = page.get("/", HTTP_ACCEPT_LANGUAGE="it").content.decode()
            corpora = page.get("/api/v1/corpora/").json()
            corpus_page = page.get("/admin/ingestion/corpus/").content.decode()
    finally:
        llm.forget_backend()
    assert corpora[0]["chat_model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "SmolLM2-135M-Instruct" in corpus_page and "llama3.1:8b" not in corpus_page
    assert "answers come from the small embedded model" in english
    assert "le risposte vengono dal piccolo modello integrato" in italian
    assert "answers come from" not in italian
