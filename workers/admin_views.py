"""Pages in the Django admin: the GPU workers (the same data as GET /api/v1/workers/), and
the fleet's last hour drawn, for people who run no Prometheus."""

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import JsonResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.translation import gettext as _

from workers import selectors
from workers.models import VIEW_PERMISSION


def workers_view(request):
    # Hosts, Ollama addresses and job arguments: for those allowed to see them.
    if not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied
    context = {
        **admin.site.each_context(request),
        "title": _("GPU workers"),
        "workers": selectors.gpu_workers(),
    }
    return TemplateResponse(request, "admin/workers/workers.html", context)


def fleet_view(request):
    context = {**admin.site.each_context(request), "title": _("Fleet: the last hour")}
    return TemplateResponse(request, "admin/workers/fleet.html", context)


def fleet_data_view(request):
    return JsonResponse(selectors.fleet_history())


def urls():
    return [
        path("workers/", admin.site.admin_view(workers_view), name="gpu-workers"),
        path("workers/fleet/", admin.site.admin_view(fleet_view), name="fleet"),
        path("workers/fleet/data/", admin.site.admin_view(fleet_data_view), name="fleet-data"),
    ]
