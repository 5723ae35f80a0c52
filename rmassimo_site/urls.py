from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from chat import api as chat_api
from core import api as core_api
from core import views as core_views
from evaluation import api as evaluation_api
from ingestion import api as ingestion_api
from workers import admin_views
from workers import api as workers_api

api_v1 = [
    path("questions/", chat_api.QuestionListCreate.as_view(), name="question-list"),
    path("questions/<int:pk>/", chat_api.QuestionDetail.as_view(), name="question-detail"),
    path("questions/<int:pk>/cancel/", chat_api.QuestionCancel.as_view(), name="question-cancel"),
    path(
        "questions/<int:pk>/feedback/",
        chat_api.QuestionFeedback.as_view(),
        name="question-feedback",
    ),
    path("conversations/", chat_api.ConversationListCreate.as_view(), name="conversation-list"),
    path(
        "conversations/<int:pk>/",
        chat_api.ConversationDetail.as_view(),
        name="conversation-detail",
    ),
    path("corpora/", ingestion_api.CorpusList.as_view(), name="corpus-list"),
    path("status/", core_api.Status.as_view(), name="status"),
    path(
        "corpora/<slug:slug>/documents/",
        ingestion_api.CorpusDocuments.as_view(),
        name="corpus-documents",
    ),
    path("documents/<int:pk>/", ingestion_api.DocumentDetail.as_view(), name="document-detail"),
    path("jobs/", ingestion_api.JobList.as_view(), name="job-list"),
    path("jobs/<int:pk>/", ingestion_api.JobDetail.as_view(), name="job-detail"),
    path("workers/", workers_api.WorkerList.as_view(), name="worker-list"),
    path("evaluation/runs/", evaluation_api.RunList.as_view(), name="evaluation-run-list"),
    path(
        "evaluation/runs/<int:pk>/",
        evaluation_api.RunDetail.as_view(),
        name="evaluation-run-detail",
    ),
]

urlpatterns = [
    path("admin/", include(admin_views.urls())),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The split view serves its script as a file: the page's CSP allows no inline script.
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="api-docs"),
    path("metrics", core_views.metrics_view, name="metrics"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("i18n/", include("django.conf.urls.i18n")),
    path("", include("chat.web_urls")),
]
