from celery import shared_task

from chat import services


@shared_task(name="chat.tasks.answer_question")
def answer_question(question_id: int) -> None:
    services.question_answer(question_id=question_id)
