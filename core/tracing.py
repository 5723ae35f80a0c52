"""OpenTelemetry traces, off by default.

On when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, or
RMASSIMO_TRACING=1: spans go out by OTLP over HTTP to that endpoint (the OpenTelemetry
SDK reads the usual OTEL_* variables: headers, service name, sampler). A question's trace
runs from the API request (Django's instrumentation) through the Celery message (the
Celery instrumentation puts the trace context in the message headers) to the worker's
task, its retrieval, the Milvus search and the model call.

Off, nothing of OpenTelemetry is imported and `span()` costs one test of a flag.
"""

from __future__ import annotations

import contextlib
import logging
import os

logger = logging.getLogger(__name__)

_enabled = False
_tracer = None


def wanted() -> bool:
    if os.environ.get("RMASSIMO_TRACING", "").strip().lower() in ("1", "true", "on", "yes"):
        return True
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def enabled() -> bool:
    return _enabled


def setup(*, service: str, processor=None) -> None:
    """Install the tracer provider and the Django and Celery instrumentations.

    `processor`: a span processor to use instead of the OTLP exporter (tests give an
    in-memory exporter's). Safe to call twice.
    """
    global _enabled, _tracer
    if _enabled:
        return
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    if processor is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        processor = BatchSpanProcessor(OTLPSpanExporter())
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME") or f"rmassimo-{service}"}
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    DjangoInstrumentor().instrument(tracer_provider=provider)
    CeleryInstrumentor().instrument(tracer_provider=provider)
    _tracer = trace.get_tracer("rmassimo", tracer_provider=provider)
    _enabled = True
    logger.info("tracing on: spans exported for %s", service)


def teardown() -> None:
    """Undo setup() (tests): no instrumentation, no spans."""
    global _enabled, _tracer
    if not _enabled:
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    DjangoInstrumentor().uninstrument()
    CeleryInstrumentor().uninstrument()
    _enabled, _tracer = False, None


@contextlib.contextmanager
def span(name: str, *, current: bool = True, **attributes):
    """A child span of the current one while tracing is on; nothing otherwise.

    `current=False`: the span is not made current (for a generator, whose caller runs
    between its steps); it still ends, with any error recorded, when the block does.
    """
    if not _enabled:
        yield None
        return
    if current:
        with _tracer.start_as_current_span(name, attributes=_clean(attributes)) as made:
            yield made
        return
    made = _tracer.start_span(name, attributes=_clean(attributes))
    try:
        yield made
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit):
            made.record_exception(exc)
            from opentelemetry.trace import Status, StatusCode

            made.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
        raise
    finally:
        made.end()


def _clean(attributes: dict) -> dict:
    return {k.replace("__", "."): v for k, v in attributes.items() if v is not None}


def _celery_process() -> bool:
    import sys

    return any("celery" in arg for arg in sys.argv[:2])


def setup_from_environment() -> None:
    """Called as Django starts: the web process traces from here; a Celery worker's pool
    processes start their own provider when they start (a provider's export thread does
    not survive the fork)."""
    if wanted() and not _celery_process():
        setup(service="web")


def _connect_worker_signal() -> None:
    from celery import signals

    @signals.worker_process_init.connect(weak=False)
    def _trace_pool_process(**kwargs) -> None:
        if wanted():
            setup(service="worker")


_connect_worker_signal()
