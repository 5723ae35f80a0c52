"""Worker heartbeats and counters, kept in Redis for `GET /api/v1/workers/` and the admin.

The worker's main process beats every RMASSIMO_HEARTBEAT_S; its pool processes record the
job they are running. A worker whose last beat is older than three intervals is offline.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import redis
from django.conf import settings

from workers import identity

logger = logging.getLogger(__name__)

REGISTRY = "rmassimo:workers"
_FORGET_AFTER_S = 24 * 3600


def _key(name: str) -> str:
    return f"rmassimo:worker:{name}"


_client: redis.Redis | None = None
_client_pid: int | None = None


def client() -> redis.Redis:
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
        _client_pid = os.getpid()
    return _client


def offline_after_s() -> float:
    return 3 * settings.RMASSIMO_HEARTBEAT_S


def beat(*, queues: list[str], extra: dict | None = None) -> None:
    name = identity.worker_name()
    now = time.time()
    fields = {
        "name": name,
        "gpu": identity.gpu_label(),
        "ollama_url": identity.ollama_url() if identity.gpu_label() != "cpu" else "",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "queues": json.dumps(queues),
        "llm": answering_label() if identity.gpu_label() != "cpu" else "",
        "last_seen": now,
        **(extra or {}),
    }
    pipe = client().pipeline()
    pipe.hset(_key(name), mapping=fields)
    pipe.hsetnx(_key(name), "started_at", now)
    pipe.expire(_key(name), _FORGET_AFTER_S)
    pipe.zadd(REGISTRY, {name: now})
    pipe.zremrangebyscore(REGISTRY, 0, now - _FORGET_AFTER_S)
    pipe.execute()


def run_started() -> None:
    """A worker starting (again): its start time and counters are this run's. The record
    outlives the process (a day), so a restart would otherwise carry the last run's over."""
    key = _key(identity.worker_name())
    pipe = client().pipeline()
    pipe.hset(key, mapping={"started_at": time.time(), "jobs_done": 0})
    pipe.hdel(key, "current_job")
    pipe.execute()


def answering_label() -> str:
    """The model that answers in this worker, as the workers page names it."""
    from core import llm

    try:
        chosen = llm.backend()
    except llm.LLMError as exc:
        return f"unavailable: {exc}"[:200]
    if chosen.embedded:
        return f"{chosen.model} (embedded, llama.cpp)"
    return f"{chosen.model} (Ollama)"


def publish_models(**fields) -> None:
    """This worker's models (`models` pulled, `loaded` now, `serving`) and `queues`."""
    encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
    client().hset(_key(identity.worker_name()), mapping=encoded)


def job_started(*, task: str, task_id: str, args: list) -> None:
    job = json.dumps({"task": task, "id": task_id, "args": args, "since": time.time()})
    client().hset(_key(identity.worker_name()), "current_job", job)


def job_finished() -> None:
    pipe = client().pipeline()
    pipe.hdel(_key(identity.worker_name()), "current_job")
    pipe.hincrby(_key(identity.worker_name()), "jobs_done", 1)
    pipe.execute()


def llm_failed(message: str) -> None:
    """Count a failure of this worker's Ollama; enough in a row marks the GPU unhealthy."""
    key = _key(identity.worker_name())
    failures = client().hincrby(key, "llm_failures", 1)
    if failures >= settings.RMASSIMO_UNHEALTHY_AFTER:
        client().hset(
            key,
            mapping={"healthy": "0", "health_error": message[:500], "unhealthy_since": time.time()},
        )


def llm_succeeded() -> None:
    client().hset(_key(identity.worker_name()), mapping={"llm_failures": 0})


def set_healthy() -> None:
    client().hset(
        _key(identity.worker_name()),
        mapping={"healthy": "1", "health_error": "", "llm_failures": 0},
    )


def is_healthy() -> tuple[bool, float]:
    """(healthy, seconds since it was marked unhealthy)."""
    raw = client().hmget(_key(identity.worker_name()), "healthy", "unhealthy_since")
    healthy = raw[0] != "0"
    since = time.time() - float(raw[1] or 0) if not healthy else 0.0
    return healthy, since


def question_queues() -> list[str]:
    """The broker queues a question can wait in: the shared one, every model's (those the
    workers' Ollamas have) and every card's own."""
    seen = workers()
    pinned = sorted({q for w in seen for q in w["queues"] if q.startswith("gpu.")})
    models = sorted({f"interactive.{m}" for w in seen for m in w["models"]})
    return ["interactive", *models, *pinned]


def available_gpu_workers() -> list[dict]:
    """Online, healthy GPU workers, the least busy first."""
    ready = [w for w in workers() if w["gpu"] != "cpu" and w["online"] and w["healthy"]]
    return sorted(ready, key=lambda w: (w["current_job"] is not None, w["name"]))


def gone() -> None:
    """A clean shutdown: offline at once rather than after three missed beats."""
    client().hset(_key(identity.worker_name()), "last_seen", 0)


class Heartbeat(threading.Thread):
    """Beats, and takes a GPU worker off its queues while its Ollama keeps failing.

    An unhealthy worker stops consuming (so other cards get the work) and probes its
    Ollama every RMASSIMO_HEALTH_RETRY_S; when the probe answers, it consumes again.
    """

    def __init__(self, *, queues: list[str], node: str, control=None, placer=None) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self._queues = queues
        self.placer = placer  # when set, it owns the queues: health only turns it off and on
        self.node = node
        self.control = control
        self.consuming = True
        self.last_probe = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                beat(queues=self.queues, extra={"backend": self._backend()})
                self._sample_fleet()
                if self.control is not None and identity.gpu_label() != "cpu":
                    self._follow_health()
            except redis.RedisError:
                logger.warning("heartbeat could not reach Redis", exc_info=True)
            except Exception:  # noqa: BLE001 - the heartbeat must outlive any hiccup
                logger.exception("heartbeat step failed")
            self.stopping.wait(settings.RMASSIMO_HEARTBEAT_S)

    def _sample_fleet(self) -> None:
        from workers import fleet

        fleet.sample_queues()

    @property
    def queues(self) -> list[str]:
        return list(self.placer.queues) if self.placer is not None else self._queues

    def _backend(self) -> str:
        if identity.gpu_label() == "cpu":
            return ""
        from core import llm

        try:
            return llm.backend().name
        except llm.LLMError:
            return ""

    def _follow_health(self) -> None:
        from core import llm

        if llm.backend().embedded:
            return  # no server to watch: the model runs in this worker
        healthy, since = is_healthy()
        if not healthy and self.consuming:
            logger.warning(
                "%s: its Ollama keeps failing; not taking work until it answers", self.node
            )
            self._set_consuming(False)
        elif not healthy and since >= settings.RMASSIMO_HEALTH_RETRY_S:
            if time.monotonic() - self.last_probe >= settings.RMASSIMO_HEALTH_RETRY_S:
                self.last_probe = time.monotonic()
                problem = llm.probe(
                    model=settings.RMASSIMO_CHAT_MODEL, base_url=identity.ollama_url()
                )
                if problem is None:
                    logger.warning("%s: its Ollama answers again; taking work", self.node)
                    set_healthy()
                    self._set_consuming(True)
        elif healthy and not self.consuming:
            self._set_consuming(True)

    def _set_consuming(self, on: bool) -> None:
        if self.placer is not None:
            self.placer.set_enabled(on)
            self.consuming = on
            return
        for queue in self.queues:
            if on:
                self.control.add_consumer(queue, destination=[self.node], reply=True, timeout=5)
            else:
                self.control.cancel_consumer(queue, destination=[self.node], reply=True, timeout=5)
        self.consuming = on


def workers() -> list[dict]:
    """Every worker seen in the last day, with its state."""
    names = client().zrange(REGISTRY, 0, -1)
    if not names:
        return []
    pipe = client().pipeline()
    for name in names:
        pipe.hgetall(_key(name))
    now = time.time()
    result = []
    for raw in pipe.execute():
        if not raw:
            continue
        last_seen = float(raw.get("last_seen") or 0)
        current = json.loads(raw["current_job"]) if raw.get("current_job") else None
        result.append(
            {
                "name": raw.get("name", ""),
                "gpu": raw.get("gpu", ""),
                "host": raw.get("host", ""),
                "pid": int(raw.get("pid") or 0),
                "ollama_url": raw.get("ollama_url", ""),
                "online": now - last_seen < offline_after_s(),
                "healthy": raw.get("healthy", "1") == "1",
                "health_error": raw.get("health_error", ""),
                "last_seen": last_seen or None,
                "started_at": float(raw["started_at"]) if raw.get("started_at") else None,
                "current_job": current,
                "jobs_done": int(raw.get("jobs_done") or 0),
                "llm": raw.get("llm", ""),
                "queues": json.loads(raw.get("queues") or "[]"),
                "backend": raw.get("backend", ""),
                # what its Ollama has pulled, has loaded now, and the model it serves
                "models": json.loads(raw.get("models") or "[]"),
                "models_seen": "models" in raw,
                "loaded": json.loads(raw.get("loaded") or "[]"),
                "serving": raw.get("serving", ""),
            }
        )
    return sorted(result, key=lambda w: (w["gpu"] == "cpu", w["gpu"], w["name"]))


def queue_depths(queues: list[str]) -> dict[str, int]:
    """Messages waiting in each broker queue (kombu's Redis transport keeps a list per queue)."""
    pipe = client().pipeline()
    for queue in queues:
        pipe.llen(queue)
    return dict(zip(queues, (int(n) for n in pipe.execute()), strict=True))
