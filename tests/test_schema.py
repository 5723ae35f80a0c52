"""Schemathesis against /api/schema/: generated requests to every operation get no 5xx,
and every response matches the published schema."""

from __future__ import annotations

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

from rmassimo_site.wsgi import application
from tests.conftest import grant

schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", application)

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.fixture
def keep_db_connection():
    """The WSGI app closes the connection after each request; the test's transaction
    lives on it (django's own test client does the same)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def staff_token(django_user_model, keep_db_connection):
    from rest_framework.authtoken.models import Token

    from chat.services import conversation_create
    from ingestion.models import Corpus

    user = django_user_model.objects.create_user("fuzzer", password="x", is_staff=True)
    grant(user)  # the document and job operations answer, not only refuse
    corpus = Corpus.objects.create(slug="demo", name="Demo")
    conversation_create(owner=user, corpus=corpus, title="fuzz")
    return Token.objects.create(user=user).key


@pytest.mark.django_db
@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_matches_its_schema(case, staff_token):
    case.call_and_validate(headers={"Authorization": f"Token {staff_token}"}, checks=CHECKS)
