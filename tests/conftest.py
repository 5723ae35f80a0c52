"""Shared fixtures: real Redis, a real Milvus Lite server, real Celery workers, and the
Ollama stand-in (the one fake: no model weights can be fetched here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
from django.conf import settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests import processes
from tests.ollama_stub import DEFAULTS as STUB_DEFAULTS
from tests.ollama_stub import OllamaStub

STUB_MODELS = {
    "chat_models": (settings.RMASSIMO_CHAT_MODEL,),
    "embed_models": (settings.RMASSIMO_EMBED_MODEL,),
}


@pytest.fixture(scope="session")
def var_dir() -> Path:
    path = Path(os.environ["RMASSIMO_VAR_DIR"])
    (path / "logs").mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def clean_redis():
    """Nothing left in the test broker from an earlier run."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        client.flushdb()
    except redis.ConnectionError as exc:
        pytest.exit(f"Redis is not reachable at {settings.REDIS_URL}: {exc}", returncode=2)
    yield


@pytest.fixture(scope="session")
def milvus(var_dir):
    proc = processes.start_milvus(
        var_dir / "milvus", settings.MILVUS_URI, var_dir / "logs" / "milvus.log"
    )
    yield settings.MILVUS_URI
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="session")
def ollama():
    stub = OllamaStub(name="gpu0", **STUB_MODELS).start()
    yield stub
    stub.stop()


@pytest.fixture
def stub(ollama):
    """The session's stand-in, reset to its defaults for each test."""
    ollama.configure(**{**STUB_DEFAULTS, **STUB_MODELS, "name": "gpu0"})
    ollama.reset_calls()
    yield ollama
    ollama.configure(**{**STUB_DEFAULTS, **STUB_MODELS, "name": "gpu0"})


SESSION_WORKER = "gpu0@tests"
SESSION_QUEUES = ["interactive", "batch", "gpu.0", "cpu"]
_session_worker_started = False


@pytest.fixture(scope="session")
def worker(django_db_setup, django_db_blocker, milvus, ollama, var_dir):
    """One worker taking every queue, bound to the session's stand-in as gpu0."""
    global _session_worker_started
    with django_db_blocker.unblock():
        proc = processes.Worker(
            name=SESSION_WORKER,
            queues=SESSION_QUEUES,
            ollama_url=ollama.url,
            log_dir=var_dir / "logs",
        )
    _session_worker_started = True
    yield proc
    proc.stop()


@pytest.fixture
def own_workers(django_db_setup, milvus, transactional_db):
    """For a test that starts its own workers: the session worker stops consuming meanwhile."""
    from workers.celery import app

    if _session_worker_started:
        for queue in SESSION_QUEUES:
            replies = app.control.cancel_consumer(
                queue, destination=[SESSION_WORKER], reply=True, timeout=10
            )
            assert replies, f"the session worker did not stop consuming {queue}"
    yield
    if _session_worker_started:
        for queue in SESSION_QUEUES:
            app.control.add_consumer(queue, destination=[SESSION_WORKER], reply=True)


@pytest.fixture
def live(worker, stub, transactional_db):
    """A test that goes through the real worker: committed rows, a clean stand-in."""
    return stub


def _client_for(user) -> APIClient:
    client = APIClient()
    if user is not None:
        token, _ = Token.objects.get_or_create(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


# What the people who run the corpus are granted: the admin and the API ask for these.
OPERATOR_PERMISSIONS = (
    "ingestion.view_document",
    "ingestion.add_document",
    "ingestion.change_document",
    "ingestion.delete_document",
    "ingestion.view_ingestionjob",
    "ingestion.change_ingestionjob",
    "workers.view_worker",
)


def grant(user, permissions=OPERATOR_PERMISSIONS) -> None:
    from django.contrib.auth.models import Permission

    for name in permissions:
        app_label, codename = name.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )


@pytest.fixture
def make_user(django_user_model):
    def make(username: str, *, staff: bool = False, permissions=()):
        user = django_user_model.objects.create_user(
            username=username, password="pw-" + username, is_staff=staff
        )
        grant(user, permissions)
        return user

    return make


@pytest.fixture
def api(make_user):
    """API clients: .owner, .other, .staff (token auth, with the operators' permissions)
    and .anon."""

    class Clients:
        pass

    clients = Clients()
    clients.owner_user = make_user("owner")
    clients.other_user = make_user("other")
    clients.staff_user = make_user("staff", staff=True, permissions=OPERATOR_PERMISSIONS)
    clients.owner = _client_for(clients.owner_user)
    clients.other = _client_for(clients.other_user)
    clients.staff = _client_for(clients.staff_user)
    clients.anon = _client_for(None)
    return clients
