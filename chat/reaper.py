"""The question reaper: puts back questions whose message or worker was lost, and fails
those no GPU worker can take."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from chat.models import Question
from core import metrics, realtime
from workers import health, placement

logger = logging.getLogger(__name__)


def requeue_stale(*, now=None) -> dict:
    """The reaper: put back questions whose message or worker was lost.

    - `running` past its lease: its worker died (a whole-worker death leaves the message
      unacknowledged until Redis' visibility timeout; this is quicker);
    - `queued` for longer than RMASSIMO_REQUEUE_AFTER_S while the broker holds fewer
      messages than there are such questions: messages were lost (Redis restarted).
    Duplicates are harmless: the claim lets only one attempt run.
    """
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
        for question in Question.objects.filter(
            pk__in=waiting, status=Question.Status.QUEUED
        ).select_related("conversation__corpus"):
            changed = Question.objects.filter(pk=question.pk, status=Question.Status.QUEUED).update(
                status=Question.Status.FAILED, error=message, finished_at=now
            )
            if changed:
                stranded += 1
                metrics.question_finished(question, outcome="failed", finished_at=now)  # metrics
                realtime.publish_on_commit(
                    question.conversation_id,
                    {"type": "failed", "question": question.pk, "error": message},
                )
        waiting = []
    if waiting:
        # A question for a model that no online worker's Ollama has would be put back for
        # ever: fail it, saying how to pull the model (the workers listed theirs since).
        unanswerable = []
        for question in Question.objects.filter(pk__in=waiting).select_related(
            "conversation__corpus"
        ):
            model = question.conversation.corpus.chat_model or settings.RMASSIMO_CHAT_MODEL
            queue, missing = placement.route_question(model, count=False)
            if queue is None:
                unanswerable.append(question.pk)
                changed = Question.objects.filter(
                    pk=question.pk, status=Question.Status.QUEUED
                ).update(status=Question.Status.FAILED, error=missing, finished_at=now)
                if changed:
                    stranded += 1
                    metrics.question_finished(question, outcome="failed", finished_at=now)
                    realtime.publish_on_commit(
                        question.conversation_id,
                        {"type": "failed", "question": question.pk, "error": missing},
                    )
        waiting = [pk for pk in waiting if pk not in unanswerable]
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
