"""How late do answer tokens reach a websocket client, and how much first-token time does
the system add on top of the model's own?

Starts everything itself, on its own temporary database, Redis database and Milvus Lite
server: daphne serving the real ASGI app, one real Celery worker with N answer slots, and
the Ollama stand-in (tests/ollama_stub.py) emitting tokens at a set rate. Clients are real
websocket connections (the ``websockets`` package) with token auth; questions are posted
to the HTTP API like any client would.

* token latency: for every token, the time from the stand-in writing it to its socket to
  the client receiving the delta that contains it (coalescing in the worker included).
  Emission times are taken in this process by wrapping the stand-in's chunk writer.
* added first-token time: (first delta received - question posted) minus the model's own
  first-token time (first token written - chat request received by the stand-in), i.e.
  API, queue, claim, retrieval (embedding + Milvus), prompt and delivery.

Usage: python bench/stream.py [--tps 50] [--tokens 100] [--single 7] [--concurrent 10]
Uses REDIS_URL (default redis://127.0.0.1:6379/13; that database is flushed) and a fresh
PostgreSQL database next to DATABASE_URL when PostgreSQL answers, else SQLite in a temp
dir. Prints the figures and writes them to docs/benchmarks.md, section
"## Streaming (bench/stream.py)" (--no-write to skip).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.processes import free_port  # noqa: E402

SECTION = "## Streaming (bench/stream.py)"
MARKER = re.compile(r"Bench (r\d+q\d+):")
FINAL = {"done", "failed", "cancelled"}


def make_database(work_dir: Path) -> tuple[str, callable]:
    """A fresh database: PostgreSQL when one answers, else SQLite. Returns (url, drop)."""
    import psycopg

    base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    parsed = urlparse(base)
    if parsed.scheme.startswith("postgres"):
        name = f"rmassimo_bench_{os.getpid()}"
        admin = parsed._replace(path="/postgres").geturl().replace("postgres://", "postgresql://")
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=2) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error as exc:
            print(f"PostgreSQL not usable ({exc}); using SQLite", file=sys.stderr)
        else:

            def drop() -> None:
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

            return parsed._replace(path=f"/{name}").geturl(), drop
    return f"sqlite:///{work_dir / 'bench.sqlite3'}", lambda: None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Emissions:
    """Records when the stand-in writes each streamed token, per bench question."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: dict[str, list[tuple[float, str]]] = defaultdict(list)

    def install(self) -> None:
        from tests import ollama_stub

        original = ollama_stub._Handler._write_chunk
        emissions = self

        def write_chunk(handler, record):
            original(handler, record)
            sent = time.time()
            content = (record.get("message") or {}).get("content") or record.get("response")
            messages = (handler.body or {}).get("messages") or [{}]
            found = MARKER.search(str(messages[-1].get("content") or ""))
            if content and found:
                with emissions.lock:
                    emissions.tokens[found.group(1)].append((sent, content))

        ollama_stub._Handler._write_chunk = write_chunk


async def ask_and_follow(http, ws_url, headers, conversation_id, marker, go):
    """Post one question when `go` is set; collect its events from the websocket."""
    from websockets.asyncio.client import connect

    async with connect(ws_url, additional_headers=headers, proxy=None, max_queue=None) as ws:
        await go.wait()
        posted_at = time.time()
        response = await http.post(
            "/api/v1/questions/",
            json={
                "text": f"Bench {marker}: when did Vesuvius bury Pompeii?",
                "conversation": conversation_id,
            },
        )
        response.raise_for_status()
        question = response.json()["id"]
        deltas, final = [], None
        while final is None:
            event = json.loads(await asyncio.wait_for(ws.recv(), 60))
            received = time.time()
            if event.get("question") != question:
                continue
            if event["type"] == "delta":
                deltas.append((received, event["seq"], event["text"]))
            elif event["type"] in FINAL:
                final = event
    return {
        "marker": marker,
        "question": question,
        "posted_at": posted_at,
        "deltas": deltas,
        "final": final,
    }


def measure(results, emissions: Emissions, chat_calls: dict[str, float]):
    latencies, added_first, model_first, problems = [], [], [], []
    for result in results:
        marker, deltas, final = result["marker"], result["deltas"], result["final"]
        tokens = emissions.tokens.get(marker, [])
        if final["type"] != "done" or not deltas or not tokens:
            problems.append(f"{marker}: {final['type']} {final.get('error', '')}")
            continue
        received_text = "".join(text for _, _, text in deltas)
        if received_text != "".join(text for _, text in tokens) or [
            seq for _, seq, _ in deltas
        ] != list(range(len(deltas))):
            problems.append(f"{marker}: received text differs from the emitted tokens")
            continue
        # Token i arrives with the first delta whose cumulative text covers it.
        ends, total = [], 0
        for received, _, text in deltas:
            total += len(text)
            ends.append((total, received))
        covered, index = 0, 0
        for emitted, text in tokens:
            covered += len(text)
            while ends[index][0] < covered:
                index += 1
            latencies.append((ends[index][1] - emitted) * 1000)
        own = tokens[0][0] - chat_calls[marker]
        model_first.append(own * 1000)
        added_first.append((deltas[0][0] - result["posted_at"] - own) * 1000)
    return latencies, added_first, model_first, problems


def breakdown(results) -> dict:
    """Medians of the steps the DB times: queued to claimed, and retrieval."""
    from chat.models import Question

    rows = [q.timings for q in Question.objects.filter(pk__in=[r["question"] for r in results])]
    waits = [t["wait_ms"] for t in rows if t["wait_ms"] is not None]
    retrievals = [t["retrieval_ms"] for t in rows if t["retrieval_ms"] is not None]
    return {
        "wait_p50": statistics.median(waits) if waits else float("nan"),
        "retrieval_p50": statistics.median(retrievals) if retrievals else float("nan"),
    }


def summary(name, latencies, added_first, model_first, count, problems) -> dict:
    return {
        "name": name,
        "questions": count,
        "tokens": len(latencies),
        "token_p50": statistics.median(latencies) if latencies else float("nan"),
        "token_p90": percentile(latencies, 90),
        "token_p99": percentile(latencies, 99),
        "token_max": max(latencies) if latencies else float("nan"),
        "first_p50": statistics.median(added_first) if added_first else float("nan"),
        "first_p90": percentile(added_first, 90),
        "model_first_p50": statistics.median(model_first) if model_first else float("nan"),
        "problems": problems,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| conversations at once | questions | tokens | token latency p50 / p90 / p99 / max "
        "(ms) | added first-token time p50 / p90 (ms) | model's own first token p50 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['questions']} | {r['tokens']} | "
            f"{r['token_p50']:.1f} / {r['token_p90']:.1f} / {r['token_p99']:.1f} / "
            f"{r['token_max']:.1f} | {r['first_p50']:.1f} / {r['first_p90']:.1f} | "
            f"{r['model_first_p50']:.1f} |"
        )
    lines += [
        "",
        "Of the added first-token time (p50, from the DB's timings): created to claimed by "
        "the worker, and retrieval (query embedding + Milvus search):",
        "",
        "| conversations at once | queued to claimed (ms) | retrieval (ms) |",
        "|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['wait_p50']:.1f} | {r['retrieval_p50']:.1f} |")
    return "\n".join(lines)


def verdict(p50_ms: float) -> str:
    return f"{p50_ms:.0f} ms: met" if p50_ms < 100 else f"{p50_ms:.0f} ms: missed"


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{SECTION}\n\n{body.strip()}\n"
    start = text.find(SECTION)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        rest = text[end + 1 :] if end != -1 else ""
        text = text[:start] + section + ("\n" + rest if rest else "")
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tps", type=float, default=50.0, help="stand-in tokens per second")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per answer")
    parser.add_argument("--single", type=int, default=7, help="questions asked one at a time")
    parser.add_argument("--concurrent", type=int, default=10, help="conversations at once")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of concurrent questions")
    parser.add_argument(
        "--flush-ms", type=int, default=50, help="RMASSIMO_STREAM_FLUSH_MS (the shipped default)"
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()

    work_dir = Path(tempfile.mkdtemp(prefix="rmassimo-bench-"))
    (work_dir / "logs").mkdir()
    os.environ["RMASSIMO_VAR_DIR"] = str(work_dir)
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/13")
    os.environ["MILVUS_URI"] = f"http://127.0.0.1:{free_port()}"
    os.environ["RMASSIMO_STREAM_FLUSH_MS"] = str(args.flush_ms)
    os.environ["RMASSIMO_LOG_LEVEL"] = "WARNING"
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    database_url, drop_database = make_database(work_dir)
    os.environ["DATABASE_URL"] = database_url

    import django

    django.setup()
    import httpx
    import redis
    from asgiref.sync import async_to_sync
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from rest_framework.authtoken.models import Token

    from chat import services
    from tests import processes
    from tests.browser import Daphne
    from tests.corpus import build_corpus
    from tests.ollama_stub import OllamaStub

    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    call_command("migrate", verbosity=0)
    emissions = Emissions()
    emissions.install()
    started = []
    try:
        milvus = processes.start_milvus(
            work_dir / "milvus", settings.MILVUS_URI, work_dir / "logs" / "milvus.log"
        )
        started.append(milvus)
        stub = OllamaStub(
            name="gpu0",
            chat_models=(settings.RMASSIMO_CHAT_MODEL,),
            embed_models=(settings.RMASSIMO_EMBED_MODEL,),
        ).start()
        slots = max(1, args.concurrent)
        worker = processes.Worker(
            name="gpu0@bench",
            queues=["interactive", "batch", "gpu.0", "cpu"],
            ollama_url=stub.url,
            concurrency=slots,
            log_dir=work_dir / "logs",
            extra_env={"RMASSIMO_GPU_SLOTS": str(slots)},
        )
        started.append(worker)
        web = Daphne(
            log_dir=work_dir / "logs",
            extra_env={"OLLAMA_URLS": stub.url, "RMASSIMO_OLLAMA_URL": stub.url},
        )
        started.append(web)
        corpus = build_corpus()
        user = get_user_model().objects.create_user("bench", password="bench-pw")
        key = Token.objects.create(user=user).key
        headers = {"Authorization": f"Token {key}"}

        def chat_call_times() -> dict[str, float]:
            times = {}
            for call in stub.calls:
                if call["path"] == "/api/chat" and call["body"]:
                    found = MARKER.search(str(call["body"]["messages"][-1]["content"]))
                    if found:
                        times[found.group(1)] = call["time"]
            return times

        def run(label: int, count: int) -> list[dict]:
            conversations = [
                services.conversation_create(owner=user, corpus=corpus) for _ in range(count)
            ]
            return async_to_sync(follow)(label, conversations)

        async def follow(label: int, conversations) -> list[dict]:
            go = asyncio.Event()
            async with httpx.AsyncClient(base_url=web.url, headers=headers, timeout=30) as http:
                tasks = [
                    asyncio.create_task(
                        ask_and_follow(
                            http,
                            f"{web.ws_url}/ws/conversations/{c.pk}/",
                            headers,
                            c.pk,
                            f"r{label}q{i}",
                            go,
                        )
                    )
                    for i, c in enumerate(conversations)
                ]
                await asyncio.sleep(0.5)  # every socket open before anyone asks
                go.set()
                return await asyncio.gather(*tasks)

        stub.configure(tps=args.tps, reply_tokens=args.tokens, latency=0.0)
        run(0, 1)  # warm-up: imports, connections, collection load
        rows = []
        single = []
        for label in range(1, args.single + 1):
            single.extend(run(label, 1))
        measured = measure(single, emissions, chat_call_times())
        rows.append(summary("1", *measured[:3], len(single), measured[3]) | breakdown(single))
        if args.concurrent > 1:
            many = []
            for label in range(100, 100 + args.rounds):
                many.extend(run(label, args.concurrent))
            measured = measure(many, emissions, chat_call_times())
            rows.append(
                summary(str(args.concurrent), *measured[:3], len(many), measured[3])
                | breakdown(many)
            )
    finally:
        for proc in reversed(started):
            try:
                if hasattr(proc, "stop"):
                    proc.stop()
                else:
                    proc.terminate()
                    proc.wait(30)
            except Exception as exc:  # noqa: BLE001
                print(f"could not stop {proc}: {exc}", file=sys.stderr)
        from django.db import connections

        connections.close_all()
        drop_database()
        shutil.rmtree(work_dir, ignore_errors=True)

    result = table(rows)
    print(result)
    for row in rows:
        for problem in row["problems"]:
            print(f"problem: {problem}", file=sys.stderr)
    conditions = (
        f"Stand-in at {args.tps:g} tokens/s, {args.tokens} tokens per answer, no model latency; "
        f"worker coalescing interval {args.flush_ms} ms (RMASSIMO_STREAM_FLUSH_MS); one worker "
        f"with {max(1, args.concurrent)} answer slots; daphne, the worker, Milvus Lite, Redis, "
        f"{'PostgreSQL' if database_url.startswith('postgres') else 'SQLite'} and the client "
        f"on one machine ({os.cpu_count()} CPUs, Python {platform.python_version()}); "
        f"measured {datetime.now(UTC):%Y-%m-%d}. {args.single} questions one at a time, then "
        f"{args.rounds} rounds of {args.concurrent} conversations asking at once."
    )
    print(conditions)
    if not args.no_write:
        body = "\n".join(
            [
                "`python bench/stream.py` starts daphne, a worker and the Ollama stand-in, asks "
                "through the HTTP API and follows the answers over websockets.",
                "",
                "- *token latency*: from the stand-in writing a token to the client receiving "
                "the delta that carries it (the worker's coalescing included).",
                "- *added first-token time*: first delta received minus question posted, less "
                "the model's own first-token time (request received to first token written): "
                "API, queue, claim, retrieval, prompt and delivery.",
                "",
                result,
                "",
                conditions,
                "",
                "Targets on this machine: added first-token time p50 under 100 ms with one "
                f"conversation ({verdict(rows[0]['first_p50'])}); token latency p50 under "
                f"100 ms with ten ({verdict(rows[-1]['token_p50'])}). With ten conversations "
                "asking in the same instant, their first-token time is mostly ten answer "
                "processes, daphne and Milvus sharing the CPUs; the stream itself stays as "
                "quick as with one.",
            ]
        )
        write_section(ROOT / "docs" / "benchmarks.md", body)
        print("written to docs/benchmarks.md")
    return 1 if any(row["problems"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
