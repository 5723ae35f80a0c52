"""The last hour of the fleet, for the admin's fleet page (people without Prometheus).

Questions, their timings and failures come from the database. What the database does not
keep is sampled into Redis, trimmed to the last hour: queue depths (by the heartbeat of
whichever worker takes each 10-second slot) and model loads (core.metrics).
"""

from __future__ import annotations

import json
import time

from workers import health

QUEUES_KEY = "rmassimo:fleet:queues"
SLOT_KEY = "rmassimo:fleet:slot:{}"
SAMPLE_EVERY_S = 10
HISTORY_S = 3600


def sample_queues(*, now: float | None = None) -> bool:
    """Record the queue depths once per slot, whichever worker's heartbeat comes first."""
    now = time.time() if now is None else now
    slot = int(now // SAMPLE_EVERY_S)
    client = health.client()
    if not client.set(SLOT_KEY.format(slot), 1, nx=True, ex=SAMPLE_EVERY_S * 3):
        return False
    queues = sorted({"interactive", "batch", "cpu", *health.question_queues()})
    depths = health.queue_depths(queues)
    entry = json.dumps({"at": round(now, 3), "depths": depths}, sort_keys=True)
    pipe = client.pipeline()
    pipe.zadd(QUEUES_KEY, {entry: now})
    pipe.zremrangebyscore(QUEUES_KEY, 0, now - HISTORY_S)
    pipe.execute()
    return True


def queue_samples(*, since: float) -> list[dict]:
    return [json.loads(raw) for raw in health.client().zrangebyscore(QUEUES_KEY, since, "+inf")]


def load_events(*, since: float) -> list[dict]:
    from core.metrics import LOADS_KEY

    return [json.loads(raw) for raw in health.client().zrangebyscore(LOADS_KEY, since, "+inf")]
