from celery import shared_task

from evaluation import services


@shared_task(name="evaluation.tasks.evaluate_item")
def evaluate_item(result_id: int) -> None:
    services.result_evaluate(result_id=result_id)
