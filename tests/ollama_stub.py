"""A deterministic stand-in for an Ollama server, speaking its REST API.

No model weights can be fetched where the tests and benchmarks run, so this server answers
``/api/chat`` and ``/api/generate`` (streaming NDJSON or not), ``/api/embed``,
``/api/embeddings``, ``/api/tags``, ``/api/show``, ``/api/ps`` and ``/api/version`` with
Ollama's JSON shapes, status codes and error bodies, for the real ``ollama`` client.

* Replies echo the prompt: ``"Echo: w1 w2 ..."``, the words of the last user message
  (``prompt`` on /api/generate) cycled, one word per streamed token.  ``reply_tokens`` sets
  the length, a ``[[tokens=N]]`` directive anywhere in the request overrides it and
  ``options.num_predict`` caps it (done_reason "length").  think/format/tools are ignored.
* Embeddings are a hashed bag of words, stable across processes: shared words, close vectors.
* ``latency`` (prompt eval), ``tps`` (pacing), ``parallel`` (OLLAMA_NUM_PARALLEL, per
  loaded model), failures (``fail_status``, ``fail_message``, ``fail_count``, and
  ``error_after``: an ``{"error"}`` line after that many streamed tokens) and hung streams
  (``stall_after``, ``stall_seconds``).  Stubs with different ``name`` labels stand for
  different GPUs.
* The scheduler, as a simulation of what placement depends on: ``gpus`` (each card's
  memory), ``models`` (per model: ``size``, ``load_s``, ``prompt_tps``, ``tps``, and
  ``num_predict`` as a Modelfile sets it),
  ``keep_alive`` (OLLAMA_KEEP_ALIVE), ``max_loaded`` (OLLAMA_MAX_LOADED_MODELS),
  ``max_queue`` (OLLAMA_MAX_QUEUE), ``num_ctx`` (OLLAMA_CONTEXT_LENGTH) and ``time_scale``
  (every simulated duration is multiplied by it, so a bench of hours runs in minutes).
  A model that is not resident is loaded before its first token, evicting the least
  recently used idle model when memory is short; ``/api/ps`` lists resident models; each
  load and unload is logged in ``events``.  docs/ollama-simulator.md maps every setting
  to the Ollama behaviour it mirrors.

Behaviour changes at run time through ``configure()`` or, for a stub in another process,
``GET/POST /_stub/config``, ``GET/DELETE /_stub/calls`` and ``GET/DELETE /_stub/events``.
``calls`` logs every ``/api/`` request: path, model, body, ``time`` (received) and
``finished`` (its answer written), so a benchmark takes the model's own time from it.
CLI: ``--help``.
"""

import argparse
import hashlib
import json
import math
import re
import select
import signal
import socket
import threading
import time
import unicodedata
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULTS = {
    "name": "stub",
    "chat_models": ("llama3.1:8b",),
    "embed_models": ("bge-m3",),
    "embed_dim": 256,
    "reply_tokens": 48,
    "latency": 0.0,
    "embed_latency": 0.0,
    "tps": 0.0,
    "parallel": None,
    "fail_status": 500,
    "fail_message": "stub failure",
    "fail_count": 0,
    "stall_after": None,
    "stall_seconds": 30.0,
    "error_after": None,
    # the simulated scheduler (see docs/ollama-simulator.md)
    "gpus": None,
    "models": {},
    "keep_alive": 300.0,
    "max_loaded": None,
    "max_queue": None,
    "num_ctx": 4096,
    "time_scale": 1.0,
}
# Ollama's own words (server/sched.go ErrMaxQueue)
MAX_QUEUE_ERROR = "server busy, please try again.  maximum pending requests exceeded"
FOREVER = "2318-11-26T00:00:00Z"  # what /api/ps shows for keep_alive -1
TOKENS_DIRECTIVE = re.compile(r"\[\[tokens=(\d+)\]\]")
WORD = re.compile(r"[^\W_]+")  # letters and digits in any script, so "città" is one word
FAILING_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")
MODIFIED_AT = "2025-01-01T00:00:00Z"
# family, size in bytes, parameter size, quantisation, context length, hidden size
CARDS = {
    False: ("llama", 4_920_753_328, "8.0B", "Q4_K_M", 131072, 4096),
    True: ("bert", 1_157_672_605, "566.70M", "F16", 8192, None),  # hidden size is embed_dim
}


def canonical(model):
    """Ollama treats "bge-m3" and "bge-m3:latest" as the same model."""
    return model if ":" in model else model + ":latest"


def now_rfc3339():
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def embed_text(text, dim):
    vec = [0.0] * dim
    for word in WORD.findall(unicodedata.normalize("NFC", text).lower()):
        # blake2b, not hash(): vectors must match across processes and runs
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        vec[int.from_bytes(digest[:4], "little") % dim] += 1.0 if digest[4] & 1 else -1.0
    return normalise(vec)


def normalise(vec):
    norm = math.sqrt(sum(v * v for v in vec))
    if norm == 0.0:
        return [1.0 / math.sqrt(len(vec))] * len(vec)
    return [v / norm for v in vec]


def describe(embedding, dim):
    """Return (details, size, context length, embedding length) as /api/show reports them."""
    family, size, params, quant, context, hidden = CARDS[embedding]
    details = {"parent_model": "", "format": "gguf", "family": family, "families": [family]}
    details.update(parameter_size=params, quantization_level=quant)
    return details, size, context, hidden or dim


def nanos(seconds):
    return max(1, int(seconds * 1_000_000_000))


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def keep_alive_seconds(value):
    """Ollama's keep_alive: seconds as a JSON number, or a Go duration string ("5m",
    "1h30m", "0"); negative keeps the model for ever (returned as -1), 0 unloads it."""
    if isinstance(value, bool):
        raise StubError(400, "json: cannot unmarshal bool into keep_alive")
    if isinstance(value, (int, float)):
        return -1.0 if value < 0 else float(value)
    text = str(value).strip()
    body = text.lstrip("+-")
    parts = _DURATION_PART.findall(body)
    if body == "0":
        return 0.0
    if not parts or "".join(n + u for n, u in parts) != body:
        # Go's time.ParseDuration, as Ollama uses it: "-1" as a string has no unit
        raise StubError(400, f'time: missing unit in duration "{text}"')
    return -1.0 if text.startswith("-") else sum(float(n) * _UNIT_S[u] for n, u in parts)


class StubError(Exception):
    """An error answer: StubError(status, message)."""


class _Runner:
    """One model resident on the simulated server, like a runnerRef in Ollama's scheduler."""

    def __init__(self, model, size, alloc, num_ctx):
        self.model = model
        self.size = size
        self.alloc = alloc  # card index -> bytes
        self.num_ctx = num_ctx
        self.loading = True
        self.refs = 0  # requests using it now
        self.last_used = time.monotonic()
        self.expires = None  # monotonic deadline once idle; None: never
        self.expires_at = FOREVER


class OllamaStub:
    """``with OllamaStub(tps=20) as stub: ollama.Client(host=stub.url)``; see DEFAULTS."""

    def __init__(self, *, host="127.0.0.1", port=0, name="stub", **behaviour):
        self.host, self.port = host, port
        self._lock = threading.Lock()
        self._slots = threading.Condition(self._lock)
        self._config = dict(DEFAULTS)
        self._runners = {}  # canonical model name -> _Runner
        self._loading = False  # Ollama's scheduler loads one model at a time
        self._pending = 0  # requests waiting for a model or a slot (OLLAMA_MAX_QUEUE)
        self._events = []
        self._calls = []
        self._conns = set()
        self._stopped = threading.Event()
        self._server = None
        self.url = None
        self.configure(name=name, **behaviour)

    def start(self):
        self._stopped.clear()
        server = _Server((self.host, self.port), _Handler)
        server.stub = self
        self._server = server
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}"
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self):
        self._stopped.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            conns = list(self._conns)
            self._slots.notify_all()
        # Open keep-alive and stalled connections would otherwise outlive the stub.
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def configure(self, **behaviour):
        unknown = set(behaviour) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown stub setting(s): {', '.join(sorted(unknown))}")
        for key in ("chat_models", "embed_models"):
            if key in behaviour:
                value = behaviour[key]
                behaviour[key] = (value,) if isinstance(value, str) else tuple(value)
        if "models" in behaviour:
            behaviour["models"] = {canonical(k): dict(v) for k, v in behaviour["models"].items()}
        if behaviour.get("gpus") is not None:
            behaviour["gpus"] = [int(size) for size in behaviour["gpus"]]
        with self._lock:
            self._config.update(behaviour)
            self._slots.notify_all()  # a raised ``parallel`` frees queued requests

    @property
    def config(self):
        with self._lock:
            return dict(self._config)

    @property
    def calls(self):
        with self._lock:
            return [dict(call) for call in self._calls]

    def reset_calls(self):
        with self._lock:
            self._calls.clear()

    def _record(self, path, body):
        model = body.get("model") if isinstance(body, dict) else None
        entry = {"path": path, "model": model, "body": body, "time": time.time()}
        with self._lock:
            entry["stub"] = self._config["name"]
            self._calls.append(entry)
        return entry

    def _finished(self, entry):
        # The model's own time for a request is `finished - time`: benchmarks subtract
        # it from what a client saw, rather than assuming the configured pace was kept.
        with self._lock:
            entry["finished"] = time.time()

    def _take_failure(self):
        with self._lock:
            cfg = self._config
            if cfg["fail_count"] == 0:
                return None
            if cfg["fail_count"] > 0:
                cfg["fail_count"] -= 1
            return StubError(cfg["fail_status"], cfg["fail_message"])

    @property
    def events(self):
        """Loads and unloads, oldest first: {"event", "model", "reason", "seconds", ...}."""
        with self._lock:
            return list(self._events)

    def reset_events(self):
        with self._lock:
            self._events.clear()

    def _event(self, event, runner, reason, seconds=0.0):
        entry = {"event": event, "model": runner.model, "reason": reason, "seconds": seconds}
        cards = sorted(runner.alloc)
        self._events.append(
            {**entry, "cards": cards, "time": time.time(), "stub": self._config["name"]}
        )

    def spec(self, model):
        """A model's simulated size, load time and speeds (``models`` over the defaults)."""
        cfg = self._config
        name = canonical(model)
        embedding = name in {canonical(m) for m in cfg["embed_models"]}
        base = {
            "size": CARDS[embedding][1],
            "load_s": 0.0,
            "prompt_tps": None,
            "tps": None,
            "num_predict": None,
        }
        return {**base, **cfg["models"].get(name, {})}

    def scaled(self, seconds):
        return max(0.0, float(seconds or 0.0)) * self._config["time_scale"]

    def _unload(self, runner, reason):
        self._runners.pop(runner.model, None)
        self._event("unload", runner, reason)
        self._slots.notify_all()

    def _expire(self):
        now = time.monotonic()
        for runner in list(self._runners.values()):
            idle = runner.refs == 0 and not runner.loading
            if idle and runner.expires is not None and now >= runner.expires:
                self._unload(runner, "expired")

    def _place(self, size):
        """Card index -> bytes for a model of `size`, evicting idle models (least recently
        used first) while memory or OLLAMA_MAX_LOADED_MODELS is short; None: wait."""
        cfg = self._config
        cards = cfg["gpus"]
        limit = cfg["max_loaded"] or (3 * len(cards) if cards else None)
        if cards and size > sum(cards):
            gib = 2**30
            raise StubError(
                500,
                f"model requires more system memory ({size / gib:.1f} GiB) than is "
                f"available ({sum(cards) / gib:.1f} GiB)",
            )
        while True:
            alloc = self._fit(size, cards) if limit is None or len(self._runners) < limit else None
            if alloc is not None:
                return alloc
            idle = [r for r in self._runners.values() if r.refs == 0 and not r.loading]
            if not idle:
                return None
            self._unload(min(idle, key=lambda r: r.last_used), "evicted")

    def _fit(self, size, cards):
        if not cards:
            return {}
        free = [
            cap - sum(r.alloc.get(i, 0) for r in self._runners.values())
            for i, cap in enumerate(cards)
        ]
        order = sorted(range(len(cards)), key=lambda i: -free[i])
        if free[order[0]] >= size:  # a model that fits one card goes on one card
            return {order[0]: size}
        if sum(max(0, f) for f in free) < size:
            return None
        # else it is spread over the cards the server sees, in proportion to their free memory
        total = sum(max(0, f) for f in free)
        return {i: size * free[i] // total for i in order if free[i] > 0}

    @contextmanager
    def _use(self, model, *, num_ctx=None, keep_alive=None):
        """Hold `model` for one request: wait for a slot, loading the model first when it
        is not resident (or was loaded with another num_ctx). Yields the runner."""
        name = canonical(model)
        with self._slots:
            cfg = self._config
            if cfg["max_queue"] is not None and self._pending >= cfg["max_queue"]:
                raise StubError(503, MAX_QUEUE_ERROR)
            want_ctx = int(num_ctx or cfg["num_ctx"])
            self._pending += 1
            try:
                runner, load = self._take(name, want_ctx)
            finally:
                self._pending -= 1
        try:
            if load:
                seconds = self.scaled(self.spec(name)["load_s"])
                began = time.monotonic()
                self._stopped.wait(seconds)
                with self._slots:
                    runner.loading = False
                    self._loading = False
                    self._event("load", runner, "request", time.monotonic() - began)
                    self._slots.notify_all()
            yield runner
        finally:
            with self._slots:
                runner.refs -= 1
                runner.last_used = time.monotonic()
                self._set_expiry(runner, keep_alive)
                self._slots.notify_all()

    def _take(self, name, want_ctx):
        while not self._stopped.is_set():
            self._expire()
            runner = self._runners.get(name)
            if runner is not None and runner.num_ctx != want_ctx:
                if runner.refs or runner.loading:
                    self._slots.wait(0.05)  # a reload waits for the runner to go idle
                    continue
                self._unload(runner, "num_ctx changed")
                runner = None
            if runner is not None:
                limit = self._config["parallel"]
                if runner.loading or (limit and runner.refs >= limit):
                    self._slots.wait(0.05)
                    continue
                runner.refs += 1
                return runner, False
            if not self._loading:
                size = int(self.spec(name)["size"])
                alloc = self._place(size)
                if alloc is not None:
                    runner = _Runner(name, size, alloc, want_ctx)
                    runner.refs = 1
                    self._runners[name] = runner
                    self._loading = True
                    return runner, True
            self._slots.wait(0.05)
        raise StubError(500, "the server is shutting down")

    def _set_expiry(self, runner, keep_alive):
        seconds = (
            self._config["keep_alive"] if keep_alive is None else keep_alive_seconds(keep_alive)
        )
        if seconds < 0:
            runner.expires, runner.expires_at = None, FOREVER
            return
        runner.expires = time.monotonic() + self.scaled(seconds)
        runner.expires_at = datetime.fromtimestamp(
            time.time() + self.scaled(seconds), UTC
        ).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if seconds == 0 and runner.refs == 0 and self._runners.get(runner.model) is runner:
            self._unload(runner, "keep_alive 0")

    def unload(self, model):
        """keep_alive 0: unload now if idle, else once its running requests end."""
        with self._slots:
            runner = self._runners.get(canonical(model))
            if runner is None:
                return
            if runner.refs or runner.loading:
                runner.expires = time.monotonic()
            else:
                self._unload(runner, "keep_alive 0")

    def resident(self):
        """What /api/ps lists: loaded models, least recently used first."""
        with self._lock:
            self._expire()
            return sorted(
                (r for r in self._runners.values() if not r.loading), key=lambda r: r.last_used
            )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the ollama client expects
    disable_nagle_algorithm = True  # each streamed token leaves at once
    server_version = "ollama-stub"

    def setup(self):
        super().setup()
        self.stub = self.server.stub
        with self.stub._lock:
            self.stub._conns.add(self.connection)

    def finish(self):
        with self.stub._lock:
            self.stub._conns.discard(self.connection)
        with suppress(OSError):
            super().finish()

    def log_message(self, format, *args):
        pass

    def _send(self, status, payload, content_type="application/json; charset=utf-8"):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _parse_body(self, raw):
        if not raw.strip():
            raise StubError(400, "missing request body")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise StubError(400, f"invalid JSON in request body: {exc}") from None
        if not isinstance(body, dict):
            raise StubError(400, "json: cannot unmarshal request body into a JSON object")
        return body

    def _write_chunk(self, record):
        data = json.dumps(record).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _client_gone(self):
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

    def _route(self):
        method, path = self.command, self.path.split("?", 1)[0]
        routes = {
            ("GET", "/"): lambda: b"Ollama is running",
            ("HEAD", "/"): lambda: b"Ollama is running",
            ("GET", "/api/version"): lambda: {"version": "0.12.0"},
            ("GET", "/api/tags"): self._tags,
            ("GET", "/api/ps"): self._ps,
            ("POST", "/api/show"): self._show,
            ("POST", "/api/chat"): self._chat,
            ("POST", "/api/generate"): self._generate,
            ("POST", "/api/embed"): self._embed,
            ("POST", "/api/embeddings"): self._embeddings,
            ("GET", "/_stub/config"): lambda: self.stub.config,
            ("POST", "/_stub/config"): self._configure,
            ("GET", "/_stub/calls"): lambda: self.stub.calls,
            ("DELETE", "/_stub/calls"): lambda: self.stub.reset_calls() or {"status": "ok"},
            ("GET", "/_stub/events"): lambda: self.stub.events,
            ("DELETE", "/_stub/events"): lambda: self.stub.reset_events() or {"status": "ok"},
        }
        handler = routes.get((method, path))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""  # drained even when unused: keep-alive
        self.body = None
        call = None
        try:
            if handler is None:
                return self._send(404, b"404 page not found", "text/plain")
            if method == "POST":
                try:
                    self.body = self._parse_body(raw)
                finally:
                    if path.startswith("/api/"):
                        call = self.stub._record(path, self.body)
            elif path.startswith("/api/"):
                call = self.stub._record(path, None)
            if path in FAILING_PATHS and (failure := self.stub._take_failure()):
                raise failure
            result = handler()
            if isinstance(result, bytes):
                self._send(200, result, "text/plain; charset=utf-8")
            elif result is not None:
                self._send(200, result)
        except StubError as exc:
            self._send(exc.args[0], {"error": exc.args[1]})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if call is not None:
                self.stub._finished(call)

    do_GET = do_HEAD = do_POST = do_DELETE = _route

    def _find(self, model, cfg):
        """Return True for an embedding model, False for a chat model, None if unknown."""
        kinds = {canonical(m): False for m in cfg["chat_models"]}
        kinds.update({canonical(m): True for m in cfg["embed_models"]})
        return kinds.get(canonical(model))

    def _tags(self):
        cfg = self.stub.config
        models = [(m, False) for m in cfg["chat_models"]] + [(m, True) for m in cfg["embed_models"]]
        listed = []
        for model, embedding in models:
            name = canonical(model)
            details, _, _, _ = describe(embedding, cfg["embed_dim"])
            size = int(self.stub.spec(name)["size"])
            digest = hashlib.sha256(name.encode()).hexdigest()
            entry = {"name": name, "model": name, "modified_at": MODIFIED_AT, "size": size}
            listed.append({**entry, "digest": digest, "details": details})
        return {"models": listed}

    def _ps(self):
        cfg = self.stub.config
        listed = []
        for runner in self.stub.resident():
            embedding = bool(self._find(runner.model, cfg))
            details, _, _, _ = describe(embedding, cfg["embed_dim"])
            digest = hashlib.sha256(runner.model.encode()).hexdigest()
            entry = {"name": runner.model, "model": runner.model, "size": runner.size}
            entry.update(digest=digest, details=details, expires_at=runner.expires_at)
            listed.append({**entry, "size_vram": runner.size, "context_length": runner.num_ctx})
        return {"models": listed}

    def _show(self):
        cfg = self.stub.config
        model = self.body.get("model") or self.body.get("name") or ""
        if not model:
            raise StubError(400, "model is required")
        embedding = self._find(model, cfg)
        if embedding is None:
            raise StubError(404, f"model '{model}' not found")
        details, _, context, hidden = describe(embedding, cfg["embed_dim"])
        arch = details["family"]
        return {
            "modelfile": f'# Modelfile generated by "ollama show"\nFROM {canonical(model)}\n',
            "parameters": "" if embedding else 'stop                           "<|eot_id|>"',
            "template": "" if embedding else "{{ .Prompt }}",
            "details": details,
            "model_info": {
                "general.architecture": arch,
                f"{arch}.context_length": context,
                f"{arch}.embedding_length": hidden,
            },
            "capabilities": ["embedding"] if embedding else ["completion"],
            "modified_at": MODIFIED_AT,
        }

    def _require(self, want_embedding, verb):
        cfg = self.stub.config
        model = self.body.get("model") or ""
        if not model:
            raise StubError(400, "model is required")
        embedding = self._find(model, cfg)
        if embedding is None:
            raise StubError(404, f'model "{model}" not found, try pulling it first')
        if embedding != want_embedding:
            raise StubError(400, f'"{model}" does not support {verb}')
        return model, cfg

    def _chat(self):
        model, cfg = self._require(False, "chat")
        messages = [m for m in self.body.get("messages") or [] if isinstance(m, dict)]
        texts = [str(m.get("content") or "") for m in messages]
        last = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        source = str(last.get("content") or "")
        return self._complete(model, cfg, texts, source, bool(messages), True)

    def _generate(self):
        model, cfg = self._require(False, "generate")
        prompt = str(self.body.get("prompt") or "")
        texts = [str(self.body.get("system") or ""), prompt]
        return self._complete(model, cfg, texts, prompt, bool(prompt), False)

    def _complete(self, model, cfg, texts, source, has_input, chat):
        def record(content, done, **extra):
            out = {"model": model, "created_at": now_rfc3339()}
            if chat:
                out["message"] = {"role": "assistant", "content": content}
            else:
                out["response"] = content
            return {**out, "done": done, **extra}

        options = self.body.get("options") or {}
        num_ctx, keep_alive = options.get("num_ctx"), self.body.get("keep_alive")
        if not has_input:  # Ollama's way to load (or, with keep_alive 0, unload) a model
            if keep_alive is not None and keep_alive_seconds(keep_alive) == 0:
                self.stub.unload(model)
                return record("", True, done_reason="unload")
            with self.stub._use(model, num_ctx=num_ctx, keep_alive=keep_alive):
                return record("", True, done_reason="load")

        started = time.monotonic()
        count = cfg["reply_tokens"]
        for text in texts:
            for found in TOKENS_DIRECTIVE.findall(text):
                count = int(found)
        reason = "stop"
        # The request's option, else the model's own (a Modelfile's PARAMETER num_predict).
        num_predict = options.get("num_predict") or self.stub.spec(model)["num_predict"]
        if isinstance(num_predict, int) and 0 < num_predict < count:
            count, reason = num_predict, "length"
        words = TOKENS_DIRECTIVE.sub(" ", source).split() or ["..."]
        tokens = [" " + words[i % len(words)] for i in range(count)]
        if tokens:
            tokens[0] = "Echo:" + tokens[0]
        stream = self.body.get("stream", True) is not False
        stall_after = cfg["stall_after"] if stream else None
        error_after = cfg["error_after"]
        stopped = self.stub._stopped
        prompt_count = sum(len(t.split()) for t in texts)
        spec = self.stub.spec(model)
        tps = spec["tps"] or cfg["tps"]
        evaluation = cfg["latency"] + (
            prompt_count / spec["prompt_tps"] if spec["prompt_tps"] else 0
        )

        with self.stub._use(model, num_ctx=num_ctx, keep_alive=keep_alive):
            loaded = time.monotonic()
            stopped.wait(self.stub.scaled(evaluation))
            evaluated = time.monotonic()
            if stream:
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
            for i, token in enumerate(tokens):
                if stall_after is not None and i >= stall_after:
                    return self._stall(cfg["stall_seconds"])
                if error_after is not None and i >= error_after:
                    return self._fail_midway(stream, cfg["fail_message"])
                if tps and stopped.wait(self.stub.scaled(1.0 / tps)):
                    break
                if stream:
                    self._write_chunk(record(token, False))
            if stream and stall_after is not None and stall_after >= len(tokens):
                return self._stall(cfg["stall_seconds"])
            if error_after is not None and error_after >= len(tokens):
                return self._fail_midway(stream, cfg["fail_message"])
            if stopped.is_set():
                self.close_connection = True
                return None  # the stub went away mid-answer: no final record
            finished = time.monotonic()

        counters = {
            "done_reason": reason,
            "total_duration": nanos(finished - started),
            "load_duration": nanos(loaded - started),
            "prompt_eval_count": prompt_count,
            "prompt_eval_duration": nanos(evaluated - loaded),
            "eval_count": len(tokens),
            "eval_duration": nanos(finished - evaluated),
        }
        if not stream:
            return record("".join(tokens), True, **counters)
        self._write_chunk(record("", True, **counters))
        self.wfile.write(b"0\r\n\r\n")
        return None

    def _fail_midway(self, stream, message):
        # Ollama reports a failure after the 200 status as one last NDJSON line.
        if not stream:
            raise StubError(500, message)
        self._write_chunk({"error": message})
        self.wfile.write(b"0\r\n\r\n")
        return None

    def _stall(self, seconds):
        deadline = time.monotonic() + seconds
        # Hold the slot like a hung runner would, but let go once the client hangs up.
        while time.monotonic() < deadline and not self.stub._stopped.wait(0.05):
            if self._client_gone():
                break
        self.close_connection = True
        return None

    def _embed(self):
        model, cfg = self._require(True, "embeddings")
        raw = self.body.get("input")
        texts = ([raw] if raw else []) if isinstance(raw, str) else [] if raw is None else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise StubError(400, "invalid input type")
        started = time.monotonic()
        options = self.body.get("options") or {}
        with self.stub._use(
            model, num_ctx=options.get("num_ctx"), keep_alive=self.body.get("keep_alive")
        ):
            loaded = time.monotonic()
            self.stub._stopped.wait(self.stub.scaled(cfg["embed_latency"]))
            dims = self.body.get("dimensions") or 0
            vectors = []
            for text in texts:
                vec = embed_text(text, cfg["embed_dim"])
                vectors.append(normalise(vec[:dims]) if 0 < dims < len(vec) else vec)
        if not texts:
            return {"model": model, "embeddings": []}
        return {
            "model": model,
            "embeddings": vectors,
            "total_duration": nanos(time.monotonic() - started),
            "load_duration": nanos(loaded - started),
            "prompt_eval_count": sum(len(WORD.findall(t)) for t in texts),
        }

    def _embeddings(self):
        model, cfg = self._require(True, "embeddings")
        prompt = str(self.body.get("prompt") or "")
        if not prompt:
            return {"embedding": []}
        options = self.body.get("options") or {}
        with self.stub._use(
            model, num_ctx=options.get("num_ctx"), keep_alive=self.body.get("keep_alive")
        ):
            self.stub._stopped.wait(self.stub.scaled(cfg["embed_latency"]))
            return {"embedding": embed_text(prompt, cfg["embed_dim"])}

    def _configure(self):
        try:
            self.stub.configure(**self.body)
        except TypeError as exc:
            raise StubError(400, str(exc)) from None
        return self.stub.config


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run a deterministic Ollama stand-in.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--name", default="stub")
    for flag, kind in (("latency", float), ("tps", float), ("parallel", int)):
        parser.add_argument(f"--{flag}", type=kind, help=f"default {DEFAULTS[flag]}")
    parser.add_argument("--reply-tokens", type=int, help=f"default {DEFAULTS['reply_tokens']}")
    parser.add_argument("--embed-dim", type=int, help=f"default {DEFAULTS['embed_dim']}")
    for kind in ("chat", "embed"):
        default = ", ".join(DEFAULTS[f"{kind}_models"])
        parser.add_argument(
            f"--{kind}-model", dest=f"{kind}_models", action="append", help=f"repeatable; {default}"
        )
    parser.add_argument(
        "--config", type=json.loads, help="JSON object of further settings (see DEFAULTS)"
    )
    args = vars(parser.parse_args(argv))
    args.update(args.pop("config") or {})
    if args["parallel"] == 0:
        args["parallel"] = None  # 0 means unlimited, like OLLAMA_NUM_PARALLEL unset
    stub = OllamaStub(**{key: value for key, value in args.items() if value is not None}).start()

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"ollama stub {stub.config['name']} listening on {stub.url}", flush=True)
    while not done.wait(0.5):
        pass
    stub.stop()


if __name__ == "__main__":
    main()
