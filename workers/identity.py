"""Which card this worker process serves and which Ollama it must call.

`run_workers` sets these in each worker's environment; a worker started by hand without
them serves card 0 and calls the first URL of OLLAMA_URLS.
"""

import os
import socket

from django.conf import settings


def gpu_label() -> str:
    return os.environ.get("RMASSIMO_WORKER_GPU", "gpu0")


def ollama_url() -> str:
    return os.environ.get("RMASSIMO_OLLAMA_URL") or settings.OLLAMA_URLS[0]


def worker_name() -> str:
    return os.environ.get("RMASSIMO_WORKER_NAME") or f"{gpu_label()}@{socket.gethostname()}"
