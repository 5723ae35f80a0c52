"""Redis killed while answers stream, and the reaper's process down while a GPU worker dies:
each question still ends done, generated once, its text whole."""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from chat.models import Question
from tests.faults.test_faults import FINAL, final
from tests.ollama_stub import TOKENS_DIRECTIVE
from tests.processes import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def generations(stubs, text: str) -> list[dict]:
    """The answers the stand-ins generated (or began) for the question `text`."""
    return [
        call
        for stub in stubs
        for call in stub.calls
        if call["path"] == "/api/chat" and text in str(call["body"].get("messages"))
    ]


def generated_text(call: dict, tokens: int) -> str:
    """The whole reply the stand-in streams for this request: "Echo:" and the words of the
    last user message, cycled, one per token (tests/ollama_stub.py)."""
    messages = call["body"]["messages"]
    last = next(m for m in reversed(messages) if m["role"] == "user")["content"]
    words = TOKENS_DIRECTIVE.sub(" ", last).split() or ["..."]
    return "Echo:" + "".join(" " + words[i % len(words)] for i in range(tokens))


def row(pk: int) -> Question:
    return Question.objects.get(pk=pk)


def streaming(stack, pk: int) -> bool:
    """Running, with some of its text already shown to the person asking."""
    q = stack.question(pk)
    return q["status"] == "running" and len(q["answer"]) > 0


def test_redis_killed_while_answers_stream_each_is_answered_once_and_whole(fault_stack, corpus_dir):
    """Redis goes away mid-stream and comes back empty: the answers streaming go on and
    are saved whole, the one waiting in the lost broker is put back by the reaper, and no
    question is generated twice."""
    short, long = 30, 80
    # Each card loads the model for its first answer, as Ollama does: the worker learns
    # what a load costs (placement keeps it in Redis) as that answer ends.
    load = {settings.RMASSIMO_CHAT_MODEL: {"load_s": 0.5}}
    cards = [
        fault_stack.stub("gpu0", tps=10, reply_tokens=short, models=load),
        fault_stack.stub("gpu1", tps=10, reply_tokens=long, models=load),
    ]
    for i, card in enumerate(cards):
        fault_stack.worker(f"gpu{i}", stub=card)
    fault_stack.ingest(corpus_dir)
    texts = [f"Vesuvius question {i}" for i in range(3)]
    ids = [fault_stack.ask(text) for text in texts]
    # Two stream, one on each card; the third waits in the broker.
    on_air = wait_for(
        lambda: (s := [pk for pk in ids if streaming(fault_stack, pk)]) and len(s) == 2 and s,
        timeout=60,
        what="two answers to stream",
    )

    fault_stack.redis.kill()

    # The short answer ends while Redis is away: it is saved all the same, and the person
    # asking, polling meanwhile, reads it whole.
    def one_ended():
        polled = [fault_stack.question(pk) for pk in on_air]
        return next((q for q in polled if q["status"] in FINAL), None)

    ended = wait_for(one_ended, timeout=60, what="an answer to end")
    assert ended["status"] == "done", ended["error"]
    fault_stack.redis.start()

    results = [final(fault_stack, pk, timeout=120) for pk in ids]
    assert [r["status"] for r in results] == ["done"] * 3, [r["error"] for r in results]
    assert Question.objects.count() == 3
    for text, result in zip(texts, results, strict=True):
        (call,) = generations(cards, text)  # generated once
        tokens = short if call["stub"] == "gpu0" else long
        assert result["answer"] == generated_text(call, tokens)  # whole: no gap, no repeat
        assert result["attempts"] == 1


def test_reaper_down_while_a_worker_dies_recovers_the_question_once_back(fault_stack, corpus_dir):
    """The reapers' worker and celery beat are down while a GPU worker is SIGKILLed
    mid-answer: the question waits (its message is held until Redis' visibility timeout),
    and once they are back it is answered once, by the card alive; the answer streaming on
    that card meanwhile is not started again."""
    reaper_s = float(fault_stack.env["RMASSIMO_REAPER_S"])
    tokens = 150
    cards = [fault_stack.stub(f"gpu{i}", tps=10, reply_tokens=tokens) for i in (0, 1)]
    workers = [fault_stack.worker(f"gpu{i}", stub=card) for i, card in enumerate(cards)]
    fault_stack.ingest(corpus_dir)  # through the CPU worker, before it goes down

    beat = next(p for p in fault_stack.procs if "beat" in p.args)
    os.killpg(beat.pid, signal.SIGKILL)
    os.killpg(fault_stack.cpu.proc.pid, signal.SIGKILL)
    beat.wait()
    fault_stack.cpu.proc.wait()

    orphan = fault_stack.ask("What did Vesuvius bury?")
    wait_for(lambda: streaming(fault_stack, orphan), timeout=60, what="the first to stream")
    other = fault_stack.ask("Tell me about Etna")
    wait_for(lambda: streaming(fault_stack, other), timeout=60, what="the second to stream")
    dead = int(row(orphan).gpu.removeprefix("gpu"))
    dying, alive = cards[dead], cards[1 - dead]
    os.killpg(workers[dead].proc.pid, signal.SIGKILL)  # the whole worker, as a crashed host
    workers[dead].proc.wait()

    # Down for many reaper periods past the orphan's lease: nothing else recovers it.
    wait_for(
        lambda: row(orphan).lease_until < timezone.now() - timedelta(seconds=5 * reaper_s),
        timeout=60,
        what="the orphan's lease to have run out long ago",
    )
    stuck = row(orphan)
    assert (stuck.status, stuck.attempts) == ("running", 1)

    back = timezone.now()
    fault_stack._spawn(
        "beat",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery",
            "beat",
            "-l",
            "info",
            "-s",
            beat.args[-1],
        ],
    )
    fault_stack.worker("cpu", queues=["cpu", "housekeeping"], stub=None)

    recovered, answered = final(fault_stack, orphan, timeout=90), final(fault_stack, other)
    assert recovered["status"] == "done", recovered["error"]
    assert (recovered["gpu"], recovered["attempts"]) == (f"gpu{1 - dead}", 2)
    assert row(orphan).started_at >= back
    (redo,) = generations([alive], "What did Vesuvius bury?")
    assert recovered["answer"] == generated_text(redo, tokens)
    assert len(generations([dying], "What did Vesuvius bury?")) == 1  # the one cut short
    assert answered["status"] == "done", answered["error"]
    assert answered["attempts"] == 1
    (once,) = generations([alive, dying], "Tell me about Etna")
    assert answered["answer"] == generated_text(once, tokens)
