"""Helpers for the ingestion tests: documents made on the spot (PDF, DOCX, long text), a
local HTTP server for URL documents, waiting on jobs, and workers of a test's own."""

from __future__ import annotations

import io
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ingestion.models import IngestionJob
from tests import processes
from tests.processes import wait_for

SESSION_WORKER = "gpu0@tests"
ALL_QUEUES = ["interactive", "batch", "gpu.0", "cpu"]


def make_pdf(pages: list[str]) -> bytes:
    """A real PDF with one page per string (core fonts: Latin-1 text)."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_auto_page_break(auto=True, margin=15)
    for text in pages:
        pdf.add_page()
        pdf.set_font("helvetica", size=11)
        pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def make_docx(paragraphs: list[str], *, table: list[list[str]] | None = None) -> bytes:
    import docx

    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, value in enumerate(row):
                grid.cell(r, c).text = value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def long_text(topic: str, sentences: int) -> str:
    """Prose long enough for several chunks (about 25 sentences a chunk at 512 tokens)."""
    return " ".join(
        f"Sentence {i} of the {topic} notes describes {topic} detail number {i} at length."
        for i in range(sentences)
    )


def wait_jobs(ids, *, timeout: float = 60) -> list[IngestionJob]:
    ids = list(ids)

    def final():
        rows = IngestionJob.objects.in_bulk(ids)
        if len(rows) == len(ids) and all(r.is_final for r in rows.values()):
            return [rows[pk] for pk in ids]
        return None

    return wait_for(final, timeout=timeout, interval=0.1, what=f"jobs {ids} to finish")


def wait_job(job_id: int, *, timeout: float = 60) -> IngestionJob:
    return wait_jobs([job_id], timeout=timeout)[0]


# A local web server for documents added by URL


@dataclass
class Route:
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    status: int = 200
    delay: float = 0.0  # seconds before answering (a slow or hung server)
    delays: list[float] = field(default_factory=list)  # per request, then `delay`
    headers: dict[str, str] = field(default_factory=dict)  # e.g. Location, for a redirect


class LocalSite:
    """Serves fixed routes on 127.0.0.1; records each request's path.

    Its URL names it `localhost`, the host the tests allow URL ingestion to reach
    (RMASSIMO_FETCH_ALLOWED_HOSTS): 127.0.0.1 itself is refused like any internal address.
    """

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: list[str] = []
        self._release = threading.Event()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server API)
                site.hits.append(self.path)
                route = site.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                delay = route.delays.pop(0) if route.delays else route.delay
                if delay and site._release.wait(delay):
                    return
                try:
                    self.send_response(route.status)
                    self.send_header("Content-Type", route.content_type)
                    self.send_header("Content-Length", str(len(route.body)))
                    for name, value in route.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(route.body)
                except OSError:
                    pass  # the worker gave up or was killed meanwhile

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    def count(self, path: str) -> int:
        return sum(1 for hit in self.hits if hit == path)

    def __enter__(self) -> LocalSite:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


# Workers of a test's own (another environment), and killing a worker's pool process


def _control(action: str) -> None:
    from workers.celery import app

    for queue in ALL_QUEUES:
        getattr(app.control, action)(queue, destination=[SESSION_WORKER], reply=True, timeout=5)


@contextmanager
def private_worker(name: str, *, ollama_url: str, log_dir: Path, env: dict[str, str]):
    """A worker with its own environment, alone on the queues while it runs.

    The session worker (started first by the `worker` fixture) stops consuming meanwhile,
    so every task of the test goes to this one.
    """
    _control("cancel_consumer")
    proc = None
    try:
        proc = processes.Worker(
            name=name, queues=ALL_QUEUES, ollama_url=ollama_url, log_dir=log_dir, extra_env=env
        )
        yield proc
    finally:
        if proc is not None:
            proc.stop()
        _control("add_consumer")


def pool_children(worker: processes.Worker) -> list[int]:
    pid = worker.proc.pid
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def kill_pool_child(worker: processes.Worker) -> int:
    """SIGKILL the pool process running the task, as the OOM killer would."""
    children = wait_for(lambda: pool_children(worker), timeout=10, what="a pool process")
    os.kill(children[0], signal.SIGKILL)
    return children[0]


def wait_new_child(worker: processes.Worker, old: int, timeout: float = 20) -> int:
    def fresh():
        children = pool_children(worker)
        return children[0] if children and children[0] != old else None

    return wait_for(fresh, timeout=timeout, what="the pool to start a new process")


def consumed(*, sent: int = 0, before: int | None = None, timeout: float = 60) -> None:
    """Wait until the session worker has consumed every message sent so far, before a test
    asserts that a message changed nothing: no message waits in a queue it takes, none is
    delivered and not yet acknowledged (acks are late: a task is acknowledged after it ran;
    kombu keeps those in the `unacked` hash), and it runs nothing. With `sent`, also wait
    until its count of jobs done is `sent` past `before` (jobs_done(), read before sending):
    a message it has taken but not yet recorded as delivered is seen that way."""
    from workers import health

    if sent:
        wait_for(
            lambda: jobs_done() >= before + sent,
            timeout=timeout,
            what=f"the worker to run the {sent} message(s) sent",
        )

    def idle() -> bool:
        me = _session_worker()
        pipe = health.client().pipeline()  # one MULTI: a consistent view
        for queue in me["queues"]:
            pipe.llen(queue)
        pipe.hlen("unacked")
        *depths, unacked = pipe.execute()
        return not any(depths) and not unacked and _session_worker()["current_job"] is None

    wait_for(idle, timeout=timeout, interval=0.1, what="the worker to consume every message")


def jobs_done() -> int:
    """The session worker's count of tasks run (its heartbeat record)."""
    return _session_worker()["jobs_done"]


def _session_worker() -> dict:
    from workers import health

    return next(w for w in health.workers() if w["name"] == SESSION_WORKER)
