"""Faults of the web server and the database: daphne restarted under a client that follows an
answer, and PostgreSQL restarted under running workers. Both run the real processes of the
fault stack; the database fault runs them on a private PostgreSQL, which the test stops and
starts again (the suite's own database is never touched)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from glob import glob
from pathlib import Path

import pytest
import websockets
from rest_framework.authtoken.models import Token
from websockets.asyncio.client import connect as ws_connect

from tests import processes
from tests.faults.conftest import FaultStack, RedisServer
from tests.faults.test_faults import FINAL, echoed_tokens, final
from tests.processes import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


# --- daphne restarted mid-answer -----------------------------------------------------------


class ChatClient:
    """What the browser's chat (chat/static/chat/chat.js) keeps of one answer: its parts by
    sequence number, so a delta replayed after a reconnect changes nothing. Checks on the way
    that no sequence number ever comes with two different texts."""

    def __init__(self, question: int) -> None:
        self.question = question
        self.parts: dict[int, str] = {}
        self.done: dict | None = None

    def on_event(self, event: dict) -> None:
        if event.get("question") != self.question:
            return
        if event["type"] == "delta":
            seq = event["seq"]
            assert self.parts.get(seq, event["text"]) == event["text"], f"seq {seq} changed"
            self.parts[seq] = event["text"]
        elif event["type"] in FINAL:
            self.done = event

    @property
    def last_seq(self) -> int:
        return max(self.parts, default=-1)

    def text(self) -> str:
        seqs = sorted(self.parts)
        assert seqs == list(range(len(seqs))), f"a gap in the deltas: {seqs}"
        return "".join(self.parts[s] for s in seqs)


def start_daphne(stack: FaultStack, port: int) -> subprocess.Popen:
    """The stack's ASGI server again, on the port the clients know."""
    proc = subprocess.Popen(
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
        cwd=processes.ROOT,
        env=processes.worker_env(**stack.env),
        stdout=(stack.log_dir / "web-restarted.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stack.procs.append(proc)  # stopped with the stack
    wait_for(
        lambda: processes.port_open("127.0.0.1", port) or proc.poll() is not None,
        timeout=90,
        what="daphne to listen again",
    )
    assert proc.poll() is None, "daphne exited on restart"
    return proc


def test_daphne_restarted_mid_answer_the_client_resumes_without_gap_or_duplicate(
    fault_stack, corpus_dir
):
    # Long enough that the answer still streams once the server is back.
    stub = fault_stack.stub("gpu0", tps=15, reply_tokens=300)
    fault_stack.worker("gpu0", stub=stub)
    fault_stack.ingest(corpus_dir)
    conversation = fault_stack.http.post("/api/v1/conversations/", json={"corpus": "faults"})
    assert conversation.status_code == 201, conversation.text
    port = int(fault_stack.base.rsplit(":", 1)[1])
    url = f"ws://127.0.0.1:{port}/ws/conversations/{conversation.json()['id']}/"
    headers = {"Authorization": fault_stack.http.headers["Authorization"]}
    web = fault_stack.procs[0]

    async def scenario():
        async with ws_connect(url, additional_headers=headers, proxy=None) as first:
            pk = await asyncio.to_thread(
                lambda: fault_stack.http.post(
                    "/api/v1/questions/",
                    json={
                        "text": "What did Vesuvius bury?",
                        "conversation": conversation.json()["id"],
                    },
                ).json()["id"]
            )
            client = ChatClient(pk)
            while client.last_seq < 5:
                client.on_event(json.loads(await asyncio.wait_for(first.recv(), 30)))
            os.killpg(web.pid, signal.SIGKILL)  # the web server crashes mid-answer
            with pytest.raises(websockets.ConnectionClosed):
                while True:  # what was already on the wire, then the broken connection
                    client.on_event(json.loads(await asyncio.wait_for(first.recv(), 30)))
        seen_before = client.last_seq
        await asyncio.to_thread(web.wait)
        await asyncio.to_thread(start_daphne, fault_stack, port)
        after: list[dict] = []
        async with ws_connect(url, additional_headers=headers, proxy=None) as second:
            while client.done is None:
                event = json.loads(await asyncio.wait_for(second.recv(), 60))
                after.append(event)
                client.on_event(event)
        return client, seen_before, after

    client, seen_before, after = asyncio.run(scenario())
    mine = [e for e in after if e.get("question") == client.question]
    assert mine[0]["type"] == "started", "the answer ended before the server was back"
    assert client.done["type"] == "done", client.done
    # The new server replays the text so far and then follows live, each sequence once.
    seqs = [e["seq"] for e in mine if e["type"] == "delta"]
    assert seqs == list(range(len(seqs)))
    assert seqs[-1] > seen_before  # it did go on live after the crash
    result = fault_stack.question(client.question)
    assert result["status"] == "done", result["error"]
    assert client.text() == client.done["answer"] == result["answer"]
    assert echoed_tokens(result["answer"]) == 300
    assert result["attempts"] == 1


# --- PostgreSQL restarted under running workers ---------------------------------------------


def _pg_bin(name: str) -> str:
    found = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"PostgreSQL's {name} is not installed")
    return path


class PrivatePostgres:
    """A PostgreSQL server of this test's own (initdb in a temporary folder, a free port), so
    it can be stopped and started while the suite's database goes on."""

    def __init__(self, log_dir: Path) -> None:
        self.port = processes.free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="rmassimo-pg-"))
        self.data = self.dir / "data"
        self.log_dir = log_dir
        # In its own folder: the server's user cannot write under the tests' root-owned ones.
        self.log = self.dir / "postgres.log"
        # PostgreSQL refuses to run as root: its files and processes belong to `postgres`.
        self._as_owner = [] if os.geteuid() else ["runuser", "-u", "postgres", "--"]
        if self._as_owner:
            shutil.chown(self.dir, "postgres")
        self._run(
            _pg_bin("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/rmassimo"
        self.start()
        self._run(
            _pg_bin("createdb"), "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", "rmassimo"
        )

    def _run(self, *argv) -> None:
        result = subprocess.run(
            [*self._as_owner, *map(str, argv)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def _ctl(self, *argv) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", self.data, "-l", self.log, "-w", "-t", "60", *argv)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
        self._ctl("-o", options, "start")

    def stop(self) -> None:
        """Immediate mode: every server process quits at once, as in a crash."""
        self._ctl("-m", "immediate", "stop")

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        if self.log.exists():
            shutil.copy(self.log, self.log_dir / f"postgres-{self.port}.log")
        shutil.rmtree(self.dir, ignore_errors=True)


def _manage(database_url: str, *argv: str) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", *argv],
        cwd=processes.ROOT,
        env=processes.worker_env(DATABASE_URL=database_url),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def pg_stack(milvus, var_dir, transactional_db, django_user_model, tmp_path, monkeypatch):
    """The fault stack (web, beat, CPU worker, GPU workers) on a private PostgreSQL. The test
    process reads nothing from that database: it goes through the HTTP API like a client."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    postgres = PrivatePostgres(log_dir)
    _manage(postgres.url, "migrate", "--no-input", "-v", "0")
    # Every process of the stack, and `manage.py ingest`, get the private database.
    monkeypatch.setattr(processes, "database_url", lambda: postgres.url)
    user = django_user_model.objects.create_user(username="faulty", password="x")
    token = Token.objects.create(user=user)
    _manage(
        postgres.url,
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model; "
        "from rest_framework.authtoken.models import Token; "
        f"u = get_user_model().objects.create_user(username='faulty', password='x'); "
        f"Token.objects.create(user=u, key='{token.key}')",
    )
    redis = RedisServer(log_dir)
    stack = FaultStack(redis, log_dir, user)
    stack.postgres = postgres
    yield stack
    stack.close()
    redis.kill()
    postgres.close()


def database_away_in(worker) -> bool:
    """The worker has tried the database since it went away (its pool says so)."""
    return "error connecting in" in worker.output()


def test_postgres_restarted_under_running_workers_loses_and_repeats_nothing(pg_stack, corpus_dir):
    lease_s = float(pg_stack.env["RMASSIMO_LEASE_S"])
    stubs = [pg_stack.stub(f"gpu{i}", tps=10, reply_tokens=40) for i in (0, 1)]
    gpus = [pg_stack.worker(f"gpu{i}", stub=stub) for i, stub in enumerate(stubs)]
    pg_stack.ingest(corpus_dir)
    before = [pg_stack.ask(f"Vesuvius question {i}") for i in range(4)]
    wait_for(
        lambda: sum(bool(pg_stack.question(pk)["answer"]) for pk in before) == 2,
        timeout=60,
        what="both cards to be streaming an answer",
    )
    stopped_at = time.monotonic()
    pg_stack.postgres.stop()
    with ThreadPoolExecutor(1) as pool:
        # Asked while the database is away: the web waits for it rather than fail.
        during = pool.submit(pg_stack.ask, "Etna question asked while the database is away")
        wait_for(
            lambda: all(database_away_in(w) for w in gpus),
            timeout=60,
            what="both cards to notice the database is away",
        )
        # The outage itself: a few seconds, longer than the answers' lease.
        time.sleep(max(0.0, stopped_at + 3 * lease_s - time.monotonic()))
        pg_stack.postgres.start()
        asked = [*before, during.result(timeout=120)]
    results = [final(pg_stack, pk, timeout=120) for pk in asked]
    assert [r["status"] for r in results] == ["done"] * 5, [r["error"] for r in results]
    after = final(pg_stack, pg_stack.ask("Etna question asked after the restart"), timeout=60)
    assert after["status"] == "done", after["error"]
    results.append(after)
    # Each answered once: one whole answer, generated once, by its first attempt.
    assert all(echoed_tokens(r["answer"]) == 40 for r in results)
    assert all(r["answer"].count("Echo:") == 1 for r in results)
    texts = [r["text"] for r in results]
    chats = [str(c["body"]) for s in stubs for c in s.calls if c["path"] == "/api/chat"]
    assert {t: sum(t in body for body in chats) for t in texts} == {t: 1 for t in texts}
    assert [r["attempts"] for r in results] == [1] * 6
    # Nothing was restarted to get there.
    assert all(w.proc.poll() is None for w in pg_stack.workers)
    assert all(proc.poll() is None for proc in pg_stack.procs)
