"""A whole R.Massimo stack in temporary folders, for benchmarks: Milvus Lite server, Ollama
stand-ins, Celery workers and the ASGI server, each a real process (the stand-ins run in
this process, on threads). Call `setup()` before importing anything from Django.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
DEMO_SET = ROOT / "evaluation" / "sets" / "demo.jsonl"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.processes import free_port  # noqa: E402


class Stack:
    def __init__(self, *, name: str, redis_db: int = 9) -> None:
        self.var = Path(tempfile.mkdtemp(prefix=f"rmassimo-{name}-"))
        (self.var / "logs").mkdir()
        self.procs: list = []
        self.stubs: list = []
        os.environ.update(
            {
                "DJANGO_SETTINGS_MODULE": "tests.settings",
                "RMASSIMO_VAR_DIR": str(self.var),
                "REDIS_URL": os.environ.get(
                    "BENCH_REDIS_URL", f"redis://127.0.0.1:6379/{redis_db}"
                ),
                "MILVUS_URI": f"http://127.0.0.1:{free_port()}",
                "RMASSIMO_ASK_RATE": "100000/min",
                "RMASSIMO_LOG_LEVEL": "WARNING",
                # Production's coalescing interval, not the test suite's shorter one.
                "RMASSIMO_STREAM_FLUSH_MS": os.environ.get("RMASSIMO_STREAM_FLUSH_MS", "50"),
            }
        )
        self.database = fresh_database(f"rmassimo_bench_{name}")
        self.processes, self.milvus = start_services(self.var)

    def stub(self, **behaviour):
        from django.conf import settings

        from tests.ollama_stub import OllamaStub

        behaviour.setdefault("chat_models", (settings.RMASSIMO_CHAT_MODEL,))
        behaviour.setdefault("embed_models", (settings.RMASSIMO_EMBED_MODEL,))
        stub = OllamaStub(**behaviour).start()
        self.stubs.append(stub)
        return stub

    def worker(self, *, name: str, queues: list[str], ollama_url: str, gpu: str, **extra):
        worker = self.processes.Worker(
            name=name,
            queues=queues,
            ollama_url=ollama_url,
            gpu=gpu,
            log_dir=self.var / "logs",
            extra_env={"RMASSIMO_LOG_LEVEL": "WARNING", **extra},
        )
        self.procs.append(worker)
        return worker

    def cpu_worker(self, *also: str):
        """The CPU worker as run_workers starts it (parsing and chunking, no model), on the
        `cpu` queue and the queues in `also`."""
        return self.worker(
            name="cpu@bench", queues=["cpu", *also], ollama_url="", gpu="cpu",
            CUDA_VISIBLE_DEVICES="",
        )  # fmt: skip

    def web(self, processes: int = 1, **extra_env: str) -> str:
        """Start the web tier as deployed (`manage.py run_web`, `processes` daphne processes
        on one socket) on a free port; returns its base URL."""
        port = free_port()
        log = (self.var / "logs" / f"web-{port}.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "run_web",
                "--processes",
                str(processes),
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=self.processes.worker_env(**extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        # The socket listens before any daphne process has imported the app: wait for a
        # page, not for the port.
        self.processes.wait_for(
            lambda: _answers(f"http://127.0.0.1:{port}/accounts/login/"),
            timeout=600,
            interval=1,
            what="run_web to answer",
        )
        self.web_proc = proc
        return f"http://127.0.0.1:{port}"

    def stop_web(self) -> None:
        proc = getattr(self, "web_proc", None)
        if proc is not None:
            self.processes.stop(proc, timeout=30)
            self.procs.remove(proc)
            self.web_proc = None

    def close(self) -> None:
        for proc in reversed(self.procs):
            if hasattr(proc, "stop"):
                proc.stop()
            else:
                self.processes.stop(proc, timeout=15)
        for stub in self.stubs:
            stub.stop()
        self.milvus.terminate()
        self.milvus.wait(30)
        from django.db import connections

        connections.close_all()
        if self.database:
            drop_database(self.database)
        if os.environ.get("BENCH_KEEP") is None:
            shutil.rmtree(self.var, ignore_errors=True)


def indexed_corpus(slug: str, docs: dict[str, str], **fields):
    """Corpus `slug` holding `docs`, indexed through the workers as `manage.py ingest`
    indexes them (the CPU worker parses and chunks; a worker on `batch` embeds, unless
    `embed_model="none"`, and upserts into Milvus), so that questions search real passages.
    Needs workers on `cpu` and `batch`; stops the bench if a document was not indexed."""
    from ingestion.models import Chunk, IngestionJob
    from tests.corpus import build_corpus

    corpus = build_corpus(slug, docs, timeout=600, **fields)
    jobs = IngestionJob.objects.filter(document__corpus=corpus)
    if jobs.exclude(status="done").exists() or not jobs.exists():
        errors = sorted(set(jobs.exclude(status="done").values_list("error", flat=True)))
        raise SystemExit(f"corpus {slug}: documents not indexed: {errors[:3]}")
    passages = Chunk.objects.filter(document__corpus=corpus, indexed=True).count()
    print(f"corpus {slug}: {len(docs)} documents, {passages} passages indexed", flush=True)
    return corpus


def demo_documents() -> dict[str, str]:
    """The demo corpus (demo/*.md: the service described in English and Italian)."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(DEMO.glob("*.md"))}


def demo_questions() -> list[str]:
    """The questions of the demo evaluation set that the demo corpus answers."""
    items = [json.loads(line) for line in DEMO_SET.read_text().splitlines() if line.strip()]
    return [item["question"] for item in items if item.get("documents")]


def retrieval_evidence(question_ids: list[int], stubs: list, *, label: str = "") -> bool:
    """Print, and return, whether every question searched the corpus: its answer came with
    sources, and every chat request the stand-ins received carried retrieved passages."""
    from chat.models import Question

    sources = list(Question.objects.filter(pk__in=question_ids).values_list("status", "sources"))
    done = [s for status, s in sources if status == "done"]
    with_sources = sum(1 for s in done if s)
    chats = [c for stub in stubs for c in stub.calls if c["path"] == "/api/chat"]
    prompted = sum(
        1 for c in chats if '<passage n="1"' in str(c["body"]["messages"][-1]["content"])
    )
    ok = bool(done) and with_sources == len(done) and bool(chats) and prompted == len(chats)
    print(
        f"retrieval{f' ({label})' if label else ''}: {with_sources} of {len(done)} answers "
        f"came with sources from Milvus; "
        f"{prompted} of {len(chats)} chat requests to the stand-ins carried retrieved "
        f"passages  {'OK' if ok else 'FAILED'}",
        flush=True,
    )
    return ok


def model_time(stub, since: int) -> float:
    """The stand-in's own time, in seconds, for the one chat request among its calls after
    the first `since`: from the request's arrival to its answer written (its record)."""

    def recorded():
        chats = [c for c in stub.calls[since:] if c["path"] == "/api/chat"]
        return chats if chats and all("finished" in c for c in chats) else None

    chats = wait(recorded, timeout=30, what="the stand-in's record of the answer")
    if len(chats) != 1:
        raise SystemExit(f"expected one chat request to the stand-in, found {len(chats)}")
    return chats[0]["finished"] - chats[0]["time"]


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def fresh_database(name: str) -> str | None:
    """Point DATABASE_URL at an empty database: BENCH_DATABASE_URL when set, else a new
    PostgreSQL database `name` when one answers, else the settings' SQLite file.
    Returns the name of the database created here (to drop afterwards), or None."""
    url = os.environ.get("BENCH_DATABASE_URL")
    created = None
    if url is None:
        try:
            import psycopg

            with psycopg.connect(_ADMIN_DSN, autocommit=True, connect_timeout=2) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{name}"')
            url, created = f"postgres://postgres@127.0.0.1:5432/{name}", name
        except Exception:  # noqa: BLE001, S110 - no PostgreSQL: SQLite it is
            pass
    if url:
        os.environ["DATABASE_URL"] = url
    return created


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(_ADMIN_DSN, autocommit=True, connect_timeout=2) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_services(var: Path):
    """Django set up and migrated, the bench's Redis database emptied, a Milvus Lite server
    on MILVUS_URI. Returns (tests.processes, the Milvus process)."""
    import django

    django.setup()
    import redis
    from django.conf import settings
    from django.core.management import call_command

    from tests import processes

    call_command("migrate", verbosity=0)
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    milvus = processes.start_milvus(
        var / "milvus", settings.MILVUS_URI, var / "logs" / "milvus.log"
    )
    return processes, milvus


def token_for(username: str, *, staff: bool = False) -> str:
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    user, _ = get_user_model().objects.get_or_create(
        username=username, defaults={"is_staff": staff}
    )
    return Token.objects.get_or_create(user=user)[0].key


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
