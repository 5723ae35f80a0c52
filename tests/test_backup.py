"""manage.py backup and restore: a backup restored into a fresh stack (its own database,
Milvus server, media folder and Redis) answers questions from the restored corpus."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from django.core.management import call_command
from django.db import connection

from chat.models import Conversation, Question
from core import vectorstore
from ingestion.models import Document
from tests import processes
from tests.corpus import DOCS, build_corpus

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


class FreshStack:
    """A database, Milvus Lite server, var/ folder and Redis that nothing has used yet."""

    def __init__(self, base: Path) -> None:
        self.var = base / "var"
        self.var.mkdir(parents=True)
        self.procs: list[subprocess.Popen] = []
        conf = connection.settings_dict
        if conf["ENGINE"].endswith("sqlite3"):
            self.db_name = None
            self.database_url = f"sqlite:///{self.var / 'restored.sqlite3'}"
        else:
            self.db_name = f"{conf['NAME']}_restored"
            self._admin(f'DROP DATABASE IF EXISTS "{self.db_name}"')
            self._admin(f'CREATE DATABASE "{self.db_name}"')
            self.database_url = processes.database_url().rsplit("/", 1)[0] + f"/{self.db_name}"
        redis_port = processes.free_port()
        self.procs.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        processes.wait_for(
            lambda: processes.port_open("127.0.0.1", redis_port), timeout=20, what="redis"
        )
        self.milvus_uri = f"http://127.0.0.1:{processes.free_port()}"
        self.procs.append(
            processes.start_milvus(self.var / "milvus", self.milvus_uri, base / "milvus.log")
        )
        self.env = {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "MILVUS_URI": self.milvus_uri,
            "RMASSIMO_VAR_DIR": str(self.var),
        }

    def _admin(self, sql: str) -> None:
        conf = connection.settings_dict
        with psycopg.connect(
            host=conf.get("HOST") or "127.0.0.1",
            port=conf.get("PORT") or 5432,
            user=conf.get("USER") or "postgres",
            password=conf.get("PASSWORD") or None,
            dbname="postgres",
            autocommit=True,
        ) as admin:
            admin.execute(sql)

    def manage(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=processes.worker_env(**self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def query(self, sql: str, *params):
        if self.db_name is None:
            with sqlite3.connect(self.database_url.removeprefix("sqlite:///")) as db:
                return db.execute(sql.replace("%s", "?"), params).fetchall()
        with psycopg.connect(self.database_url.replace("postgres://", "postgresql://", 1)) as db:
            return db.execute(sql, params).fetchall()

    def final_status(self, table: str, pk: int, finals: tuple[str, ...], what: str) -> str:
        """The row's status once it is one of `finals` (the table name is the test's own)."""
        sql = f"SELECT status FROM {table} WHERE id = %s"  # noqa: S608

        def settled():
            rows = self.query(sql, pk)
            return rows and rows[0][0] in finals

        processes.wait_for(settled, timeout=90, interval=0.5, what=what)
        return self.query(sql, pk)[0][0]

    def close(self) -> None:
        for proc in reversed(self.procs):
            processes.stop(proc)
        if self.db_name:
            self._admin(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')


@pytest.fixture
def fresh(tmp_path):
    stack = FreshStack(tmp_path / "fresh")
    yield stack
    stack.close()


def test_a_backup_restored_into_a_fresh_stack_answers_from_it(
    live, fresh, tmp_path, make_user, var_dir
):
    corpus = build_corpus("backed-up")
    owner = make_user("keeper")
    volcanoes = Document.objects.get(corpus=corpus, source="volcanoes.txt")
    chess = Document.objects.get(corpus=corpus, source="chess.txt")
    # A question accepted just before the backup, whose broker message is not in it.
    waiting = Question.objects.create(
        conversation=Conversation.objects.create(owner=owner, corpus=corpus),
        text="What buried Herculaneum?",
    )
    # A document whose vectors are gone (as when it is re-ingested while the backup
    # runs): the backup must not pass off its stale database rows as indexed.
    vectorstore.delete_document(corpus.pk, chess.pk)
    vectorstore.flush(corpus.pk)

    archive = tmp_path / "rmassimo.tar.gz"
    call_command("backup", str(archive))

    restored = fresh.manage("restore", str(archive))
    assert restored.returncode == 0, restored.stderr
    assert "queued again 1 question(s) and 1 document(s)" in restored.stdout
    # The restore refuses a stack that is not fresh, rather than mixing two moments.
    again = fresh.manage("restore", str(archive))
    assert again.returncode != 0 and "not empty" in again.stderr

    worker = processes.Worker(
        name="gpu0@restored",
        queues=["interactive", "batch", "gpu.0", "cpu"],
        ollama_url=live.url,
        log_dir=var_dir / "logs",
        extra_env=fresh.env,
    )
    try:
        asked = fresh.manage(
            "ask",
            "Which eruption buried Pompeii?",
            "--corpus",
            "backed-up",
            "--user",
            "keeper",
            "--timeout",
            "90",
        )
        assert asked.returncode == 0, asked.stderr + worker.output()[-2000:]
        sources = asked.stdout.split("Sources:", 1)[1]
        assert sources.splitlines()[1].startswith("  [1] volcanoes ")
        assert "Vesuvius" in sources

        status = fresh.final_status(
            "chat_question", waiting.pk, ("done", "failed"), what="the waiting question"
        )
        assert status == "done"
        status = fresh.final_status(
            "ingestion_document", chess.pk, ("indexed", "failed"), what="the stale document"
        )
        assert status == "indexed"
        asked = fresh.manage(
            "ask",
            "Which defence answers 1.e4 with c5?",
            "--corpus",
            "backed-up",
            "--user",
            "keeper",
            "--timeout",
            "90",
        )
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.split("Sources:", 1)[1].splitlines()[1].startswith("  [1] chess ")
        # The uploaded files came along: the stale document was parsed again from its file.
        assert (fresh.var / "media" / chess.file.name).read_text() == DOCS["chess.txt"]
        assert volcanoes.file.name
    finally:
        worker.stop()
