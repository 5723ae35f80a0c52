"""Writes for conversations and questions, and the answer job the GPU workers run."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from celery.exceptions import SoftTimeLimitExceeded
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from chat import prompts
from chat.models import Conversation, Question
from core import llm, realtime, vectorstore
from ingestion.models import Corpus
from workers import health, identity

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
    queue: str | None = None,
) -> Question:
    """Record a question and enqueue it once the row is committed.

    `queue` pins it to one card (`gpu.<i>`); by default any idle GPU takes it.
    """
    from chat.tasks import answer_question

    text = text.strip()
    with transaction.atomic():
        if conversation is None:
            conversation = conversation_create(owner=owner, corpus=corpus, title=text[:80])
        question = Question.objects.create(conversation=conversation, text=text)
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=timezone.now())

        def enqueue() -> None:
            answer_question.apply_async(args=[question.pk], queue=queue)
            Question.objects.filter(pk=question.pk).update(enqueued_at=timezone.now())
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


class Lost(Exception):
    """This attempt no longer owns the question: cancelled, or taken over after its lease."""


def _claim(question_id: int) -> tuple[Question | None, float]:
    """Take the question for this worker. Returns (question, 0) when claimed, (None, s) when
    another attempt holds a live lease for s more seconds, (None, 0) when nothing is to do.

    A row left `running` by a worker that died is taken over once its lease runs out; the
    attempt counter in the row makes a late finish of the dead attempt a no-op.
    """
    from django.conf import settings

    now = timezone.now()
    claimable = Q(status=Question.Status.QUEUED) | Q(
        status=Question.Status.RUNNING, lease_until__lt=now
    )
    claimed = Question.objects.filter(claimable, pk=question_id).update(
        status=Question.Status.RUNNING,
        started_at=now,
        first_token_at=None,
        lease_until=now + timedelta(seconds=settings.RMASSIMO_LEASE_S),
        gpu=identity.gpu_label(),
        worker=identity.worker_name(),
        attempts=F("attempts") + 1,
    )
    if claimed:
        return Question.objects.select_related("conversation__corpus").get(pk=question_id), 0
    row = Question.objects.filter(pk=question_id).values("status", "lease_until").first()
    if row and row["status"] == Question.Status.RUNNING and row["lease_until"]:
        return None, max(0.5, (row["lease_until"] - now).total_seconds() + 0.5)
    return None, 0


def question_answer(*, question_id: int) -> float:
    """Answer one question on this worker's GPU; safe to run twice (the claim decides).

    Returns 0, or the seconds after which the task should try again (the question is held
    by an attempt whose lease has not run out yet, e.g. a redelivery after a crash).
    """
    from django.conf import settings

    question, retry_in = _claim(question_id)
    if question is None:
        if not retry_in:
            logger.info("question %s already finished; nothing to do", question_id)
        return retry_in
    if question.attempts > settings.RMASSIMO_MAX_ATTEMPTS:
        reason = question.error or "the worker answering it stopped unexpectedly each time"
        _finish_failed(
            question,
            f"Gave up after {settings.RMASSIMO_MAX_ATTEMPTS} attempts: {reason}",
        )
        return 0
    corpus = question.conversation.corpus
    base_url = identity.ollama_url()
    realtime.publish(
        question.conversation_id,
        {
            "type": "started",
            "question": question.pk,
            "gpu": question.gpu,
            "attempt": question.attempts,
        },
    )
    try:
        _answer(question, corpus, base_url, settings)
        health.llm_succeeded()
    except Lost:
        logger.info("question %s: this attempt lost its claim; stopping", question.pk)
    except llm.LLMError as exc:
        logger.warning("question %s failed on %s: %s", question.pk, question.gpu, exc)
        if exc.retryable:
            health.llm_failed(str(exc))
        if not (exc.retryable and question.attempts < settings.RMASSIMO_MAX_ATTEMPTS):
            _finish_failed(question, str(exc))
        elif not _retry_elsewhere(question, str(exc)):
            _finish_failed(question, str(exc))
    except vectorstore.VectorStoreError as exc:
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
    return 0


def _retry_elsewhere(question: Question, message: str) -> bool:
    """Put the question back, on another healthy GPU when there is one, or on this one
    after a pause while it is not yet marked unhealthy (a server can be briefly
    overloaded). False when no GPU can take it: the caller fails it."""
    from django.conf import settings

    from chat.tasks import answer_question

    others = [w for w in health.available_gpu_workers() if w["gpu"] != identity.gpu_label()]
    if others:
        queue, countdown = f"gpu.{others[0]['gpu'][3:]}", 0.0
    elif health.is_healthy()[0]:
        queue = None
        countdown = settings.RMASSIMO_RETRY_BACKOFF_S * 2 ** (question.attempts - 1)
    else:
        return False
    released = Question.objects.filter(
        pk=question.pk, status=Question.Status.RUNNING, attempts=question.attempts
    ).update(status=Question.Status.QUEUED, error=message, lease_until=None, answer="")
    if not released:
        return True
    realtime.clear_partial(question.pk)
    answer_question.apply_async(args=[question.pk], queue=queue, countdown=countdown)
    realtime.publish(
        question.conversation_id,
        {"type": "queued", "question": question.pk, "position": 1, "retry": True, "error": message},
    )
    return True


class _Lease:
    """Renews this attempt's lease while it streams, and notices cancel or take-over."""

    def __init__(self, question: Question) -> None:
        from django.conf import settings

        self.question = question
        self.every = min(_CANCEL_CHECK_S, settings.RMASSIMO_LEASE_S / 3)
        self.length = timedelta(seconds=settings.RMASSIMO_LEASE_S)
        self.last = time.monotonic()

    def check(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        renewed = Question.objects.filter(
            pk=self.question.pk,
            status=Question.Status.RUNNING,
            attempts=self.question.attempts,
        ).update(lease_until=timezone.now() + self.length)
        if not renewed:
            raise Lost()


def _answer(question: Question, corpus: Corpus, base_url: str, settings) -> None:
    lease = _Lease(question)
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
    if embed_model and _with_retries(lambda: vectorstore.has_dense(corpus.pk)):
        embedding = llm.embed_query(standalone, model=embed_model, base_url=base_url)
    hits = _with_retries(
        lambda: vectorstore.search(
            corpus.pk, text=standalone, embedding=embedding, top_k=settings.RMASSIMO_TOP_K
        )
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
    generation_started = time.monotonic()
    try:
        for piece in llm.stream_chat(messages, model=chat_model, base_url=base_url, stats=stats):
            if first_token_at is None:
                first_token_at = timezone.now()
            parts.append(piece)
            if stream.push(piece):
                lease.check()
    except Lost:
        stream.discard()
        # Stopped by its owner: keep what was written so far, as the chat showed it.
        Question.objects.filter(
            pk=question.pk, status=Question.Status.CANCELLED, attempts=question.attempts
        ).update(answer="".join(parts))
        raise
    stream.flush()
    generation_ms = stats.eval_ms or round((time.monotonic() - generation_started) * 1000, 1)

    answer = "".join(parts)
    sources = source_dicts(hits)
    fields = {
        "status": Question.Status.DONE,
        "answer": answer,
        "error": "",
        "standalone_text": standalone,
        "sources": sources,
        "model": llm.answering_model(chat_model),
        "retrieval_ms": retrieval_ms,
        "generation_ms": generation_ms,
        "prompt_tokens": stats.prompt_tokens or None,
        "completion_tokens": stats.completion_tokens or None,
        "first_token_at": first_token_at or timezone.now(),
        "finished_at": timezone.now(),
        "lease_until": None,
    }
    with transaction.atomic():
        done = Question.objects.filter(
            pk=question.pk, status=Question.Status.RUNNING, attempts=question.attempts
        ).update(**fields)
        if not done:
            raise Lost()
        for name, value in fields.items():
            setattr(question, name, value)

        def announce() -> None:
            realtime.publish(
                question.conversation_id,
                {
                    "type": "done",
                    "question": question.pk,
                    "answer": question.answer,
                    "sources": question.sources,
                    "timings": _json_timings(question),
                    "gpu": question.gpu,
                },
            )
            realtime.clear_partial(question.pk)

        transaction.on_commit(announce)


def _with_retries(call):
    """Milvus calls: a few quick retries before the failure reaches the person asking."""
    from django.conf import settings

    delays = settings.RMASSIMO_VECTORSTORE_RETRY_DELAYS
    for delay in delays:
        try:
            return call()
        except vectorstore.VectorStoreError:
            logger.warning("vector store call failed; retrying in %ss", delay)
            time.sleep(delay)
    return call()


def requeue_stale(*, now=None) -> dict:
    """The reaper: put back questions whose message or worker was lost.

    - `running` past its lease: its worker died (a whole-worker death leaves the message
      unacknowledged until Redis' visibility timeout; this is quicker);
    - `queued` for longer than RMASSIMO_REQUEUE_AFTER_S while the broker holds fewer
      messages than there are such questions: messages were lost (Redis restarted).
    Duplicates are harmless: the claim lets only one attempt run.
    """
    from django.conf import settings

    from chat.tasks import answer_question

    now = now or timezone.now()
    expired = list(
        Question.objects.filter(status=Question.Status.RUNNING, lease_until__lt=now).values_list(
            "pk", flat=True
        )
    )
    for pk in expired:
        answer_question.apply_async(args=[pk])
    waiting = list(
        Question.objects.filter(
            status=Question.Status.QUEUED,
            created_at__lt=now - timedelta(seconds=settings.RMASSIMO_REQUEUE_AFTER_S),
        )
        .filter(
            Q(enqueued_at__isnull=True)
            | Q(enqueued_at__lt=now - timedelta(seconds=settings.RMASSIMO_REQUEUE_AFTER_S))
        )
        .order_by("created_at")
        .values_list("pk", flat=True)
    )
    requeued = []
    stranded = 0
    patience = timedelta(seconds=settings.RMASSIMO_NO_WORKER_FAIL_AFTER_S)
    if waiting and not health.available_gpu_workers():
        # Workers restarting or briefly away: the question keeps its place for a while.
        waiting = list(
            Question.objects.filter(pk__in=waiting, created_at__lt=now - patience).values_list(
                "pk", flat=True
            )
        )
    if waiting and not health.available_gpu_workers():
        # No GPU worker online and healthy: say so rather than leave people waiting.
        reasons = sorted({w["health_error"] for w in health.workers() if w["health_error"]})
        message = "No GPU worker is available to answer right now" + (
            f" ({'; '.join(reasons)[:400]})." if reasons else "; is run_workers running?"
        )
        for question in Question.objects.filter(pk__in=waiting, status=Question.Status.QUEUED):
            changed = Question.objects.filter(pk=question.pk, status=Question.Status.QUEUED).update(
                status=Question.Status.FAILED, error=message, finished_at=now
            )
            if changed:
                stranded += 1
                realtime.publish(
                    question.conversation_id,
                    {"type": "failed", "question": question.pk, "error": message},
                )
        waiting = []
    if waiting:
        depth = sum(health.queue_depths(health.question_queues()).values())
        if depth < len(waiting):
            requeued = waiting
            Question.objects.filter(pk__in=waiting).update(enqueued_at=now)
            for pk in waiting:
                answer_question.apply_async(args=[pk])
    if expired or requeued or stranded:
        logger.warning(
            "reaper: %d expired, %d requeued, %d failed for want of a GPU worker",
            len(expired),
            len(requeued),
            stranded,
        )
    return {"expired": len(expired), "requeued": len(requeued), "stranded": stranded}


def _cancelled(question_id: int) -> bool:
    return Question.objects.filter(pk=question_id, status=Question.Status.CANCELLED).exists()


def _json_timings(question: Question) -> dict:
    return {
        key: (value.isoformat() if hasattr(value, "isoformat") else value)
        for key, value in question.timings.items()
    }
