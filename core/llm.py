"""The one module that talks to the language and embedding models.

Two backends answer behind the same functions:

- `ollama`: llama-index's Ollama integrations, which use the official `ollama` client:
  `/api/chat` streamed as NDJSON, `/api/embed` for batches, `/api/show` for model facts.
- `embedded`: llama.cpp inside this process (`core.llm_embedded`), on a GGUF file; no
  embedding model, so retrieval is BM25 alone.

RMASSIMO_LLM_BACKEND picks one; `auto` takes Ollama when this process' Ollama answers
`/api/version`, else the embedded model. The choice is made once per process and logged,
as a warning when the embedded model answers or `auto` chose (so nobody mistakes the small
embedded model for the real one), at INFO when Ollama was asked for by name.
Every failure leaves here as an `LLMError` whose message a person can read and which names
the server's URL (or the model file).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import ollama
from celery import signals
from django.conf import settings
from django.utils.translation import gettext
from llama_index.core.llms import ChatMessage
from llama_index.embeddings.ollama import OllamaEmbedding
from llama_index.llms.ollama import Ollama

from core import metrics, tracing

logger = logging.getLogger(__name__)

OLLAMA = "ollama"
EMBEDDED = "embedded"
AUTO = "auto"
BACKEND_CHOICES = (AUTO, OLLAMA, EMBEDDED)


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
    load_ms: float = 0.0
    first_token_s: float | None = None
    done_reason: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Backend:
    """Which model answers in this process, and why."""

    name: str  # OLLAMA or EMBEDDED
    model: str  # the default chat model, or the GGUF file's name
    where: str  # the Ollama URL, or the GGUF file's path
    chosen_by: str  # "setting" or "auto"

    @property
    def embedded(self) -> bool:
        return self.name == EMBEDDED

    @property
    def label(self) -> str:
        if self.embedded:
            return f"embedded llama.cpp: {self.model}"
        return f"ollama: {self.model} at {self.where}"


_backend: Backend | None = None
_backend_lock = threading.Lock()


def decide_backend(setting: str, *, ollama_url: str) -> Backend:
    """The backend RMASSIMO_LLM_BACKEND=`setting` means for a process bound to `ollama_url`."""
    from core import llm_embedded

    choice = (setting or AUTO).strip().lower()
    if choice not in BACKEND_CHOICES:
        raise LLMError(
            f"RMASSIMO_LLM_BACKEND is '{setting}'; it must be one of {', '.join(BACKEND_CHOICES)}.",
            retryable=False,
        )
    chosen_by = "setting"
    if choice == AUTO:
        chosen_by = "auto"
        choice = OLLAMA if server_version(ollama_url) else EMBEDDED
    if choice == EMBEDDED:
        path = llm_embedded.model_path()
        return Backend(name=EMBEDDED, model=path.name, where=str(path), chosen_by=chosen_by)
    return Backend(
        name=OLLAMA, model=settings.RMASSIMO_CHAT_MODEL, where=_url(ollama_url), chosen_by=chosen_by
    )


def backend() -> Backend:
    """This process' backend, decided on first use and kept for the life of the process."""
    global _backend
    with _backend_lock:
        if _backend is None:
            from workers import identity

            _backend = decide_backend(
                settings.RMASSIMO_LLM_BACKEND, ollama_url=identity.ollama_url()
            )
            _announce(_backend)
        return _backend


def forget_backend() -> None:
    """Decide again on next use (after the settings changed, as in tests)."""
    global _backend
    with _backend_lock:
        _backend = None


def _announce(chosen: Backend) -> None:
    if chosen.embedded:
        reason = (
            f"no Ollama answers at {_ollama_url_for_log()}"
            if chosen.chosen_by == "auto"
            else "RMASSIMO_LLM_BACKEND=embedded"
        )
        logger.warning(
            "LLM BACKEND: EMBEDDED (%s). Answers come from %s, run by llama.cpp in this "
            "process (%s); retrieval is BM25 alone. Start Ollama for better answers.",
            reason,
            chosen.model,
            chosen.where,
        )
    elif chosen.chosen_by == "auto":
        logger.warning(
            "LLM BACKEND: OLLAMA at %s answers; chat model %s.", chosen.where, chosen.model
        )
    else:
        logger.info("LLM backend: Ollama at %s, chat model %s.", chosen.where, chosen.model)


def _ollama_url_for_log() -> str:
    from workers import identity

    return _url(identity.ollama_url())


@signals.worker_process_init.connect
def _decide_when_the_worker_starts(**kwargs) -> None:
    # A worker decides as it starts, so its log says at once which model answers, and an
    # Ollama that is briefly down later does not turn a GPU worker into a small-model one.
    try:
        backend()
    except LLMError:
        logger.exception("no LLM backend")


def describe(*, ollama_urls: list[str] | None = None, show_where: bool = True) -> dict:
    """What answers here, for the status endpoint and the chat's banner.

    `ollama_urls`: the servers the online GPU workers call (None: unknown, this process'
    own is named), since they, not this process, answer. `show_where` False names no
    server at all.
    """
    chosen = backend()
    label = chosen.label
    if not chosen.embedded and not show_where:
        label = f"ollama: {chosen.model}"
    elif not chosen.embedded and ollama_urls is not None:
        where = f"at {', '.join(ollama_urls)}" if ollama_urls else "(no GPU worker online)"
        label = f"ollama: {chosen.model} {where}"
    embed_model = settings.RMASSIMO_EMBED_MODEL.strip()
    dense = not chosen.embedded and embed_model.lower() not in ("", "none")
    retrieval = "hybrid" if dense else "bm25"
    banner = ""
    if chosen.embedded:
        banner = gettext(
            "No Ollama server is in use: answers come from the small embedded model "
            "%(model)s (llama.cpp) and passages are found by keyword search (BM25) "
            "only. Start Ollama for better answers."
        ) % {"model": chosen.model}
    elif not dense:
        banner = gettext(
            "Answers come from %(model)s on Ollama; passages are found by keyword "
            "search (BM25) only, with no embedding model."
        ) % {"model": chosen.model}
    return {"llm": label, "retrieval": retrieval, "banner": banner}


def answering_model(model: str) -> str:
    """The name of the model that really answers a request for `model` in this process."""
    chosen = backend()
    return chosen.model if chosen.embedded else model


_lock = threading.Lock()
# Keyed by what they send, too: a test (or a reloaded setting) gets a client that sends it.
_llms: dict[tuple, Ollama] = {}
_embedders: dict[tuple, OllamaEmbedding] = {}


def _url(base_url: str) -> str:
    return base_url.rstrip("/")


def keep_alive() -> str | float | None:
    """The keep_alive to send, or None to send none.

    A request's keep_alive overrides the server's OLLAMA_KEEP_ALIVE, so by default none is
    sent and each Ollama keeps models as its operator configured it (its default: 5 minutes;
    `-1`: for ever). RMASSIMO_OLLAMA_KEEP_ALIVE sets one for every request when wanted.
    """
    value = str(settings.RMASSIMO_OLLAMA_KEEP_ALIVE or "").strip()
    try:
        # Ollama reads a number as seconds but a string only as a duration with a unit:
        # "-1" must go as the number -1.
        return float(value) if value else None
    except ValueError:
        return value


def runner_options() -> dict:
    """Options that shape the runner Ollama loads (not just one request): the same from
    every worker and every call, or Ollama reloads the model whenever they differ."""
    return {"num_ctx": settings.RMASSIMO_CONTEXT_WINDOW}


def chat_model(*, model: str, base_url: str) -> Ollama:
    key = (model, _url(base_url), keep_alive(), runner_options()["num_ctx"])
    with _lock:
        llm = _llms.get(key)
        if llm is None:
            llm = Ollama(
                model=model,
                base_url=key[1],
                request_timeout=settings.RMASSIMO_OLLAMA_TIMEOUT,
                # Sent as options.num_ctx with every request (see runner_options); set, so
                # the client does not ask /api/show before every first call.
                context_window=runner_options()["num_ctx"],
                temperature=settings.RMASSIMO_TEMPERATURE,
                keep_alive=keep_alive(),
            )
            _llms[key] = llm
    return llm


def embedder(*, model: str, base_url: str) -> OllamaEmbedding:
    key = (model, _url(base_url), keep_alive())
    with _lock:
        emb = _embedders.get(key)
        if emb is None:
            emb = OllamaEmbedding(
                model_name=model,
                base_url=key[1],
                embed_batch_size=settings.RMASSIMO_EMBED_BATCH,
                keep_alive=keep_alive(),
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
        metrics.ollama_error(server=url, status=str(exc.status_code))
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
        metrics.ollama_error(server=url, status="unreachable")
        raise LLMError(
            f"The Ollama server at {url} could not be reached; check that it is running "
            "and that OLLAMA_URLS points at it.",
            url=url,
        ) from exc
    except httpx.TimeoutException as exc:
        metrics.ollama_error(server=url, status="timeout")
        raise LLMError(
            f"The Ollama server at {url} did not answer within "
            f"{settings.RMASSIMO_OLLAMA_TIMEOUT:g} seconds.",
            url=url,
        ) from exc
    except (httpx.HTTPError, ValueError) as exc:
        metrics.ollama_error(server=url, status="broken")
        raise LLMError(
            f"The connection to the Ollama server at {url} broke off: {str(exc)[:200]}",
            url=url,
        ) from exc


def _messages(messages: list[dict]) -> list[ChatMessage]:
    return [ChatMessage(role=m["role"], content=m["content"]) for m in messages]


def stream_chat(
    messages: list[dict], *, model: str, base_url: str, stats: StreamStats
) -> Iterator[str]:
    """Yield the reply's text pieces as they arrive; fill `stats` from the final record.

    With the embedded backend `model` and `base_url` are not used: the GGUF file answers.
    """
    # Not made the current span: a generator's caller runs between its steps.
    with tracing.span(
        f"chat {model}",
        current=False,
        gen_ai__operation__name="chat",
        gen_ai__request__model=model,
    ):
        if backend().embedded:
            from core import llm_embedded

            yield from llm_embedded.stream_chat(messages, stats=stats)
            _record_call(backend().model, stats)
            return
        llm = chat_model(model=model, base_url=base_url)
        sent = time.monotonic()
        with _translated(base_url, model):
            for chunk in llm.stream_chat(_messages(messages)):
                raw = chunk.raw or {}
                if chunk.delta:
                    if stats.first_token_s is None:
                        stats.first_token_s = time.monotonic() - sent
                    yield chunk.delta
                if raw.get("done"):
                    stats.prompt_tokens = int(raw.get("prompt_eval_count") or 0)
                    stats.completion_tokens = int(raw.get("eval_count") or 0)
                    stats.eval_ms = int(raw.get("eval_duration") or 0) / 1e6
                    stats.load_ms = int(raw.get("load_duration") or 0) / 1e6
                    stats.done_reason = str(raw.get("done_reason") or "")
                    _record_call(model, stats)


def _record_call(model: str, stats: StreamStats) -> None:
    from workers import identity

    metrics.model_call(
        model=model,
        gpu=identity.gpu_label(),
        first_token_s=stats.first_token_s,
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        load_s=stats.load_ms / 1000,
    )


def complete_chat(messages: list[dict], *, model: str, base_url: str) -> str:
    if backend().embedded:
        from core import llm_embedded

        return "".join(llm_embedded.stream_chat(messages, stats=StreamStats()))
    llm = chat_model(model=model, base_url=base_url)
    with _translated(base_url, model):
        return str(llm.chat(_messages(messages)).message.content or "")


def _no_embeddings_when_embedded(model: str) -> None:
    if backend().embedded:
        raise LLMError(
            f"The embedding model '{model}' is served by Ollama, and this process runs the "
            "embedded backend without Ollama; set RMASSIMO_EMBED_MODEL=none for BM25 "
            "retrieval, or start Ollama.",
            retryable=False,
        )


def embed_texts(texts: list[str], *, model: str, base_url: str) -> list[list[float]]:
    _no_embeddings_when_embedded(model)
    emb = embedder(model=model, base_url=base_url)
    with _translated(base_url, model):
        return emb.get_text_embedding_batch(texts)


def embed_query(text: str, *, model: str, base_url: str) -> list[float]:
    _no_embeddings_when_embedded(model)
    emb = embedder(model=model, base_url=base_url)
    with tracing.span(
        f"embeddings {model}", gen_ai__operation__name="embeddings", gen_ai__request__model=model
    ):
        with _translated(base_url, model):
            return emb.get_query_embedding(text)


def server_version(base_url: str, *, timeout: float = 2.0) -> str | None:
    """The server's version when it answers, else None; never raises."""
    try:
        response = httpx.get(f"{_url(base_url)}/api/version", timeout=timeout)
        response.raise_for_status()
        return str(response.json().get("version"))
    except (httpx.HTTPError, ValueError):
        return None


def probe(*, model: str, base_url: str, timeout: float = 10.0) -> str | None:
    """None when the server can take a generation now, else why not (for worker health).

    A load request (`/api/generate` with no prompt) goes through the same queue as real
    work, so an overloaded server (503) or a missing model fails it, while /api/version
    would still answer. It carries the answers' runner options, so it does not make
    Ollama reload a model that answers use.
    """
    body = {"model": model, "options": runner_options()}
    if keep_alive() is not None:
        body["keep_alive"] = keep_alive()
    try:
        response = httpx.post(f"{_url(base_url)}/api/generate", json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"The Ollama server at {_url(base_url)} could not be reached ({exc})."
    if response.status_code != 200:
        return (
            f"The Ollama server at {_url(base_url)} answered {response.status_code}: "
            f"{response.text[:200]}"
        )
    return None


_kinds: dict[tuple[str, str, str], bool] = {}  # (url, model, digest) -> is an embedding model


def pulled_models(base_url: str, *, timeout: float = 5.0) -> dict[str, bool]:
    """The models pulled on that server (`/api/tags`), each mapped to True for an embedding
    model (its `/api/show` capabilities say so), False for a chat model. Raises LLMError."""
    url = _url(base_url)
    try:
        client = ollama.Client(host=url, timeout=timeout)
        listed = client.list().models
        found = {}
        for entry in listed:
            name = str(entry.model)
            key = (url, name, str(entry.digest or ""))
            if key not in _kinds:
                capabilities = client.show(name).capabilities or []
                _kinds[key] = "embedding" in capabilities and "completion" not in capabilities
            found[name] = _kinds[key]
        return found
    except (ollama.ResponseError, httpx.HTTPError, ConnectionError) as exc:
        raise LLMError(
            f"The Ollama server at {url} could not list its models: {exc}", url=url
        ) from exc


def loaded_models(base_url: str, *, timeout: float = 5.0) -> list[str]:
    """The models resident on that server now (`/api/ps`). Raises LLMError."""
    url = _url(base_url)
    try:
        return [str(m.model) for m in ollama.Client(host=url, timeout=timeout).ps().models]
    except (ollama.ResponseError, httpx.HTTPError, ConnectionError) as exc:
        raise LLMError(
            f"The Ollama server at {url} could not list its loaded models: {exc}", url=url
        ) from exc
