"""A page in the Django admin listing the GPU workers (the same data as GET /api/v1/workers/)."""

from django.contrib import admin
from django.template.response import TemplateResponse
from django.urls import path

from workers import selectors


def workers_view(request):
    context = {
        **admin.site.each_context(request),
        "title": "GPU workers",
        "workers": selectors.gpu_workers(),
    }
    return TemplateResponse(request, "admin/workers/workers.html", context)


def urls():
    return [path("workers/", admin.site.admin_view(workers_view), name="gpu-workers")]
