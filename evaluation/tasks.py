from celery import shared_task
from django.conf import settings

from evaluation import services
from workers.celery import limits


# An item is answered like a question: the answer's time limit.
@shared_task(name="evaluation.tasks.evaluate_item", **limits(settings.RMASSIMO_ANSWER_TIME_LIMIT))
def evaluate_item(result_id: int) -> None:
    services.result_evaluate(result_id=result_id)
