"""Errors under /api/ are JSON, even from a server started with DJANGO_DEBUG=true, whose
HTML debug pages would list settings and URLs; malformed questions are 400, not 500."""

from __future__ import annotations

import httpx
import pytest
from django.test import Client
from django.urls import path
from rest_framework.authtoken.models import Token

from ingestion.models import Corpus
from tests.browser import Daphne

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def debug_server(django_db_setup, django_db_blocker, var_dir):
    with django_db_blocker.unblock():
        server = Daphne(log_dir=var_dir / "logs", extra_env={"DJANGO_DEBUG": "true"})
    yield server
    server.stop()


@pytest.fixture
def http(debug_server, make_user):
    Corpus.objects.create(slug="t", name="T")
    token = Token.objects.create(user=make_user("asker"))
    with httpx.Client(
        base_url=debug_server.url, headers={"Authorization": f"Token {token.key}"}, timeout=60
    ) as client:
        yield client


def assert_json_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json"), response.text[:500]
    body = response.json()
    assert "SECRET_KEY" not in response.text and "REDIS_URL" not in response.text
    return body


def test_an_oversized_body_is_413_json(http):
    big = b"x" * (30 * 1024 * 1024)
    as_json = http.post(
        "/api/v1/questions/",
        content=b'{"text": "' + big + b'", "corpus": "t"}',
        headers={"Content-Type": "application/json"},
    )
    assert "larger than" in assert_json_error(as_json, 413)["detail"]
    # What `curl -d` sends: a form body, which Django itself would refuse with an HTML page.
    as_form = http.post(
        "/api/v1/questions/",
        content=b"corpus=t&text=" + big,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_json_error(as_form, 413)


@pytest.mark.parametrize("text", [42, 4.2, ["a question"]])
def test_a_question_whose_text_is_not_a_string_is_400(http, text):
    response = http.post("/api/v1/questions/", json={"text": text, "corpus": "t"})
    assert "text" in assert_json_error(response, 400)


def test_a_body_nested_thousands_deep_is_400(http):
    depth = 100_000
    body = '{"text": "hi", "corpus": "t", "x": ' + "[" * depth + "]" * depth + "}"
    response = http.post(
        "/api/v1/questions/", content=body, headers={"Content-Type": "application/json"}
    )
    assert "nested" in assert_json_error(response, 400)["detail"]
    # Still answering afterwards.
    assert http.post("/api/v1/questions/", json={"text": "hi", "corpus": "t"}).status_code == 202


def test_an_unknown_api_url_is_404_json(http):
    response = http.get("/api/v1/no-such-thing/")
    assert assert_json_error(response, 404) == {"detail": "Not Found."}
    assert "URLconf" not in response.text


# An in-process case for the one error no request can cause on purpose: a view that fails.
def _broken_view(request):
    raise RuntimeError("secret internals")


urlpatterns = [path("api/v1/broken/", _broken_view)]


def test_an_internal_error_is_500_json_even_with_debug_on(settings):
    settings.DEBUG = True
    settings.ROOT_URLCONF = __name__
    response = Client(raise_request_exception=False).get("/api/v1/broken/")
    assert response.status_code == 500
    assert response["Content-Type"].startswith("application/json")
    assert "secret internals" not in response.content.decode()
    assert response.json()["detail"].startswith("An internal error")
