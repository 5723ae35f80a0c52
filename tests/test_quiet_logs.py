"""What a person running the service sees: a log that speaks when something happened, and
a favicon."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.conftest import SESSION_WORKER
from tests.processes import wait_for
from workers import health
from workers.celery import app

pytestmark = pytest.mark.django_db(transaction=True)


def jobs_done() -> int:
    return next(w["jobs_done"] for w in health.workers() if w["name"] == SESSION_WORKER)


def test_the_periodic_reaper_is_silent_when_it_did_nothing(worker):
    before, log_start = jobs_done(), len(worker.output())
    # What celery beat sends every RMASSIMO_REAPER_S, then a task that is not periodic.
    app.send_task("chat.tasks.reap", queue="cpu")
    wait_for(lambda: jobs_done() > before, timeout=60, what="the reaper to run")
    app.send_task("chat.tasks.answer_question", args=[987654321], queue="interactive")
    wait_for(lambda: jobs_done() > before + 1, timeout=60, what="the other task to run")
    log = worker.output()[log_start:]
    assert "chat.tasks.reap" not in log, log
    # Other tasks still say they ran (the worker logs at INFO here).
    assert "chat.tasks.answer_question" in log, log


def test_beat_does_not_announce_each_periodic_send():
    import logging

    from workers.log_filters import QuietPeriodicTasks

    def record(name, msg, args):
        return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)

    quiet = QuietPeriodicTasks()
    sent = record(
        "celery.beat",
        "Scheduler: Sending due task %s (%s)",
        ("requeue stale questions", "chat.tasks.reap"),
    )
    assert not quiet.filter(sent)
    assert quiet.filter(record("celery.beat", "beat: Starting...", ()))


def test_there_is_a_favicon():
    response = Client().get("/favicon.ico")
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    assert body[:4] == b"\x00\x00\x01\x00"  # an ICO file
