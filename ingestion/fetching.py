"""Fetching a document added by URL: http and https only, bounded in time and size.

Runs on the CPU worker as part of the job, never in the web process or the command.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import PurePath
from urllib.parse import urlsplit

import httpx
from django.conf import settings

from ingestion.parsing import ParseError

ALLOWED_SCHEMES = ("http", "https")
_USER_AGENT = "rmassimo-ingest/1"


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str
    url: str  # after redirects


def check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise ParseError(f"Only http and https URLs can be fetched, not '{parts.scheme or url}:'.")
    if not parts.hostname:
        raise ParseError(f"The URL '{url}' names no host.")


def fetch(url: str) -> Fetched:
    """The body at `url`; a ParseError worded for a person on any failure."""
    check_url(url)
    timeout = settings.RMASSIMO_FETCH_TIMEOUT
    limit = settings.RMASSIMO_UPLOAD_MAX_BYTES
    # httpx's timeouts bound each read; the deadline bounds a server that drips bytes.
    deadline = time.monotonic() + timeout
    try:
        with httpx.Client(
            timeout=timeout,
            follow_redirects=True,
            max_redirects=5,
            headers={"User-Agent": _USER_AGENT},
        ) as client:
            with client.stream("GET", url) as response:
                if response.status_code >= 400:
                    raise ParseError(
                        f"Fetching {url} failed: the server answered HTTP "
                        f"{response.status_code} {response.reason_phrase}."
                    )
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
                        raise httpx.ReadTimeout("deadline passed")
                return Fetched(
                    data=bytes(body),
                    content_type=response.headers.get("content-type", ""),
                    url=str(response.url),
                )
    except httpx.TimeoutException as exc:
        raise ParseError(
            f"Fetching {url} timed out after {timeout:g} seconds (RMASSIMO_FETCH_TIMEOUT)."
        ) from exc
    except httpx.UnsupportedProtocol as exc:
        raise ParseError(f"Fetching {url} was redirected to a URL that is not http(s).") from exc
    except httpx.TooManyRedirects as exc:
        raise ParseError(f"Fetching {url} was redirected too many times.") from exc
    except httpx.HTTPError as exc:
        raise ParseError(f"Fetching {url} failed: {str(exc)[:200] or type(exc).__name__}.") from exc


def url_title(url: str) -> str:
    """A title for a document added by URL, until its page says better."""
    path = PurePath(url.split("?", 1)[0].rstrip("/"))
    return path.stem if path.stem and "://" not in path.name else url[:300]
