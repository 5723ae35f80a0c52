"""Time the system adds to an answer, on top of the model's own generation time.

100 questions go one at a time through the HTTP API (POST, then wait for the `done` event
the websocket consumer would forward) to a real worker, Milvus Lite and an Ollama stand-in
generating at a fixed pace. The same
questions are then answered in this process by a llama-index query engine over the same
Milvus collection and the same stand-in (the old prototype's way). For each, added time =
time until the answer is complete - the model's own time for that answer, as the stand-in
recorded it (its chat request's arrival to its answer written: first token latency +
tokens / tokens-per-second, and whatever the machine's load added to that).

    .venv/bin/python bench/pipeline.py [--questions 100] [--tps 200] [--tokens 20]

With --metrics-ab it measures what the metrics cost instead: two daphne servers and two
workers, one pair with metrics on (the workers in multiprocess mode, as run_workers
starts them) and one with RMASSIMO_METRICS=0, answer the same questions in alternating
rounds of ten; the added time per question is the difference of the two medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from stack import (
    Stack,
    indexed_corpus,
    model_time,
    percentile,
    retrieval_evidence,
    token_for,
)


def corpus_texts() -> dict[str, str]:
    from pydoc_data.topics import topics

    names = sorted(topics)[:30]
    return {f"{name}.txt": topics[name] for name in names}


def index_corpus(count: int):
    """Ingest the bench corpus through the workers; `count` questions about its topics."""
    docs = corpus_texts()
    corpus = indexed_corpus("bench", docs)
    topics = sorted(docs)
    questions = [
        f"What does the documentation say about {topics[i % len(topics)][:-4]}?"
        for i in range(count)
    ]
    return corpus, docs, questions


async def ask_all(base: str, token: str, questions: list[str], stub) -> dict[str, list]:
    """Ask one at a time as a websocket client would see it: follow the conversation's
    events (the channel layer the websocket consumer reads), POST, wait for `done`.
    Returns each question's id, added time and model's own time (ms, from `stub`'s record)."""
    import httpx
    from channels.layers import get_channel_layer

    from core import realtime

    layer = get_channel_layer()
    out: dict[str, list] = {"ids": [], "added": [], "own": []}
    headers = {"Authorization": f"Token {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
        for text in questions:
            conversation = (
                await client.post("/api/v1/conversations/", json={"corpus": "bench"})
            ).json()["id"]
            channel = await layer.new_channel()
            await layer.group_add(realtime.group_name(conversation), channel)
            since = len(stub.calls)
            t0 = time.perf_counter()
            posted = await client.post(
                "/api/v1/questions/", json={"text": text, "conversation": conversation}
            )
            posted.raise_for_status()
            while True:
                event = (await asyncio.wait_for(layer.receive(channel), 30))["event"]
                if event["type"] in ("done", "failed", "cancelled"):
                    break
            elapsed = time.perf_counter() - t0
            await layer.group_discard(realtime.group_name(conversation), channel)
            if event["type"] != "done":
                raise SystemExit(f"question {event['type']}: {event.get('error')}")
            own = model_time(stub, since)
            out["ids"].append(posted.json()["id"])
            out["added"].append((elapsed - own) * 1000)
            out["own"].append(own * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--tps", type=float, default=200.0)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--metrics-ab", action="store_true", help="metrics on against off")
    parser.add_argument("--recording-cost", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recording_cost:
        print(f"{recording_cost_us():.1f}")
        return
    if args.metrics_ab:
        metrics_ab(args)
        return

    stack = Stack(name="pipeline")
    try:
        from django.conf import settings

        stub = stack.stub(name="gpu0", tps=args.tps, latency=args.latency, reply_tokens=args.tokens)
        stack.worker(
            name="gpu0@bench",
            queues=["interactive", "batch", "gpu.0", "cpu"],
            ollama_url=stub.url,
            gpu="gpu0",
        )
        base = stack.web()
        corpus, docs, questions = index_corpus(args.questions)
        generation = args.latency + args.tokens / args.tps
        print(
            f"{len(docs)} documents indexed; {args.questions} questions; stand-in set to "
            f"{generation * 1000:.0f} ms per answer ({args.tokens} tokens at "
            f"{args.tps:g}/s after {args.latency * 1000:.0f} ms)"
        )

        system = asyncio.run(ask_all(base, token_for("bench"), questions, stub))
        searched = retrieval_evidence(system["ids"], [stub])

        # The prototype: llama-index in-process over the same collection and stand-in.
        from llama_index.core import Settings as LlamaSettings
        from llama_index.core import VectorStoreIndex
        from llama_index.embeddings.ollama import OllamaEmbedding
        from llama_index.llms.ollama import Ollama

        from core import vectorstore

        store = vectorstore.store(corpus.pk, dim=None)
        LlamaSettings.embed_model = OllamaEmbedding(
            model_name=settings.RMASSIMO_EMBED_MODEL, base_url=stub.url
        )
        llm = Ollama(
            model=settings.RMASSIMO_CHAT_MODEL,
            base_url=stub.url,
            context_window=settings.RMASSIMO_CONTEXT_WINDOW,
            request_timeout=30,
        )
        engine = VectorStoreIndex.from_vector_store(store).as_query_engine(
            llm=llm, similarity_top_k=settings.RMASSIMO_TOP_K, streaming=True
        )
        prototype: dict[str, list] = {"added": [], "own": []}
        for text in questions:
            since = len(stub.calls)
            t0 = time.perf_counter()
            response = engine.query(text)
            "".join(response.response_gen)
            elapsed = time.perf_counter() - t0
            own = model_time(stub, since)
            prototype["added"].append((elapsed - own) * 1000)
            prototype["own"].append(own * 1000)

        def line(label: str, run: dict) -> str:
            added, own = run["added"], run["own"]
            return (
                f"{label:44}{percentile(added, 0.5):>8.1f} ms{percentile(added, 0.95):>9.1f} ms"
                f"{percentile(own, 0.5):>9.1f} ms"
            )

        print()
        print(f"{'added on top of the model':44}{'median':>11}{'p95':>12}{'model p50':>12}")
        print(line("this system (API -> queue -> GPU worker)", system))
        print(line("prototype (llama-index in-process)", prototype))
        median = percentile(system["added"], 0.5)
        print()
        print(
            f"median added time: {median:.1f} ms (target: under 50 ms)  "
            f"{'OK' if median < 50 else 'MISSED'}"
        )
        if not searched:
            raise SystemExit("questions did not search the corpus: figures not valid")
    finally:
        stack.close()


def metrics_ab(args) -> None:
    """Metrics on against off, same stack, alternating rounds (see the module's doc)."""
    stack = Stack(name="pipeline")
    try:
        from tests.processes import free_port
        from workers.celery import app

        stub = stack.stub(name="gpu0", tps=args.tps, latency=args.latency, reply_tokens=args.tokens)
        queues = ["interactive", "batch", "gpu.0", "cpu"]
        multiproc = stack.var / "metrics"
        multiproc.mkdir()
        arms = {
            "on": {
                "RMASSIMO_METRICS": "1",
                "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
                "RMASSIMO_METRICS_PORT": str(free_port()),
            },
            "off": {"RMASSIMO_METRICS": "0"},
        }
        for arm, env in arms.items():
            stack.worker(name=f"gpu0@{arm}", queues=queues, ollama_url=stub.url, gpu="gpu0", **env)
        bases = {
            "on": stack.web(RMASSIMO_METRICS="1"),
            "off": stack.web(RMASSIMO_METRICS="0"),
        }

        def consume(arm: str, on: bool) -> None:
            action = app.control.add_consumer if on else app.control.cancel_consumer
            for queue in queues:
                action(queue, destination=[f"gpu0@{arm}"], reply=True, timeout=10)

        consume("on", False)
        _, docs, questions = index_corpus(args.questions)
        generation = args.latency + args.tokens / args.tps
        token = token_for("bench")
        added: dict[str, list[float]] = {"on": [], "off": []}
        for start in range(0, len(questions), 10):
            batch = questions[start : start + 10]
            for arm in ("off", "on") if (start // 10) % 2 else ("on", "off"):
                other = "off" if arm == "on" else "on"
                consume(other, False)
                consume(arm, True)
                added[arm] += asyncio.run(ask_all(bases[arm], token, batch, stub))["added"]
        on, off = percentile(added["on"], 0.5), percentile(added["off"], 0.5)
        print(
            f"{len(docs)} documents; {args.questions} questions per arm in alternating rounds "
            f"of 10; stand-in set to {generation * 1000:.0f} ms per answer"
        )
        print(f"{'added on top of the model':34}{'median':>10}{'p95':>11}")
        for arm in ("off", "on"):
            print(
                f"{'metrics ' + arm:34}{percentile(added[arm], 0.5):>7.2f} ms"
                f"{percentile(added[arm], 0.95):>8.2f} ms"
            )
        print(f"\nmetrics cost per question (median on - median off): {on - off:+.2f} ms")
        import subprocess
        import sys

        # In a fresh process in multiprocess mode, as in a worker's pool process.
        timed = subprocess.run(
            [sys.executable, __file__, "--recording-cost"],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(f"recording calls of one question, timed alone (multiprocess mode): {timed} µs")
    finally:
        stack.close()


def recording_cost_us(rounds: int = 2000) -> float:
    """The calls one answered question makes into core.metrics, timed in this process."""
    import types
    from datetime import UTC, datetime, timedelta

    from core import metrics

    now = datetime.now(UTC)
    corpus = types.SimpleNamespace(slug="bench", effective_chat_model="m")
    question = types.SimpleNamespace(
        gpu="gpu0",
        status="done",
        conversation=types.SimpleNamespace(corpus=corpus),
        model="m",
        created_at=now,
        started_at=now + timedelta(milliseconds=5),
        first_token_at=now + timedelta(milliseconds=50),
        finished_at=now + timedelta(milliseconds=150),
        retrieval_ms=8.0,
        generation_ms=100.0,
    )
    task = types.SimpleNamespace(
        name="chat.tasks.answer_question",
        request=types.SimpleNamespace(
            delivery_info={"routing_key": "interactive"}, eta=None, rmassimo_sent_at=None
        ),
    )
    started = time.perf_counter()
    for _ in range(rounds):
        headers: dict = {}
        metrics.task_published(headers)
        task.request.rmassimo_sent_at = headers[metrics.SENT_AT_HEADER]
        metrics.task_started(task, "gpu0")
        for _search in range(2):  # has_dense and search
            metrics.milvus_call("search", 0.002, failed=False)
        metrics.model_call(
            model="m",
            gpu="gpu0",
            first_token_s=0.02,
            prompt_tokens=300,
            completion_tokens=20,
            load_s=0.0,
        )
        metrics.question_finished(question)
        metrics.task_ended(task, "succeeded", "gpu0")
    return (time.perf_counter() - started) / rounds * 1e6


if __name__ == "__main__":
    main()
