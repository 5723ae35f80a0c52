"""Template context shared by every page."""

from __future__ import annotations

import redis
from django.http import HttpRequest

from core import llm
from workers import health
from workers.models import may_see_details


def backend(request: HttpRequest) -> dict:
    """`rmassimo_backend`: which model answers and how passages are found, with a banner
    sentence when the chat runs on less than Ollama with hybrid retrieval (else "")."""
    return {"rmassimo_backend": status(staff=_is_staff(request))}


def _is_staff(request: HttpRequest) -> bool:
    return may_see_details(getattr(request, "user", None))


def status(*, staff: bool = False) -> dict:
    """What answers; the servers' URLs only for staff allowed to see the workers' details,
    as in the workers API."""
    try:
        if not staff:
            return llm.describe(ollama_urls=None, show_where=False)
        return llm.describe(ollama_urls=_answering_urls())
    except llm.LLMError as exc:
        # A broken setting must not take every page down with it: the banner says it.
        return {"llm": "unavailable", "retrieval": "bm25", "banner": str(exc)}


def _answering_urls() -> list[str] | None:
    """The Ollama servers the online GPU workers call, from their heartbeats.

    The web process calls no model itself: its own OLLAMA_URLS may name no server at all
    (under Compose each worker has its own). None when Redis cannot say.
    """
    try:
        workers = health.workers()
    except redis.RedisError:
        return None
    return sorted(
        {w["ollama_url"] for w in workers if w["online"] and w["gpu"] != "cpu" and w["ollama_url"]}
    )
