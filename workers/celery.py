"""The Celery app. Queues, in the order a GPU worker takes them:

- `interactive`: questions; always first, so a question waits for at most one batch.
- `batch`: embedding batches of ingestion jobs, and evaluation items.
- `gpu.<i>`: questions pinned to one card (a retry sent to another card).
- `cpu`: parsing, chunking and housekeeping, on the CPU worker.
"""

import os

from celery import Celery
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rmassimo_site.settings")

app = Celery("rmassimo")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_queues = [Queue("interactive"), Queue("batch"), Queue("cpu")]
app.conf.task_create_missing_queues = True
app.conf.task_routes = {
    "chat.tasks.answer_question": {"queue": "interactive"},
    "chat.tasks.reap": {"queue": "cpu"},
    "ingestion.tasks.embed_batch": {"queue": "batch"},
    # Evaluation items use the GPU like questions, but wait behind them.
    "evaluation.tasks.evaluate_item": {"queue": "batch"},
    "ingestion.tasks.*": {"queue": "cpu"},
}
app.autodiscover_tasks()


@app.on_after_configure.connect
def _schedule(sender, **kwargs) -> None:
    from django.conf import settings

    # The reaper puts back questions whose message or worker was lost (see chat.reaper).
    sender.add_periodic_task(
        settings.RMASSIMO_REAPER_S,
        sender.signature("chat.tasks.reap"),
        name="requeue stale questions",
    )
