"""The Celery app. Queues, in the order a GPU worker takes them:

- `interactive.<model>`: questions for that chat model; always first, so a question waits
  for at most one batch. Each GPU worker takes those of the model it serves
  (workers.placement; docs/fleet.md); `interactive` takes any question, as with
  RMASSIMO_PLACEMENT=shared or an embedded-backend worker.
- `gpu.<cards>@<host>`: questions pinned to one worker (a retry sent to another card).
- `batch.<model>`: embedding batches for that embedding model; `batch`: evaluation items,
  and every batch with RMASSIMO_PLACEMENT=shared.
- `cpu`: parsing and chunking, on the CPU worker.
- `housekeeping`: the reapers, on a worker of their own that nothing else feeds, so no
  parsing backlog can delay recovery.
"""

import os

from celery import Celery
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rmassimo_site.settings")

app = Celery("rmassimo")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_queues = [Queue("interactive"), Queue("batch"), Queue("cpu")]
app.conf.task_create_missing_queues = True
app.conf.task_routes = (
    # Routing at enqueue, by model; the table below is the rest (and the shared mode).
    "workers.placement.route_task",
    {
        "chat.tasks.answer_question": {"queue": "interactive"},
        "chat.tasks.reap": {"queue": "housekeeping"},
        "ingestion.tasks.reap_jobs": {"queue": "housekeeping"},
        "ingestion.tasks.embed_batch": {"queue": "batch"},
        # Evaluation items use the GPU like questions, but wait behind them.
        "evaluation.tasks.evaluate_item": {"queue": "batch"},
        "ingestion.tasks.*": {"queue": "cpu"},
    },
)
app.autodiscover_tasks()

# Seconds the hard time limit comes after the soft one, which the task handles itself.
HARD_LIMIT_MARGIN_S = 30
HOUSEKEEPING_LIMIT_S = 60


def limits(soft_s: float) -> dict:
    """A task's time limits: the soft one raises in the task, the hard one kills it."""
    return {"soft_time_limit": soft_s, "time_limit": soft_s + HARD_LIMIT_MARGIN_S}


@app.on_after_configure.connect
def _schedule(sender, **kwargs) -> None:
    from django.conf import settings

    # The reaper puts back questions whose message or worker was lost (see chat.reaper).
    sender.add_periodic_task(
        settings.RMASSIMO_REAPER_S,
        sender.signature("chat.tasks.reap"),
        name="requeue stale questions",
    )
    sender.add_periodic_task(
        settings.RMASSIMO_REAPER_S,
        sender.signature("ingestion.tasks.reap_jobs"),
        name="requeue stale ingestion jobs",
    )
