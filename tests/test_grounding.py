"""Grounded answers through the real worker: "I don't know" when retrieval finds nothing
relevant enough (no sources, no model call), and which sources the answer cites."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers

from chat import services
from chat.grounding import NO_ANSWER
from tests.corpus import build_corpus
from tests.test_pipeline import ask, poll
from tests.test_websocket import auth_header, events_until_final, join

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def fresh_channel_layer():
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)
    yield
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)


def _chat_calls(stub) -> list[dict]:
    return [c["body"] for c in stub.calls if c["path"] == "/api/chat"]


def test_no_relevant_passage_means_i_dont_know_without_sources_or_model(live, api):
    # BM25 alone; in this corpus "the" and "is" score well under 1.2, "Vesuvius" above.
    corpus = build_corpus(slug="grounded", embed_model="none", min_relevance_bm25=1.2)
    corpus.no_answer_it = "Non saprei: nei miei scritti non c'è."
    corpus.save()
    live.reset_calls()
    nothing = poll(
        api.owner, ask(api.owner, text="Capitale dell'Australia?", corpus="grounded")["id"]
    )
    assert nothing["status"] == "done"
    assert nothing["answer"] == "Non saprei: nei miei scritti non c'è."
    assert nothing["sources"] == []
    weak = poll(
        api.owner, ask(api.owner, text="What is the capital of Australia?", corpus="grounded")["id"]
    )
    assert weak["answer"] == NO_ANSWER["en"] and weak["sources"] == []
    assert _chat_calls(live) == []  # the model was not asked to answer from nothing

    answered = poll(
        api.owner, ask(api.owner, text="When did Vesuvius bury Pompeii?", corpus="grounded")["id"]
    )
    assert answered["sources"] and answered["answer"].startswith("Echo:")
    (call,) = _chat_calls(live)
    # Retrieval found something: the model answers, told how to say it does not know.
    assert NO_ANSWER["en"] in call["messages"][0]["content"]


def test_sources_say_whether_the_answer_cited_them(live, api):
    corpus = build_corpus(slug="cites", embed_model="none", min_relevance_bm25=0.0)
    conversation = services.conversation_create(owner=api.owner_user, corpus=corpus)
    # The stand-in echoes the question's words: the answer carries the marker "[2]".
    text = "Vesuvius sourdough Najdorf? [2] [[tokens=400]]"
    owner_auth = auth_header(api.owner_user)

    async def scenario():
        communicator = await join(conversation.pk, [owner_auth])
        posted = await sync_to_async(ask)(api.owner, text=text, conversation=conversation.pk)
        events = await events_until_final(communicator, posted["id"])
        await communicator.disconnect()
        return posted, events[-1]

    posted, done = async_to_sync(scenario)()
    result = api.owner.get(f"/api/v1/questions/{posted['id']}/").json()
    assert "[2]" in result["answer"] and "[1]" not in result["answer"]
    assert len(result["sources"]) == 3
    assert [s["cited"] for s in result["sources"]] == [False, True, False]
    assert done["type"] == "done" and done["sources"] == result["sources"]
