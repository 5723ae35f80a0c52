"""Nothing lost: each case ends with every accepted question in a final state, exactly one
answer per question, and the reason readable when it failed."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from chat.models import Question
from tests.processes import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

FINAL = ("done", "failed", "cancelled")


def final(stack, pk, timeout=60):
    return wait_for(
        lambda: (q := stack.question(pk))["status"] in FINAL and q,
        timeout=timeout,
        what=f"question {pk} to finish",
    )


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def online_gpus(stack) -> list[str]:
    return [
        w["gpu"]
        for w in stack.gpu_workers()
        if w["name"].endswith("@faults") and w["online"] and w["healthy"]
    ]


def echoed_tokens(answer: str) -> int:
    return len(answer.split()) - 1  # the stand-in's reply is "Echo:" and one word per token


def test_worker_killed_mid_answer_is_answered_once_by_another(fault_stack, corpus_dir):
    a = fault_stack.stub("gpu0", tps=20, reply_tokens=40)
    b = fault_stack.stub("gpu1", tps=20, reply_tokens=40)
    worker_a = fault_stack.worker("gpu0", stub=a)
    fault_stack.ingest(corpus_dir)
    pk = fault_stack.ask("What did Vesuvius bury?")
    wait_for(
        lambda: fault_stack.question(pk)["status"] == "running" and len(a.calls) > 0,
        timeout=30,
        what="gpu0 to start answering",
    )
    wait_for(
        lambda: len(fault_stack.question(pk)["answer"]) > 0, timeout=10, what="some text to stream"
    )
    os.killpg(worker_a.proc.pid, signal.SIGKILL)  # the whole worker, as a crashed host
    worker_a.proc.wait()
    fault_stack.worker("gpu1", stub=b)
    result = final(fault_stack, pk)
    assert result["status"] == "done", result["error"]
    assert result["gpu"] == "gpu1"
    assert echoed_tokens(result["answer"]) == 40  # one whole answer, not two glued
    assert result["attempts"] == 2
    assert Question.objects.count() == 1
    assert len([c for c in b.calls if c["path"] == "/api/chat"]) == 1


def test_job_that_kills_its_worker_every_time_fails_after_max_attempts(fault_stack, corpus_dir):
    a = fault_stack.stub("gpu0", tps=10, reply_tokens=200)
    worker = fault_stack.worker("gpu0", stub=a)
    fault_stack.ingest(corpus_dir)
    pk = fault_stack.ask("Tell me about Etna")
    killed = 0
    seen_attempts = set()

    def kill_each_attempt():
        nonlocal killed
        row = Question.objects.get(pk=pk)
        if row.status in FINAL:
            return True
        if row.status == "running" and row.attempts not in seen_attempts and a.calls:
            seen_attempts.add(row.attempts)
            for child in children(worker.proc.pid):
                os.kill(child, signal.SIGKILL)  # the pool process running the answer
                killed += 1
        return False

    wait_for(kill_each_attempt, timeout=90, interval=0.1, what="the question to end")
    result = fault_stack.question(pk)
    assert result["status"] == "failed"
    assert "Gave up after 3 attempts" in result["error"]
    assert "stopped unexpectedly" in result["error"]
    assert killed >= 3
    assert worker.proc.poll() is None  # the worker itself survived, and took nothing twice


def test_redis_restart_loses_no_queued_question(fault_stack, corpus_dir):
    a = fault_stack.stub("gpu0", tps=50, reply_tokens=10)
    fault_stack.worker("gpu0", stub=a)
    fault_stack.ingest(corpus_dir)
    # Stop consuming, queue questions, then lose every message with the broker.
    fault_stack.workers[-1].stop()
    ids = [fault_stack.ask(f"Vesuvius question {i}") for i in range(5)]
    fault_stack.redis.kill()
    fault_stack.redis.start()
    fault_stack.worker("gpu0", stub=a)
    results = [final(fault_stack, pk, timeout=90) for pk in ids]
    assert [r["status"] for r in results] == ["done"] * 5, [r["error"] for r in results]
    assert all(echoed_tokens(r["answer"]) == 10 for r in results)
    assert Question.objects.filter(status="done").count() == 5


def test_failing_ollama_retries_on_healthy_gpu_and_is_marked_unhealthy(fault_stack, corpus_dir):
    bad = fault_stack.stub("gpu0", tps=100, reply_tokens=10)
    good = fault_stack.stub("gpu1", tps=100, reply_tokens=10)
    fault_stack.worker("gpu0", stub=bad)
    fault_stack.worker("gpu1", stub=good)
    fault_stack.ingest(corpus_dir)
    bad.configure(fail_status=503, fail_message="server busy, please try again", fail_count=-1)
    ids = [fault_stack.ask(f"Etna question {i}") for i in range(6)]
    results = [final(fault_stack, pk) for pk in ids]
    assert [r["status"] for r in results] == ["done"] * 6, [r["error"] for r in results]
    assert {r["gpu"] for r in results} == {"gpu1"}
    workers = {w["gpu"]: w for w in fault_stack.gpu_workers() if w["name"].endswith("@faults")}
    assert workers["gpu0"]["healthy"] is False
    assert "503" in workers["gpu0"]["health_error"]
    assert workers["gpu1"]["healthy"] is True
    # While unhealthy it takes no work: its Ollama hears nothing of the next questions,
    # neither to embed them nor to answer them (its health probes aside).
    more = [fault_stack.ask(f"Vesuvius question {i}") for i in range(3)]
    assert all(final(fault_stack, pk)["gpu"] == "gpu1" for pk in more)
    assert not [c for c in bad.calls if "Vesuvius question" in str(c["body"])]
    assert [c for c in good.calls if "Vesuvius question" in str(c["body"])]
    # Recovery: the probe succeeds, the card is healthy and takes work again.
    bad.configure(fail_count=0)
    wait_for(
        lambda: any(
            w["gpu"] == "gpu0" and w["healthy"]
            for w in fault_stack.gpu_workers()
            if w["name"].endswith("@faults")
        ),
        timeout=30,
        what="gpu0 to recover",
    )


def test_stalled_stream_is_retried_on_another_gpu(fault_stack, corpus_dir):
    stalling = fault_stack.stub("gpu0", tps=50, reply_tokens=20)
    good = fault_stack.stub("gpu1", tps=50, reply_tokens=20)
    fault_stack.worker("gpu0", stub=stalling)
    fault_stack.ingest(corpus_dir)
    stalling.configure(stall_after=3, stall_seconds=30)
    # gpu1 takes only what is sent to it by name: the stalling card takes the question.
    fault_stack.worker("gpu1", stub=good, queues=["gpu.1"])
    wait_for(lambda: len(online_gpus(fault_stack)) == 2, timeout=90, what="both cards online")
    pk = fault_stack.ask("What is Etna?")
    result = final(fault_stack, pk)
    assert result["status"] == "done", result["error"]
    assert echoed_tokens(result["answer"]) == 20
    assert (result["gpu"], result["attempts"]) == ("gpu1", 2)
    assert [c for c in stalling.calls if c["path"] == "/api/chat"]


def test_unreachable_ollama_with_no_other_gpu_fails_readably(fault_stack, corpus_dir):
    stub = fault_stack.stub("gpu0", tps=100, reply_tokens=5)
    fault_stack.worker("gpu0", stub=stub)
    fault_stack.ingest(corpus_dir)
    url = stub.url
    stub.stop()
    pk = fault_stack.ask("What is Etna?")
    result = final(fault_stack, pk)
    assert result["status"] == "failed"
    assert url in result["error"] and "could not be reached" in result["error"]


def test_unreachable_milvus_fails_readably(fault_stack, corpus_dir):
    stub = fault_stack.stub("gpu0", tps=100, reply_tokens=5)
    fault_stack.worker("gpu0", stub=stub)
    fault_stack.ingest(corpus_dir)
    fault_stack.workers[-1].stop()
    dead = "http://127.0.0.1:9"
    fault_stack.worker("gpu0", stub=stub, MILVUS_URI=dead)
    pk = fault_stack.ask("What is Etna?")
    result = final(fault_stack, pk, timeout=90)
    assert result["status"] == "failed"
    assert "vector store" in result["error"] and dead in result["error"]


def test_a_first_token_three_leases_away_is_generated_once(fault_stack, corpus_dir):
    """A model load or a long prompt takes longer than the lease: the attempt holds the
    question all the while, so the reaper gives it to no other card."""
    lease_s = float(fault_stack.env["RMASSIMO_LEASE_S"])
    cards = [fault_stack.stub(f"gpu{i}", tps=50, reply_tokens=10) for i in (0, 1)]
    for i, card in enumerate(cards):
        fault_stack.worker(f"gpu{i}", stub=card, RMASSIMO_OLLAMA_TIMEOUT=str(10 * lease_s))
    fault_stack.ingest(corpus_dir)
    for card in cards:
        card.configure(latency=3 * lease_s)
    pk = fault_stack.ask("What did Vesuvius bury?")
    result = final(fault_stack, pk, timeout=90)
    assert result["status"] == "done", result["error"]
    generations = [c for card in cards for c in card.calls if c["path"] == "/api/chat"]
    assert len(generations) == 1
    assert result["attempts"] == 1
    assert echoed_tokens(result["answer"]) == 10


def test_ollama_error_after_some_tokens_is_retried_elsewhere_and_replaced(fault_stack, corpus_dir):
    """The model fails mid-answer: another card answers again from the start, and the text
    shown is its answer alone, not the first attempt's beginning with the whole after it."""
    failing = fault_stack.stub("gpu0", tps=50, reply_tokens=20)
    good = fault_stack.stub("gpu1", tps=50, reply_tokens=20)
    fault_stack.worker("gpu0", stub=failing)
    fault_stack.worker("gpu1", stub=good, queues=["gpu.1"])
    fault_stack.ingest(corpus_dir)
    failing.configure(error_after=5, fail_message="CUDA error: an illegal memory access")
    wait_for(lambda: len(online_gpus(fault_stack)) == 2, timeout=90, what="both cards online")
    pk = fault_stack.ask("What is Etna?")
    result = final(fault_stack, pk)
    assert result["status"] == "done", result["error"]
    assert (result["gpu"], result["attempts"]) == ("gpu1", 2)
    assert echoed_tokens(result["answer"]) == 20
    assert result["answer"].count("Echo:") == 1
    assert len([c for c in failing.calls if c["path"] == "/api/chat"]) == 1
