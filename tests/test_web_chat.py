"""The web chat pages through Django's test client: who sees what, and escaping."""

from __future__ import annotations

import json
import re

import pytest
from django.test import Client

from chat import services
from chat.models import Question
from core import realtime
from ingestion import services as ingestion_services

pytestmark = pytest.mark.django_db

XSS_TEXT = '<script>window.__xss=1</script> <img src=x onerror="window.__xss=1">'


def banner_context(request):
    return {"rmassimo_backend": {"llm": "stub", "retrieval": "bm25", "banner": "<b>Demo</b> mode"}}


@pytest.fixture
def corpus():
    corpus, _ = ingestion_services.corpus_get_or_create(slug="demo")
    corpus.name = "Demo writings"
    corpus.save()
    return corpus


@pytest.fixture
def people(make_user):
    class People:
        pass

    people = People()
    people.owner_user = make_user("owner")
    people.other_user = make_user("other")
    people.staff_user = make_user("staff", staff=True)
    for name in ("owner", "other", "staff"):
        client = Client()
        client.force_login(getattr(people, f"{name}_user"))
        setattr(people, name, client)
    people.anon = Client()
    return people


def test_pages_need_login(people, corpus):
    mine = services.conversation_create(owner=people.owner_user, corpus=corpus, title="mine")
    for path in ("/", f"/c/{mine.pk}/"):
        response = people.anon.get(path)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/?next=")
    login = people.anon.get("/accounts/login/?next=/")
    assert login.status_code == 200
    assert b'name="username"' in login.content and b'name="password"' in login.content


def test_login_and_logout_through_the_forms(make_user):
    make_user("reader")
    client = Client()
    response = client.post(
        "/accounts/login/", {"username": "reader", "password": "pw-reader", "next": "/"}
    )
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").status_code == 200
    wrong = Client().post("/accounts/login/", {"username": "reader", "password": "nope"})
    assert wrong.status_code == 200 and b"form-error" in wrong.content
    assert client.post("/accounts/logout/").status_code == 302
    assert client.get("/").status_code == 302


def test_home_lists_only_my_conversations_and_the_corpora(people, corpus):
    services.conversation_create(owner=people.owner_user, corpus=corpus, title="Owner topic")
    services.conversation_create(owner=people.other_user, corpus=corpus, title="Other topic")
    page = people.owner.get("/").content.decode()
    assert "Owner topic" in page
    assert "Other topic" not in page
    assert '<option value="demo">Demo writings' in page
    strings = json.loads(
        re.search(r'<script id="rm-strings" type="application/json">(.*?)</script>', page).group(1)
    )
    assert strings["cancelled"] == "Stopped"


def test_conversation_of_another_user_is_404(people, corpus):
    mine = services.conversation_create(owner=people.owner_user, corpus=corpus, title="mine")
    assert people.owner.get(f"/c/{mine.pk}/").status_code == 200
    assert people.other.get(f"/c/{mine.pk}/").status_code == 404
    assert people.staff.get(f"/c/{mine.pk}/").status_code == 404
    assert people.owner.get(f"/c/{mine.pk + 1000}/").status_code == 404


def test_model_and_document_text_is_escaped(people, corpus):
    conversation = services.conversation_create(
        owner=people.owner_user, corpus=corpus, title=XSS_TEXT
    )
    Question.objects.create(
        conversation=conversation,
        text=XSS_TEXT,
        status=Question.Status.DONE,
        answer=f"Echo: {XSS_TEXT} [x](javascript:window.__xss=1)",
        sources=[
            {"document": 1, "title": XSS_TEXT, "page": 2, "score": 0.5, "text": XSS_TEXT},
        ],
        error="",
    )
    response = people.owner.get(f"/c/{conversation.pk}/")
    page = response.content.decode()
    assert "<script>window.__xss" not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;" in page
    # No script runs but this site's own files.
    assert "script-src 'self'" in response["Content-Security-Policy"]
    home = people.owner.get("/").content.decode()
    assert "<script>window.__xss" not in home and "&lt;script&gt;" in home


def test_running_answer_shows_the_text_so_far(people, corpus):
    conversation = services.conversation_create(owner=people.owner_user, corpus=corpus)
    question = Question.objects.create(
        conversation=conversation, text="Tell me", status=Question.Status.RUNNING, gpu="gpu0"
    )
    stream = realtime.AnswerStream(
        question_id=question.pk, conversation_id=conversation.pk, attempt=question.attempts
    )
    stream.push("Half of the ")
    stream.flush()
    stream.push("answer")
    stream.flush()
    try:
        page = people.owner.get(f"/c/{conversation.pk}/").content.decode()
    finally:
        stream.discard()
    assert "Half of the answer" in page
    assert 'data-status="running"' in page
    assert "Answering on gpu0" in page


def test_italian_through_the_language_switch(people, corpus):
    mine = services.conversation_create(owner=people.owner_user, corpus=corpus, title="mine")
    english = people.owner.get(f"/c/{mine.pk}/").content.decode()
    assert "All conversations" in english and 'lang="en"' in english
    switched = people.owner.post("/i18n/setlang/", {"language": "it", "next": f"/c/{mine.pk}/"})
    assert switched.status_code == 302 and switched["Location"] == f"/c/{mine.pk}/"
    italian = people.owner.get(f"/c/{mine.pk}/").content.decode()
    assert 'lang="it"' in italian
    assert "Tutte le conversazioni" in italian
    assert "Esci" in italian  # log out
    strings = json.loads(
        re.search(r'<script id="rm-strings" type="application/json">(.*?)</script>', italian).group(
            1
        )
    )
    assert strings["cancelled"] == "Interrotta"
    assert strings["sources"] == "Fonti"


def no_banner_context(request):
    return {"rmassimo_backend": {"llm": "ollama", "retrieval": "hybrid", "banner": ""}}


def with_context_processor(settings, processor: str) -> None:
    templates = [dict(settings.TEMPLATES[0])]
    processors = [
        p for p in templates[0]["OPTIONS"]["context_processors"] if not p.endswith(".backend")
    ]
    templates[0]["OPTIONS"] = {
        **templates[0]["OPTIONS"],
        "context_processors": [*processors, processor],
    }
    settings.TEMPLATES = templates


def test_backend_banner_is_shown_escaped_when_there_is_one(people, corpus, settings):
    with_context_processor(settings, "tests.test_web_chat.no_banner_context")
    assert 'class="banner"' not in people.owner.get("/").content.decode()
    with_context_processor(settings, "tests.test_web_chat.banner_context")
    page = people.owner.get("/").content.decode()
    assert '<div class="banner" role="status">&lt;b&gt;Demo&lt;/b&gt; mode</div>' in page
