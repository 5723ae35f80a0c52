"""Logging filters for the worker processes."""

from __future__ import annotations

import logging


def _periodic_task_names() -> set[str]:
    from workers.celery import app

    return {entry["task"] for entry in (app.conf.beat_schedule or {}).values()}


class QuietPeriodicTasks(logging.Filter):
    """Drops Celery's INFO lines ("Task ... received", "... succeeded in ...", beat's
    "Sending due task ...") for the tasks celery beat sends every few seconds: a log that
    says something every 15 s whether or not anything happened hides what did. The tasks
    log themselves when they act, and their failures still show (logged at ERROR)."""

    _names: set[str] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO or not record.name.startswith("celery."):
            return True
        if record.name == "celery.beat" and str(record.msg).startswith("Scheduler: Sending"):
            # Beat saying that it sent them, every RMASSIMO_REAPER_S: the same noise.
            return False
        data = getattr(record, "data", None)
        if not isinstance(data, dict) or "name" not in data:
            return True
        if QuietPeriodicTasks._names is None:
            QuietPeriodicTasks._names = _periodic_task_names()
        return data["name"] not in QuietPeriodicTasks._names
