"""A mixed-model fleet on the Ollama simulator: shared queue, fixed split and placement.

Every policy gets the same arrival sequence, in the same run, through the real API, Celery
workers, Redis and Milvus (BM25 retrieval: each model's corpus holds the demo corpus, and
the questions are the demo evaluation set's); only the model servers are simulated
(tests/ollama_stub.py: model loads, LRU eviction, one model per card's memory), with time
scaled by --scale so that an hour of traffic takes minutes. Figures are printed in the
simulation's own seconds (wall seconds / scale).

(a) `--scenario mix`: 4 cards of 24 GB, two 14 GB chat models (each fits a card, both do
    not), 10 s per load, answers lognormal (median 2 s, sigma 0.8), Poisson arrivals at 80%
    of the fleet's capacity, the mix 80/20 turning to 20/80 halfway.
(b) `--scenario big`: 4 cards where a 40 GB model needs two of them (one worker owns the
    group gpu2+3, the only server that has pulled it) next to an 8 GB model; 70/30 mix,
    60% load. A shared queue sends the big model's questions to cards that lack it.

Policies: `shared` (one queue, any worker takes any question: RMASSIMO_PLACEMENT=shared),
`fixed` (each server has pulled only the model it is given: a static split), `placement`
(every server has both models; RMASSIMO_PLACEMENT=models decides).

    .venv/bin/python bench/fleet.py [--scenario mix|big] [--questions 1060] [--scale 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from dataclasses import dataclass

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

GB = 10**9
TPS = 50.0  # simulated tokens per second: an answer of t seconds is t * TPS tokens
QUESTIONS = demo_questions()


@dataclass
class Scenario:
    cards: list[tuple[str, list[int]]]  # worker label, card memories
    models: dict[str, dict]  # model -> simulator settings (size, load_s)
    mix: tuple[dict[str, float], dict[str, float]]  # share per model, first and second half
    load: float  # share of the fleet's capacity the arrivals ask for
    fixed: dict[str, str]  # worker label -> the one model it has in the fixed split
    pulled: dict[str, list[str]] | None = None  # otherwise; None: every model everywhere


SCENARIOS = {
    "mix": Scenario(
        cards=[(f"gpu{i}", [24 * GB]) for i in range(4)],
        models={
            "alpha:14b": {"size": 14 * GB, "load_s": 10.0},
            "beta:14b": {"size": 14 * GB, "load_s": 10.0},
        },
        mix=({"alpha:14b": 0.8, "beta:14b": 0.2}, {"alpha:14b": 0.2, "beta:14b": 0.8}),
        load=0.8,
        fixed={"gpu0": "alpha:14b", "gpu1": "alpha:14b", "gpu2": "beta:14b", "gpu3": "beta:14b"},
    ),
    "big": Scenario(
        cards=[("gpu0", [24 * GB]), ("gpu1", [24 * GB]), ("gpu2+3", [24 * GB, 24 * GB])],
        models={
            "huge:70b": {"size": 40 * GB, "load_s": 40.0},
            "small:8b": {"size": 8 * GB, "load_s": 5.0},
        },
        mix=({"huge:70b": 0.3, "small:8b": 0.7}, {"huge:70b": 0.3, "small:8b": 0.7}),
        load=0.6,
        fixed={"gpu0": "small:8b", "gpu1": "small:8b", "gpu2+3": "huge:70b"},
        # The big model is pulled only where it fits: on the two-card group.
        pulled={"gpu0": ["small:8b"], "gpu1": ["small:8b"], "gpu2+3": ["huge:70b", "small:8b"]},
    ),
}


def arrivals(scenario: Scenario, n: int, seed: int, median: float, sigma: float) -> list:
    """(at, model, answer seconds), in simulated seconds; the same for every policy."""
    rng = random.Random(seed)
    mean = median * math.exp(sigma**2 / 2)
    rate = scenario.load * len(scenario.cards) / mean
    at, out = 0.0, []
    for i in range(n):
        at += rng.expovariate(rate)
        shares = scenario.mix[0] if i < n // 2 else scenario.mix[1]
        pick, acc, model = rng.random(), 0.0, ""
        for model, share in shares.items():  # noqa: B007 - the one picked is kept
            acc += share
            if pick < acc:
                break
        out.append((at, model, rng.lognormvariate(math.log(median), sigma)))
    return out


async def submit(base: str, token: str, plan: list, scale: float) -> list[int]:
    import httpx

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(
        base_url=base, timeout=120, headers={"Authorization": f"Token {token}"}, limits=limits
    ) as client:
        start = time.monotonic()

        async def one(i: int, at: float, model: str, seconds: float) -> int:
            await asyncio.sleep(max(0.0, start + at * scale - time.monotonic()))
            tokens = max(1, round(seconds * TPS))
            text = f"{QUESTIONS[i % len(QUESTIONS)]} [[tokens={tokens}]]"
            body = {"text": text, "corpus": slug(model)}
            r = await client.post("/api/v1/questions/", json=body)
            r.raise_for_status()
            return r.json()["id"]

        return list(await asyncio.gather(*(one(i, *q) for i, q in enumerate(plan))))


def slug(model: str) -> str:
    return "m-" + model.replace(":", "-").replace(".", "-")


def run_policy(stack, scenario, policy: str, plan: list, args) -> dict:
    import redis
    from django.conf import settings

    from chat.models import Question

    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    scale = args.scale
    env = {
        "RMASSIMO_PLACEMENT": "shared" if policy == "shared" else "models",
        "RMASSIMO_PLACEMENT_TICK_S": str(max(0.2, 0.5 * scale)),
        "RMASSIMO_PLACEMENT_WINDOW_S": str(60 * scale),
        "RMASSIMO_PLACEMENT_LOAD_S": str(10 * scale),
        "RMASSIMO_PLACEMENT_SERVICE_S": str(5 * scale),
        "RMASSIMO_HEARTBEAT_S": "1",
        # Production's wait for Ollama (120 s), in simulated time: the test settings' 10 s
        # would cut off the first answer of a 40 s model load.
        "RMASSIMO_OLLAMA_TIMEOUT": str(120 * scale),
        "RMASSIMO_LLM_BACKEND": "ollama",
    }
    stubs, workers = [], []
    models = list(scenario.models)
    for label, memory in scenario.cards:
        if policy == "fixed":
            pulled = [scenario.fixed[label]]
        else:
            pulled = scenario.pulled[label] if scenario.pulled else models
        stub = stack.stub(
            name=label,
            chat_models=pulled,
            embed_models=["bge-m3"],
            models=scenario.models,
            gpus=memory,
            keep_alive=-1,
            parallel=1,
            tps=TPS,
            time_scale=scale,
        )
        stubs.append(stub)
        queues = ["interactive", "batch", f"gpu.{label[3:]}"]
        if policy != "shared":
            queues = [f"gpu.{label[3:]}"]
        workers.append(
            stack.worker(
                name=f"{label}@fleet", queues=queues, ollama_url=stub.url, gpu=label, **env
            )
        )
    base = stack.web(**env)
    token = token_for("bench")
    # Each worker lists its models before the first question (routing reads them).
    wait(lambda: _all_listed(len(scenario.cards), policy), timeout=60, what="models listed")

    t0 = time.monotonic()
    ids = asyncio.run(submit(base, token, plan, scale))
    wait(
        lambda: Question.objects.filter(pk__in=ids, status__in=Question.FINAL).count() == len(ids),
        timeout=3600,
        what=f"{policy}: every question answered",
    )
    wall = time.monotonic() - t0
    rows = list(Question.objects.filter(pk__in=ids))
    failed = [q for q in rows if q.status != "done"]
    responses = [(q.finished_at - q.created_at).total_seconds() / scale for q in rows]
    service = [
        (q.finished_at - q.started_at).total_seconds() / scale
        for q in rows
        if q.started_at and q.finished_at
    ]
    waits = [(q.started_at - q.created_at).total_seconds() / scale for q in rows if q.started_at]
    busy: dict[str, float] = {}
    for q in rows:
        if q.started_at and q.finished_at:
            busy[q.gpu] = busy.get(q.gpu, 0.0) + (q.finished_at - q.started_at).total_seconds()
    loads = {s.config["name"]: [e for e in s.events if e["event"] == "load"] for s in stubs}
    loading = {name: sum(e["seconds"] for e in evs) for name, evs in loads.items()}
    per_model = {}
    for q, r in zip(rows, responses, strict=True):
        per_model.setdefault(q.conversation.corpus.chat_model, []).append(r)
    searched = retrieval_evidence(ids, stubs)
    for worker in workers:
        worker.stop()
    stack.stop_web()
    stack.procs = [p for p in stack.procs if p not in workers]
    for stub in stubs:
        stub.stop()
    stack.stubs = [s for s in stack.stubs if s not in stubs]
    return {
        "policy": policy,
        "done": len(rows) - len(failed),
        "failed": len(failed),
        "mean": sum(responses) / len(responses),
        "p95": percentile(responses, 0.95),
        "service": sum(service) / max(1, len(service)),
        "wait": sum(waits) / max(1, len(waits)),
        "loads": sum(len(v) for v in loads.values()),
        "loads_per_card": {name: len(v) for name, v in loads.items()},
        "loading_share": sum(loading.values()) / max(1e-9, sum(busy.values())),
        "loading_per_card": {name: loading[name] / max(1e-9, busy.get(name, 0)) for name in loads},
        "per_model": {m: (sum(v) / len(v), len(v)) for m, v in per_model.items()},
        "wall": wall,
        "errors": sorted({q.error for q in failed})[:3],
        "searched": searched,
    }


def _all_listed(n: int, policy: str) -> bool:
    from workers import health

    online = [w for w in health.workers() if w["gpu"] != "cpu" and w["online"]]
    return len(online) == n and (policy == "shared" or all(w["models"] for w in online))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="mix")
    parser.add_argument("--questions", type=int, default=1060)
    parser.add_argument("--scale", type=float, default=0.2)
    parser.add_argument("--median", type=float, default=2.0)
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--policies", default="shared,fixed,placement")
    args = parser.parse_args()
    scenario = SCENARIOS[args.scenario]

    stack = Stack(name="fleet")
    try:
        # BM25 retrieval in Milvus: the bench is about the chat models. With no embedding
        # model, the CPU worker can write the passages too (the GPU workers start later,
        # one set per policy).
        stack.cpu_worker("batch")
        for model in scenario.models:
            indexed_corpus(
                slug(model), demo_documents(), name=model, chat_model=model, embed_model="none"
            )
        plan = arrivals(scenario, args.questions, args.seed, args.median, args.sigma)
        span = plan[-1][0]
        print(
            f"scenario {args.scenario}: {len(scenario.cards)} workers "
            f"({', '.join(label for label, _ in scenario.cards)}), models "
            + ", ".join(
                f"{m} ({s['size'] / GB:.0f} GB, load {s['load_s']:g} s)"
                for m, s in scenario.models.items()
            )
            + f"; {len(plan)} questions over {span:.0f} s at {scenario.load:.0%} load, "
            f"time scale {args.scale:g}"
        )
        mean_answer = sum(q[2] for q in plan) / len(plan)
        results = []
        for policy in args.policies.split(","):
            result = run_policy(stack, scenario, policy, plan, args)
            results.append(result)
            print(
                f"  {policy:10} done {result['done']}, failed {result['failed']} "
                f"in {result['wall']:.0f} s wall; mean wait {result['wait']:.1f} s, mean "
                f"time on a card {result['service']:.2f} s (answer alone: {mean_answer:.2f} s) "
                f"{result['errors']}",
                flush=True,
            )
        print()
        print(
            f"{'policy':12}{'mean':>9}{'p95':>9}{'loads':>7}{'loading':>9}  "
            "loads per card / loading share of busy time per card; mean per model"
        )
        for r in results:
            cards = ", ".join(
                f"{name} {r['loads_per_card'][name]}/{r['loading_per_card'][name]:.0%}"
                for name in r["loads_per_card"]
            )
            models = ", ".join(f"{m} {mean:.1f} s ({n})" for m, (mean, n) in r["per_model"].items())
            print(
                f"{r['policy']:12}{r['mean']:>8.1f}s{r['p95']:>8.1f}s{r['loads']:>7}"
                f"{r['loading_share']:>9.1%}  {cards}; {models}"
            )
        if not all(r["searched"] for r in results):
            raise SystemExit("questions did not search the corpus: figures not valid")
        by = {r["policy"]: r for r in results}
        # A policy that failed questions (the shared queue sends a model's questions to cards
        # that lack it) is no baseline: its failures end fast and pull its mean down.
        others = [by[p] for p in ("shared", "fixed") if p in by and not by[p]["failed"]]
        for p in ("shared", "fixed", "placement"):
            if p in by and by[p]["failed"]:
                print(f"{p}: {by[p]['failed']} questions failed, left out of the comparison")
        if "placement" in by and others and not by["placement"]["failed"]:
            best_other = min(r["mean"] for r in others)
            ratio = best_other / by["placement"]["mean"]
            share = by["placement"]["loading_share"]
            print()
            print(
                f"placement: mean {ratio:.1f}x lower than the better of the others "
                f"(target: at least 3x) {'OK' if ratio >= 3 else 'MISSED'}; "
                f"{share:.1%} of busy time loading (target: under 5%) "
                f"{'OK' if share < 0.05 else 'MISSED'}"
            )
    finally:
        stack.close()


if __name__ == "__main__":
    main()
