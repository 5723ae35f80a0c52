"""Reads: every query here that takes a user is scoped to the person asking."""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from chat.models import Conversation, Question
from core import realtime


def conversations_of(user: AbstractBaseUser) -> QuerySet[Conversation]:
    return Conversation.objects.filter(owner=user).select_related("corpus")


def questions_of(user: AbstractBaseUser) -> QuerySet[Question]:
    return Question.objects.filter(conversation__owner=user).select_related("conversation__corpus")


def queue_position(question: Question) -> int:
    """1 for the next question a free GPU will take."""
    return Question.objects.filter(
        status=Question.Status.QUEUED, created_at__lte=question.created_at
    ).count()


def conversation_history(question: Question, *, turns: int) -> list[tuple[str, str]]:
    """The last `turns` answered exchanges before `question`, oldest first. An answer that
    failed, was stopped or was cut short is left out: fed back, the model would take it
    for a good one and build on it."""
    previous = (
        Question.objects.filter(
            conversation_id=question.conversation_id,
            status=Question.Status.DONE,
            truncated=False,
            created_at__lt=question.created_at,
        )
        .order_by("-created_at")
        .values_list("text", "answer")[:turns]
    )
    return list(reversed(list(previous)))


def with_answer_so_far(questions: Iterable[Question]) -> list[Question]:
    """The questions, each running one's `answer` set (in memory) to the text streamed so
    far: while an answer streams the text lives in Redis; the DB has it once final."""
    questions = list(questions)
    for question in questions:
        if question.status == Question.Status.RUNNING:
            question.answer = "".join(realtime.partial_answer(question.pk, question.attempts))
    return questions


def question_chat_model(question_id: int) -> str | None:
    """The chat model that answers the question: its corpus', or the default."""
    from django.conf import settings

    row = Question.objects.filter(pk=question_id).values_list(
        "conversation__corpus__chat_model", flat=True
    )
    if not row:
        return None
    return row[0] or settings.RMASSIMO_CHAT_MODEL
