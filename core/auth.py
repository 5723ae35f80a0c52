"""Who is asking, and how often a wrong key may be tried.

The client's address is the connection's, unless RMASSIMO_BEHIND_PROXY says a reverse
proxy sits in front: then it is the last address in X-Forwarded-For, the one that proxy
appended (anything before it came from the client and proves nothing).

Wrong API tokens count against the address they came from, over HTTP and the websocket
alike; past the budget every token from that address is refused until the period ends,
so guessing cannot go on one answer at a time. The count lives in the cache (Redis): while
Redis is away it is not kept, and tokens are checked against the database alone, so API
clients still read their answers (a token is 160 random bits: the budget slows guessing,
the length is what defeats it).
"""

from __future__ import annotations

import logging

import redis
from django.conf import settings
from django.core.cache import cache
from rest_framework import authentication, exceptions
from rest_framework.throttling import SimpleRateThrottle

logger = logging.getLogger(__name__)

_BAD_TOKEN_KEY = "bad-token:{}"  # noqa: S105 (a cache key, not a secret)


def _last_forwarded(value: str) -> str:
    return value.split(",")[-1].strip()


def client_ip(request) -> str:
    """The address of the client of a Django (or DRF) request."""
    meta = request.META
    if settings.RMASSIMO_BEHIND_PROXY and meta.get("HTTP_X_FORWARDED_FOR"):
        return _last_forwarded(meta["HTTP_X_FORWARDED_FOR"])
    return meta.get("REMOTE_ADDR", "") or ""


def client_ip_from_scope(scope) -> str:
    """The same for an ASGI scope (the websocket)."""
    if settings.RMASSIMO_BEHIND_PROXY:
        for name, value in scope.get("headers", []):
            if name == b"x-forwarded-for":
                return _last_forwarded(value.decode("latin1"))
    client = scope.get("client") or ("", 0)
    return client[0] or ""


def _budget() -> tuple[int, int]:
    limit, period = SimpleRateThrottle.parse_rate(None, settings.RMASSIMO_BAD_TOKEN_RATE)
    return limit, period


def bad_tokens_blocked(ip: str) -> bool:
    limit, _ = _budget()
    try:
        return (cache.get(_BAD_TOKEN_KEY.format(ip)) or 0) >= limit
    except redis.RedisError:
        logger.warning("the wrong-token budget is not kept while Redis is away")
        return False


def bad_token_record(ip: str) -> bool:
    """Counts a wrong token from `ip`; True when that spent its budget."""
    limit, period = _budget()
    key = _BAD_TOKEN_KEY.format(ip)
    try:
        # The period starts at the first wrong token; add() does not extend it.
        cache.add(key, 0, timeout=period)
        try:
            count = cache.incr(key)
        except ValueError:  # expired between add() and incr()
            cache.add(key, 1, timeout=period)
            count = 1
    except redis.RedisError:
        logger.warning("the wrong-token budget is not kept while Redis is away")
        return False
    return count >= limit


class TooManyBadTokens(exceptions.Throttled):
    default_detail = "Too many wrong tokens from your address; try again later."


class TokenAuthentication(authentication.TokenAuthentication):
    """DRF's token authentication, with a budget of wrong tokens per client address."""

    def authenticate(self, request):
        words = authentication.get_authorization_header(request).split()
        if not words or words[0].lower() != self.keyword.lower().encode():
            return None
        ip = client_ip(request)
        if bad_tokens_blocked(ip):
            raise TooManyBadTokens(wait=_budget()[1])
        try:
            return super().authenticate(request)
        except exceptions.AuthenticationFailed:
            if bad_token_record(ip):
                raise TooManyBadTokens(wait=_budget()[1]) from None
            raise
