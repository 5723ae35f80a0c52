from celery import shared_task

from chat import answering, reaper


@shared_task(name="chat.tasks.answer_question", bind=True, max_retries=None)
def answer_question(self, question_id: int) -> None:
    retry_in = answering.question_answer(question_id=question_id)
    if retry_in:
        raise self.retry(countdown=retry_in)


@shared_task(name="chat.tasks.reap")
def reap() -> dict:
    return reaper.requeue_stale()
