"""Who is on the other end of a websocket: session cookie (browsers) or API token.

API clients authenticate with ``Authorization: Token <key>``, or ``?token=<key>`` where
they cannot set headers (the browser WebSocket API, some proxies). A token, when given,
decides alone: a wrong one leaves the connection anonymous even if a session cookie came
too, so a client is never silently someone other than the token says.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


def token_from_scope(scope) -> str | None:
    """The token key the client sent, or None when it sent none."""
    header = _header(scope, b"authorization")
    if header is not None:
        scheme, _, key = header.decode("latin1").strip().partition(" ")
        if scheme.lower() == "token":
            return key.strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin1"))
    if query.get("token"):
        return query["token"][0].strip()
    return None


@database_sync_to_async
def _user_for_token(key: str):
    from rest_framework.authtoken.models import Token

    token = Token.objects.select_related("user").filter(key=key).first()
    if token is None or not token.user.is_active:
        return AnonymousUser()
    return token.user


class TokenAuthMiddleware(BaseMiddleware):
    """Sets scope["user"] from a DRF token; runs inside the session middleware."""

    async def __call__(self, scope, receive, send):
        scope = dict(scope)
        key = token_from_scope(scope)
        if key is not None:
            scope["user"] = await _user_for_token(key) if key else AnonymousUser()
            scope["auth_method"] = "token"
        return await super().__call__(scope, receive, send)


class BrowserOriginValidator(OriginValidator):
    """AllowedHostsOriginValidator, except that an API client with a token needs no Origin.

    Browsers always send Origin on a websocket handshake, so its absence means a client that
    is not a browser: no page on another site can be driving it (cross-site websocket
    hijacking needs a browser and its cookies). Such a client must bring a token.
    """

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] == "websocket"
            and _header(scope, b"origin") is None
            and token_from_scope(scope)
        ):
            return await self.application(scope, receive, send)
        return await super().__call__(scope, receive, send)


def allowed_hosts_origin_validator(application) -> BrowserOriginValidator:
    allowed = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed:
        allowed = ["localhost", "127.0.0.1", "[::1]"]
    return BrowserOriginValidator(application, allowed)


def websocket_auth_stack(application):
    """Origin check, then session auth, then token auth (which overrides the session)."""
    return allowed_hosts_origin_validator(AuthMiddlewareStack(TokenAuthMiddleware(application)))
