"""Load: many clients asking and polling at once against the web tier.

200 clients (each its own user), for 60 s: ask, poll every 0.5 s until the answer is final,
ask again. The questions come from the demo evaluation set and are asked of the demo corpus
(demo/), indexed first: each one searches it in Milvus (BM25) before the model answers.
4 simulated GPUs (stand-ins serving one request at a time). Afterwards every accepted
question must reach a final state (questions lost must be 0), and every answer must have
come with the passages its search found.

The same run measures the web tier with each number of daphne processes in
--web-processes (`manage.py run_web`, one socket), one after the other on the same stack,
so the first is the baseline of the others.

    .venv/bin/python bench/load.py [--clients 200] [--seconds 60] [--gpus 4]
                                   [--web-processes 1,4]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from stack import (
    Stack,
    demo_documents,
    demo_questions,
    indexed_corpus,
    percentile,
    retrieval_evidence,
    token_for,
    wait,
)

QUESTIONS = demo_questions()


async def client_loop(base: str, token: str, deadline: float, stats: dict, first: int) -> None:
    import httpx

    async with httpx.AsyncClient(
        base_url=base, timeout=30, headers={"Authorization": f"Token {token}"}
    ) as http:
        n = first
        while time.monotonic() < deadline:
            n += 1
            try:
                t0 = time.perf_counter()
                text = QUESTIONS[n % len(QUESTIONS)]
                r = await http.post("/api/v1/questions/", json={"text": text, "corpus": "load"})
                stats["latency"].append(time.perf_counter() - t0)
                stats["requests"] += 1
                if r.status_code != 202:
                    stats["errors"] += 1
                    await asyncio.sleep(0.5)
                    continue
                pk = r.json()["id"]
                stats["accepted"].append(pk)
                while time.monotonic() < deadline + 120:
                    await asyncio.sleep(0.5)
                    t0 = time.perf_counter()
                    g = await http.get(f"/api/v1/questions/{pk}/")
                    stats["latency"].append(time.perf_counter() - t0)
                    stats["requests"] += 1
                    if g.status_code != 200:
                        stats["errors"] += 1
                        continue
                    if g.json()["status"] in ("done", "failed", "cancelled"):
                        break
            except httpx.HTTPError:
                stats["errors"] += 1
                await asyncio.sleep(0.5)


async def run_clients(base: str, tokens: list[str], seconds: float, stats: dict) -> None:
    deadline = time.monotonic() + seconds
    # Each client starts at another question of the set.
    await asyncio.gather(*(client_loop(base, t, deadline, stats, i) for i, t in enumerate(tokens)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--tps", type=float, default=100)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--warmup", type=float, default=15, help="unmeasured seconds first")
    parser.add_argument(
        "--web-processes",
        default="1,4",
        help="daphne processes of each measured web tier, comma separated (default 1,4)",
    )
    args = parser.parse_args()
    tiers = [int(n) for n in args.web_processes.split(",")]

    stack = Stack(name="load")
    try:
        stubs = []
        for i in range(args.gpus):
            stub = stack.stub(name=f"gpu{i}", tps=args.tps, reply_tokens=args.tokens, parallel=1)
            stubs.append(stub)
            stack.worker(
                name=f"gpu{i}@load",
                queues=["interactive", "batch", f"gpu.{i}"],
                ollama_url=stub.url,
                gpu=f"gpu{i}",
            )
        stack.cpu_worker()
        # BM25 only: the bench is about the web tier, not embeddings.
        indexed_corpus("load", demo_documents(), embed_model="none")
        for stub in stubs:
            stub.reset_calls()  # the ingestion's calls are not answers
        tokens = [token_for(f"load{i}") for i in range(args.clients)]
        print(
            f"{args.clients} clients for {args.seconds:g} s per web tier, "
            f"{args.gpus} simulated GPUs ({args.tokens} tokens at {args.tps:g}/s)"
        )
        results = {}
        for processes in tiers:
            base = stack.web(processes)
            try:
                results[processes] = measure(base, tokens, args.seconds, args.warmup)
            finally:
                stack.stop_web()
            report(processes, results[processes])
        baseline = results[tiers[0]]
        for processes in tiers[1:]:
            ratio = baseline["p95"] / max(results[processes]["p95"], 1e-9)
            print(
                f"API p95 with {processes} processes: {ratio:.1f}x lower than with "
                f"{tiers[0]} (target: 3x or more, 0 errors, 0 lost)"
            )
        lost = sum(r["lost"] for r in results.values())
        print(f"questions lost: {lost} (must be 0)  {'OK' if lost == 0 else 'FAILED'}")
        asked = [pk for r in results.values() for pk in r["ids"]]
        if not retrieval_evidence(asked, stubs):
            raise SystemExit("questions did not search the corpus: figures not valid")
    finally:
        stack.close()


def measure(base: str, tokens: list[str], seconds: float, warmup: float) -> dict:
    from chat.models import Question

    # Unmeasured: every process imports lazily on its first requests, and the clients'
    # connections spread over the processes.
    warm = {"requests": 0, "errors": 0, "latency": [], "accepted": []}
    asyncio.run(run_clients(base, tokens, warmup, warm))
    stats = {"requests": 0, "errors": 0, "latency": [], "accepted": []}
    t0 = time.monotonic()
    asyncio.run(run_clients(base, tokens, seconds, stats))
    elapsed = time.monotonic() - t0
    accepted = stats["accepted"] + warm["accepted"]
    try:
        wait(
            lambda: (
                Question.objects.filter(pk__in=accepted, status__in=Question.FINAL).count()
                == len(accepted)
            ),
            timeout=180,
            what="every question to finish",
        )
    except TimeoutError:
        pass
    final = Question.objects.filter(pk__in=accepted, status__in=Question.FINAL)
    done = final.filter(status="done").count()
    latency = [x * 1000 for x in stats["latency"]]
    return {
        "requests": stats["requests"],
        "rate": stats["requests"] / elapsed,
        "errors": stats["errors"],
        "p50": percentile(latency, 0.5),
        "p95": percentile(latency, 0.95),
        "accepted": len(accepted),
        "done": done,
        "failed": final.count() - done,
        "lost": len(accepted) - final.count(),
        "ids": accepted,
    }


def report(processes: int, r: dict) -> None:
    print(
        f"web tier of {processes} daphne process(es): requests {r['requests']} "
        f"({r['rate']:.0f}/s), errors {r['errors']}, API latency p50 {r['p50']:.0f} ms, "
        f"p95 {r['p95']:.0f} ms; questions accepted {r['accepted']}, answered {r['done']}, "
        f"failed {r['failed']}, lost {r['lost']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
