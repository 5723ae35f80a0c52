"""Fetching a document added by URL: http and https only, bounded in time and size, and
never to this server's own network.

Runs on the CPU worker as part of the job, never in the web process or the command.

A URL may name a host that resolves to a loopback, private, link-local or cloud-metadata
address (or redirect to one): fetching it would index the service's own admin pages, or
whatever answers inside the network, and quote it to plain users. So every connection,
the first and the one after each redirect, resolves the name itself, refuses it unless all
of its addresses are public, and connects to the address it checked (a second lookup
could answer differently). Hosts named in RMASSIMO_FETCH_ALLOWED_HOSTS skip the check.

Every refused or failed fetch ends with the same sentence: differing errors (refused,
timed out, HTTP 404) would tell which internal ports are open. The reason goes to the
worker's log, for the people who run it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import PurePath
from urllib.parse import urlsplit

import httpcore
import httpx
from django.conf import settings

from ingestion.parsing import ParseError

logger = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("http", "https")
_USER_AGENT = "rmassimo-ingest/1"
_MAX_REDIRECTS = 5


def refused_message(url: str) -> str:
    """The one sentence for any fetch that was refused or failed."""
    return (
        f"The URL {url} could not be fetched: only public addresses (and the hosts in "
        "RMASSIMO_FETCH_ALLOWED_HOSTS) are fetched, and the server must answer with a "
        "document in time."
    )


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str
    url: str  # after redirects


class AddressRefused(Exception):
    """A connection to a non-public address of a host that is not allowed."""


def _allowed_hosts() -> set[str]:
    return {h.strip().strip("[]").lower() for h in settings.RMASSIMO_FETCH_ALLOWED_HOSTS if h}


def is_public(address: str) -> bool:
    """Whether an IP address is on the public internet (not loopback, private, link-local,
    shared, reserved, multicast or unspecified)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _literal_ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def check_url(url: str) -> None:
    """What can be told without a lookup: the scheme, a host, and a literal address."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise ParseError(f"Only http and https URLs can be fetched, not '{parts.scheme or url}:'.")
    if not parts.hostname:
        raise ParseError(f"The URL '{url}' names no host.")
    address = _literal_ip(parts.hostname)
    if address and parts.hostname not in _allowed_hosts() and not is_public(address):
        raise ParseError(refused_message(url))


class _CheckedBackend(httpcore.SyncBackend):
    """Connects only to public addresses, unless the host is allowed by name."""

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        name = host.strip("[]").lower()
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        addresses = [info[4][0] for info in infos]
        if name not in _allowed_hosts():
            # One internal address refuses the name: a resolver answering both kinds
            # would otherwise let a retry land on the internal one.
            internal = [a for a in addresses if not is_public(a)]
            if internal:
                raise AddressRefused(f"{name} resolves to {', '.join(internal)}")
        error: Exception | None = None
        for address in dict.fromkeys(addresses):
            try:
                # A literal address: the one checked is the one connected to.
                return super().connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                error = exc
        raise error or httpcore.ConnectError(f"{name} has no address")


class _CheckedTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__(trust_env=False)
        # httpx builds its pool without a way to name the network backend; this is the
        # same pool with the checking one.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            network_backend=_CheckedBackend(),
        )


def fetch(url: str) -> Fetched:
    """The body at `url`; a ParseError worded for a person on any failure."""
    check_url(url)
    timeout = settings.RMASSIMO_FETCH_TIMEOUT
    limit = settings.RMASSIMO_UPLOAD_MAX_BYTES
    # httpx's timeouts bound each read; the deadline bounds a server that drips bytes.
    deadline = time.monotonic() + timeout
    try:
        with httpx.Client(
            transport=_CheckedTransport(),
            timeout=timeout,
            follow_redirects=True,
            max_redirects=_MAX_REDIRECTS,
            # No proxy from the environment: the address checked must be the one reached.
            trust_env=False,
            headers={"User-Agent": _USER_AGENT},
        ) as client:
            with client.stream("GET", url) as response:
                if response.status_code >= 400:
                    raise _Failed(f"HTTP {response.status_code} {response.reason_phrase}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise ParseError(
                        f"The document at {url} is {int(declared):,} bytes, over the limit of "
                        f"{limit:,} bytes (RMASSIMO_UPLOAD_MAX_BYTES)."
                    )
                body = bytearray()
                for piece in response.iter_bytes():
                    body.extend(piece)
                    if len(body) > limit:
                        raise ParseError(
                            f"The document at {url} is over the limit of {limit:,} bytes "
                            "(RMASSIMO_UPLOAD_MAX_BYTES)."
                        )
                    if time.monotonic() > deadline:
                        raise _Failed(f"no complete answer in {timeout:g} s")
                return Fetched(
                    data=bytes(body),
                    content_type=response.headers.get("content-type", ""),
                    url=str(response.url),
                )
    except ParseError:
        raise
    except (_Failed, AddressRefused, httpx.HTTPError, OSError) as exc:
        logger.warning("fetching %s failed: %s", url, str(exc)[:300] or type(exc).__name__)
        raise ParseError(refused_message(url)) from exc


class _Failed(Exception):
    """An answer that is not a document (an error status, too slow)."""


def url_title(url: str) -> str:
    """A title for a document added by URL, until its page says better."""
    path = PurePath(url.split("?", 1)[0].rstrip("/"))
    return path.stem if path.stem and "://" not in path.name else url[:300]
