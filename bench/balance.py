"""Load balancing across simulated GPUs.

N stand-in Ollamas, each serving one request at a time at a fixed tokens/s, one GPU worker
per stand-in, and the CPU worker. The demo corpus (demo/) is indexed first; M questions
from its evaluation set, each searching it in Milvus (BM25) and sent to the model with the
passages found, whose answer lengths are lognormal (median about one second of
generation, sigma 1.2), are posted through the API one right after the other. Printed:
makespan, efficiency = total generation time / (N x makespan), p50/p95 wait, per-GPU busy
share; the same jobs assigned greedily to the first idle GPU as they arrived, with zero
overhead (the limit, computed here); and the same workload pinned round-robin (question
i -> gpu.<i mod N>), as a round-robin or random proxy would spread it. Generation time is
each answer's as its stand-in recorded it (request received to answer written), not the
planned length / tps: on a busy machine the stand-ins themselves run slower than planned.
Last, the evidence that every question searched the corpus.

    .venv/bin/python bench/balance.py [--gpus 4] [--questions 200] [--tps 50] [--seed 7]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
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


def lengths(m: int, median_tokens: int, sigma: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [max(1, round(rng.lognormvariate(math.log(median_tokens), sigma))) for _ in range(m)]


def greedy_makespan(
    durations: list[float], n: int, arrivals: list[float] | None = None
) -> tuple[float, list[float]]:
    """First idle GPU takes the next job, in order of arrival, with zero overhead. Jobs
    arrive at `arrivals` (seconds from the first), all at 0 when not given."""
    arrivals = arrivals or [0.0] * len(durations)
    free = [(0.0, gpu) for gpu in range(n)]
    heapq.heapify(free)
    waits = []
    end = 0.0
    for arrived, d in sorted(zip(arrivals, durations, strict=True), key=lambda job: job[0]):
        at, gpu = heapq.heappop(free)
        at = max(at, arrived)
        waits.append(at - arrived)
        end = max(end, at + d)
        heapq.heappush(free, (at + d, gpu))
    return end, waits


def round_robin_makespan(durations: list[float], n: int) -> float:
    loads = [0.0] * n
    for i, d in enumerate(durations):
        loads[i % n] += d
    return max(loads)


def submit_all(base: str, token: str, texts: list[str]) -> list[int]:
    """Post every question through the API, one right after the other: in the planned
    order, as the round-robin run creates them. (Posted all at once, they reach the queue
    in whatever order the web process commits them, and a long answer drawn last can
    lengthen the makespan by its whole length: that compares orders, not strategies.)"""
    import httpx

    ids = []
    with httpx.Client(
        base_url=base, timeout=60, headers={"Authorization": f"Token {token}"}
    ) as client:
        for text in texts:
            r = client.post("/api/v1/questions/", json={"text": text, "corpus": "bench"})
            r.raise_for_status()
            ids.append(r.json()["id"])
    return ids


def recorded_durations(ordered: list, stubs: list) -> list[float]:
    """Each question's model time as its stand-in recorded it, in the order given."""

    def written():
        chats = [c for stub in stubs for c in stub.calls if c["path"] == "/api/chat"]
        return chats if all("finished" in c for c in chats) else None

    took = {}
    chats = wait(written, timeout=30, what="the stand-ins' records")
    for call in chats:
        # The prompt ends with the question (chat.prompts.answer_messages).
        asked = str(call["body"]["messages"][-1]["content"]).rsplit("Question: ", 1)
        took[asked[-1]] = call["finished"] - call["time"]
    missing = [q.text for q in ordered if q.text not in took]
    if missing or len(chats) != len(ordered):
        raise SystemExit(
            f"{len(chats)} chat requests at the stand-ins for {len(ordered)} questions, "
            f"{len(missing)} of which have none"
        )
    return [took[q.text] for q in ordered]


def measure(ids: list[int], n: int, stubs: list) -> dict:
    from chat.models import Question

    rows = {q.pk: q for q in Question.objects.filter(pk__in=ids)}
    ordered = [rows[i] for i in ids]
    failed = [q for q in ordered if q.status != "done"]
    if failed:
        raise SystemExit(f"{len(failed)} questions did not finish: {failed[0].error}")
    durations = recorded_durations(ordered, stubs)
    start = min(q.created_at for q in ordered)
    end = max(q.finished_at for q in ordered)
    makespan = (end - start).total_seconds()
    busy = {}
    for q in ordered:
        busy[q.gpu] = busy.get(q.gpu, 0.0) + (q.finished_at - q.started_at).total_seconds()
    waits = [(q.started_at - q.created_at).total_seconds() for q in ordered]
    return {
        "durations": durations,
        # In what order, and when, the system received them: posted at once, they arrive
        # over a while and not in the order posted.
        "arrivals": [(q.created_at - start).total_seconds() for q in ordered],
        "makespan": makespan,
        "efficiency": sum(durations) / (n * makespan),
        "wait_p50": percentile(waits, 0.5),
        "wait_p95": percentile(waits, 0.95),
        "busy": {gpu: share / makespan for gpu, share in sorted(busy.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--tps", type=float, default=50.0)
    parser.add_argument("--median-seconds", type=float, default=1.0)
    parser.add_argument("--sigma", type=float, default=1.2)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    stack = Stack(name="balance")
    try:
        from chat import services

        n, m = args.gpus, args.questions
        tokens = lengths(m, round(args.median_seconds * args.tps), args.sigma, args.seed)
        durations = [t / args.tps for t in tokens]
        asked = demo_questions()
        # Numbered, so that each answer's record at the stand-ins is found by its text.
        texts = [f"{asked[i % len(asked)]} ({i}) [[tokens={t}]]" for i, t in enumerate(tokens)]
        stubs = [stack.stub(name=f"gpu{i}", tps=args.tps, parallel=1) for i in range(n)]
        for i, stub in enumerate(stubs):
            stack.worker(
                name=f"gpu{i}@bench",
                queues=["interactive", "batch", f"gpu.{i}"],
                ollama_url=stub.url,
                gpu=f"gpu{i}",
            )
        stack.cpu_worker()
        # BM25 only: the bench is about generation; the search is the same for every
        # strategy.
        corpus = indexed_corpus("bench", demo_documents(), embed_model="none")
        base = stack.web()
        token = token_for("bench")
        print(
            f"{n} simulated GPUs at {args.tps:g} tokens/s, {m} questions, answer length "
            f"lognormal(median {args.median_seconds:g} s, sigma {args.sigma}); "
            f"total generation planned {sum(durations):.1f} s"
        )

        from django.contrib.auth import get_user_model

        from chat.models import Question

        owner = get_user_model().objects.get(username="bench")

        def pinned(batch: list[str]) -> list[int]:
            return [
                services.question_create(
                    owner=owner, text=t, corpus=corpus, queue=f"gpu.{i % n}"
                ).pk
                for i, t in enumerate(batch)
            ]

        def finish(ids: list[int], label: str, timeout: float) -> None:
            wait(
                lambda: (
                    Question.objects.filter(pk__in=ids, status__in=Question.FINAL).count()
                    == len(ids)
                ),
                timeout=timeout,
                what=label,
            )

        def run(label: str, submit) -> dict:
            for stub in stubs:
                stub.reset_calls()  # each run's answers are found in its own record
            t0 = time.monotonic()
            ids = submit()
            finish(ids, label, sum(durations) + 300)
            result = measure(ids, n, stubs)
            result["searched"] = retrieval_evidence(ids, stubs, label=label)
            result["wall"] = time.monotonic() - t0
            result["ids"] = ids
            return result

        # Unmeasured: one short answer on each GPU worker first, so that neither strategy
        # pays for the first search of the new collection (Milvus loads it) or for a
        # worker's first connections.
        finish(pinned([f"{asked[i % len(asked)]} [[tokens=1]]" for i in range(n)]), "warm-up", 300)

        shared = run("shared queue", lambda: submit_all(base, token, texts))
        robin = run("round robin", lambda: pinned(texts))

        # The limits schedule the very answers each run had, with their recorded times,
        # as they arrived.
        limit, limit_waits = greedy_makespan(shared["durations"], n, shared["arrivals"])
        rr_limit = round_robin_makespan(robin["durations"], n)
        limit_eff = sum(shared["durations"]) / (n * limit)
        print(
            f"generation time as the stand-ins recorded it: shared queues "
            f"{sum(shared['durations']):.2f} s, round robin {sum(robin['durations']):.2f} s "
            f"(planned {sum(durations):.2f} s)"
        )
        print()
        print(f"{'':34}{'makespan':>10}{'efficiency':>12}{'wait p50':>10}{'wait p95':>10}")
        print(
            f"{'shared queues (this system)':34}{shared['makespan']:>9.1f}s"
            f"{shared['efficiency']:>12.1%}{shared['wait_p50']:>9.1f}s{shared['wait_p95']:>9.1f}s"
        )
        print(
            f"{'greedy first-idle, zero overhead':34}{limit:>9.1f}s{limit_eff:>12.1%}"
            f"{percentile(limit_waits, 0.5):>9.1f}s{percentile(limit_waits, 0.95):>9.1f}s"
        )
        print(
            f"{'round robin gpu.<i mod N> (system)':34}{robin['makespan']:>9.1f}s"
            f"{robin['efficiency']:>12.1%}{robin['wait_p50']:>9.1f}s{robin['wait_p95']:>9.1f}s"
        )
        print(
            f"{'round robin, zero overhead':34}{rr_limit:>9.1f}s"
            f"{sum(robin['durations']) / (n * rr_limit):>12.1%}"
        )
        print()
        print(
            "busy share per GPU, shared queues: "
            + ", ".join(f"{g} {s:.0%}" for g, s in shared["busy"].items())
        )
        print(
            "busy share per GPU, round robin:   "
            + ", ".join(f"{g} {s:.0%}" for g, s in robin["busy"].items())
        )
        gap = limit_eff - shared["efficiency"]
        shorter = 1 - shared["makespan"] / robin["makespan"]
        print()
        print(
            f"efficiency gap to the greedy limit: {gap:.1%} (target: within 3%)  "
            f"{'OK' if gap <= 0.03 else 'MISSED'}"
        )
        print(
            f"makespan shorter than round robin: {shorter:.1%} (target: at least 12%)  "
            f"{'OK' if shorter >= 0.12 else 'MISSED'}"
        )
        if not (shared["searched"] and robin["searched"]):
            raise SystemExit("questions did not search the corpus: figures not valid")
    finally:
        stack.close()


if __name__ == "__main__":
    main()
