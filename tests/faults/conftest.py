"""A private stack for fault tests: its own Redis (so it can be killed and restarted), the
ASGI server, a CPU worker, celery beat, and GPU workers started per test. The test process
talks to it over HTTP and reads the shared test database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from rest_framework.authtoken.models import Token

from tests import processes
from tests.conftest import grant
from tests.ollama_stub import OllamaStub

FAST = {
    # Short leases, reaper and health periods, so each fault resolves in seconds.
    "RMASSIMO_LEASE_S": "2",
    "RMASSIMO_REAPER_S": "1",
    "RMASSIMO_REQUEUE_AFTER_S": "2",
    "RMASSIMO_HEARTBEAT_S": "0.5",
    "RMASSIMO_HEALTH_RETRY_S": "1",
    "RMASSIMO_MAX_ATTEMPTS": "3",
    "RMASSIMO_RETRY_BACKOFF_S": "0.2",
    "RMASSIMO_OLLAMA_TIMEOUT": "2",
    "RMASSIMO_VECTORSTORE_RETRY_DELAYS": "0.2,0.4",
    "RMASSIMO_UNHEALTHY_AFTER": "2",
    "RMASSIMO_ASK_RATE": "10000/min",
    "RMASSIMO_LLM_BACKEND": "ollama",
    "RMASSIMO_NO_WORKER_FAIL_AFTER_S": "20",
}


class RedisServer:
    def __init__(self, log_dir: Path) -> None:
        self.port = processes.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = log_dir / f"redis-{self.port}.log"
        self.proc = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        processes.wait_for(
            lambda: processes.port_open("127.0.0.1", self.port), timeout=20, what="redis-server"
        )

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class FaultStack:
    def __init__(self, redis: RedisServer, log_dir: Path, user) -> None:
        self.redis = redis
        self.log_dir = log_dir
        self.env = {**FAST, "REDIS_URL": redis.url}
        self.workers: list[processes.Worker] = []
        self.stubs: list[OllamaStub] = []
        self.procs: list[subprocess.Popen] = []
        port = processes.free_port()
        self.base = f"http://127.0.0.1:{port}"
        self._spawn(
            "web",
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "rmassimo_site.asgi:application",
            ],
        )
        self._spawn(
            "beat",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.celery",
                "beat",
                "-l",
                "info",
                "-s",
                str(log_dir / f"beat-{port}"),
            ],
        )
        self.cpu = self.worker("cpu", queues=["cpu", "housekeeping"], stub=None)
        processes.wait_for(
            lambda: processes.port_open("127.0.0.1", port), timeout=60, what="daphne"
        )
        token, _ = Token.objects.get_or_create(user=user)
        self.http = httpx.Client(
            base_url=self.base, timeout=30, headers={"Authorization": f"Token {token.key}"}
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        self.procs.append(
            subprocess.Popen(
                argv,
                cwd=processes.ROOT,
                env=processes.worker_env(**self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def stub(self, name: str, **behaviour) -> OllamaStub:
        from django.conf import settings

        behaviour.setdefault("chat_models", (settings.RMASSIMO_CHAT_MODEL,))
        behaviour.setdefault("embed_models", (settings.RMASSIMO_EMBED_MODEL,))
        stub = OllamaStub(name=name, **behaviour).start()
        self.stubs.append(stub)
        return stub

    def worker(self, gpu: str, *, queues=None, stub: OllamaStub | None, **env) -> processes.Worker:
        index = gpu[3:] if gpu.startswith("gpu") else ""
        worker = processes.Worker(
            name=f"{gpu}@faults",
            queues=queues or ["interactive", "batch", f"gpu.{index}"],
            ollama_url=stub.url if stub else "http://127.0.0.1:9",
            gpu=gpu,
            log_dir=self.log_dir,
            extra_env={**self.env, **env},
        )
        self.workers.append(worker)
        return worker

    def ingest(self, folder: Path, corpus: str = "faults") -> None:
        result = subprocess.run(
            [
                sys.executable,
                "manage.py",
                "ingest",
                str(folder),
                "--corpus",
                corpus,
                "--timeout",
                "60",
            ],
            cwd=processes.ROOT,
            env=processes.worker_env(**self.env),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def ask(self, text: str, corpus: str = "faults") -> int:
        response = self.http.post("/api/v1/questions/", json={"text": text, "corpus": corpus})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def question(self, pk: int) -> dict:
        return self.http.get(f"/api/v1/questions/{pk}/").json()

    def gpu_workers(self) -> list[dict]:
        return self.http.get("/api/v1/workers/").json()

    def close(self) -> None:
        self.http.close()
        for worker in self.workers:
            worker.stop(timeout=10)
        for proc in self.procs:
            processes.stop(proc, timeout=10)
        for stub in self.stubs:
            stub.stop()


# The corpus every fault test indexes (a folder of it: `corpus_dir`).
DOCS = {
    "vesuvius.txt": "Vesuvius buried Pompeii and Herculaneum in 79 AD under ash and pumice.",
    "etna.txt": "Etna is the tallest active volcano in Europe, on the island of Sicily.",
}


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def fault_stack(milvus, var_dir, transactional_db, django_user_model, tmp_path):
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    redis = RedisServer(log_dir)
    user = django_user_model.objects.create_user(username="faulty", password="x", is_staff=True)
    grant(user)  # an operator: sees each card's health error
    stack = FaultStack(redis, log_dir, user)
    yield stack
    stack.close()
    redis.kill()
