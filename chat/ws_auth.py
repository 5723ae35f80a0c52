"""Who is on the other end of a websocket: session cookie (browsers) or API token.

API clients authenticate with ``Authorization: Token <key>``, or ``?token=<key>`` where
they cannot set headers (the browser WebSocket API, some proxies). A token, when given,
decides alone: a wrong one leaves the connection anonymous even if a session cookie came
too, so a client is never silently someone other than the token says.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http.request import split_domain_port, validate_host

from core import auth


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
def _user_for_token(key: str, ip: str):
    from rest_framework.authtoken.models import Token

    # Wrong tokens share one budget per address with the HTTP API.
    if auth.bad_tokens_blocked(ip):
        return AnonymousUser()
    token = Token.objects.select_related("user").filter(key=key).first() if key else None
    if token is None or not token.user.is_active:
        auth.bad_token_record(ip)
        return AnonymousUser()
    return token.user


class TokenAuthMiddleware(BaseMiddleware):
    """Sets scope["user"] from a DRF token; runs inside the session middleware."""

    async def __call__(self, scope, receive, send):
        scope = dict(scope)
        key = token_from_scope(scope)
        if key is not None:
            scope["user"] = await _user_for_token(key, auth.client_ip_from_scope(scope))
            scope["auth_method"] = "token"
        return await super().__call__(scope, receive, send)


def _port(scheme: str, port: int | None) -> int:
    return port or (443 if scheme in ("https", "wss") else 80)


def origin_allowed(scope) -> bool:
    """Whether a websocket handshake may go on, as far as its Origin tells.

    A browser's handshake must come from a page of this very site: its Origin must name
    the host and port the client connected to (the Host header), with a host in
    ALLOWED_HOSTS, or be one of CSRF_TRUSTED_ORIGINS. Matching the host alone would let
    any other service on the same machine (http://localhost:9999) drive a user's session.
    Browsers always send Origin on a websocket handshake, so its absence means a client
    that is not a browser: no page on another site can be driving it (cross-site websocket
    hijacking needs a browser and its cookies). Such a client must bring a token.
    """
    raw = _header(scope, b"origin")
    if raw is None:
        return bool(token_from_scope(scope))
    origin = raw.decode("latin1").strip().lower()
    if origin in {o.lower().rstrip("/") for o in settings.CSRF_TRUSTED_ORIGINS}:
        return True
    host = (_header(scope, b"host") or b"").decode("latin1").strip().lower()
    try:
        parsed, connected = urlsplit(origin), urlsplit(f"//{host}")
        origin_port, host_port = parsed.port, connected.port
    except ValueError:
        return False
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not host:
        return False
    return (
        parsed.hostname == connected.hostname
        and _port(parsed.scheme, origin_port) == _port(parsed.scheme, host_port)
        and validate_host(split_domain_port(host)[0], _allowed_hosts())
    )


def _allowed_hosts() -> list[str]:
    allowed = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed:
        allowed = ["localhost", "127.0.0.1", "[::1]"]
    return allowed


class SameOriginValidator:
    """Refuses (HTTP 403) a websocket handshake whose Origin is not this site."""

    def __init__(self, application) -> None:
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)


def websocket_auth_stack(application):
    """Origin check, then session auth, then token auth (which overrides the session)."""
    return SameOriginValidator(AuthMiddlewareStack(TokenAuthMiddleware(application)))
