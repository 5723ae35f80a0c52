"""The placement policy in a discrete-event model of the fleet: no system, no overhead.

The same rules the workers run (workers.policy.choose), against the same scenario as
bench/fleet.py (a): 4 cards, two models that do not fit a card together, 10 s per load,
answers lognormal (median 2 s, sigma 0.8), Poisson arrivals at 80% load, the mix 80/20
turning to 20/80 halfway. It shows what the policy itself does, in seconds, for several
seeds; bench/fleet.py measures the real thing.

    .venv/bin/python bench/fleet_model.py [--questions 1060] [--seeds 7,8,9]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.policy import View, choose  # noqa: E402

MODELS = ("A", "B")


def arrivals(n: int, cards: int, seed: int, load=0.8, median=2.0, sigma=0.8):
    rng = random.Random(seed)
    rate = load * cards / (median * math.exp(sigma**2 / 2))
    at, out = 0.0, []
    for i in range(n):
        at += rng.expovariate(rate)
        share_a = 0.8 if i < n // 2 else 0.2
        out.append(
            (
                at,
                "A" if rng.random() < share_a else "B",
                rng.lognormvariate(math.log(median), sigma),
            )
        )
    return out


def simulate(policy: str, plan, cards=4, load_s=10.0, tick=0.5, window=60.0):
    serving = ["A", "A", "B", "B"] if policy == "fixed" else [None] * cards
    resident = list(serving)
    free_at = [0.0] * cards
    loading = serving_time = 0.0
    loads = 0
    queues = {"A": [], "B": [], "*": []}
    seen, done, learned = [], [], {}
    i, now = 0, 0.0
    while len(done) < len(plan):
        upcoming = [plan[i][0]] if i < len(plan) else []
        now = min(upcoming + [f for f in free_at if f > now] + [now + tick])
        while i < len(plan) and plan[i][0] <= now:
            queues["*" if policy == "shared" else plan[i][1]].append(plan[i])
            seen.append((plan[i][0], plan[i][1]))
            i += 1
        if policy == "placement":
            recent = [m for at, m in seen if at > now - window]
            rate = {m: recent.count(m) / min(window, max(now, 1e-9)) for m in MODELS}
            for card in range(cards):
                others = [k for k in range(cards) if k != card]
                view = View(
                    serving=serving[card],
                    pulled=set(MODELS),
                    resident={resident[card]} if resident[card] else set(),
                    busy=free_at[card] > now,
                    waiting={m: len(queues[m]) for m in MODELS},
                    servers={m: sum(serving[k] == m for k in others) for m in MODELS},
                    idle_servers={
                        m: sum(serving[k] == m and free_at[k] <= now for k in others)
                        for m in MODELS
                    },
                    rate=rate,
                    service_s=learned,
                    load_s={m: load_s for m in MODELS},
                )
                serving[card] = choose(view)
        for card in range(cards):
            if free_at[card] > now:
                continue
            queue = queues["*"] if policy == "shared" else queues.get(serving[card], [])
            if not queue:
                continue
            at, model, seconds = queue.pop(0)
            extra = 0.0
            if resident[card] != model:
                extra, loads, resident[card] = load_s, loads + 1, model
            loading += extra
            serving_time += seconds
            free_at[card] = now + extra + seconds
            learned[model] = 0.8 * learned.get(model, seconds) + 0.2 * (extra + seconds)
            done.append(free_at[card] - at)
    done.sort()
    return {
        "mean": sum(done) / len(done),
        "p95": done[int(0.95 * (len(done) - 1))],
        "loads": loads,
        "loading": loading / (loading + serving_time),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=1060)
    parser.add_argument("--seeds", default="7,8,9")
    args = parser.parse_args()
    print(f"{'seed':>4}  {'policy':10}{'mean':>9}{'p95':>9}{'loads':>7}{'loading':>9}")
    for seed in (int(s) for s in args.seeds.split(",")):
        plan = arrivals(args.questions, 4, seed)
        for policy in ("shared", "fixed", "placement"):
            r = simulate(policy, plan)
            print(
                f"{seed:>4}  {policy:10}{r['mean']:>8.1f}s{r['p95']:>8.1f}s{r['loads']:>7}"
                f"{r['loading']:>9.1%}"
            )


if __name__ == "__main__":
    main()
