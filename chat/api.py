"""Questions and conversations over HTTP. Thin views: validate, call a service, serialize."""

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from chat import selectors, services
from chat.formats import SourceSerializer, TimingsSerializer
from chat.models import Conversation, Question
from ingestion import selectors as corpus_selectors


class QuestionOutput(serializers.ModelSerializer):
    corpus = serializers.SlugRelatedField(
        source="conversation.corpus", slug_field="slug", read_only=True
    )
    sources = SourceSerializer(many=True)
    timings = TimingsSerializer()

    class Meta:
        model = Question
        fields = [
            "id",
            "status",
            "conversation",
            "corpus",
            "text",
            "answer",
            "truncated",
            "sources",
            "gpu",
            "model",
            "timings",
            "error",
            "attempts",
            "feedback",
            "created_at",
        ]


class StrictCharField(serializers.CharField):
    """A string, and only a string: DRF's CharField would take 42 as "42"."""

    default_error_messages = {"not_a_string": "Must be a string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_a_string")
        return super().to_internal_value(data)


class StrictSlugField(StrictCharField, serializers.SlugField):
    pass


class QuestionInput(serializers.Serializer):
    text = StrictCharField(max_length=settings.RMASSIMO_QUESTION_MAX_CHARS, trim_whitespace=True)
    corpus = StrictSlugField(required=False)
    conversation = serializers.IntegerField(required=False, min_value=1)

    def validate(self, data):
        user = self.context["request"].user
        conversation = None
        if "conversation" in data:
            conversation = selectors.conversations_of(user).filter(pk=data["conversation"]).first()
            if conversation is None:
                raise NotFound("No such conversation.")
        corpus = None
        if "corpus" in data:
            corpus = corpus_selectors.corpus_by_slug(data["corpus"])
            if corpus is None:
                raise serializers.ValidationError({"corpus": f"Unknown corpus '{data['corpus']}'."})
        if conversation is None and corpus is None:
            raise serializers.ValidationError(
                {"corpus": "Give a corpus, or a conversation to continue."}
            )
        if conversation is not None and corpus is not None and conversation.corpus_id != corpus.pk:
            raise serializers.ValidationError(
                {"corpus": "This conversation belongs to another corpus."}
            )
        return {"text": data["text"], "corpus": corpus, "conversation": conversation}


class QuestionListCreate(APIView):
    throttle_scope = "ask"

    def get_throttles(self):
        return [ScopedRateThrottle()] if self.request.method == "POST" else []

    @extend_schema(request=QuestionInput, responses={202: QuestionOutput})
    def post(self, request):
        data = QuestionInput(data=request.data, context={"request": request})
        data.is_valid(raise_exception=True)
        question = services.question_create(owner=request.user, **data.validated_data)
        [question] = selectors.with_answer_so_far([question])
        return Response(QuestionOutput(question).data, status=status.HTTP_202_ACCEPTED)


class QuestionDetail(generics.RetrieveAPIView):
    serializer_class = QuestionOutput

    def get_queryset(self):
        return selectors.questions_of(self.request.user)

    def get_object(self):
        [question] = selectors.with_answer_so_far([super().get_object()])
        return question


class QuestionCancel(APIView):
    @extend_schema(request=None, responses={200: QuestionOutput})
    def post(self, request, pk: int):
        question = selectors.questions_of(request.user).filter(pk=pk).first()
        if question is None:
            raise NotFound("No such question.")
        services.question_cancel(question=question)
        [question] = selectors.with_answer_so_far([question])
        return Response(QuestionOutput(question).data)


class FeedbackInput(serializers.Serializer):
    value = serializers.ChoiceField(choices=[1, -1], allow_null=True)


class QuestionFeedback(APIView):
    @extend_schema(request=FeedbackInput, responses={200: QuestionOutput})
    def post(self, request, pk: int):
        question = selectors.questions_of(request.user).filter(pk=pk).first()
        if question is None:
            raise NotFound("No such question.")
        data = FeedbackInput(data=request.data)
        data.is_valid(raise_exception=True)
        services.question_set_feedback(question=question, value=data.validated_data["value"])
        [question] = selectors.with_answer_so_far([question])
        return Response(QuestionOutput(question).data)


class ConversationOutput(serializers.ModelSerializer):
    corpus = serializers.SlugRelatedField(slug_field="slug", read_only=True)

    class Meta:
        model = Conversation
        fields = ["id", "corpus", "title", "created_at", "updated_at"]


class ConversationDetailOutput(ConversationOutput):
    questions = QuestionOutput(many=True, read_only=True)

    class Meta(ConversationOutput.Meta):
        fields = [*ConversationOutput.Meta.fields, "questions"]


class ConversationInput(serializers.Serializer):
    corpus = serializers.SlugField()
    title = serializers.CharField(max_length=200, required=False, allow_blank=True)

    def validate_corpus(self, slug):
        corpus = corpus_selectors.corpus_by_slug(slug)
        if corpus is None:
            raise serializers.ValidationError(f"Unknown corpus '{slug}'.")
        return corpus


class ConversationListCreate(generics.ListAPIView):
    serializer_class = ConversationOutput
    # Each new conversation is a row: created as freely as questions are asked, no more.
    throttle_scope = "conversation"

    def get_throttles(self):
        return [ScopedRateThrottle()] if self.request.method == "POST" else []

    def get_queryset(self):
        return selectors.conversations_of(self.request.user)

    @extend_schema(request=ConversationInput, responses={201: ConversationOutput})
    def post(self, request):
        data = ConversationInput(data=request.data)
        data.is_valid(raise_exception=True)
        conversation = services.conversation_create(
            owner=request.user,
            corpus=data.validated_data["corpus"],
            title=data.validated_data.get("title", ""),
        )
        return Response(ConversationOutput(conversation).data, status=status.HTTP_201_CREATED)


class ConversationDetail(generics.RetrieveAPIView):
    serializer_class = ConversationDetailOutput

    def get_queryset(self):
        return selectors.conversations_of(self.request.user).prefetch_related("questions")

    def get_object(self):
        conversation = super().get_object()
        # The prefetched questions are the ones serialized.
        selectors.with_answer_so_far(conversation.questions.all())
        return conversation
