"""Queues per model, routing at enqueue, and the placement loop of each GPU worker.

With RMASSIMO_PLACEMENT=models (the default) a question for chat model M waits in the
queue `interactive.M`, an embedding batch for embedding model E in `batch.E`. A GPU worker
consumes the question queue of the one chat model it serves, then its own pinned queue,
then the batch queues of every embedding model its Ollama has: questions still go ahead
of batches. Which model a worker serves is decided by `workers.policy`, on each worker,
every RMASSIMO_PLACEMENT_TICK_S, from what the heartbeats and the broker say; a change is
made with Celery's own `cancel_consumer`/`add_consumer`, one worker at a time (a short
Redis lock), so two workers do not both leave a model. docs/fleet.md has the rules.

RMASSIMO_PLACEMENT=shared keeps one `interactive` and one `batch` queue for every worker:
any worker takes any question, whatever model it needs (what a single-model fleet needs,
and the baseline of bench/fleet.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import redis
from django.conf import settings

from workers import health, identity, policy

logger = logging.getLogger(__name__)

MODELS = "models"
SHARED = "shared"
QUESTIONS = "interactive"
BATCHES = "batch"
_ARRIVALS = "rmassimo:arrivals:"
_LEARNED = "rmassimo:learned:"
_LOCK = "rmassimo:placement:lock"
_LOAD_FLOOR_S = 0.05  # a load_duration under this is a warm model's bookkeeping, not a load


def mode() -> str:
    return SHARED if str(settings.RMASSIMO_PLACEMENT).strip().lower() == SHARED else MODELS


def canonical(model: str) -> str:
    """Ollama's own name for a model: "bge-m3" is "bge-m3:latest"."""
    model = model.strip()
    return model if ":" in model else f"{model}:latest"


def question_queue(model: str) -> str:
    return f"{QUESTIONS}.{canonical(model)}" if mode() == MODELS else QUESTIONS


def batch_queue(model: str) -> str:
    return f"{BATCHES}.{canonical(model)}" if mode() == MODELS and model else BATCHES


def model_of(queue: str) -> str | None:
    """The model a question or batch queue is for; None for any other queue."""
    for prefix in (f"{QUESTIONS}.", f"{BATCHES}."):
        if queue.startswith(prefix):
            return queue[len(prefix) :]
    return None


def missing_model_message(model: str) -> str:
    return (
        f"No GPU worker's Ollama has the model '{model}'. Pull it on the GPU servers with "
        f"`ollama pull {model}`, or give the corpus a model they have."
    )


# --- routing, at enqueue --------------------------------------------------------------


def route_question(model: str, *, count: bool = True) -> tuple[str | None, str]:
    """(queue, "") for a question that needs chat model `model`, or (None, why) when no
    online worker can answer it: its Ollama lacks the model, so waiting would not help.

    With no GPU worker online at all the question is queued: workers may be restarting,
    and the reaper fails it with the reason if none comes back in time.
    """
    if mode() == SHARED:
        return QUESTIONS, ""
    workers = [w for w in health.workers() if w["gpu"] != "cpu" and w["online"]]
    if not workers:
        return question_queue(model), ""
    if any(canonical(model) in w["models"] for w in workers):
        if count:
            record_arrival(model)
        return question_queue(model), ""
    if any(w["backend"] == "embedded" for w in workers):
        # The small embedded model answers whatever model was asked for (and says so).
        return QUESTIONS, ""
    if all(w["backend"] == "ollama" and not w["models_seen"] for w in workers):
        return question_queue(model), ""  # none has listed its models yet
    return None, missing_model_message(model)


def _serving_queue(model: str) -> str:
    """Where a question for `model` goes when it is (re)sent: its model's queue, or the
    shared one when only an embedded-backend worker can answer it."""
    workers = [w for w in health.workers() if w["gpu"] != "cpu" and w["online"]]
    if any(canonical(model) in w["models"] for w in workers):
        return question_queue(model)
    if any(w["backend"] == "embedded" for w in workers):
        return QUESTIONS
    return question_queue(model)


def route_task(name, args, kwargs, options, task=None, **kw):  # noqa: ARG001 - Celery's API
    """Celery router: a question goes to its chat model's queue, an embedding batch to its
    embedding model's. A queue named when the task is sent (a card's own) wins."""
    if mode() != MODELS:
        return None
    if name == "chat.tasks.answer_question" and args:
        from chat import selectors

        model = selectors.question_chat_model(args[0])
        return {"queue": _serving_queue(model)} if model else None
    if name == "ingestion.tasks.embed_batch":
        from ingestion import selectors

        ranges = (kwargs or {}).get("ranges") or []
        model = selectors.job_embed_model(ranges[0][0]) if ranges else ""
        return {"queue": batch_queue(model)} if model else None
    return None


def record_arrival(model: str) -> None:
    now = time.time()
    key = _ARRIVALS + canonical(model)
    window = settings.RMASSIMO_PLACEMENT_WINDOW_S
    pipe = health.client().pipeline()
    pipe.zadd(key, {uuid.uuid4().hex: now})
    pipe.zremrangebyscore(key, 0, now - window)
    pipe.expire(key, int(window) + 60)
    pipe.execute()


def arrival_rates(models: list[str]) -> dict[str, float]:
    """Questions per second over the last RMASSIMO_PLACEMENT_WINDOW_S, per model."""
    now = time.time()
    window = settings.RMASSIMO_PLACEMENT_WINDOW_S
    pipe = health.client().pipeline()
    for model in models:
        pipe.zcount(_ARRIVALS + model, now - window, now)
    return {m: n / window for m, n in zip(models, pipe.execute(), strict=True)}


# --- what the fleet has learned -------------------------------------------------------


def _learn(kind: str, model: str, seconds: float) -> None:
    key = _LEARNED + kind
    client = health.client()
    old = client.hget(key, canonical(model))
    value = seconds if old is None else 0.8 * float(old) + 0.2 * seconds
    client.hset(key, canonical(model), value)


def learn_load(model: str, seconds: float) -> None:
    """Record a model load (Ollama's load_duration); warm requests report ~0 and are skipped."""
    if seconds >= _LOAD_FLOOR_S:
        _learn("load", model, seconds)


def learn_service(model: str, seconds: float) -> None:
    _learn("service", model, seconds)


def learned(kind: str) -> dict[str, float]:
    return {m: float(v) for m, v in health.client().hgetall(_LEARNED + kind).items()}


# --- the worker's side ----------------------------------------------------------------


def ordered(serving: str | None, base: list[str], embed_models: list[str]) -> list[str]:
    """The queues a GPU worker consumes, in the order it takes them: its model's questions,
    questions pinned to it, batches of its embedding models, then the rest of `base`."""
    first = [question_queue(serving)] if serving else []
    pinned = [q for q in base if q == QUESTIONS or q.startswith("gpu.")]
    batches = [batch_queue(m) for m in sorted(embed_models)]
    rest = [q for q in base if q not in pinned]
    result: list[str] = []
    for queue in first + pinned + batches + rest:
        if queue not in result:
            result.append(queue)
    return result


class Placer(threading.Thread):
    """Keeps this worker's queues on the model it should serve (see `workers.policy`)."""

    def __init__(self, *, node: str, control, base: list[str]) -> None:
        super().__init__(name="placement", daemon=True)
        self.node = node
        self.control = control
        self.base = list(base)
        self.queues = list(base)  # what it consumes now, in order
        self.serving: str | None = None
        self.chat_models: list[str] = []
        self.embed_models: list[str] = []
        self.loaded: list[str] = []
        self.enabled = True
        self.refreshed = 0.0
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    # Heartbeat hands its health decisions to us: an unhealthy worker takes nothing.
    def set_enabled(self, on: bool) -> None:
        with self.lock:
            self.enabled = on
            self._apply(self._wanted() if on else [])

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.step()
            except redis.RedisError:
                logger.warning("placement could not reach Redis", exc_info=True)
            except Exception:  # noqa: BLE001 - the loop must outlive any hiccup
                logger.exception("placement step failed")
            self.stopping.wait(settings.RMASSIMO_PLACEMENT_TICK_S)

    def step(self) -> None:
        if time.monotonic() - self.refreshed >= settings.RMASSIMO_HEARTBEAT_S:
            self._refresh()
        with self.lock:
            if not self.enabled:
                return
            pick = policy.choose(self._view())
            if pick != self.serving:
                self._switch_to(pick)
            elif self.queues != self._wanted():
                self._apply(self._wanted())

    def _refresh(self) -> None:
        from core import llm

        self.refreshed = time.monotonic()
        try:
            pulled = llm.pulled_models(identity.ollama_url())
            loaded = llm.loaded_models(identity.ollama_url())
        except llm.LLMError as exc:
            logger.info("%s: %s", self.node, exc)
            return
        self.chat_models = sorted(m for m, embedding in pulled.items() if not embedding)
        self.embed_models = sorted(m for m, embedding in pulled.items() if embedding)
        self.loaded = sorted(loaded)
        self._publish()

    def _publish(self) -> None:
        health.publish_models(
            models=self.chat_models + self.embed_models,
            loaded=self.loaded,
            serving=self.serving or "",
            queues=self.queues,
        )

    def _view(self) -> policy.View:
        fleet = [
            w
            for w in health.workers()
            if w["gpu"] != "cpu" and w["online"] and w["healthy"] and w["name"] != self.node
        ]
        models = self.chat_models
        depths = health.queue_depths([question_queue(m) for m in models]) if models else {}
        servers = {m: sum(1 for w in fleet if w["serving"] == m) for m in models}
        idle = {
            m: sum(1 for w in fleet if w["serving"] == m and not w["current_job"]) for m in models
        }
        me = next((w for w in health.workers() if w["name"] == self.node), None)
        return policy.View(
            serving=self.serving,
            pulled=set(models),
            resident=set(self.loaded),
            busy=bool(me and me["current_job"]),
            waiting={m: depths.get(question_queue(m), 0) for m in models},
            servers=servers,
            idle_servers=idle,
            rate=arrival_rates(models) if models else {},
            service_s=learned("service"),
            load_s=learned("load"),
            default_service_s=settings.RMASSIMO_PLACEMENT_SERVICE_S,
            default_load_s=settings.RMASSIMO_PLACEMENT_LOAD_S,
        )

    def _switch_to(self, model: str | None) -> None:
        # One switch at a time across the fleet: decide again under the lock, on fresh data.
        token = uuid.uuid4().hex
        client = health.client()
        if not client.set(_LOCK, token, nx=True, px=5000):
            return
        try:
            pick = policy.choose(self._view())
            if pick == self.serving:
                return
            logger.info("%s: serving %s (was %s)", self.node, pick, self.serving)
            self.serving = pick
            self._apply(self._wanted())
            self._publish()
        finally:
            if client.get(_LOCK) == token:
                client.delete(_LOCK)

    def _wanted(self) -> list[str]:
        return ordered(self.serving, self.base, self.embed_models)

    def _apply(self, wanted: list[str]) -> None:
        """Consume `wanted`, in that order: cancel from the first queue out of place on, and
        add back in order (a worker polls its queues in the order it added them)."""
        current = self.queues
        keep = 0
        while keep < min(len(current), len(wanted)) and current[keep] == wanted[keep]:
            keep += 1
        for queue in current[keep:]:
            self.control.cancel_consumer(queue, destination=[self.node], reply=True, timeout=5)
        for queue in wanted[keep:]:
            self.control.add_consumer(queue, destination=[self.node], reply=True, timeout=5)
        self.queues = list(wanted)
        health.publish_models(queues=self.queues)

