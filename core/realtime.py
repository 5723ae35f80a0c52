"""The one module that pushes live events (channel layer) and keeps partial answers.

Events go to the channel-layer group of a conversation; websocket consumers forward them.
While an answer streams, its deltas are also appended to a Redis list, so a client that
(re)connects mid-answer reads the text so far with sequence numbers, then follows the live
deltas, dropping any it has already seen. The list is kept per attempt: an attempt that
lost its claim can neither add to nor delete the text of the one that holds it. The DB
holds the final text.

Celery workers and management commands are synchronous: they publish through one event
loop per process, running in a daemon thread, because channels_redis binds its connections
to the loop that made them (a fresh loop per call leaves them dangling: "Event loop is
closed").
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time

import redis
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction

logger = logging.getLogger(__name__)

PARTIAL_TTL_S = 3600
_PUBLISH_TIMEOUT_S = 5.0

_state_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None
_outbox: asyncio.Queue | None = None
_redis: redis.Redis | None = None
_redis_pid: int | None = None


def group_name(conversation_id: int) -> str:
    return f"conversation.{int(conversation_id)}"


def _partial_key(question_id: int, attempt: int) -> str:
    return f"rmassimo:partial:{int(question_id)}:{int(attempt)}"


def _background_loop() -> tuple[asyncio.AbstractEventLoop, asyncio.Queue]:
    global _loop, _loop_pid, _outbox
    with _state_lock:
        # A forked pool child inherits the objects but not the thread that runs them.
        if _loop is None or _loop_pid != os.getpid():
            loop = asyncio.new_event_loop()
            outbox: asyncio.Queue = asyncio.Queue()
            threading.Thread(target=loop.run_forever, name="realtime-loop", daemon=True).start()
            asyncio.run_coroutine_threadsafe(_send_forever(outbox), loop)
            _loop, _loop_pid, _outbox = loop, os.getpid(), outbox
            atexit.register(drain)
        return _loop, _outbox


def redis_client() -> redis.Redis:
    global _redis, _redis_pid
    with _state_lock:
        if _redis is None or _redis_pid != os.getpid():
            _redis = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
            _redis_pid = os.getpid()
        return _redis


def publish(conversation_id: int, event: dict) -> None:
    """Send one event to everyone following the conversation; never raises, never waits.

    Events go out in the order they were published, from one sender coroutine, so the
    streaming worker is not held up by the channel layer. Live push is best effort: the DB
    and the partial list stay the truth for any client that missed it.
    """
    if get_channel_layer() is None:
        return
    loop, outbox = _background_loop()
    message = {"type": "rm.event", "event": event}
    loop.call_soon_threadsafe(outbox.put_nowait, (group_name(conversation_id), message))


def publish_on_commit(conversation_id: int, event: dict) -> None:
    """Publish once the current transaction commits (at once outside one): an event must
    never announce a write that a rollback then undoes, nor arrive before it is readable."""
    transaction.on_commit(lambda: publish(conversation_id, event))


def drain(timeout: float = _PUBLISH_TIMEOUT_S) -> None:
    """Wait until every event published so far has been handed to the channel layer."""
    if _loop is None or _loop_pid != os.getpid():
        return
    loop, outbox = _background_loop()
    future = asyncio.run_coroutine_threadsafe(outbox.join(), loop)
    try:
        future.result(timeout=timeout)
    except Exception:  # noqa: BLE001
        logger.warning("some live events could not be sent in time")


async def _send_forever(outbox: asyncio.Queue) -> None:
    layer = get_channel_layer()
    while True:
        group, message = await outbox.get()
        try:
            await layer.group_send(group, message)
        except Exception:  # noqa: BLE001
            logger.warning(
                "could not push %s event to %s", message["event"].get("type"), group, exc_info=True
            )
        finally:
            outbox.task_done()


class AnswerStream:
    """Coalesces the model's tokens into deltas: one push per interval or size, not per token."""

    def __init__(self, *, question_id: int, conversation_id: int, attempt: int) -> None:
        self.question_id = question_id
        self.conversation_id = conversation_id
        self.attempt = attempt
        self._key = _partial_key(question_id, attempt)
        self.seq = -1  # of the last delta sent
        self._buffer: list[str] = []
        self._buffered_chars = 0
        # The first token goes out at once: it is the one a person is waiting for.
        self._last_flush = float("-inf")
        self._interval = settings.RMASSIMO_STREAM_FLUSH_MS / 1000.0
        self._max_chars = settings.RMASSIMO_STREAM_FLUSH_CHARS
        _forget(self._key)

    def push(self, text: str) -> bool:
        """Buffer text; returns True when it was flushed (a moment to check for cancel)."""
        self._buffer.append(text)
        self._buffered_chars += len(text)
        now = time.monotonic()
        if now - self._last_flush >= self._interval or self._buffered_chars >= self._max_chars:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer.clear()
        self._buffered_chars = 0
        self.seq += 1
        try:
            pipe = redis_client().pipeline()
            pipe.rpush(self._key, text)
            pipe.expire(self._key, PARTIAL_TTL_S)
            pipe.execute()
        except redis.RedisError:
            # Redis is away: the answer goes on, and the DB gets all of it when done; only
            # a client (re)connecting meanwhile misses the text so far.
            logger.warning("question %s: could not keep its partial text", self.question_id)
        publish(
            self.conversation_id,
            {
                "type": "delta",
                "question": self.question_id,
                "attempt": self.attempt,
                "seq": self.seq,
                "text": text,
            },
        )

    def discard(self) -> None:
        _forget(self._key)


def partial_answer(question_id: int, attempt: int) -> list[str]:
    """The deltas an attempt has sent so far while streaming; index = sequence number.
    Empty while Redis is away: the answer is whole in the DB once done."""
    try:
        return list(redis_client().lrange(_partial_key(question_id, attempt), 0, -1))
    except redis.RedisError:
        logger.warning("could not read the partial text of question %s", question_id)
        return []


def clear_partial(question_id: int, attempt: int) -> None:
    _forget(_partial_key(question_id, attempt))


def _forget(key: str) -> None:
    """Best effort: a partial text left behind by a Redis outage expires on its own."""
    try:
        redis_client().delete(key)
    except redis.RedisError:
        logger.warning("could not delete %s; it expires in %ss", key, PARTIAL_TTL_S)
