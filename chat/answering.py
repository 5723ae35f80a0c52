"""The answer job a GPU worker runs: claim the question, hold its lease, retrieve, stream
the answer, and finish it, fail it or hand it to another card.

Every write of an attempt is conditional on the question still being `running` under this
attempt's number, so an attempt that lost its claim (cancelled, or taken over after its
lease ran out) changes nothing.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import redis
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connections, transaction
from django.db.models import F, Q
from django.utils import timezone

from chat import formats, grounding, prompts, selectors
from chat.models import Question
from core import llm, metrics, realtime, tracing, vectorstore
from ingestion.models import Corpus
from workers import health, identity, placement

logger = logging.getLogger(__name__)

_CANCEL_CHECK_S = 0.25
# How long an attempt waits for the database to come back to save what it did (a restart,
# a failover): past it the task is tried again later, as after any crash.
_DB_AWAY_MAX_S = 120.0
_DB_AWAY = (OperationalError, InterfaceError)
_MAX_STANDALONE_CHARS = 1000
# Why a model stopped, when it did not end its answer itself: its length limit (Ollama and
# llama.cpp), or the embedded backend's guard against a loop.
CUT_SHORT = frozenset({"length", "repetition"})
_SENTENCE_END = re.compile(r"[.!?…](?=\s|$)|\n")


def cut_cleanly(text: str) -> str:
    """An answer that was cut, ended where a reader expects: after its last whole sentence
    when that keeps most of it, else after its last whole word, with an ellipsis."""
    text = text.rstrip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] >= len(text) // 2:
        return text[: ends[-1]].rstrip()
    space = text.rfind(" ")
    if space > 0:
        text = text[:space]
    return text.rstrip(" ,;:-") + "…"


class Lost(Exception):
    """This attempt no longer owns the question: cancelled, or taken over after its lease."""


def question_claim(question_id: int) -> tuple[Question | None, float]:
    """Take the question for this worker. Returns (question, 0) when claimed, (None, s) when
    another attempt holds a live lease for s more seconds, (None, 0) when nothing is to do.

    A row left `running` by a worker that died is taken over once its lease runs out; the
    attempt counter in the row makes a late finish of the dead attempt a no-op.
    """
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
    question, retry_in = question_claim(question_id)
    if question is None:
        if not retry_in:
            logger.info("question %s already finished; nothing to do", question_id)
        return retry_in
    if question.attempts > settings.RMASSIMO_MAX_ATTEMPTS:
        reason = question.error or "the worker answering it stopped unexpectedly each time"
        question_fail(
            question=question,
            message=f"Gave up after {settings.RMASSIMO_MAX_ATTEMPTS} attempts: {reason}",
        )
        return 0
    corpus = question.conversation.corpus
    base_url = identity.ollama_url()
    realtime.publish_on_commit(
        question.conversation_id,
        {
            "type": "started",
            "question": question.pk,
            "gpu": question.gpu,
            "attempt": question.attempts,
        },
    )
    try:
        with _Lease(question) as lease:
            _answer(question, corpus, base_url, lease)
        with _bookkeeping(question, "its card's health"):
            health.llm_succeeded()
    except Lost:
        logger.info("question %s: this attempt lost its claim; stopping", question.pk)
    except _DB_AWAY:
        # The database stayed away: the task is sent again and takes the question over once
        # this attempt's lease has run out.
        raise
    except llm.LLMError as exc:
        logger.warning("question %s failed on %s: %s", question.pk, question.gpu, exc)
        if exc.retryable:
            with _bookkeeping(question, "its card's failure"):
                health.llm_failed(str(exc))
        if not (exc.retryable and question.attempts < settings.RMASSIMO_MAX_ATTEMPTS):
            question_fail(question=question, message=str(exc))
        elif not question_retry_elsewhere(question=question, message=str(exc)):
            question_fail(question=question, message=str(exc))
    except vectorstore.VectorStoreError as exc:
        logger.warning("question %s failed: %s", question.pk, exc)
        question_fail(question=question, message=str(exc))
    except SoftTimeLimitExceeded:
        question_fail(
            question=question,
            message=f"The answer took longer than {settings.RMASSIMO_ANSWER_TIME_LIMIT} seconds "
            "and was stopped.",
        )
    except Exception:
        logger.exception("question %s failed unexpectedly", question.pk)
        question_fail(
            question=question, message="An internal error stopped this answer; please try again."
        )
    return 0


def question_retry_elsewhere(*, question: Question, message: str) -> bool:
    """Put the question back, on another healthy GPU when there is one, or on this one
    after a pause while it is not yet marked unhealthy (a server can be briefly
    overloaded). False when no GPU can take it: the caller fails it."""
    from chat.tasks import answer_question

    model = question.conversation.corpus.effective_chat_model
    others = [
        w
        for w in health.available_gpu_workers()
        if w["name"] != identity.worker_name()
        and any(q.startswith("gpu.") for q in w["queues"])
        and (not w["models_seen"] or placement.canonical(model) in w["models"])
    ]
    if others:
        # That worker's own queue: named per host and card, it reaches that worker alone.
        queue = next(q for q in others[0]["queues"] if q.startswith("gpu."))
        countdown = 0.0
    elif health.is_healthy()[0]:
        queue = None
        countdown = settings.RMASSIMO_RETRY_BACKOFF_S * 2 ** (question.attempts - 1)
    else:
        return False
    released = _despite_the_database_away(
        lambda: Question.objects.filter(
            pk=question.pk, status=Question.Status.RUNNING, attempts=question.attempts
        ).update(status=Question.Status.QUEUED, error=message, lease_until=None, answer=""),
        question_id=question.pk,
    )
    if not released:
        return True
    realtime.clear_partial(question.pk, question.attempts)
    answer_question.apply_async(args=[question.pk], queue=queue, countdown=countdown)
    realtime.publish_on_commit(
        question.conversation_id,
        {"type": "queued", "question": question.pk, "position": 1, "retry": True, "error": message},
    )
    return True


class _Lease:
    """This attempt's hold on the question, for as long as the attempt is alive.

    A heartbeat thread renews `lease_until` every third of RMASSIMO_LEASE_S whatever the
    attempt is doing: condensing the question, embedding it, retrying Milvus, waiting for
    Ollama to load the model or read the prompt, streaming. Only a dead attempt lets its
    lease run out, so the reaper hands only dead attempts' questions to another card. The
    stream also checks at its flushes, so a stop is noticed within _CANCEL_CHECK_S.

    Every renewal matches the attempt number: once the question was cancelled or another
    attempt took over, a renewal changes nothing and this attempt learns it is lost.
    """

    def __init__(self, question: Question) -> None:
        self.question = question
        self.length = timedelta(seconds=settings.RMASSIMO_LEASE_S)
        self.every = settings.RMASSIMO_LEASE_S / 3
        self.lost = threading.Event()
        # Set while the database does not answer: the stream goes on without checking, the
        # heartbeat keeps trying and clears it once a renewal goes through.
        self.database_away = threading.Event()
        self._stopped = threading.Event()
        self._last_check = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{question.pk}", daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)

    def _renew(self) -> bool:
        return bool(
            Question.objects.filter(
                pk=self.question.pk,
                status=Question.Status.RUNNING,
                attempts=self.question.attempts,
            ).update(lease_until=timezone.now() + self.length)
        )

    def _beat(self) -> None:
        try:
            while not self._stopped.wait(self.every):
                try:
                    if not self._renew():
                        self.lost.set()
                        return
                    self.database_away.clear()
                except DatabaseError:
                    # The database is away: the next beat tries again. Should it stay away
                    # past the lease, the question may go to another card, which is right.
                    logger.warning("question %s: could not renew its lease", self.question.pk)
                    self.database_away.set()
                    connections.close_all()
        finally:
            connections.close_all()  # this thread's own connection

    def check(self) -> None:
        """Raise Lost once this attempt no longer holds the question."""
        if self.lost.is_set():
            raise Lost()
        if self.database_away.is_set() or time.monotonic() - self._last_check < _CANCEL_CHECK_S:
            return
        self._last_check = time.monotonic()
        try:
            renewed = self._renew()
        except _DB_AWAY:
            # A restart of the database is no reason to drop an answer being generated: the
            # stream goes on, and the answer is saved once the database is back.
            logger.warning("question %s: the database is away; answering on", self.question.pk)
            self.database_away.set()
            connections.close_all()  # this thread's broken connection
            return
        if not renewed:
            self.lost.set()
            raise Lost()


def _answer(question: Question, corpus: Corpus, base_url: str, lease: _Lease) -> None:
    history = selectors.conversation_history(question, turns=settings.RMASSIMO_HISTORY_TURNS)
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
        lease.check()

    with tracing.span("retrieval", rmassimo__corpus=corpus.slug):
        found = grounding.retrieve(
            corpus=corpus,
            text=standalone,
            base_url=base_url,
            top_k=settings.RMASSIMO_TOP_K,
            retry=_vectorstore_call,
        )
    hits = found.hits
    retrieval_ms = found.ms
    lease.check()

    language = grounding.question_language(question.text, default=corpus.language)
    no_answer = grounding.no_answer_sentence(corpus, language)
    stream = realtime.AnswerStream(
        question_id=question.pk,
        conversation_id=question.conversation_id,
        attempt=question.attempts,
    )
    stats = llm.StreamStats()
    parts: list[str] = []
    first_token_at = None
    generation_started = time.monotonic()
    answering_model = llm.answering_model(chat_model)
    if not found.relevant:
        # Nothing relevant enough: the corpus' own "I don't know", without sources and
        # without asking the model to answer from nothing.
        hits, answering_model = [], ""
        first_token_at = timezone.now()
        parts.append(no_answer)
        stream.push(no_answer)
    else:
        messages = prompts.answer_messages(
            persona=corpus.persona_prompt,
            history=history,
            hits=hits,
            question=question.text,
            no_answer=no_answer,
        )
        try:
            for piece in llm.stream_chat(
                messages, model=chat_model, base_url=base_url, stats=stats
            ):
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
    # Placement weighs a model swap by what loading this model really costs here.
    with _bookkeeping(question, "the model's load time"):
        placement.learn_load(chat_model, stats.load_ms / 1000)

    answer = "".join(parts)
    truncated = stats.done_reason in CUT_SHORT
    if truncated:
        answer = cut_cleanly(answer[: stats.extra.get("keep_chars", len(answer))])
    if not answer.strip():
        # The model stopped before writing anything but the prompt's own markup.
        answer, truncated = no_answer, False
    sources = grounding.mark_cited(source_dicts(hits), answer)
    fields = {
        "status": Question.Status.DONE,
        "answer": answer,
        "truncated": truncated,
        "error": "",
        "standalone_text": standalone,
        "sources": sources,
        "model": answering_model,
        "retrieval_ms": retrieval_ms,
        "generation_ms": generation_ms,
        "prompt_tokens": stats.prompt_tokens or None,
        "completion_tokens": stats.completion_tokens or None,
        "first_token_at": first_token_at or timezone.now(),
        "finished_at": timezone.now(),
        "lease_until": None,
    }

    def save() -> None:
        with transaction.atomic():
            done = Question.objects.filter(
                pk=question.pk, status=Question.Status.RUNNING, attempts=question.attempts
            ).update(**fields)
            if not done:
                raise Lost()
            for name, value in fields.items():
                setattr(question, name, value)

            realtime.publish_on_commit(
                question.conversation_id,
                {
                    "type": "done",
                    "question": question.pk,
                    "answer": question.answer,
                    "truncated": question.truncated,
                    "sources": question.sources,
                    "timings": formats.timings(question),
                    "gpu": question.gpu,
                },
            )
            transaction.on_commit(lambda: realtime.clear_partial(question.pk, question.attempts))

    _despite_the_database_away(save, question_id=question.pk)
    metrics.question_finished(question)  # metrics: outcome, waits, tokens from the row


def _despite_the_database_away(write, *, question_id: int):
    """One write of this attempt, tried again while the database is away (restarted, failing
    over) for up to _DB_AWAY_MAX_S: an answer already generated is saved, not generated
    again by another attempt. The write's own conditions (status, attempt) still decide."""
    deadline = time.monotonic() + _DB_AWAY_MAX_S
    delay = 0.2
    while True:
        try:
            return write()
        except _DB_AWAY:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning(
                "question %s: the database is away; saving again in %.1fs", question_id, delay
            )
            connections.close_all()  # the broken connection: the next try takes a fresh one
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


@contextmanager
def _bookkeeping(question: Question, what: str):
    """What the fleet learns from an answer is kept in Redis, which is best effort while
    an answer streams: with Redis away the answer goes on and is saved whole."""
    try:
        yield
    except redis.RedisError:
        logger.warning("question %s: could not record %s (Redis away)", question.pk, what)


def _vectorstore_call(call):
    """Milvus calls: a few quick retries before the failure reaches the person asking."""
    delays = settings.RMASSIMO_VECTORSTORE_RETRY_DELAYS
    for delay in delays:
        try:
            return call()
        except vectorstore.VectorStoreError:
            logger.warning("vector store call failed; retrying in %ss", delay)
            time.sleep(delay)
    return call()


def question_fail(*, question: Question, message: str) -> None:
    """End this attempt as failed, with a reason a person can read."""
    now = timezone.now()
    changed = _despite_the_database_away(
        lambda: Question.objects.filter(
            pk=question.pk, status=Question.Status.RUNNING, attempts=question.attempts
        ).update(status=Question.Status.FAILED, error=message, finished_at=now, lease_until=None),
        question_id=question.pk,
    )
    realtime.clear_partial(question.pk, question.attempts)
    if changed:
        metrics.question_finished(question, outcome="failed", finished_at=now)  # metrics
        realtime.publish_on_commit(
            question.conversation_id,
            {"type": "failed", "question": question.pk, "error": message},
        )


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
