"""Errors under /api/ answered as JSON, whatever DEBUG says.

API clients parse what they get back; an HTML page (Django's debug page lists settings,
the URLs of Redis and Milvus included) is no use to them and says too much to anyone.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.utils.deprecation import MiddlewareMixin
from rest_framework.response import Response

logger = logging.getLogger(__name__)

API_PREFIX = "/api/"


def body_limit(request: HttpRequest) -> int:
    """The largest body an API request may send: a document upload may carry a whole file
    (RMASSIMO_UPLOAD_MAX_BYTES) besides its form fields; anything else is JSON or a form."""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if request.content_type == "multipart/form-data":
        limit += settings.RMASSIMO_UPLOAD_MAX_BYTES
    return limit


def _error(status: int, detail: str) -> JsonResponse:
    return JsonResponse({"detail": detail}, status=status)


def _too_big(limit: int) -> JsonResponse:
    return _error(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"The request body is larger than the {limit:,} bytes accepted here.",
    )


class ApiErrorsMiddleware(MiddlewareMixin):
    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        if not request.path.startswith(API_PREFIX):
            return None
        # Refused before anyone reads it, so no parser and no CSRF check sees it.
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return _error(HTTPStatus.BAD_REQUEST, "The Content-Length header is not a number.")
        limit = body_limit(request)
        if length > limit:
            return _too_big(limit)
        return None

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not request.path.startswith(API_PREFIX):
            return None
        if isinstance(exception, RequestDataTooBig):
            return _too_big(body_limit(request))
        if isinstance(exception, Http404):
            return _error(HTTPStatus.NOT_FOUND, "Not found.")
        if isinstance(exception, PermissionDenied):
            return _error(HTTPStatus.FORBIDDEN, "You may not do this.")
        if isinstance(exception, SuspiciousOperation):
            logger.warning("refused %s %s: %s", request.method, request.path, exception)
            return _error(HTTPStatus.BAD_REQUEST, "The request was refused as malformed.")
        logger.error("internal error on %s %s", request.method, request.path, exc_info=exception)
        return _error(
            HTTPStatus.INTERNAL_SERVER_ERROR, "An internal error occurred; it has been logged."
        )

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        # Django's own error pages (an unknown URL, an error raised outside a view) are
        # HTML; the API's own responses are left as the client negotiated them.
        if (
            request.path.startswith(API_PREFIX)
            and response.status_code >= 400
            and not isinstance(response, Response)
            and not response.get("Content-Type", "").startswith("application/json")
        ):
            try:
                phrase = HTTPStatus(response.status_code).phrase
            except ValueError:
                phrase = "Error"
            return _error(response.status_code, f"{phrase}.")
        return response
