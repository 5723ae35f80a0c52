"""Real processes for the tests: the Milvus Lite server and Celery workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate, *, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM (a warm shutdown), then SIGKILL to the whole process group if it lingers.

    The process must have been started with start_new_session=True."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def start_milvus(data_dir: Path, uri: str, log: Path) -> subprocess.Popen:
    parsed = urlparse(uri)
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("milvus-lite")),
            "server",
            "--data-dir",
            str(data_dir),
            "--host",
            parsed.hostname,
            "--port",
            str(parsed.port),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_for(
        lambda: port_open(parsed.hostname, parsed.port) or proc.poll() is not None,
        timeout=60,
        what="the Milvus Lite server",
    )
    if proc.poll() is not None:
        raise RuntimeError(f"milvus-lite server exited: {log.read_text()[-2000:]}")
    return proc


def database_url() -> str:
    """The URL of the test database, for worker processes."""
    conf = connection.settings_dict
    if conf["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{conf['NAME']}"
    user = conf.get("USER") or ""
    password = f":{conf['PASSWORD']}" if conf.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    host = f"{conf.get('HOST') or '127.0.0.1'}:{conf.get('PORT') or 5432}"
    return f"postgres://{auth}{host}/{conf['NAME']}"


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "MILVUS_URI": settings.MILVUS_URI,
            "RMASSIMO_VAR_DIR": os.environ["RMASSIMO_VAR_DIR"],
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class Worker:
    """One real Celery worker process consuming from the real broker."""

    def __init__(
        self,
        *,
        name: str,
        queues: list[str],
        ollama_url: str,
        gpu: str = "gpu0",
        concurrency: int = 1,
        log_dir: Path,
        extra_env: dict | None = None,
    ) -> None:
        self.name = name
        self.log = log_dir / f"worker-{name.replace('@', '-')}.log"
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery",
            "worker",
            "-n",
            name,
            "-Q",
            ",".join(queues),
            "-c",
            str(concurrency),
            "--prefetch-multiplier",
            "1",
            "-l",
            "info",
            "--without-gossip",
            "--without-mingle",
        ]
        env = worker_env(
            **{
                "RMASSIMO_WORKER_GPU": gpu,
                "RMASSIMO_WORKER_NAME": name,
                "RMASSIMO_OLLAMA_URL": ollama_url,
                "RMASSIMO_LOG_LEVEL": "INFO",
                **(extra_env or {}),
            }
        )
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._ready, timeout=90, interval=0.1, what=f"worker {name} to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited:\n{self.output()[-3000:]}")
        return " ready." in self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 20) -> None:
        stop(self.proc, timeout)
