"""Traces: one question's spans from the API request through the Celery message to the
worker's retrieval and model call, caught by the OpenTelemetry SDK's in-memory exporter.

The worker here is a real Celery worker on the real broker, run on a thread of the test
process (celery.contrib.testing) so that one in-memory exporter sees both sides; the
trace context crosses in the message's headers as it does between processes.
"""

from __future__ import annotations

import pytest
from celery.contrib.testing.worker import start_worker
from django.conf import settings
from rest_framework.test import APIClient

from chat.models import Question
from core import tracing
from tests.corpus import build_corpus
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def spans(monkeypatch):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.setup(service="tests", processor=SimpleSpanProcessor(exporter))
    yield exporter
    tracing.teardown()


@pytest.fixture
def thread_worker(own_workers, stub, monkeypatch):
    from workers.celery import app

    monkeypatch.setenv("RMASSIMO_OLLAMA_URL", stub.url)
    monkeypatch.setenv("RMASSIMO_WORKER_NAME", "gpu0@traces")
    with start_worker(
        app,
        pool="solo",
        perform_ping_check=False,
        hostname="gpu0@traces",
        queues=["interactive", "batch", "gpu.0", "cpu"],
        shutdown_timeout=30,
    ) as worker:
        yield worker


def test_tracing_is_off_by_default():
    assert not tracing.wanted()
    assert not tracing.enabled()
    with tracing.span("nothing") as made:
        assert made is None


def test_a_question_is_one_trace_from_the_api_to_the_model(spans, thread_worker, make_user):
    build_corpus(slug="traced")
    spans.clear()
    client = APIClient()
    client.force_authenticate(make_user("tracer"))
    posted = client.post("/api/v1/questions/", {"text": "Vesuvius?", "corpus": "traced"})
    assert posted.status_code == 202
    question_id = posted.json()["id"]
    wait_for(
        lambda: Question.objects.get(pk=question_id).status == "done",
        timeout=60,
        what="the answer",
    )

    def finished():
        names = {s.name for s in spans.get_finished_spans()}
        return "run/chat.tasks.answer_question" in names and names

    wait_for(finished, timeout=10, what="the worker's span")
    by_name = {}
    for span in spans.get_finished_spans():
        by_name.setdefault(span.name, span)
    api = next(s for s in by_name.values() if s.name.startswith("POST") and "questions" in s.name)
    publish = by_name["apply_async/chat.tasks.answer_question"]
    run = by_name["run/chat.tasks.answer_question"]
    chat = next(s for n, s in by_name.items() if n.startswith("chat "))
    search = by_name["milvus search"]
    retrieval = by_name["retrieval"]
    trace_id = api.context.trace_id
    for span in (publish, run, chat, search, retrieval):
        assert span.context.trace_id == trace_id, span.name
    # The worker's span continues the publisher's: the context came in the message.
    assert publish.parent.span_id == api.context.span_id
    assert run.parent.span_id == publish.context.span_id
    assert run.parent.is_remote
    assert chat.attributes["gen_ai.request.model"] == chat.name.split(" ", 1)[1]
    assert chat.parent.span_id == run.context.span_id
    assert retrieval.parent.span_id == run.context.span_id
    assert search.parent.span_id == retrieval.context.span_id
    assert by_name[f"embeddings {settings.RMASSIMO_EMBED_MODEL}"].parent.span_id == (
        retrieval.context.span_id
    )
