"""Prometheus metrics of every process: definitions, the calls that record them, and the
exposition each process serves.

How the processes are scraped (docs/operations.md has the whole story):

- The web process (one daphne) keeps its metrics in memory and serves them at `/metrics`
  (staff, or `Authorization: Bearer <RMASSIMO_METRICS_TOKEN>`), with the fleet's view read
  from Redis at scrape time: queue depths, workers online and healthy.
- A Celery worker is a main process and prefork children that run the jobs and record
  the figures. prometheus_client's multiprocess mode is used there: every process writes
  its values to memory-mapped files in the worker's own PROMETHEUS_MULTIPROC_DIR, and the
  main process serves their sum on the worker's port (RMASSIMO_METRICS_PORT), with its
  card's NVML telemetry. A child that is replaced loses nothing: its files stay and are
  summed. One exporter per child was the alternative; children come and go and would
  need a port each, which nobody could scrape without a discovery service.

RMASSIMO_METRICS=0 turns every recording call into a no-op (the overhead bench compares).
Labels take bounded values only: card labels, model names, corpus slugs, queue and task
names, Ollama server URLs from the settings, outcomes; never ids or user names.
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)
# A `_created` series per labelled child doubles the series and nothing here reads them.
disable_created_metrics()

ENABLED = os.environ.get("RMASSIMO_METRICS", "1").strip().lower() not in ("0", "false", "no", "off")
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds: from a cached answer's few milliseconds to a long answer on a busy card.
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_QUICK = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LOADS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)

# --- questions (the answer job) -------------------------------------------------------
QUESTIONS = Counter(
    "rmassimo_questions",
    "Questions that reached an end, by corpus, model, card and outcome (done, failed, cancelled).",
    ["corpus", "model", "gpu", "outcome"],
)
QUESTION_QUEUE_WAIT = Histogram(
    "rmassimo_question_queue_wait_seconds",
    "From a question's creation to a GPU worker claiming it.",
    ["gpu"],
    buckets=_LATENCY,
)
QUESTION_FIRST_TOKEN = Histogram(
    "rmassimo_question_first_token_seconds",
    "From a question's creation to the first token of its answer: what the asker waits.",
    ["gpu"],
    buckets=_LATENCY,
)
QUESTION_RETRIEVAL = Histogram(
    "rmassimo_question_retrieval_seconds",
    "Retrieval of a question's passages: query embedding and Milvus search.",
    ["gpu"],
    buckets=_QUICK,
)
QUESTION_GENERATION = Histogram(
    "rmassimo_question_generation_seconds",
    "The model's generation time of an answer, as the model server reports it.",
    ["gpu", "model"],
    buckets=_LATENCY,
)
QUESTION_DURATION = Histogram(
    "rmassimo_question_duration_seconds",
    "From a question's creation to its end, by outcome.",
    ["gpu", "outcome"],
    buckets=_LATENCY,
)

# --- model calls (core.llm), named after the OpenTelemetry GenAI conventions ------------
GEN_AI_FIRST_TOKEN = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai.server.time_to_first_token: request sent to the model server until its first token.",
    ["gen_ai_request_model", "gpu"],
    buckets=_LATENCY,
)
GEN_AI_TOKENS = Histogram(
    "gen_ai_client_token_usage",
    "gen_ai.client.token.usage: tokens per chat call, input (prompt) or output (generated).",
    ["gen_ai_token_type", "gen_ai_request_model", "gpu"],
    buckets=_TOKENS,
)
MODEL_LOADS = Histogram(
    "rmassimo_model_load_seconds",
    "Model loads seen in the server's load_duration, and how long they took; _count is loads.",
    ["gpu", "model"],
    buckets=_LOADS,
)
OLLAMA_ERRORS = Counter(
    "rmassimo_ollama_errors",
    "Failed calls to an Ollama server, by server and HTTP status (or unreachable, timeout, "
    "broken).",
    ["server", "status"],
)

# --- the vector store (core.vectorstore) -------------------------------------------------
MILVUS_DURATION = Histogram(
    "rmassimo_milvus_request_duration_seconds",
    "Calls to Milvus by operation, failed ones included.",
    ["operation"],
    buckets=_QUICK,
)
MILVUS_ERRORS = Counter(
    "rmassimo_milvus_errors", "Failed calls to Milvus by operation.", ["operation"]
)

# --- ingestion ------------------------------------------------------------------------
INGESTION_DOCUMENTS = Counter(
    "rmassimo_ingestion_documents",
    "Documents added to a corpus (new or changed).",
    ["corpus"],
)
INGESTION_CHUNKS = Counter(
    "rmassimo_ingestion_chunks",
    "Chunks embedded and written to the vector store.",
    ["corpus"],
)
INGESTION_JOBS = Counter(
    "rmassimo_ingestion_jobs",
    "Ingestion jobs that reached an end, by outcome (done, failed).",
    ["corpus", "outcome"],
)

# --- Celery (workers.signals) -----------------------------------------------------------
TASKS = Counter(
    "rmassimo_celery_tasks",
    "Celery tasks run, by task, queue and state (succeeded, failed, retried).",
    ["task", "queue", "state"],
)
TASK_DURATION = Histogram(
    "rmassimo_celery_task_duration_seconds", "Run time of Celery tasks.", ["task"], buckets=_LATENCY
)
QUEUE_WAIT = Histogram(
    "rmassimo_celery_queue_wait_seconds",
    "From a task being published to a worker starting it, by queue (countdowns included).",
    ["queue"],
    buckets=_LATENCY,
)
GPU_BUSY = Counter(
    "rmassimo_gpu_busy_seconds",
    "Seconds a GPU worker spent running jobs (answers, embedding batches); over "
    "rmassimo_gpu_slots, its busy share.",
    ["gpu"],
)
GPU_SLOTS = Gauge(
    "rmassimo_gpu_slots",
    "Jobs at once a GPU worker runs (its Celery concurrency).",
    ["gpu"],
    multiprocess_mode="max",
)

# --- the web process ------------------------------------------------------------------
WEBSOCKETS = Gauge(
    "rmassimo_websocket_connections",
    "Open websocket connections following a conversation.",
    multiprocess_mode="livesum",
)

# A server's load_duration also counts waiting for the scheduler and a warm model's few
# milliseconds; from this much on, a model was (re)loaded.
MODEL_LOAD_MIN_S = float(os.environ.get("RMASSIMO_MODEL_LOAD_MIN_S", "0.25"))


# --- recording calls: each one line at its call site ----------------------------------


def _seconds(start, end) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


def question_finished(question, *, outcome: str | None = None, finished_at=None) -> None:
    """Record a question that reached done, failed or cancelled, from its row (`outcome`
    and `finished_at` when the row object was not updated with them)."""
    if not ENABLED:
        return
    try:
        gpu = question.gpu or "none"
        status = str(outcome or question.status)
        corpus = question.conversation.corpus.slug
        model = question.model or question.conversation.corpus.effective_chat_model
        QUESTIONS.labels(corpus, model, gpu, status).inc()
        created = question.created_at
        total = _seconds(created, finished_at or question.finished_at)
        if total is not None:
            QUESTION_DURATION.labels(gpu, status).observe(total)
        if status != "done":
            return
        wait = _seconds(created, question.started_at)
        if wait is not None:
            QUESTION_QUEUE_WAIT.labels(gpu).observe(wait)
        first = _seconds(created, question.first_token_at)
        if first is not None:
            QUESTION_FIRST_TOKEN.labels(gpu).observe(first)
        if question.retrieval_ms is not None:
            QUESTION_RETRIEVAL.labels(gpu).observe(question.retrieval_ms / 1000)
        if question.generation_ms is not None:
            QUESTION_GENERATION.labels(gpu, model).observe(question.generation_ms / 1000)
    except Exception:  # noqa: BLE001 - a figure must never fail an answer
        logger.debug("could not record a question", exc_info=True)


def model_call(
    *,
    model: str,
    gpu: str,
    first_token_s: float | None,
    prompt_tokens: int,
    completion_tokens: int,
    load_s: float,
) -> None:
    """Record one streamed chat call's figures, as the model server reported them."""
    if not ENABLED:
        return
    if first_token_s is not None:
        GEN_AI_FIRST_TOKEN.labels(model, gpu).observe(first_token_s)
    if prompt_tokens:
        GEN_AI_TOKENS.labels("input", model, gpu).observe(prompt_tokens)
    if completion_tokens:
        GEN_AI_TOKENS.labels("output", model, gpu).observe(completion_tokens)
    if load_s >= MODEL_LOAD_MIN_S:
        MODEL_LOADS.labels(gpu, model).observe(load_s)
        _remember_load(gpu=gpu, model=model, seconds=load_s)


def ollama_error(*, server: str, status: str) -> None:
    if ENABLED:
        OLLAMA_ERRORS.labels(server, status).inc()


def milvus_call(operation: str, seconds: float, *, failed: bool) -> None:
    if not ENABLED:
        return
    MILVUS_DURATION.labels(operation).observe(seconds)
    if failed:
        MILVUS_ERRORS.labels(operation).inc()


def ingestion_documents(*, corpus: str, count: int = 1) -> None:
    if ENABLED and count:
        INGESTION_DOCUMENTS.labels(corpus).inc(count)


def ingestion_chunks(*, corpus: str, count: int) -> None:
    if ENABLED and count:
        INGESTION_CHUNKS.labels(corpus).inc(count)


def ingestion_job(*, corpus: str, outcome: str, count: int = 1) -> None:
    if ENABLED and count:
        INGESTION_JOBS.labels(corpus, outcome).inc(count)


def websocket_opened() -> None:
    if ENABLED:
        WEBSOCKETS.inc()


def websocket_closed() -> None:
    if ENABLED:
        WEBSOCKETS.dec()


# --- Celery -----------------------------------------------------------------------------

SENT_AT_HEADER = "rmassimo_sent_at"


def task_published(headers: dict) -> None:
    """Stamp a message with its publishing time, for the queue wait (a retry is a new
    message, stamped anew)."""
    if ENABLED and headers is not None:
        headers[SENT_AT_HEADER] = time.time()


def task_started(task, gpu: str) -> None:
    if not ENABLED:
        return
    request = task.request
    request._rmassimo_started = time.monotonic()
    sent_at = getattr(request, SENT_AT_HEADER, None)
    if not sent_at:
        return
    try:
        since = float(sent_at)
        if request.eta:
            # A countdown is a wait someone asked for, not a queue's.
            from datetime import datetime

            since = max(since, datetime.fromisoformat(str(request.eta)).timestamp())
        QUEUE_WAIT.labels(_queue_of(request)).observe(max(0.0, time.time() - since))
    except (TypeError, ValueError):
        pass


def task_ended(task, state: str, gpu: str) -> None:
    if not ENABLED:
        return
    request = task.request
    TASKS.labels(task.name, _queue_of(request), state).inc()
    started = getattr(request, "_rmassimo_started", None)
    if started is None or state == "retried":
        return
    seconds = time.monotonic() - started
    request._rmassimo_started = None
    TASK_DURATION.labels(task.name).observe(seconds)
    if gpu != "cpu":
        GPU_BUSY.labels(gpu).inc(seconds)


def _queue_of(request) -> str:
    info = getattr(request, "delivery_info", None) or {}
    return str(info.get("routing_key") or info.get("queue") or "unknown")


# --- the fleet page's memory of model loads ----------------------------------------------

LOADS_KEY = "rmassimo:fleet:loads"
HISTORY_S = 3600


def _remember_load(*, gpu: str, model: str, seconds: float) -> None:
    """Keep the last hour of loads in Redis for the admin's fleet page."""
    try:
        import json

        from workers import health

        now = time.time()
        entry = json.dumps({"at": now, "gpu": gpu, "model": model, "seconds": round(seconds, 3)})
        pipe = health.client().pipeline()
        pipe.zadd(LOADS_KEY, {entry: now})
        pipe.zremrangebyscore(LOADS_KEY, 0, now - HISTORY_S)
        pipe.execute()
    except Exception:  # noqa: BLE001
        logger.debug("could not remember a model load", exc_info=True)


# --- exposition -------------------------------------------------------------------------


class FleetCollector(Collector):
    """What the web process knows of the whole fleet, read from Redis at scrape time."""

    def collect(self):
        from workers import health

        depth = GaugeMetricFamily(
            "rmassimo_queue_depth", "Messages waiting in each broker queue.", labels=["queue"]
        )
        up = GaugeMetricFamily(
            "rmassimo_worker_up",
            "1 when the worker's heartbeat is recent, by worker and card ('cpu' for the CPU "
            "worker).",
            labels=["worker", "gpu"],
        )
        healthy = GaugeMetricFamily(
            "rmassimo_worker_healthy",
            "1 while the worker's model server answers (an unhealthy GPU worker takes no work).",
            labels=["worker", "gpu"],
        )
        ready = GaugeMetricFamily(
            "rmassimo_gpu_workers_ready", "GPU workers online and healthy: able to answer."
        )
        try:
            workers = health.workers()
            queues = sorted(
                {"interactive", "batch", "cpu"} | {q for w in workers for q in w["queues"]}
            )
            for queue, count in health.queue_depths(queues).items():
                depth.add_metric([queue], count)
            count = 0
            for worker in workers:
                up.add_metric([worker["name"], worker["gpu"]], 1.0 if worker["online"] else 0.0)
                healthy.add_metric(
                    [worker["name"], worker["gpu"]], 1.0 if worker["healthy"] else 0.0
                )
                if worker["gpu"] != "cpu" and worker["online"] and worker["healthy"]:
                    count += 1
            ready.add_metric([], count)
        except Exception:  # noqa: BLE001 - Redis away: the scrape still answers, without these
            logger.warning("metrics: could not read the fleet from Redis", exc_info=True)
            return
        yield from (depth, up, healthy, ready)


_fleet_registry = CollectorRegistry(auto_describe=False)
_fleet_registry.register(FleetCollector())


def _process_registry() -> CollectorRegistry:
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def web_exposition() -> bytes:
    """The web process' own figures and the fleet's, in Prometheus' text format."""
    return generate_latest(_process_registry()) + generate_latest(_fleet_registry)


def worker_registry(gpu: str) -> CollectorRegistry:
    """What a worker's main process serves: every process' figures and its card's NVML."""
    registry = CollectorRegistry()
    if MULTIPROCESS:
        multiprocess.MultiProcessCollector(registry)
    else:
        # A worker started without a multiprocess directory (solo pool, or by hand):
        # its own process is all there is.
        for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001
            registry.register(collector)
    if gpu != "cpu":
        from core import gpu_telemetry

        registry.register(gpu_telemetry.NvmlCollector(gpu=gpu))
    return registry


def start_worker_exporter(*, gpu: str, slots: int) -> int | None:
    """Serve this worker's metrics on RMASSIMO_METRICS_PORT (0: any free port); returns the
    port, or None when no port is set."""
    from prometheus_client import start_http_server

    port = os.environ.get("RMASSIMO_METRICS_PORT", "").strip()
    if not ENABLED or not port:
        return None
    if gpu != "cpu":
        GPU_SLOTS.labels(gpu).set(slots)
    _start_error_counters_at_zero()
    address = os.environ.get("RMASSIMO_METRICS_ADDR", "127.0.0.1")
    server, _thread = start_http_server(int(port), addr=address, registry=worker_registry(gpu))
    return int(server.server_address[1])


OLLAMA_STATUSES = ("404", "429", "500", "503", "unreachable", "timeout", "broken")
MILVUS_OPERATIONS = ("search", "upsert", "delete", "flush", "count", "has_dense", "drop")


def _start_error_counters_at_zero() -> None:
    """A counter that appears with its first error shows no increase to rate(): the
    first failure would go unseen by the alerts. This worker's Ollama and Milvus error
    series start at 0 instead."""
    from workers import identity

    server = identity.ollama_url().rstrip("/")
    for status in OLLAMA_STATUSES:
        OLLAMA_ERRORS.labels(server, status)
    for operation in MILVUS_OPERATIONS:
        MILVUS_ERRORS.labels(operation)


def child_exited(pid: int) -> None:
    if MULTIPROCESS:
        try:
            multiprocess.mark_process_dead(pid)
        except Exception:  # noqa: BLE001
            logger.debug("could not mark process %s dead", pid, exc_info=True)
