"""One Celery worker per GPU or card group, each bound to its own Ollama; queues in
priority order."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from django.test import Client

from chat.models import Question
from ingestion.models import Chunk, Corpus, Document, IngestionJob
from tests.corpus import build_corpus
from tests.ollama_stub import OllamaStub
from tests.processes import ROOT, Worker, wait_for, worker_env
from tests.test_pipeline import ask, poll
from workers import health

pytestmark = pytest.mark.django_db(transaction=True)


HOST = socket.gethostname()
# run_workers below runs card 0 alone and cards 1 and 2 as one group, each with its stub
LABELS = ["gpu0", "gpu1+2"]


def stub_of(two_stubs, label):
    return two_stubs[LABELS.index(label)]


def environ(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def ours(entries: list[dict]) -> list[dict]:
    """The workers run_workers started here (not the suite's own gpu0@tests)."""
    return [w for w in entries if w["name"].endswith(f"@{HOST}")]


def online() -> list[dict]:
    return [w for w in ours(health.workers()) if w["online"]]


@pytest.fixture
def two_stubs(stub):
    stubs = [
        OllamaStub(
            name=f"gpu{i}",
            chat_models=stub.config["chat_models"],
            embed_models=stub.config["embed_models"],
            tps=200,
            parallel=1,
        ).start()
        for i in range(2)
    ]
    yield stubs
    for s in stubs:
        s.stop()


@pytest.fixture
def run_workers(own_workers, two_stubs, var_dir):
    log = (var_dir / "logs" / "run_workers.log").open("wb")
    env = worker_env(
        RMASSIMO_GPUS="0,1+2",
        OLLAMA_URLS=",".join(s.url for s in two_stubs),
        RMASSIMO_LOG_LEVEL="INFO",
        # Short leases and reaper period: a lost answer is recovered within seconds.
        RMASSIMO_LEASE_S="3",
        RMASSIMO_REAPER_S="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "run_workers", "--loglevel", "info"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.close()


def test_run_workers_one_worker_per_gpu_each_on_its_own_ollama(run_workers, two_stubs, api):
    workers = wait_for(
        lambda: (w := online()) and len(w) == 4 and w,
        timeout=180,
        what="two GPU workers, the CPU and the housekeeping worker online",
    )
    assert sorted(w["name"].split("@")[0] for w in workers) == [
        "cpu",
        "gpu0",
        "gpu1+2",
        "housekeeping",
    ]
    gpu = [w for w in workers if w["gpu"] != "cpu"]
    assert sorted(w["gpu"] for w in gpu) == LABELS
    for w in gpu:
        assert w["queues"] == sorted(["interactive", "batch", f"gpu.{w['gpu'][3:]}@{HOST}"])
        assert w["ollama_url"] == stub_of(two_stubs, w["gpu"]).url
    # The group's worker process, and so its pool, sees both of its cards.
    group = next(w for w in gpu if w["gpu"] == "gpu1+2")
    assert environ(group["pid"])["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert environ(next(w for w in gpu if w["gpu"] == "gpu0")["pid"])["CUDA_VISIBLE_DEVICES"] == "0"
    listed = ours(api.staff.get("/api/v1/workers/").json())
    assert sorted(w["gpu"] for w in listed) == LABELS
    assert all(w["online"] and w["healthy"] for w in listed)
    assert {q["name"] for q in listed[0]["queues"]} >= {"interactive", "batch"}
    assert all(w["ollama_url"] == "" for w in api.owner.get("/api/v1/workers/").json())
    assert api.anon.get("/api/v1/workers/").status_code == 401
    page = Client()
    page.force_login(api.staff_user)
    html = page.get("/admin/workers/").content.decode()
    assert "gpu0@" in html and "gpu1+2@" in html and "online" in html
    page.force_login(api.owner_user)
    assert page.get("/admin/workers/").status_code == 302  # to the admin login

    corpus = build_corpus()
    for s in two_stubs:
        s.configure(tps=20, reply_tokens=30)
    ids = [
        ask(api.owner, text=f"Vesuvius question {i}", corpus=corpus.slug)["id"] for i in range(6)
    ]
    results = [poll(api.owner, i, timeout=60) for i in ids]
    assert all(r["status"] == "done" for r in results), [r["error"] for r in results]
    # Both workers served answers, and each question reached only its own worker's Ollama.
    assert {r["gpu"] for r in results} == set(LABELS)
    for r in results:
        mine = stub_of(two_stubs, r["gpu"])
        other = two_stubs[1 - two_stubs.index(mine)]
        asked = [
            c
            for c in mine.calls
            if c["path"] == "/api/chat" and r["text"] in c["body"]["messages"][-1]["content"]
        ]
        assert len(asked) == 1
        assert not [
            c
            for c in other.calls
            if c["path"] == "/api/chat" and r["text"] in c["body"]["messages"][-1]["content"]
        ]
        # The question's embedding went to the same card's Ollama as its answer.
        embedded = [
            c for c in mine.calls if c["path"] == "/api/embed" and r["text"] in str(c["body"])
        ]
        assert len(embedded) == 1
        assert not [
            c for c in other.calls if c["path"] == "/api/embed" and r["text"] in str(c["body"])
        ]

    listed = ours(api.staff.get("/api/v1/workers/").json())
    assert sum(w["jobs_done"] for w in listed) >= 6
    assert any(w["tokens_per_s"] > 0 for w in listed)


def test_run_workers_restarts_a_dead_worker_and_shuts_down_warmly(run_workers, two_stubs, api):
    wait_for(
        lambda: len(online()) == 4,
        timeout=180,
        what="workers online",
    )
    corpus = build_corpus()
    for s in two_stubs:
        s.configure(tps=20, reply_tokens=40)
    # The worker answering a question dies with it, pool and all: nothing acknowledges or
    # releases it, and only the reaper, which run_workers schedules itself, gives it back.
    lost = ask(api.owner, text="Vesuvius in the dark", corpus=corpus.slug)
    taken = wait_for(
        lambda: (q := Question.objects.get(pk=lost["id"])).status == "running" and q,
        timeout=30,
        what="the answer to start",
    )
    victim = next(w for w in online() if w["gpu"] == taken.gpu)
    pool = subprocess.run(
        ["pgrep", "-P", str(victim["pid"])], capture_output=True, text=True
    ).stdout.split()
    for pid in [victim["pid"], *pool]:
        os.kill(int(pid), signal.SIGKILL)
    wait_for(
        lambda: any(
            w["gpu"] == taken.gpu and w["online"] and int(w["pid"]) != int(victim["pid"])
            for w in online()
        ),
        timeout=90,
        what=f"{taken.gpu} restarted",
    )
    recovered = poll(api.owner, lost["id"], timeout=60)
    assert recovered["status"] == "done", recovered["error"]
    assert recovered["attempts"] == 2
    assert len(recovered["answer"].split()) == 41  # one whole answer
    # A long answer in flight when SIGTERM arrives is finished, not lost.
    question = ask(api.owner, text="Vesuvius slowly", corpus=corpus.slug)
    wait_for(
        lambda: Question.objects.get(pk=question["id"]).status == "running",
        timeout=30,
        what="the answer to start",
    )
    run_workers.send_signal(signal.SIGTERM)
    assert run_workers.wait(60) == 0
    final = Question.objects.get(pk=question["id"])
    assert final.status == "done"
    assert len(final.answer.split()) == 41  # "Echo:" and 40 tokens
    assert not online()


def test_question_waits_for_at_most_one_embedding_batch(own_workers, stub, var_dir, api):
    """1,000 embedding batches are queued; a question still starts after the one in flight."""
    corpus = Corpus.objects.create(slug="backlog", name="Backlog")
    document = Document.objects.create(corpus=corpus, title="big", source="big.txt")
    job = IngestionJob.objects.create(document=document, status="running", chunks_total=1000)
    Chunk.objects.bulk_create(
        Chunk(document=document, job=job, index=i, text=f"chunk number {i}") for i in range(1000)
    )
    # Each batch waits a second in its embed call: long enough that a question posted while
    # one is in that call is queued before the batch ends, even on a loaded machine.
    stub.configure(embed_latency=1.0)
    from ingestion.tasks import embed_batch

    for i in range(1000):
        embed_batch.apply_async(kwargs={"ranges": [[job.pk, job.run, i, i + 1]]})
    worker = Worker(
        name="prio@tests",
        queues=["interactive", "batch", "gpu.0"],
        ollama_url=stub.url,
        log_dir=var_dir / "logs",
    )

    def embed_calls() -> list[float]:
        return [c["time"] for c in stub.calls if c["path"] == "/api/embed"]

    try:
        wait_for(
            lambda: Chunk.objects.filter(job=job, indexed=True).count() >= 5,
            timeout=60,
            what="the backlog to be under way",
        )
        jumped = 0
        for n in range(10):
            # Post while a batch is in flight, just after its embed call began (the stand-in
            # records a call when it arrives): that batch is the one the question waits for.
            seen = len(embed_calls())
            wait_for(
                lambda seen=seen: len(embed_calls()) > seen, timeout=30, what="a batch in flight"
            )
            question = ask(api.owner, text=f"anything {n}", corpus=corpus.slug)
            result = poll(api.owner, question["id"], timeout=30)
            assert result["status"] == "done"
            row = Question.objects.get(pk=question["id"])
            posted, started = row.created_at.timestamp(), row.started_at.timestamp()
            # Batches whose embed call began after the question was queued and before it
            # was taken jumped it: with the queues polled in priority order there are none;
            # a worker that polls `batch` first (RMASSIMO_QUEUE_ORDER=sorted) serves the
            # whole backlog before the question.
            jumped += len([t for t in embed_calls() if posted <= t <= started])
        # One is allowed for a post slower than the second a batch takes.
        assert jumped <= 1, jumped
        remaining = 1000 - Chunk.objects.filter(job=job, indexed=True).count()
        assert remaining > 500  # the backlog was still there: the question jumped it
    finally:
        worker.stop()
        from workers.celery import app

        app.control.purge()
