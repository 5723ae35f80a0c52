"""GET /metrics: the web process' figures and the fleet's, for Prometheus."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpResponse
from django.views.decorators.http import require_GET

from core import metrics


def _allowed(request) -> bool:
    token = settings.RMASSIMO_METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer "):
        return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token.encode())
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


@require_GET
def metrics_view(request):
    if not _allowed(request):
        # The figures name corpora, models and servers: for the people who run them.
        status = 403 if getattr(request, "user", None) and request.user.is_authenticated else 401
        response = HttpResponse("Staff, or the metrics token, only.\n", status=status)
        if status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(metrics.web_exposition(), content_type=metrics.CONTENT_TYPE)
