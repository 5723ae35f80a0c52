"""Celery signal handlers: heartbeats from the worker process, job state from the pool."""

from __future__ import annotations

import logging
import time

from celery import signals

from core import metrics
from workers import health, identity, placement

logger = logging.getLogger(__name__)
_heartbeat: health.Heartbeat | None = None


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **kwargs) -> None:
    global _heartbeat
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values())
    health.run_started()
    health.set_healthy()
    placer = _start_placement(sender)
    _heartbeat = health.Heartbeat(
        queues=queues, node=sender.hostname, control=sender.app.control, placer=placer
    )
    _heartbeat.start()
    _start_metrics_exporter(sender)


def _start_placement(consumer) -> placement.Placer | None:
    """A GPU worker whose model runs on Ollama takes its queues from placement (by model);
    the CPU worker and an embedded-backend worker keep the queues they were started with."""
    if identity.gpu_label() == "cpu" or placement.mode() != placement.MODELS:
        return None
    from core import llm

    try:
        if llm.backend().embedded:
            return None
    except llm.LLMError:
        return None
    # In the order given with -Q: the order the worker polls them in.
    base = [q.name for q in consumer.app.amqp.queues.consume_from.values()]
    placer = placement.Placer(node=consumer.hostname, control=consumer.app.control, base=base)
    placer.start()
    return placer


def _start_metrics_exporter(consumer) -> None:
    controller = getattr(consumer, "controller", None)
    slots = int(getattr(controller, "concurrency", None) or 1)
    try:
        port = metrics.start_worker_exporter(gpu=identity.gpu_label(), slots=slots)
    except OSError:
        # The port is taken (another worker, a previous run): the worker still works.
        logger.exception("could not serve this worker's metrics")
        return
    if port:
        logger.info("metrics of %s on port %s", consumer.hostname, port)


@signals.worker_shutdown.connect
def _stop_heartbeat(**kwargs) -> None:
    if _heartbeat is not None:
        _heartbeat.stopping.set()
    try:
        health.gone()
    except Exception:  # noqa: BLE001 - shutting down; Redis may be gone too
        logger.debug("could not mark the worker gone", exc_info=True)


@signals.task_prerun.connect
def _check_connections(**kwargs) -> None:
    """Before each task, what Django does before each request: drop a connection that
    failed or outlived CONN_MAX_AGE, and check the one kept on its first use.

    Workers keep their connections between tasks (CELERY_DB_REUSE_MAX): opening one per
    task was a fifth of an embedding batch's time. Without this check a connection broken
    by a database restart would fail every task until the next periodic close.
    """
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        connection.close_if_unusable_or_obsolete()


@signals.task_prerun.connect
def _job_started(task_id=None, task=None, args=None, **kwargs) -> None:
    global _job_began
    _job_began = time.monotonic()
    try:
        health.job_started(task=task.name, task_id=task_id, args=list(args or []))
    except Exception:  # noqa: BLE001 - bookkeeping must never fail a job
        logger.debug("could not record the job start", exc_info=True)


@signals.task_postrun.connect
def _job_finished(task=None, **kwargs) -> None:
    try:
        health.job_finished()
        _learn_answer_time(task)
    except Exception:  # noqa: BLE001
        logger.debug("could not record the job end", exc_info=True)


_job_began = 0.0


def _learn_answer_time(task) -> None:
    """Placement weighs backlogs by each model's mean answer time, learned here: an answer
    taken from a model's queue counts for that model (its load included)."""
    if task is None or task.name != "chat.tasks.answer_question":
        return
    queue = (getattr(task.request, "delivery_info", None) or {}).get("routing_key") or ""
    model = placement.model_of(queue)
    if model and _job_began:
        placement.learn_service(model, time.monotonic() - _job_began)


# --- metrics: task counts, queue wait and card busy time, from Celery's own signals -----


@signals.before_task_publish.connect
def _stamp_published(headers=None, **kwargs) -> None:
    metrics.task_published(headers)


@signals.task_prerun.connect
def _metrics_task_started(task=None, **kwargs) -> None:
    try:
        metrics.task_started(task, identity.gpu_label())
    except Exception:  # noqa: BLE001 - figures must never fail a job
        logger.debug("could not record a task start", exc_info=True)


_STATES = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried"}


@signals.task_postrun.connect
def _metrics_task_ended(task=None, state=None, **kwargs) -> None:
    try:
        metrics.task_ended(task, _STATES.get(str(state), str(state).lower()), identity.gpu_label())
    except Exception:  # noqa: BLE001
        logger.debug("could not record a task end", exc_info=True)


@signals.worker_process_shutdown.connect
def _metrics_child_exited(pid=None, **kwargs) -> None:
    import os

    metrics.child_exited(pid or os.getpid())
