"""The one module that talks to the language and embedding models (Ollama).

Calls go through llama-index's Ollama integrations, which use the official `ollama`
client: `/api/chat` streamed as NDJSON, `/api/embed` for batches, `/api/show` for model facts.
Every failure leaves here as an `LLMError` whose message a person can read and which names
the server's URL.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import ollama
from django.conf import settings
from llama_index.core.llms import ChatMessage
from llama_index.embeddings.ollama import OllamaEmbedding
from llama_index.llms.ollama import Ollama


class LLMError(Exception):
    """A model server failure, worded for the person who asked.

    `retryable` is true when another server (another GPU) could well succeed.
    """

    def __init__(self, message: str, *, retryable: bool = True, url: str = "") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.url = url


@dataclass
class StreamStats:
    """What the server reported in its final streamed record."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    eval_ms: float = 0.0
    done_reason: str = ""
    extra: dict = field(default_factory=dict)


_lock = threading.Lock()
_llms: dict[tuple[str, str], Ollama] = {}
_embedders: dict[tuple[str, str], OllamaEmbedding] = {}


def _url(base_url: str) -> str:
    return base_url.rstrip("/")


def chat_model(*, model: str, base_url: str) -> Ollama:
    key = (model, _url(base_url))
    with _lock:
        llm = _llms.get(key)
        if llm is None:
            llm = Ollama(
                model=model,
                base_url=key[1],
                request_timeout=settings.RMASSIMO_OLLAMA_TIMEOUT,
                # Set, so the client does not ask /api/show before every first call.
                context_window=settings.RMASSIMO_CONTEXT_WINDOW,
                temperature=settings.RMASSIMO_TEMPERATURE,
                keep_alive=settings.RMASSIMO_OLLAMA_KEEP_ALIVE,
            )
            _llms[key] = llm
    return llm


def embedder(*, model: str, base_url: str) -> OllamaEmbedding:
    key = (model, _url(base_url))
    with _lock:
        emb = _embedders.get(key)
        if emb is None:
            emb = OllamaEmbedding(
                model_name=model,
                base_url=key[1],
                embed_batch_size=settings.RMASSIMO_EMBED_BATCH,
                keep_alive=settings.RMASSIMO_OLLAMA_KEEP_ALIVE,
                client_kwargs={"timeout": settings.RMASSIMO_OLLAMA_TIMEOUT},
            )
            _embedders[key] = emb
    return emb


@contextlib.contextmanager
def _translated(base_url: str, model: str) -> Iterator[None]:
    url = _url(base_url)
    try:
        yield
    except LLMError:
        raise
    except ollama.ResponseError as exc:
        if exc.status_code == 404:
            raise LLMError(
                f"The model '{model}' is not available on the Ollama server at {url}; "
                f"pull it there with `ollama pull {model}`.",
                retryable=False,
                url=url,
            ) from exc
        busy = exc.status_code in (429, 503)
        raise LLMError(
            f"The Ollama server at {url} answered with an error "
            f"({exc.status_code}{', busy' if busy else ''}): {str(exc.error)[:300]}",
            url=url,
        ) from exc
    except (ConnectionError, httpx.ConnectError) as exc:
        raise LLMError(
            f"The Ollama server at {url} could not be reached; check that it is running "
            "and that OLLAMA_URLS points at it.",
            url=url,
        ) from exc
    except httpx.TimeoutException as exc:
        raise LLMError(
            f"The Ollama server at {url} did not answer within "
            f"{settings.RMASSIMO_OLLAMA_TIMEOUT:g} seconds.",
            url=url,
        ) from exc
    except (httpx.HTTPError, ValueError) as exc:
        raise LLMError(
            f"The connection to the Ollama server at {url} broke off: {str(exc)[:200]}",
            url=url,
        ) from exc


def _messages(messages: list[dict]) -> list[ChatMessage]:
    return [ChatMessage(role=m["role"], content=m["content"]) for m in messages]


def stream_chat(
    messages: list[dict], *, model: str, base_url: str, stats: StreamStats
) -> Iterator[str]:
    """Yield the reply's text pieces as they arrive; fill `stats` from the final record."""
    llm = chat_model(model=model, base_url=base_url)
    with _translated(base_url, model):
        for chunk in llm.stream_chat(_messages(messages)):
            raw = chunk.raw or {}
            if chunk.delta:
                yield chunk.delta
            if raw.get("done"):
                stats.prompt_tokens = int(raw.get("prompt_eval_count") or 0)
                stats.completion_tokens = int(raw.get("eval_count") or 0)
                stats.eval_ms = int(raw.get("eval_duration") or 0) / 1e6
                stats.done_reason = str(raw.get("done_reason") or "")


def complete_chat(messages: list[dict], *, model: str, base_url: str) -> str:
    llm = chat_model(model=model, base_url=base_url)
    with _translated(base_url, model):
        return str(llm.chat(_messages(messages)).message.content or "")


def embed_texts(texts: list[str], *, model: str, base_url: str) -> list[list[float]]:
    emb = embedder(model=model, base_url=base_url)
    with _translated(base_url, model):
        return emb.get_text_embedding_batch(texts)


def embed_query(text: str, *, model: str, base_url: str) -> list[float]:
    emb = embedder(model=model, base_url=base_url)
    with _translated(base_url, model):
        return emb.get_query_embedding(text)


def embedding_dim(*, model: str, base_url: str) -> int:
    """The model's vector size, from /api/show when it says, else from one probe."""
    emb = embedder(model=model, base_url=base_url)
    with _translated(base_url, model):
        info = emb._client.show(model).modelinfo or {}
        for key, value in info.items():
            if key.endswith(".embedding_length"):
                return int(value)
        return len(emb.get_text_embedding("dimension probe"))


def server_version(base_url: str, *, timeout: float = 2.0) -> str | None:
    """The server's version when it answers, else None; never raises."""
    try:
        response = httpx.get(f"{_url(base_url)}/api/version", timeout=timeout)
        response.raise_for_status()
        return str(response.json().get("version"))
    except (httpx.HTTPError, ValueError):
        return None
