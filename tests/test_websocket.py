"""The conversation websocket: who may join, the events, and resuming mid-answer.

Consumer tests run the project's ASGI application in-process with channels'
WebsocketCommunicator; the resume and the API-client cases also go through the real
daphne server with the ``websockets`` client. Answers come from the real worker.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers
from channels.testing import WebsocketCommunicator
from django.test import Client
from rest_framework.authtoken.models import Token
from websockets.asyncio.client import connect as ws_connect

from chat import services
from chat.models import Question
from core import realtime
from rmassimo_site.asgi import application
from tests.browser import web_server  # noqa: F401  (fixture)
from tests.corpus import build_corpus
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = (b"origin", b"http://127.0.0.1:8000")
HOST = (b"host", b"127.0.0.1:8000")  # what a browser on that page connects to
FINAL = {"done", "failed", "cancelled"}


@pytest.fixture(autouse=True)
def fresh_channel_layer():
    """Each test's event loop gets its own channel layer: one that a failed test left
    receiving must not hold the next test's receive lock."""
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)
    yield
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)


def token_of(user) -> str:
    return Token.objects.get_or_create(user=user)[0].key


def session_cookie(user) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    return (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())


def auth_header(user) -> tuple[bytes, bytes]:
    return (b"authorization", f"Token {token_of(user)}".encode())


async def attempt(conversation_id: int, headers=(), query: str = ""):
    """(accepted, close code): the code of a socket refused or closed right after accepting."""
    path = f"/ws/conversations/{conversation_id}/" + (f"?{query}" if query else "")
    communicator = WebsocketCommunicator(application, path, headers=list(headers))
    accepted, code = await communicator.connect(timeout=5)
    if accepted:
        code = None
        if not await communicator.receive_nothing(timeout=0.3):
            message = await communicator.receive_output(timeout=1)
            assert message["type"] == "websocket.close", message
            code = message.get("code")
    await communicator.disconnect()
    return accepted, code


async def join(conversation_id: int, headers) -> WebsocketCommunicator:
    path = f"/ws/conversations/{conversation_id}/"
    communicator = WebsocketCommunicator(application, path, headers=list(headers))
    accepted, code = await communicator.connect(timeout=5)
    assert accepted, code
    return communicator


async def events_until_final(source, question_id: int, timeout: float = 30) -> list[dict]:
    """Events from a communicator or a `websockets` connection, up to the question's end."""
    events = []
    while True:
        if isinstance(source, WebsocketCommunicator):
            event = await source.receive_json_from(timeout=timeout)
        else:
            event = json.loads(await asyncio.wait_for(source.recv(), timeout))
        events.append(event)
        if event["type"] in FINAL and event["question"] == question_id:
            return events


def ask(client, **body) -> dict:
    response = client.post("/api/v1/questions/", body, format="json")
    assert response.status_code == 202, response.content
    return response.json()


def deltas_of(events, question_id) -> list[dict]:
    return [e for e in events if e["type"] == "delta" and e["question"] == question_id]


def test_only_the_owner_may_join(api):
    corpus = build_corpus(docs={})
    mine = services.conversation_create(owner=api.owner_user, corpus=corpus)
    theirs_key = token_of(api.other_user)
    owner_key = token_of(api.owner_user)
    owner_cookie = session_cookie(api.owner_user)
    owner_auth, staff_auth = auth_header(api.owner_user), auth_header(api.staff_user)

    async def scenario():
        results = {}
        cases = {
            "token header, no Origin": ([owner_auth], ""),
            "token query, no Origin": ([], f"token={owner_key}"),
            "token query, browser Origin": ([ORIGIN, HOST], f"token={owner_key}"),
            "session, browser Origin": ([ORIGIN, HOST, owner_cookie], ""),
            "session, no Origin": ([owner_cookie], ""),
            "session, foreign Origin": (
                [(b"origin", b"https://evil.example"), HOST, owner_cookie],
                "",
            ),
            "session, another port of this host": (
                [(b"origin", b"http://127.0.0.1:9999"), HOST, owner_cookie],
                "",
            ),
            "anonymous": ([ORIGIN, HOST], ""),
            "wrong token beats a good session": ([ORIGIN, HOST, owner_cookie], "token=not-a-key"),
            "other user": ([], f"token={theirs_key}"),
            "staff": ([staff_auth], ""),
        }
        for name, (headers, query) in cases.items():
            results[name] = await attempt(mine.pk, headers, query)
        results["no such conversation"] = await attempt(mine.pk + 1000, [owner_auth])
        return results

    results = async_to_sync(scenario)()
    assert results["token header, no Origin"] == (True, None)
    assert results["token query, no Origin"] == (True, None)
    assert results["token query, browser Origin"] == (True, None)
    assert results["session, browser Origin"] == (True, None)
    # Without a token a client must be a browser from this site.
    assert results["session, no Origin"][0] is False
    assert results["session, foreign Origin"][0] is False
    assert results["session, another port of this host"][0] is False
    assert results["anonymous"] == (True, 4401)
    assert results["wrong token beats a good session"] == (True, 4401)
    # Someone else's conversation closes exactly as a missing one: ids cannot be probed.
    assert results["other user"] == (True, 4404)
    assert results["staff"] == (True, 4404)
    assert results["no such conversation"] == (True, 4404)


def test_events_of_an_answer_arrive_in_order(live, api):
    corpus = build_corpus()
    conversation = services.conversation_create(owner=api.owner_user, corpus=corpus)
    owner_auth = auth_header(api.owner_user)
    live.configure(tps=200, reply_tokens=30)

    async def scenario():
        communicator = await join(conversation.pk, [owner_auth])
        posted = await sync_to_async(ask)(
            api.owner, text="When did Vesuvius bury Pompeii?", conversation=conversation.pk
        )
        events = await events_until_final(communicator, posted["id"])
        await communicator.disconnect()
        return posted, events

    posted, events = async_to_sync(scenario)()
    kinds = [e["type"] for e in events]
    # Nothing else is waiting: first in line, announced before any worker takes it.
    assert kinds[0] == "queued" and events[0]["position"] == 1
    started = kinds.index("started")
    assert events[started]["gpu"] == "gpu0"
    deltas = deltas_of(events, posted["id"])
    assert deltas and kinds.index("delta") > started
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    done = events[-1]
    assert done["type"] == "done"
    question = Question.objects.get(pk=posted["id"])
    assert "".join(d["text"] for d in deltas) == done["answer"] == question.answer
    assert done["sources"][0]["title"] == "volcanoes"
    assert {"document", "title", "page", "score", "text"} <= set(done["sources"][0])
    assert done["timings"]["total_ms"] > 0


def test_replayed_parts_are_not_sent_twice(api):
    corpus = build_corpus(docs={})
    conversation = services.conversation_create(owner=api.owner_user, corpus=corpus)
    owner_auth = auth_header(api.owner_user)
    question = Question.objects.create(
        conversation=conversation,
        text="q",
        status=Question.Status.RUNNING,
        gpu="gpu1",
        attempts=1,
    )
    stream = realtime.AnswerStream(
        question_id=question.pk, conversation_id=conversation.pk, attempt=1
    )
    for part in ("Once ", "upon ", "a "):
        stream.push(part)
        stream.flush()

    def publish(event):
        realtime.publish(conversation.pk, {"question": question.pk, **event})

    async def scenario():
        communicator = await join(conversation.pk, [owner_auth])
        replayed = [await communicator.receive_json_from(timeout=2) for _ in range(4)]
        await communicator.send_to(text_data="not json")  # the stream is one way: ignored
        # What the worker published while the replay was being read arrives again live.
        for event in (
            {"type": "started", "gpu": "gpu1", "attempt": 1},
            {"type": "delta", "seq": 1, "text": "upon "},
            {"type": "delta", "seq": 2, "text": "a "},
            {"type": "delta", "seq": 3, "text": "time"},
            # A second attempt (the first one's worker died): its seqs start again at 0.
            {"type": "started", "gpu": "gpu0", "attempt": 2},
            # The first attempt, not yet aware it lost its claim, streams on: not shown.
            {"type": "delta", "attempt": 1, "seq": 4, "text": " stale"},
            {"type": "delta", "attempt": 2, "seq": 0, "text": "Once upon a time"},
            {"type": "done", "answer": "Once upon a time"},
        ):
            await sync_to_async(publish)(event)
        live_events = await events_until_final(communicator, question.pk, 5)
        await communicator.disconnect()
        return replayed, live_events

    try:
        replayed, live_events = async_to_sync(scenario)()
    finally:
        stream.discard()
    assert replayed == [
        {"type": "started", "question": question.pk, "gpu": "gpu1", "attempt": 1},
        {"type": "delta", "question": question.pk, "attempt": 1, "seq": 0, "text": "Once "},
        {"type": "delta", "question": question.pk, "attempt": 1, "seq": 1, "text": "upon "},
        {"type": "delta", "question": question.pk, "attempt": 1, "seq": 2, "text": "a "},
    ]
    assert [(e["type"], e.get("seq")) for e in live_events] == [
        ("delta", 3),
        ("started", None),
        ("delta", 0),
        ("done", None),
    ]


def test_reconnecting_mid_answer_loses_and_repeats_nothing(live, api):
    corpus = build_corpus()
    conversation = services.conversation_create(owner=api.owner_user, corpus=corpus)
    owner_auth = auth_header(api.owner_user)
    live.configure(tps=25, reply_tokens=60)

    async def scenario():
        first = await join(conversation.pk, [owner_auth])
        posted = await sync_to_async(ask)(
            api.owner, text="Tell me about the sourdough starter", conversation=conversation.pk
        )
        seen = []
        while len(deltas_of(seen, posted["id"])) < 3:
            seen.append(await first.receive_json_from(timeout=10))
        await first.disconnect()
        await asyncio.sleep(0.5)  # deltas published now reach nobody
        second = await join(conversation.pk, [owner_auth])
        events = await events_until_final(second, posted["id"])
        await second.disconnect()
        return posted, seen, events

    posted, seen, events = async_to_sync(scenario)()
    assert events[0]["type"] == "started"
    assert (events[0]["question"], events[0]["gpu"]) == (posted["id"], "gpu0")
    deltas = deltas_of(events, posted["id"])
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    text = "".join(d["text"] for d in deltas)
    final = Question.objects.get(pk=posted["id"])
    assert final.status == "done"
    assert text == events[-1]["answer"] == final.answer
    assert text.startswith("".join(d["text"] for d in deltas_of(seen, posted["id"])))
    # The second connection came mid-answer: part of it was replayed, the rest was live.
    assert len(deltas) > len(deltas_of(seen, posted["id"]))


def test_stop_ends_the_stream_as_cancelled(live, api):
    corpus = build_corpus()
    conversation = services.conversation_create(owner=api.owner_user, corpus=corpus)
    owner_auth = auth_header(api.owner_user)
    live.configure(tps=20, reply_tokens=400)

    def stopped_streaming(question_id):
        return wait_for(
            lambda: realtime.partial_answer(
                question_id, Question.objects.get(pk=question_id).attempts
            )
            == [],
            timeout=10,
            what="the worker to stop streaming",
        )

    async def scenario():
        communicator = await join(conversation.pk, [owner_auth])
        posted = await sync_to_async(ask)(api.owner, text="Vesuvius?", conversation=conversation.pk)
        while not deltas_of([await communicator.receive_json_from(timeout=10)], posted["id"]):
            pass
        response = await sync_to_async(api.owner.post)(f"/api/v1/questions/{posted['id']}/cancel/")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        events = await events_until_final(communicator, posted["id"], 10)
        # The worker notices, drops the partial text and asks the model for nothing more.
        await sync_to_async(stopped_streaming)(posted["id"])
        while not await communicator.receive_nothing(timeout=0.3):
            await communicator.receive_json_from()
        quiet = await communicator.receive_nothing(timeout=1.5)
        await communicator.disconnect()
        return posted, events, quiet

    posted, events, quiet = async_to_sync(scenario)()
    assert events[-1] == {"type": "cancelled", "question": posted["id"]}
    assert quiet, "deltas kept coming after the answer was stopped"
    assert Question.objects.get(pk=posted["id"]).status == "cancelled"


def test_failure_is_an_event_with_a_readable_error(live, api):
    corpus = build_corpus()
    conversation = services.conversation_create(owner=api.owner_user, corpus=corpus)
    owner_auth = auth_header(api.owner_user)
    live.configure(fail_status=500, fail_message="CUDA out of memory", fail_count=-1)

    async def scenario():
        communicator = await join(conversation.pk, [owner_auth])
        posted = await sync_to_async(ask)(api.owner, text="Vesuvius?", conversation=conversation.pk)
        events = await events_until_final(communicator, posted["id"])
        await communicator.disconnect()
        return events

    events = async_to_sync(scenario)()
    assert events[-1]["type"] == "failed"
    assert "CUDA out of memory" in events[-1]["error"]


# ---- the real server (daphne) and a real websocket client ----


def test_resume_against_the_real_server(live, api, web_server):  # noqa: F811
    corpus = build_corpus()
    conversation = services.conversation_create(owner=api.owner_user, corpus=corpus)
    live.configure(tps=25, reply_tokens=60)
    url = f"{web_server.ws_url}/ws/conversations/{conversation.pk}/"
    key = token_of(api.owner_user)
    headers = {"Authorization": f"Token {key}"}

    async def scenario():
        # An API client: a token, and no Origin header.
        async with ws_connect(url, additional_headers=headers, proxy=None) as first:
            posted = await sync_to_async(ask)(
                api.owner, text="Who favours the Najdorf?", conversation=conversation.pk
            )
            seen = []
            while len(deltas_of(seen, posted["id"])) < 3:
                seen.append(json.loads(await asyncio.wait_for(first.recv(), 10)))
        await asyncio.sleep(0.5)
        async with ws_connect(f"{url}?token={key}", proxy=None) as second:
            events = await events_until_final(second, posted["id"])
        return posted, seen, events

    posted, seen, events = async_to_sync(scenario)()
    deltas = deltas_of(events, posted["id"])
    assert events[0]["type"] == "started"
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    final = Question.objects.get(pk=posted["id"])
    assert "".join(d["text"] for d in deltas) == final.answer == events[-1]["answer"]
    assert len(deltas) > len(deltas_of(seen, posted["id"]))


def test_real_server_closes_with_a_reason(api, web_server):  # noqa: F811
    corpus = build_corpus(docs={})
    mine = services.conversation_create(owner=api.owner_user, corpus=corpus)
    base = f"{web_server.ws_url}/ws/conversations"
    other = {"Authorization": f"Token {token_of(api.other_user)}"}

    async def close_code(url, **kwargs):
        async with ws_connect(url, proxy=None, **kwargs) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        return closed.value.rcvd.code

    async def scenario():
        codes = {
            "other": await close_code(f"{base}/{mine.pk}/", additional_headers=other),
            "missing": await close_code(f"{base}/{mine.pk + 1000}/", additional_headers=other),
            "anonymous": await close_code(f"{base}/{mine.pk}/", origin=web_server.url),
        }
        with pytest.raises(websockets.InvalidStatus) as refused:
            await close_code(f"{base}/{mine.pk}/", origin="https://evil.example")
        codes["foreign origin"] = refused.value.response.status_code
        return codes

    assert async_to_sync(scenario)() == {
        "other": 4404,
        "missing": 4404,
        "anonymous": 4401,
        "foreign origin": 403,
    }


# Daphne's default: an idle websocket gets a keep-alive ping after this many seconds.
DAPHNE_PING_INTERVAL_S = 20


def _channel_layer_timeouts() -> list[float]:
    """Every timeout on the idle path: the layer's blocking pop on Redis and the socket
    timeout of its Redis connections (redis-py's default when the settings give none)."""
    from channels_redis.core import RedisChannelLayer
    from django.conf import settings
    from redis._defaults import DEFAULT_SOCKET_TIMEOUT

    host = settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"][0]
    options = host if isinstance(host, dict) else {}
    return [RedisChannelLayer.brpop_timeout, options.get("socket_timeout", DEFAULT_SOCKET_TIMEOUT)]


def test_an_idle_socket_still_carries_the_next_answer(live, api, web_server):  # noqa: F811
    corpus = build_corpus()
    conversation = services.conversation_create(owner=api.owner_user, corpus=corpus)
    url = f"{web_server.ws_url}/ws/conversations/{conversation.pk}/"
    headers = {"Authorization": f"Token {token_of(api.owner_user)}"}
    idle_s = max(DAPHNE_PING_INTERVAL_S, *_channel_layer_timeouts()) + 3
    log_before = len(web_server.output())

    async def scenario():
        async with ws_connect(url, additional_headers=headers, proxy=None) as ws:
            await asyncio.sleep(idle_s)
            posted = await sync_to_async(ask)(
                api.owner, text="Who favours the Najdorf?", conversation=conversation.pk
            )
            # The same connection: a socket the server dropped while idle raises here.
            return posted, await events_until_final(ws, posted["id"])

    posted, events = async_to_sync(scenario)()
    assert events[-1]["type"] == "done"
    assert "".join(d["text"] for d in deltas_of(events, posted["id"])) == events[-1]["answer"]
    log = web_server.output()[log_before:]
    assert "Traceback" not in log and "Timeout reading" not in log, log[-3000:]
