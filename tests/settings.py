"""Settings for the test suite: the project's settings with test-only defaults.

Workers started by the tests get the same values through their environment.
"""

import os
import socket
import tempfile


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Redis database 15, away from a developer's running instance on database 0.
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("RMASSIMO_VAR_DIR", tempfile.mkdtemp(prefix="rmassimo-test-"))
os.environ.setdefault("MILVUS_URI", f"http://127.0.0.1:{_free_port()}")
os.environ.setdefault("RMASSIMO_STREAM_FLUSH_MS", "20")
os.environ.setdefault("RMASSIMO_OLLAMA_TIMEOUT", "10")
os.environ.setdefault("RMASSIMO_LOG_LEVEL", "WARNING")
os.environ.setdefault("RMASSIMO_ASK_RATE", "1000/min")
os.environ.setdefault("RMASSIMO_HEARTBEAT_S", "0.5")
# The tests' little web sites listen on loopback: URL ingestion may reach them by this name
# only (127.0.0.1 stays refused, as every internal address is).
os.environ.setdefault("RMASSIMO_FETCH_ALLOWED_HOSTS", "localhost")
# The suite's questions reach the model unless retrieval finds nothing at all; the tests of
# "I don't know" give their corpus its own threshold.
os.environ.setdefault("RMASSIMO_MIN_RELEVANCE_BM25", "0")
os.environ.setdefault("RMASSIMO_MIN_RELEVANCE_DENSE", "-1")
# One shared question queue: the suite's session worker takes every question, whatever its
# model; tests of routing by model and placement start their own workers with "models".
os.environ.setdefault("RMASSIMO_PLACEMENT", "shared")
# The suite's workers talk to Ollama stand-ins; a test of the embedded model says so itself.
os.environ.setdefault("RMASSIMO_LLM_BACKEND", "ollama")

from rmassimo_site.settings import *  # noqa: E402, F403

STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # noqa: F405

# DEBUG is off by default: the test servers serve static files from the apps (the run
# command collects them instead).
WHITENOISE_USE_FINDERS = True
# Logging in is part of many tests; a slow hash would only slow them down.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
