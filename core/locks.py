"""Locks shared by every process of the service, kept in Redis.

A lock is a Redis key with a short expiry that a thread of the holder renews while it
holds it: a holder that dies (a killed pool process, a lost host) frees it within TTL_S,
and one that is merely slow (a Milvus call that takes long) keeps it for as long as it
runs, so nobody else goes in meanwhile. The database is not used for this on purpose: a
row lock held across a call to another system would stall every writer of that row.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from django.conf import settings
from redis.exceptions import LockError, LockNotOwnedError

logger = logging.getLogger(__name__)

TTL_S = 10.0
_RENEW_EVERY_S = TTL_S / 3
_POLL_S = 0.05

_client: redis.Redis | None = None
_client_pid: int | None = None
_client_lock = threading.Lock()


def _redis() -> redis.Redis:
    global _client, _client_pid
    with _client_lock:
        if _client is None or _client_pid != os.getpid():
            _client = redis.Redis.from_url(settings.REDIS_URL)
            _client_pid = os.getpid()
        return _client


def key(name: str) -> str:
    return f"rmassimo:lock:{name}"


@contextmanager
def held(name: str) -> Iterator[None]:
    """Hold the lock `name` for the block, waiting for it as long as it takes (a task's
    time limit bounds the wait)."""
    # thread_local=False: the renewing thread must see the token the holder took.
    lock = _redis().lock(key(name), timeout=TTL_S, sleep=_POLL_S, thread_local=False)
    if not lock.acquire(blocking=False):
        # The line a person (or a test) reads to know a writer is waiting its turn.
        logger.info("lock %s is held elsewhere: waiting for it", name)
        lock.acquire(blocking=True)
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew, args=(lock, name, stop), name=f"lock-{name}", daemon=True
    )
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        try:
            lock.release()
        except LockError:
            logger.warning("lock %s had expired before it was released", name)
        except redis.RedisError as exc:
            logger.warning("lock %s could not be released (%s); it expires by itself", name, exc)


def _renew(lock, name: str, stop: threading.Event) -> None:
    while not stop.wait(_RENEW_EVERY_S):
        try:
            lock.reacquire()
        except LockNotOwnedError:
            logger.error("lock %s was lost while held (Redis lost it or the holder froze)", name)
            return
        except redis.RedisError as exc:
            # Redis may answer again before the key expires: keep trying.
            logger.warning("lock %s could not be renewed: %s", name, exc)
