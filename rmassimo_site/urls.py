from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from chat import api as chat_api
from ingestion import api as ingestion_api

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
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("accounts/", include("django.contrib.auth.urls")),
]
