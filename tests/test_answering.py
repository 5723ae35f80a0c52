"""The answer job's fencing: every write of an attempt is conditional on its number, so an
attempt that lost its claim (its lease ran out while it was stuck, and another card took
the question) can neither fail, corrupt nor delete what the live attempt does."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from chat import answering, selectors, services
from chat.models import Question
from core import realtime
from ingestion.models import Corpus

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def question(make_user):
    corpus = Corpus.objects.create(slug="fencing", name="Fencing")
    owner = make_user("fencer")
    conversation = services.conversation_create(owner=owner, corpus=corpus)
    # A row, no message: no worker takes it; this test plays both attempts.
    return Question.objects.create(conversation=conversation, text="Who wins?")


def test_a_stale_attempt_cannot_fail_corrupt_or_delete_the_live_one(question):
    stale, _ = answering.question_claim(question.pk)
    # Its worker looks dead: the lease ran out, and another card takes the question over.
    Question.objects.filter(pk=question.pk).update(lease_until=timezone.now() - timedelta(1))
    live, _ = answering.question_claim(question.pk)
    assert (stale.attempts, live.attempts) == (1, 2)
    conversation_id = question.conversation_id
    live_stream = realtime.AnswerStream(
        question_id=question.pk, conversation_id=conversation_id, attempt=live.attempts
    )
    live_stream.push("The live ")
    live_stream.flush()

    # The stale attempt wakes up: it starts streaming, then fails.
    stale_stream = realtime.AnswerStream(
        question_id=question.pk, conversation_id=conversation_id, attempt=stale.attempts
    )
    stale_stream.push("stale text")
    stale_stream.flush()
    answering.question_fail(question=stale, message="The stale attempt failed.")

    row = Question.objects.get(pk=question.pk)
    assert (row.status, row.attempts, row.error) == ("running", 2, "")
    live_stream.push("answer")
    live_stream.flush()
    [shown] = selectors.with_answer_so_far([row])
    assert shown.answer == "The live answer"

    # The live attempt's own failure does count.
    answering.question_fail(question=live, message="The live attempt failed.")
    row.refresh_from_db()
    assert (row.status, row.error) == ("failed", "The live attempt failed.")
    assert realtime.partial_answer(question.pk, live.attempts) == []
    stale_stream.discard()
