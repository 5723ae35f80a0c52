"""Writes for conversations and questions, as the web, the API and commands make them.

The answer job the GPU workers run is in chat.answering, the reaper in chat.reaper.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from chat import selectors
from chat.models import Conversation, Question
from core import metrics, realtime
from ingestion.models import Corpus
from workers import placement


def conversation_create(
    *, owner: AbstractBaseUser, corpus: Corpus, title: str = ""
) -> Conversation:
    return Conversation.objects.create(owner=owner, corpus=corpus, title=title[:200])


def question_create(
    *,
    owner: AbstractBaseUser,
    text: str,
    corpus: Corpus | None = None,
    conversation: Conversation | None = None,
    queue: str | None = None,
) -> Question:
    """Record a question and enqueue it once the row is committed.

    It goes to the queue of its chat model (workers.placement routes it), where a worker
    serving that model takes it; `queue` pins it to one worker's own queue instead. If no
    online worker's Ollama has the model, it fails at once, saying how to pull the model.
    """
    from chat.tasks import answer_question

    text = text.strip()
    with transaction.atomic():
        if conversation is None:
            conversation = conversation_create(owner=owner, corpus=corpus, title=text[:80])
        question = Question.objects.create(conversation=conversation, text=text)
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=timezone.now())
        if queue is None:
            # The queue itself is chosen as it is sent (workers.placement.route_task).
            model = conversation.corpus.chat_model or settings.RMASSIMO_CHAT_MODEL
            routed, missing = placement.route_question(model)
            if routed is None:
                return _fail_unanswerable(question, missing)

        def enqueue() -> None:
            # Announced before it is sent: once sent, a worker may claim it at once, which
            # would make its position 0 and could let `started` overtake `queued`.
            position = selectors.queue_position(question)
            realtime.publish(
                conversation.pk, {"type": "queued", "question": question.pk, "position": position}
            )
            realtime.drain()
            answer_question.apply_async(args=[question.pk], queue=queue)
            Question.objects.filter(pk=question.pk).update(enqueued_at=timezone.now())

        transaction.on_commit(enqueue)
    return question


def _fail_unanswerable(question: Question, message: str) -> Question:
    now = timezone.now()
    Question.objects.filter(pk=question.pk).update(
        status=Question.Status.FAILED, error=message, finished_at=now
    )
    question.refresh_from_db()
    metrics.question_finished(question)
    realtime.publish_on_commit(
        question.conversation_id, {"type": "failed", "question": question.pk, "error": message}
    )
    return question


def question_cancel(*, question: Question) -> bool:
    """Stop a question that has not finished; the worker notices while it streams."""
    changed = Question.objects.filter(
        pk=question.pk, status__in=[Question.Status.QUEUED, Question.Status.RUNNING]
    ).update(status=Question.Status.CANCELLED, finished_at=timezone.now())
    if changed:
        realtime.publish_on_commit(
            question.conversation_id, {"type": "cancelled", "question": question.pk}
        )
    question.refresh_from_db()
    if changed:
        metrics.question_finished(question)  # metrics: counted as cancelled
    return bool(changed)


def question_set_feedback(*, question: Question, value: int | None) -> Question:
    question.feedback = value
    question.save(update_fields=["feedback"])
    return question
