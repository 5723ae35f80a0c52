"""The Celery app. Queues, in the order a GPU worker takes them:

- `interactive`: questions; always first, so a question waits for at most one batch.
- `batch`: embedding batches of ingestion jobs.
- `gpu.<i>`: work pinned to one card (warm-up, health).
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
    "ingestion.tasks.embed_batch": {"queue": "batch"},
    "ingestion.tasks.*": {"queue": "cpu"},
    "workers.tasks.*": {"queue": "cpu"},
}
app.autodiscover_tasks()
