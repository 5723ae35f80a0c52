"""Writes for conversations and questions, and the answer job the GPU workers run."""

from __future__ import annotations

import logging
import time

from celery.exceptions import SoftTimeLimitExceeded
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from chat import prompts
from chat.models import Conversation, Question
from core import llm, realtime, vectorstore
from ingestion.models import Corpus
from workers import identity

logger = logging.getLogger(__name__)

_CANCEL_CHECK_S = 0.25
_MAX_STANDALONE_CHARS = 1000


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
) -> Question:
    """Record a question and enqueue it once the row is committed."""
    from chat.tasks import answer_question

    text = text.strip()
    with transaction.atomic():
        if conversation is None:
            conversation = conversation_create(owner=owner, corpus=corpus, title=text[:80])
        question = Question.objects.create(conversation=conversation, text=text)
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=timezone.now())

        def enqueue() -> None:
            answer_question.apply_async(args=[question.pk])
            realtime.publish(
                conversation.pk,
                {
                    "type": "queued",
                    "question": question.pk,
                    "position": queue_position(question),
                },
            )

        transaction.on_commit(enqueue)
    return question


def queue_position(question: Question) -> int:
    """1 for the next question a free GPU will take."""
    return Question.objects.filter(
        status=Question.Status.QUEUED, created_at__lte=question.created_at
    ).count()


def question_cancel(*, question: Question) -> bool:
    """Stop a question that has not finished; the worker notices while it streams."""
    changed = Question.objects.filter(
        pk=question.pk, status__in=[Question.Status.QUEUED, Question.Status.RUNNING]
    ).update(status=Question.Status.CANCELLED, finished_at=timezone.now())
    if changed:
        conversation_id = question.conversation_id
        transaction.on_commit(
            lambda: realtime.publish(
                conversation_id, {"type": "cancelled", "question": question.pk}
            )
        )
    question.refresh_from_db()
    return bool(changed)


def question_set_feedback(*, question: Question, value: int | None) -> Question:
    question.feedback = value
    question.save(update_fields=["feedback"])
    return question


def _finish_failed(question: Question, message: str) -> None:
    changed = Question.objects.filter(pk=question.pk, status=Question.Status.RUNNING).update(
        status=Question.Status.FAILED, error=message, finished_at=timezone.now()
    )
    realtime.clear_partial(question.pk)
    if changed:
        transaction.on_commit(
            lambda: realtime.publish(
                question.conversation_id,
                {"type": "failed", "question": question.pk, "error": message},
            )
        )


def _history(question: Question, turns: int) -> list[tuple[str, str]]:
    previous = (
        Question.objects.filter(
            conversation_id=question.conversation_id,
            status=Question.Status.DONE,
            created_at__lt=question.created_at,
        )
        .order_by("-created_at")
        .values_list("text", "answer")[:turns]
    )
    return list(reversed(list(previous)))


def source_dicts(hits: list[vectorstore.Hit]) -> list[dict]:
    return [
        {
            "document": hit.document_id,
            "title": hit.title,
            "page": hit.page,
            "score": hit.score,
            "text": hit.text,
        }
        for hit in hits
    ]


def question_answer(*, question_id: int) -> None:
    """Answer one question on this worker's GPU; safe to run twice (the claim decides)."""
    from django.conf import settings

    claimed = Question.objects.filter(pk=question_id, status=Question.Status.QUEUED).update(
        status=Question.Status.RUNNING,
        started_at=timezone.now(),
        gpu=identity.gpu_label(),
        worker=identity.worker_name(),
        attempts=F("attempts") + 1,
    )
    if not claimed:
        logger.info("question %s already taken or finished; nothing to do", question_id)
        return
    question = Question.objects.select_related("conversation__corpus").get(pk=question_id)
    corpus = question.conversation.corpus
    base_url = identity.ollama_url()
    realtime.publish(
        question.conversation_id,
        {"type": "started", "question": question.pk, "gpu": question.gpu},
    )
    try:
        _answer(question, corpus, base_url, settings)
    except (llm.LLMError, vectorstore.VectorStoreError) as exc:
        logger.warning("question %s failed: %s", question.pk, exc)
        _finish_failed(question, str(exc))
    except SoftTimeLimitExceeded:
        _finish_failed(
            question,
            f"The answer took longer than {settings.RMASSIMO_ANSWER_TIME_LIMIT} seconds "
            "and was stopped.",
        )
    except Exception:
        logger.exception("question %s failed unexpectedly", question.pk)
        _finish_failed(question, "An internal error stopped this answer; please try again.")


def _answer(question: Question, corpus: Corpus, base_url: str, settings) -> None:
    history = _history(question, settings.RMASSIMO_HISTORY_TURNS)
    chat_model = corpus.effective_chat_model
    standalone = question.text
    if history:
        standalone = (
            llm.complete_chat(
                prompts.condense_messages(history=history, question=question.text),
                model=chat_model,
                base_url=base_url,
            ).strip()[:_MAX_STANDALONE_CHARS]
            or question.text
        )

    retrieval_started = time.monotonic()
    embed_model = corpus.effective_embed_model
    embedding = None
    if embed_model and vectorstore.has_dense(corpus.pk):
        embedding = llm.embed_query(standalone, model=embed_model, base_url=base_url)
    hits = vectorstore.search(
        corpus.pk, text=standalone, embedding=embedding, top_k=settings.RMASSIMO_TOP_K
    )
    retrieval_ms = round((time.monotonic() - retrieval_started) * 1000, 1)

    messages = prompts.answer_messages(
        persona=corpus.persona_prompt, history=history, hits=hits, question=question.text
    )
    stream = realtime.AnswerStream(
        question_id=question.pk, conversation_id=question.conversation_id
    )
    stats = llm.StreamStats()
    parts: list[str] = []
    first_token_at = None
    last_cancel_check = time.monotonic()
    generation_started = time.monotonic()
    for piece in llm.stream_chat(messages, model=chat_model, base_url=base_url, stats=stats):
        if first_token_at is None:
            first_token_at = timezone.now()
            Question.objects.filter(pk=question.pk).update(first_token_at=first_token_at)
        parts.append(piece)
        if stream.push(piece) and time.monotonic() - last_cancel_check >= _CANCEL_CHECK_S:
            last_cancel_check = time.monotonic()
            if _cancelled(question.pk):
                stream.discard()
                logger.info("question %s cancelled while streaming", question.pk)
                Question.objects.filter(pk=question.pk).update(answer="".join(parts))
                return
    stream.flush()
    generation_ms = stats.eval_ms or round((time.monotonic() - generation_started) * 1000, 1)

    answer = "".join(parts)
    sources = source_dicts(hits)
    with transaction.atomic():
        done = Question.objects.filter(pk=question.pk, status=Question.Status.RUNNING).update(
            status=Question.Status.DONE,
            answer=answer,
            standalone_text=standalone,
            sources=sources,
            model=chat_model,
            retrieval_ms=retrieval_ms,
            generation_ms=generation_ms,
            prompt_tokens=stats.prompt_tokens or None,
            completion_tokens=stats.completion_tokens or None,
            first_token_at=first_token_at or timezone.now(),
            finished_at=timezone.now(),
        )
        if done:

            def announce() -> None:
                final = Question.objects.get(pk=question.pk)
                realtime.publish(
                    final.conversation_id,
                    {
                        "type": "done",
                        "question": final.pk,
                        "answer": final.answer,
                        "sources": final.sources,
                        "timings": _json_timings(final),
                        "gpu": final.gpu,
                    },
                )
                realtime.clear_partial(final.pk)

            transaction.on_commit(announce)


def _cancelled(question_id: int) -> bool:
    return Question.objects.filter(pk=question_id, status=Question.Status.CANCELLED).exists()


def _json_timings(question: Question) -> dict:
    return {
        key: (value.isoformat() if hasattr(value, "isoformat") else value)
        for key, value in question.timings.items()
    }
