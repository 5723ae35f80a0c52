"""Template context shared by every page."""

from __future__ import annotations

from django.http import HttpRequest

from core import llm


def backend(request: HttpRequest) -> dict:
    """`rmassimo_backend`: which model answers and how passages are found, with a banner
    sentence when the chat runs on less than Ollama with hybrid retrieval (else "")."""
    return {"rmassimo_backend": status()}


def status() -> dict:
    try:
        return llm.describe()
    except llm.LLMError as exc:
        # A broken setting must not take every page down with it: the banner says it.
        return {"llm": "unavailable", "retrieval": "bm25", "banner": str(exc)}
