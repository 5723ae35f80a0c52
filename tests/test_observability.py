"""Metrics from the real processes: daphne and a Celery worker with two pool processes
(prefork) on the real broker, a real Prometheus scraping them through the repository's
scrape config and rules, and the admin's fleet page in Chromium.

The worker runs with the fake NVML of tests/fake_nvml first on its PYTHONPATH, so it
reports two cards' telemetry as a worker on a GPU host would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.authtoken.models import Token

from chat.models import Question
from ingestion.models import Document, IngestionJob
from tests import conftest
from tests.browser import ARTIFACTS, Daphne, chromium  # noqa: F401  (fixture)
from tests.corpus import build_corpus
from tests.processes import ROOT, Worker, free_port, stop, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "metrics-test-token"
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "rmassimo-fleet.json"
WORKER = "gpu0@observed"
QUEUES = ["interactive", "batch", "gpu.0", "cpu"]


def _session_worker(action: str) -> None:
    """Pause or resume the suite's worker, so this module's worker takes every task."""
    from workers.celery import app

    if not conftest._session_worker_started:  # noqa: SLF001
        return
    for queue in conftest.SESSION_QUEUES:
        getattr(app.control, action)(
            queue, destination=[conftest.SESSION_WORKER], reply=True, timeout=10
        )


class Observed:
    def __init__(self, worker: Worker, web: Daphne, metrics_port: int, stub) -> None:
        self.worker = worker
        self.web = web
        self.worker_metrics = f"127.0.0.1:{metrics_port}"
        self.stub = stub

    def scrape_worker(self) -> dict:
        return parse(httpx.get(f"http://{self.worker_metrics}/metrics", timeout=10).text)

    def scrape_web(self) -> dict:
        response = httpx.get(
            f"{self.web.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )
        assert response.status_code == 200, response.text
        return parse(response.text)


def parse(text: str) -> dict:
    """{(name, frozenset(labels)): value} for every sample."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.fixture(scope="module")
def observed(django_db_setup, django_db_blocker, milvus, ollama, var_dir):
    port = free_port()
    multiproc = Path(tempfile.mkdtemp(prefix="metrics-", dir=var_dir))
    _session_worker("cancel_consumer")
    worker = web = None
    try:
        with django_db_blocker.unblock():
            worker = Worker(
                name=WORKER,
                queues=QUEUES,
                ollama_url=ollama.url,
                concurrency=2,
                log_dir=var_dir / "logs",
                extra_env={
                    "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
                    "RMASSIMO_METRICS_PORT": str(port),
                    "PYTHONPATH": f"{ROOT / 'tests' / 'fake_nvml'}{os.pathsep}{ROOT}",
                    "CUDA_VISIBLE_DEVICES": "GPU-fake-0000",
                },
            )
            web = Daphne(
                log_dir=var_dir / "logs",
                extra_env={"RMASSIMO_METRICS_TOKEN": TOKEN, "OLLAMA_URLS": ollama.url},
            )
        wait_for(
            lambda: b"rmassimo_gpu_slots" in httpx.get(f"http://127.0.0.1:{port}/metrics").content,
            timeout=30,
            what="the worker's metrics",
        )
        yield Observed(worker, web, port, ollama)
    finally:
        if web is not None:
            web.stop()
        if worker is not None:
            worker.stop()
        _session_worker("add_consumer")
        shutil.rmtree(multiproc, ignore_errors=True)


@pytest.fixture
def asker(observed, stub, make_user):
    user = make_user("asker")
    key = Token.objects.create(user=user).key
    client = httpx.Client(
        base_url=observed.web.url, headers={"Authorization": f"Token {key}"}, timeout=30
    )
    client.key = key
    yield client
    client.close()


def ask_and_wait(client, corpus_slug: str, text: str) -> dict:
    posted = client.post("/api/v1/questions/", json={"text": text, "corpus": corpus_slug})
    assert posted.status_code == 202, posted.text
    qid = posted.json()["id"]

    def final():
        data = client.get(f"/api/v1/questions/{qid}/").json()
        return data if data["status"] in ("done", "failed", "cancelled") else None

    return wait_for(final, timeout=60, interval=0.1, what=f"question {qid}")


def test_worker_and_web_figures_equal_the_database(observed, asker, stub):
    corpus = build_corpus(slug="observed")
    worker_before, web_before = observed.scrape_worker(), observed.scrape_web()

    # Two questions fail (the model is missing: not retried), three are answered.
    stub.configure(fail_status=404, fail_message="model not found", fail_count=2)
    failed = [ask_and_wait(asker, "observed", f"Failing question {i}?") for i in range(2)]
    stub.configure(fail_count=0)
    done = [ask_and_wait(asker, "observed", f"What about Vesuvius, take {i}?") for i in range(3)]
    assert [q["status"] for q in failed] == ["failed", "failed"]
    assert [q["status"] for q in done] == ["done", "done", "done"]

    after = observed.scrape_worker()

    def delta(name, **labels):
        return value(after, name, **labels) - value(worker_before, name, **labels)

    rows = Question.objects.filter(conversation__corpus=corpus)
    n_done = rows.filter(status="done").count()
    n_failed = rows.filter(status="failed").count()
    assert (n_done, n_failed) == (3, 2)
    labels = {"corpus": "observed", "gpu": "gpu0"}
    assert delta("rmassimo_questions_total", outcome="done", **labels) == n_done
    assert delta("rmassimo_questions_total", outcome="failed", **labels) == n_failed
    assert delta("rmassimo_question_first_token_seconds_count", gpu="gpu0") == n_done
    first_token = sum(
        (q.first_token_at - q.created_at).total_seconds() for q in rows.filter(status="done")
    )
    assert delta("rmassimo_question_first_token_seconds_sum") == pytest.approx(
        first_token, abs=1e-3
    )
    retrieval = sum(q.retrieval_ms for q in rows.filter(status="done")) / 1000
    assert delta("rmassimo_question_retrieval_seconds_sum") == pytest.approx(retrieval, abs=1e-3)
    assert delta("rmassimo_question_duration_seconds_count", outcome="failed") == n_failed
    tokens_out = sum(q.completion_tokens for q in rows.filter(status="done"))
    tokens_in = sum(q.prompt_tokens for q in rows.filter(status="done"))
    assert (
        delta("gen_ai_client_token_usage_sum", gen_ai_token_type="output", gpu="gpu0") == tokens_out
    )
    assert (
        delta("gen_ai_client_token_usage_sum", gen_ai_token_type="input", gpu="gpu0") == tokens_in
    )
    assert delta("gen_ai_server_time_to_first_token_seconds_count", gpu="gpu0") == n_done
    assert delta("rmassimo_ollama_errors_total", server=stub.url.rstrip("/"), status="404") == 2
    assert (
        delta("rmassimo_celery_tasks_total", task="chat.tasks.answer_question", state="succeeded")
        == n_done + n_failed
    )
    assert delta("rmassimo_milvus_request_duration_seconds_count", operation="search") >= n_done
    assert 0 < delta("rmassimo_gpu_busy_seconds_total", gpu="gpu0")

    # Ingestion, counted by the workers since they started.
    documents = Document.objects.filter(corpus=corpus, status=Document.Status.INDEXED)
    assert (
        value(after, "rmassimo_ingestion_documents_total", corpus="observed") == documents.count()
    )
    assert value(after, "rmassimo_ingestion_chunks_total", corpus="observed") == sum(
        d.chunk_count for d in documents
    )
    assert (
        value(after, "rmassimo_ingestion_jobs_total", corpus="observed", outcome="done")
        == IngestionJob.objects.filter(document__corpus=corpus, status="done").count()
    )

    # The card's telemetry (fake NVML) and its slots.
    assert value(after, "rmassimo_gpu_utilization_ratio", gpu="gpu0", card="0") == 0.75
    assert value(after, "rmassimo_gpu_slots", gpu="gpu0") == 2

    # The web process: the API requests it served, the fleet it sees.
    web_after = observed.scrape_web()
    posts = value(
        web_after,
        "django_http_requests_total_by_view_transport_method_total",
        view="question-list",
        method="POST",
    )
    posts -= value(
        web_before,
        "django_http_requests_total_by_view_transport_method_total",
        view="question-list",
        method="POST",
    )
    assert posts == 5
    assert value(web_after, "rmassimo_worker_up", worker=WORKER, gpu="gpu0") == 1
    assert value(web_after, "rmassimo_gpu_workers_ready") >= 1
    assert ("rmassimo_queue_depth", frozenset({("queue", "interactive")})) in web_after


def test_a_killed_pool_process_loses_none_of_its_figures(observed, asker, stub):
    from tests.ingestion_helpers import kill_pool_child, wait_new_child

    build_corpus(slug="observed")
    for i in range(2):
        ask_and_wait(asker, "observed", f"Before the kill {i}?")
    before = value(
        observed.scrape_worker(),
        "rmassimo_celery_tasks_total",
        task="chat.tasks.answer_question",
        state="succeeded",
    )
    killed = kill_pool_child(observed.worker)
    wait_new_child(observed.worker, killed)
    after = value(
        observed.scrape_worker(),
        "rmassimo_celery_tasks_total",
        task="chat.tasks.answer_question",
        state="succeeded",
    )
    assert after == before


def test_websocket_connections_are_counted(observed, asker):
    import websockets

    corpus = build_corpus(slug="observed")
    conversation = asker.post("/api/v1/conversations/", json={"corpus": corpus.slug}).json()["id"]
    url = f"{observed.web.ws_url}/ws/conversations/{conversation}/?token={asker.key}"

    def open_now():
        return value(observed.scrape_web(), "rmassimo_websocket_connections")

    base = open_now()

    async def hold():
        async with websockets.connect(url):
            wait_for(lambda: open_now() == base + 1, timeout=10, what="the gauge to count it")
        wait_for(lambda: open_now() == base, timeout=10, what="the gauge to drop it")

    asyncio.run(hold())


# --- a real Prometheus through the repository's scrape config and rules ----------------------


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (label names and matchers left out)."""
    bare = re.sub(r"\{[^}]*\}", "", expr)
    bare = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", bare)
    return set(re.findall(r"\b((?:rmassimo|gen_ai|django)_[a-z0-9_]+)\b", bare))


@pytest.fixture
def prometheus(observed, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "prometheus is not installed (Debian package prometheus; scripts/test.sh installs it)"
        )
    config = yaml.safe_load((MONITORING / "prometheus" / "prometheus.yml").read_text())
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    config["rule_files"] = [str(MONITORING / "prometheus" / name) for name in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # Same jobs, paths and credentials as deployed; only the addresses are this test's.
    jobs["rmassimo-web"]["static_configs"] = [{"targets": [observed.web.url.split("//")[1]]}]
    jobs["rmassimo-web"]["authorization"]["credentials_file"] = str(token_file)
    jobs["rmassimo-workers"]["static_configs"] = [{"targets": [observed.worker_metrics]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            raise RuntimeError((tmp_path / "prometheus.log").read_text()[-2000:])
        try:
            return httpx.get(f"{base}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout=60, interval=0.2, what="Prometheus to start")
        yield base
    finally:
        stop(proc)


def test_prometheus_scrapes_everything_the_dashboard_and_the_alerts_ask(
    observed, asker, stub, prometheus
):
    build_corpus(slug="observed")

    def api(path, **params):
        data = httpx.get(f"{prometheus}/api/v1/{path}", params=params, timeout=10).json()
        assert data["status"] == "success", data
        return data["data"]

    def targets_up():
        active = api("targets")["activeTargets"]
        return len(active) == 2 and all(t["health"] == "up" for t in active) and active

    wait_for(targets_up, timeout=60, interval=0.5, what="both targets scraped")
    # While Prometheus watches: an Ollama error (the alert needs to see the counter rise).
    stub.configure(fail_status=503, fail_message="busy", fail_count=1)
    ask_and_wait(asker, "observed", "A question that meets a busy server?")
    ask_and_wait(asker, "observed", "Tell me about Vesuvius?")
    # A rate needs two samples in its window, and the rules an evaluation.
    time.sleep(3)

    # What the processes export: every series Prometheus took in, and every family the web
    # process declares (a labelled family not yet observed has no series, only its TYPE).
    names = set(api("label/__name__/values"))
    web = httpx.get(
        f"{observed.web.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    ).text
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", web, re.MULTILINE):
        names.add(family)
        if kind == "histogram":
            names.update(f"{family}_{suffix}" for suffix in ("bucket", "sum", "count"))
    empty = []
    for expr in dashboard_queries():
        for name in metric_names(expr):
            assert name in names, f"the dashboard names {name}, which no process exports"
        result = api("query", query=expr.replace("$__rate_interval", "1m"))["result"]
        if not result:
            empty.append(expr)
    # What this run cannot produce: no model was loaded, Milvus and ingestion did not fail.
    allowed_empty = (
        "rmassimo_model_load_seconds",
        "milvus_errors",
        'outcome="failed"',
        'state="failed"',
    )
    assert [e for e in empty if not any(a in e for a in allowed_empty)] == []

    def evaluated():
        rules = [r for g in api("rules")["groups"] for r in g["rules"]]
        return len(rules) == 7 and all(r["lastEvaluation"][:4] != "0001" for r in rules) and rules

    rules = wait_for(evaluated, timeout=30, interval=0.5, what="every rule evaluated")
    assert {r["name"]: r["health"] for r in rules} == {r["name"]: "ok" for r in rules}
    states = {r["name"]: r["state"] for r in rules}
    assert states["NoGpuWorkerReady"] == "inactive"
    assert states["MetricsTargetDown"] == "inactive"

    # The error series started at 0, so the first error is an increase the rules can see.
    seen = api("query", query='sum(increase(rmassimo_ollama_errors_total{status="503"}[5m])) > 0.5')
    assert seen["result"], "the first Ollama error is invisible to increase()"


# --- the admin's fleet page -----------------------------------------------------------------


def test_fleet_page_draws_the_last_hour(observed, asker, stub, chromium, django_user_model):  # noqa: F811
    build_corpus(slug="observed")
    for i in range(2):
        ask_and_wait(asker, "observed", f"Fleet page question {i} about chess?")
    django_user_model.objects.create_user("fleetboss", password="pw-fleetboss", is_staff=True)
    django_user_model.objects.create_user("fleetuser", password="pw-fleetuser")

    context = chromium.new_context(
        base_url=observed.web.url, viewport={"width": 1280, "height": 1800}
    )
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)

        def login(username):
            page.goto("/admin/login/?next=/admin/workers/fleet/")
            page.fill("#id_username", username)
            page.fill("#id_password", f"pw-{username}")
            page.click("input[type=submit]")

        login("fleetuser")
        assert "/admin/login/" in page.url  # not staff: not in
        login("fleetboss")
        page.wait_for_url("**/admin/workers/fleet/")

        def drawn() -> int:
            # Read from Python: the page's CSP forbids the eval that wait_for_function uses.
            return page.evaluate("Number(document.getElementById('fleet').dataset.drawn || 0)")

        wait_for(lambda: drawn() >= 1, timeout=20, what="the fleet page to draw")
        assert page.locator("#fleet canvas").count() >= 4
        assert WORKER in page.locator("#fleet-workers").inner_text()
        # It refreshes itself.
        wait_for(lambda: drawn() >= 2, timeout=30, what="the fleet page to refresh")
        page.screenshot(path=str(ARTIFACTS / "admin-fleet.png"), full_page=True)
        data = page.evaluate("fetch('/admin/workers/fleet/data/').then(r => r.json())")
        assert sum(data["busy"]["series"]["gpu0"]) > 0
        assert any(v is not None for v in data["first_token"]["p50"])
        assert data["queues"]["x"], "no queue depth sample"
    finally:
        context.close()


# --- run_web: several daphne processes answer /metrics for all of them --------------------


def test_any_web_process_answers_for_all_of_them(django_db_setup, var_dir, tmp_path):
    import sys

    from tests.processes import port_open, worker_env

    port = free_port()
    log = (var_dir / "logs" / f"run_web-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "run_web", "--port", str(port), "--processes", "2"],
        cwd=ROOT,
        env=worker_env(RMASSIMO_METRICS_TOKEN=TOKEN, RMASSIMO_VAR_DIR=str(tmp_path)),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: port_open("127.0.0.1", port), timeout=60, what="run_web")

        def pids() -> set[str]:
            files = (tmp_path / "metrics" / "web").glob("*.db")
            return {f.stem.rsplit("_", 1)[-1] for f in files}

        wait_for(lambda: len(pids()) >= 2, timeout=60, what="both processes to record")
        for _ in range(20):  # a new connection each: the kernel spreads them over both
            assert httpx.get(f"{base}/accounts/login/", timeout=10).status_code == 200
        counts = set()
        for _ in range(6):
            text = httpx.get(
                f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
            ).text
            counts.add(
                value(
                    parse(text),
                    "django_http_requests_total_by_view_transport_method_total",
                    view="login",
                    method="GET",
                )
            )
        assert counts == {20.0}
    finally:
        stop(proc)
