"""Thin tasks: take an id, call one step. Each kind has its own time limit."""

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError

from chat import answering, reaper
from workers.celery import HOUSEKEEPING_LIMIT_S, limits


@shared_task(
    name="chat.tasks.answer_question",
    bind=True,
    max_retries=None,
    # The database away (a restart): the message is sent again rather than lost, and the
    # claim decides, once it is back, whether there is anything left to do.
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=1,
    retry_backoff_max=30,
    **limits(settings.RMASSIMO_ANSWER_TIME_LIMIT),
)
def answer_question(self, question_id: int) -> None:
    retry_in = answering.question_answer(question_id=question_id)
    if retry_in:
        raise self.retry(countdown=retry_in)


@shared_task(name="chat.tasks.reap", **limits(HOUSEKEEPING_LIMIT_S))
def reap() -> dict:
    return reaper.requeue_stale()
