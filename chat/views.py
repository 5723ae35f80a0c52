"""The web chat: server-rendered pages; questions, stops and feedback go through the API."""

from __future__ import annotations

from functools import wraps

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, render
from django.utils.translation import gettext as _

from chat import selectors
from chat.models import Question
from ingestion import selectors as corpus_selectors


def _content_security_policy(view):
    """Only this site's scripts run: a slip in escaping still cannot execute model text."""

    @wraps(view)
    def wrapped(request, *args, **kwargs):
        response = view(request, *args, **kwargs)
        host = request.get_host()
        response["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self' ws://{host} wss://{host}; object-src 'none'; "
            "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
        )
        return response

    return wrapped


def _js_strings() -> dict[str, str]:
    """The chat script's words, translated for the request's language."""
    return {
        "queued": _("Waiting for a free GPU"),
        "queuedAt": _("Waiting for a free GPU (position %(position)s)"),
        "running": _("Answering"),
        "runningOn": _("Answering on %(gpu)s"),
        "done": _("Answered"),
        "truncated": _("Cut short"),
        "failed": _("Failed"),
        "cancelled": _("Stopped"),
        "sources": _("Sources"),
        "page": _("p. %(page)s"),
        "score": _("score %(score)s"),
        "timings": _("%(seconds)s s on %(gpu)s"),
        "tokensPerSecond": _("%(rate)s tokens/s"),
        "sendFailed": _("Could not send: %(error)s"),
        "actionFailed": _("That did not work: %(error)s"),
        "connecting": _("Reconnecting…"),
        "connected": _("Live"),
        "forbidden": _("This conversation cannot be followed live. Reload the page."),
        "emptyQuestion": _("Write a question first."),
        "noCorpus": _("Choose a corpus."),
    }


def _page_context(request, **extra) -> dict:
    return {
        "conversations": selectors.conversations_of(request.user)[:50],
        "js_strings": _js_strings(),
        "max_chars": settings.RMASSIMO_QUESTION_MAX_CHARS,
        **extra,
    }


@login_required
@_content_security_policy
def home(request):
    corpora = list(corpus_selectors.corpora())
    return render(request, "chat/home.html", _page_context(request, corpora=corpora, page="home"))


@login_required
@_content_security_policy
def conversation_detail(request, pk: int):
    conversation = get_object_or_404(selectors.conversations_of(request.user), pk=pk)
    questions = selectors.with_answer_so_far(conversation.questions.all())
    for question in questions:
        timings = question.timings
        total_ms = timings["total_ms"] if question.status == Question.Status.DONE else None
        question.total_s = round(total_ms / 1000, 1) if total_ms is not None else None
        question.tokens_per_s = timings["tokens_per_s"]
    return render(
        request,
        "chat/conversation.html",
        _page_context(
            request,
            conversation=conversation,
            questions=questions,
            page="conversation",
            current=conversation.pk,
        ),
    )
