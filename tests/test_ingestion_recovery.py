"""Ingestion jobs survive their worker dying: redelivered messages resume the job, nothing is
inserted twice, and a document that kills its worker every time is given up on with a reason.
URL documents that time out fail clearly.

These tests run on a worker of their own (short fetch timeout), alone on the queues, and kill
its pool process the way the OOM killer would.
"""

from __future__ import annotations

import pytest

from core import vectorstore
from ingestion import services
from ingestion.models import Chunk, Document, IngestionJob
from tests.ingestion_helpers import (
    LocalSite,
    Route,
    kill_pool_child,
    long_text,
    private_worker,
    wait_job,
    wait_new_child,
)
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

FETCH_TIMEOUT = 2
PAGE = b"<html><head><title>Lava</title><script>var hidden = 1;</script></head><body>" + (
    b"<p>Lava flows from Etna reach the sea near Catania.</p>"
)


@pytest.fixture(scope="module")
def own_worker(worker, ollama, var_dir):
    with private_worker(
        "recovery@tests",
        ollama_url=ollama.url,
        log_dir=var_dir / "logs",
        env={"RMASSIMO_FETCH_TIMEOUT": str(FETCH_TIMEOUT), "RMASSIMO_JOB_MAX_ATTEMPTS": "3"},
    ) as proc:
        yield proc


@pytest.fixture
def corpus(own_worker, stub, transactional_db):
    corpus, _ = services.corpus_get_or_create(slug="recovery")
    return corpus


def test_url_that_times_out_fails_its_job_and_nothing_else(corpus):
    with LocalSite() as site:
        site.routes["/slow"] = Route(body=PAGE, content_type="text/html", delay=FETCH_TIMEOUT + 5)
        site.routes["/ok"] = Route(body=PAGE, content_type="text/html")
        slow = services.document_add_url(corpus=corpus, url=f"{site.url}/slow").job
        ok = services.document_add_url(corpus=corpus, url=f"{site.url}/ok").job
        slow, ok = wait_job(slow.pk), wait_job(ok.pk)
    assert slow.status == "failed"
    assert "could not be fetched" in slow.error and "/slow" in slow.error
    assert Document.objects.get(pk=slow.document_id).status == "failed"
    assert ok.status == "done", ok.error
    page = Document.objects.get(pk=ok.document_id)
    assert page.title == "Lava"  # the page's own <title>
    assert page.mime_type == "text/html"
    assert vectorstore.count(corpus.pk, document_id=page.pk) == page.chunk_count > 0
    assert vectorstore.count(corpus.pk, document_id=slow.document_id) == 0


def test_prepare_resumes_after_its_worker_died(corpus, own_worker):
    with LocalSite() as site:
        # The first fetch hangs until the worker is killed; the redelivered one is answered.
        site.routes["/etna"] = Route(body=PAGE, content_type="text/html", delays=[60])
        job = services.document_add_url(corpus=corpus, url=f"{site.url}/etna").job
        wait_for(lambda: site.count("/etna") == 1, timeout=30, what="the first fetch")
        killed = kill_pool_child(own_worker)
        wait_new_child(own_worker, killed)
        job = wait_job(job.pk)
        assert site.count("/etna") == 2
    assert job.status == "done", job.error
    assert job.attempts == 2
    document = Document.objects.get(pk=job.document_id)
    assert document.status == "indexed"
    assert vectorstore.count(corpus.pk, document_id=document.pk) == document.chunk_count > 0


def test_batch_redelivered_after_worker_death_inserts_nothing_twice(corpus, own_worker, stub):
    text = long_text("glacier", 1800)  # three embedding batches
    stub.configure(embed_latency=1.0)
    job = services.document_add(corpus=corpus, source="glacier.txt", data=text.encode()).job
    wait_for(
        lambda: (
            IngestionJob.objects.get(pk=job.pk).chunks_done > 0
            and len([c for c in stub.calls if c["path"] == "/api/embed"]) >= 2
        ),
        timeout=60,
        what="the second embedding batch to start",
    )
    killed = kill_pool_child(own_worker)
    stub.configure(embed_latency=0.0)
    wait_new_child(own_worker, killed)
    job = wait_job(job.pk)
    assert job.status == "done", job.error
    assert job.chunks_total > 32
    assert job.chunks_done == job.chunks_total
    assert job.attempts == 1  # the batch was redelivered, the job was not started over
    assert Chunk.objects.filter(document=job.document_id).count() == job.chunks_total
    assert vectorstore.count(corpus.pk, document_id=job.document_id) == job.chunks_total


def test_a_document_that_kills_its_worker_every_time_is_given_up(corpus, own_worker):
    with LocalSite() as site:
        site.routes["/poison"] = Route(body=PAGE, content_type="text/html", delay=60)
        job = services.document_add_url(corpus=corpus, url=f"{site.url}/poison").job
        for attempt in (1, 2, 3):
            wait_for(lambda n=attempt: site.count("/poison") == n, timeout=30, what="a fetch")
            killed = kill_pool_child(own_worker)
            wait_new_child(own_worker, killed)
        job = wait_job(job.pk)
        assert site.count("/poison") == 3  # the fourth delivery did not start the work again
    assert job.status == "failed"
    assert "Gave up after 3 attempts" in job.error
    assert Document.objects.get(pk=job.document_id).status == "failed"
