"""Conversations and questions in the Django admin: read-mostly, for following what users
asked, which GPU answered, how long it took and why something failed."""

from django.contrib import admin
from django.db.models import Count
from django.utils.text import Truncator

from chat.models import Conversation, Question


def _short(text: str, length: int = 80) -> str:
    return Truncator(text or "").chars(length)


class QuestionInline(admin.TabularInline):
    model = Question
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True
    fields = ["created_at", "text_short", "status", "gpu", "error_short"]
    readonly_fields = fields

    @admin.display(description="question")
    def text_short(self, question: Question) -> str:
        return _short(question.text)

    @admin.display(description="error")
    def error_short(self, question: Question) -> str:
        return _short(question.error)


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["__str__", "owner", "corpus", "questions", "created_at", "updated_at"]
    list_filter = ["corpus"]
    search_fields = ["title", "owner__username", "questions__text"]
    list_select_related = ["owner", "corpus"]
    readonly_fields = ["owner", "corpus", "title", "created_at", "updated_at"]
    inlines = [QuestionInline]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_questions=Count("questions"))

    @admin.display(description="questions", ordering="_questions")
    def questions(self, conversation: Conversation) -> int:
        return conversation._questions

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Question)
class QuestionAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "text_short",
        "owner",
        "corpus",
        "status",
        "gpu",
        "wait_ms",
        "first_token_ms",
        "total_ms",
        "tokens_per_s",
        "error_short",
        "created_at",
    ]
    list_filter = ["status", "gpu", "conversation__corpus", "feedback"]
    search_fields = ["text", "answer", "standalone_text", "conversation__owner__username"]
    list_select_related = ["conversation__owner", "conversation__corpus"]
    date_hierarchy = "created_at"
    readonly_fields = [
        "conversation",
        "text",
        "standalone_text",
        "status",
        "answer",
        "sources",
        "error",
        "gpu",
        "worker",
        "model",
        "attempts",
        "created_at",
        "started_at",
        "first_token_at",
        "finished_at",
        "retrieval_ms",
        "generation_ms",
        "prompt_tokens",
        "completion_tokens",
        "feedback",
    ]
    fields = readonly_fields

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="question")
    def text_short(self, question: Question) -> str:
        return _short(question.text)

    @admin.display(description="owner", ordering="conversation__owner__username")
    def owner(self, question: Question) -> str:
        return question.conversation.owner.get_username()

    @admin.display(description="corpus", ordering="conversation__corpus__name")
    def corpus(self, question: Question) -> str:
        return question.conversation.corpus.name

    @admin.display(description="wait (ms)")
    def wait_ms(self, question: Question):
        return question.timings["wait_ms"]

    @admin.display(description="first token (ms)")
    def first_token_ms(self, question: Question):
        return question.timings["first_token_ms"]

    @admin.display(description="total (ms)")
    def total_ms(self, question: Question):
        return question.timings["total_ms"]

    @admin.display(description="tokens/s")
    def tokens_per_s(self, question: Question):
        return question.timings["tokens_per_s"]

    @admin.display(description="error")
    def error_short(self, question: Question) -> str:
        return _short(question.error)
