"""The question pipeline end to end: API -> queue -> worker -> Milvus + Ollama -> answer."""

from __future__ import annotations

import pytest

from chat.models import Question
from core import vectorstore
from ingestion.models import Document, IngestionJob
from tests.corpus import DOCS, build_corpus, ingest
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def ask(client, **body):
    response = client.post("/api/v1/questions/", body, format="json")
    assert response.status_code == 202, response.content
    return response.json()


def poll(client, question_id, timeout=30):
    def final():
        data = client.get(f"/api/v1/questions/{question_id}/").json()
        return data if data["status"] in ("done", "failed", "cancelled") else None

    return wait_for(final, timeout=timeout, interval=0.05, what=f"question {question_id}")


def test_ingest_indexes_every_chunk_once(live):
    corpus = build_corpus()
    assert IngestionJob.objects.filter(status="done").count() == len(DOCS)
    total = sum(Document.objects.filter(corpus=corpus).values_list("chunk_count", flat=True))
    assert total >= len(DOCS)
    assert vectorstore.count(corpus.pk) == total
    # Same bytes again: no job, no new vectors.
    assert ingest(corpus, DOCS) == []
    assert vectorstore.count(corpus.pk) == total


def test_answer_is_built_from_the_right_passages(live, api):
    corpus = build_corpus()
    posted = ask(api.owner, text="When did Vesuvius bury Pompeii?", corpus=corpus.slug)
    assert posted["status"] == "queued"
    assert posted["conversation"]
    result = poll(api.owner, posted["id"])
    assert result["status"] == "done", result["error"]
    assert result["gpu"] == "gpu0"
    assert result["sources"][0]["title"] == "volcanoes"
    volcano = Document.objects.get(source="volcanoes.txt")
    assert result["sources"][0]["document"] == volcano.pk
    assert "Pompeii" in result["sources"][0]["text"]
    # The stand-in echoes the prompt it got: the volcano passage reached the model.
    assert "Herculaneum" in result["answer"]
    chat_calls = [c for c in live.calls if c["path"] == "/api/chat"]
    assert len(chat_calls) == 1
    prompt = chat_calls[0]["body"]["messages"][-1]["content"]
    assert "Herculaneum" in prompt
    assert chat_calls[0]["body"]["stream"] is True
    assert result["timings"]["completion_tokens"] == 48
    assert result["timings"]["first_token_ms"] is not None


def test_follow_up_is_condensed_with_history(live, api):
    corpus = build_corpus()
    first = poll(api.owner, ask(api.owner, text="Tell me about Vesuvius", corpus=corpus.slug)["id"])
    assert first["status"] == "done"
    live.reset_calls()
    follow = ask(api.owner, text="And what did it bury?", conversation=first["conversation"])
    result = poll(api.owner, follow["id"])
    assert result["status"] == "done", result["error"]
    chats = [c["body"] for c in live.calls if c["path"] == "/api/chat"]
    assert len(chats) == 2  # condense, then answer
    condense = chats[0]["messages"][-1]["content"]
    assert "Tell me about Vesuvius" in condense and "And what did it bury?" in condense
    answer_messages = chats[1]["messages"]
    assert answer_messages[1] == {"role": "user", "content": "Tell me about Vesuvius"}
    assert result["sources"][0]["title"] == "volcanoes"
    conversation = api.owner.get(f"/api/v1/conversations/{first['conversation']}/").json()
    assert [q["text"] for q in conversation["questions"]] == [
        "Tell me about Vesuvius",
        "And what did it bury?",
    ]


def test_a_cut_answer_says_so_and_is_not_fed_back_to_a_follow_up(live, api):
    from django.conf import settings
    from django.test import Client

    corpus = build_corpus()
    good = poll(api.owner, ask(api.owner, text="Tell me about Vesuvius", corpus=corpus.slug)["id"])
    assert good["status"] == "done" and good["truncated"] is False
    # A model whose Modelfile stops every answer after 7 tokens.
    live.configure(models={settings.RMASSIMO_CHAT_MODEL: {"num_predict": 7}})
    cut = poll(
        api.owner,
        ask(api.owner, text="Tell me about the Najdorf", conversation=good["conversation"])["id"],
    )
    assert cut["status"] == "done", cut["error"]
    assert cut["truncated"] is True
    # Ended after a whole word, with a sign that it goes on.
    assert cut["answer"].endswith("…")
    page = Client()
    page.force_login(api.owner_user)
    assert "Cut short" in page.get(f"/c/{good['conversation']}/").content.decode()

    live.configure(models={})
    live.reset_calls()
    follow = ask(api.owner, text="And sourdough?", conversation=good["conversation"])
    assert poll(api.owner, follow["id"])["status"] == "done"
    sent = str([c["body"]["messages"] for c in live.calls if c["path"] == "/api/chat"])
    # A whole exchange is history; the cut one is left out, question and answer.
    assert "Tell me about Vesuvius" in sent and good["answer"] in sent
    assert "Tell me about the Najdorf" not in sent


def test_bad_questions_get_clear_4xx(live, api):
    corpus = build_corpus(docs={})
    response = api.owner.post("/api/v1/questions/", {"text": "hi", "corpus": "nope"}, format="json")
    assert response.status_code == 400 and "Unknown corpus" in response.json()["corpus"][0]
    response = api.owner.post(
        "/api/v1/questions/", {"text": "  ", "corpus": corpus.slug}, format="json"
    )
    assert response.status_code == 400 and "text" in response.json()
    response = api.owner.post(
        "/api/v1/questions/", {"text": "x" * 2001, "corpus": corpus.slug}, format="json"
    )
    assert response.status_code == 400 and "2000" in str(response.json()["text"])
    response = api.owner.post("/api/v1/questions/", {"text": "hi"}, format="json")
    assert response.status_code == 400
    mine = ask(api.owner, text="hello", corpus=corpus.slug)
    response = api.other.post(
        "/api/v1/questions/", {"text": "hi", "conversation": mine["conversation"]}, format="json"
    )
    assert response.status_code == 404
    assert api.other.get(f"/api/v1/questions/{mine['id']}/").status_code == 404
    assert api.other.get(f"/api/v1/conversations/{mine['conversation']}/").status_code == 404
    assert api.staff.get(f"/api/v1/conversations/{mine['conversation']}/").status_code == 404
    assert (
        api.anon.post("/api/v1/questions/", {"text": "hi", "corpus": corpus.slug}).status_code
        == 401
    )
    assert api.anon.get(f"/api/v1/questions/{mine['id']}/").status_code == 401
    assert Question.objects.count() == 1


def test_ollama_error_fails_with_readable_message(live, api):
    corpus = build_corpus()
    live.configure(fail_status=500, fail_message="CUDA out of memory", fail_count=-1)
    result = poll(api.owner, ask(api.owner, text="Vesuvius?", corpus=corpus.slug)["id"])
    assert result["status"] == "failed"
    assert live.url in result["error"] and "500" in result["error"]
    assert "CUDA out of memory" in result["error"]


def test_ollama_unreachable_fails_naming_the_url(live, api):
    corpus = build_corpus()
    url = live.url
    live.port = int(url.rsplit(":", 1)[1])  # come back on the same port afterwards
    live.stop()
    try:
        result = poll(api.owner, ask(api.owner, text="Vesuvius?", corpus=corpus.slug)["id"])
    finally:
        live.start()
    assert live.url == url
    assert result["status"] == "failed"
    assert "could not be reached" in result["error"] and url in result["error"]
    assert Question.objects.filter(status="running").count() == 0


def test_cancel_stops_generation_and_keeps_the_text_so_far(live, api):
    corpus = build_corpus()
    live.configure(tps=20, reply_tokens=200)
    posted = ask(api.owner, text="Vesuvius at length", corpus=corpus.slug)
    wait_for(
        lambda: len(api.owner.get(f"/api/v1/questions/{posted['id']}/").json()["answer"]) > 0,
        timeout=30,
        what="the answer to start streaming",
    )
    cancelled = api.owner.post(f"/api/v1/questions/{posted['id']}/cancel/")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    row = wait_for(
        lambda: (q := Question.objects.get(pk=posted["id"])).answer and q,
        timeout=10,
        what="the partial answer to be kept",
    )
    assert row.status == "cancelled"
    words = len(row.answer.split())
    assert 1 <= words < 150  # stopped well before its 200 tokens
    # Cancelling again changes nothing.
    again = api.owner.post(f"/api/v1/questions/{posted['id']}/cancel/")
    assert again.json()["status"] == "cancelled"
