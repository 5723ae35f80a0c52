"""Corpora, documents and ingestion jobs over HTTP. Thin views: validate, call a service,
serialize. Everything but the corpus list is for staff."""

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, permissions, serializers, status
from rest_framework.exceptions import APIException
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from core import llm, vectorstore
from core.parsers import JSONParser
from ingestion import parsing, selectors, services
from ingestion.models import Corpus, Document, IngestionJob


class CorpusOutput(serializers.ModelSerializer):
    document_count = serializers.IntegerField(read_only=True)
    chat_model = serializers.SerializerMethodField(
        help_text="The model that answers: the corpus' own, or the embedded one without Ollama."
    )
    embed_model = serializers.SerializerMethodField()
    retrieval = serializers.SerializerMethodField()

    class Meta:
        model = Corpus
        fields = [
            "slug",
            "name",
            "description",
            "language",
            "chat_model",
            "embed_model",
            "retrieval",
            "document_count",
        ]

    def get_embed_model(self, corpus: Corpus) -> str:
        return selectors.embed_model(corpus)

    def get_chat_model(self, corpus: Corpus) -> str:
        try:
            return llm.answering_model(corpus.effective_chat_model)
        except llm.LLMError:
            return corpus.effective_chat_model

    def get_retrieval(self, corpus: Corpus) -> str:
        return selectors.corpus_retrieval(corpus)


class CorpusList(generics.ListAPIView):
    serializer_class = CorpusOutput
    pagination_class = None

    def get_queryset(self):
        return selectors.corpora()


class IsStaff(permissions.BasePermission):
    """Staff only; anonymous requests still get 401 from the authentication check."""

    message = "Only staff can manage documents and ingestion jobs."

    def has_permission(self, request, view) -> bool:
        return bool(request.user and request.user.is_staff)


class ModelPermissions(permissions.DjangoModelPermissions):
    """Django's model permissions, the ones the admin asks for: reading needs `view`,
    adding `add`, deleting `delete` (a superuser has them all)."""

    message = "Your account lacks the permission for this; an administrator can grant it."
    perms_map = {
        **permissions.DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
    }


STAFF = [permissions.IsAuthenticated, IsStaff, ModelPermissions]


class VectorStoreUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "vector_store_unavailable"


class JobOutput(serializers.ModelSerializer):
    document = serializers.PrimaryKeyRelatedField(read_only=True)
    corpus = serializers.SlugRelatedField(
        source="document.corpus", slug_field="slug", read_only=True
    )

    class Meta:
        model = IngestionJob
        fields = [
            "id",
            "document",
            "corpus",
            "status",
            "chunks_done",
            "chunks_total",
            "attempts",
            "worker",
            "error",
            "created_at",
            "started_at",
            "heartbeat_at",
            "finished_at",
            "prepare_seconds",
            "embed_seconds",
        ]


class LastJobOutput(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.CharField()


class DocumentOutput(serializers.ModelSerializer):
    corpus = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    last_job = serializers.SerializerMethodField()

    class Meta:
        model = Document
        fields = [
            "id",
            "corpus",
            "title",
            "source",
            "status",
            "mime_type",
            "size",
            "content_hash",
            "chunk_count",
            "page_count",
            "error",
            "last_job",
            "created_at",
            "updated_at",
        ]

    @extend_schema(responses=LastJobOutput(allow_null=True))
    def get_last_job(self, document: Document) -> dict | None:
        job_id = getattr(document, "last_job_id", None)
        if job_id is None:
            job = document.jobs.order_by("-created_at", "-pk").first()
            return {"id": job.pk, "status": job.status} if job else None
        return {"id": job_id, "status": document.last_job_status}


class UploadInput(serializers.Serializer):
    file = serializers.FileField(required=False, allow_empty_file=True)
    url = serializers.URLField(required=False, max_length=1000)
    title = serializers.CharField(required=False, allow_blank=True, max_length=300)

    def validate_file(self, upload):
        try:
            parsing.check_size(upload.size)
        except parsing.ParseError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        try:
            # From its head: the file stays where Django wrote it and is streamed to storage.
            parsing.detect_file(upload, name=upload.name)
        except parsing.ParseError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        return upload

    def validate_url(self, url):
        from ingestion import fetching

        try:
            fetching.check_url(url)
        except parsing.ParseError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        return url

    def validate(self, data):
        if ("file" in data) == ("url" in data):
            raise serializers.ValidationError("Give either a file or a url.")
        return data


class UploadOutput(serializers.Serializer):
    document = DocumentOutput()
    job = JobOutput(allow_null=True)
    unchanged = serializers.BooleanField()


class CorpusDocuments(generics.ListAPIView):
    """GET: the corpus' documents. POST: add one (multipart `file`, or `url`) -> 202 + job."""

    permission_classes = STAFF
    serializer_class = DocumentOutput
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    def corpus(self) -> Corpus:
        return get_object_or_404(Corpus, slug=self.kwargs["slug"])

    def get_queryset(self):
        return selectors.documents(corpus=self.corpus()).order_by("title", "pk")

    @extend_schema(request=UploadInput, responses={202: UploadOutput, 200: UploadOutput})
    def post(self, request, slug: str):
        corpus = self.corpus()
        data = UploadInput(data=request.data)
        data.is_valid(raise_exception=True)
        title = data.validated_data.get("title", "")
        if "url" in data.validated_data:
            added = services.document_add_url(
                corpus=corpus, url=data.validated_data["url"], title=title
            )
        else:
            upload = data.validated_data["file"]
            added = services.document_add(
                corpus=corpus, source=upload.name, upload=upload, title=title
            )
        document = selectors.documents().get(pk=added.document.pk)
        body = UploadOutput(
            {"document": document, "job": added.job, "unchanged": added.skipped}
        ).data
        return Response(
            body, status=status.HTTP_200_OK if added.skipped else status.HTTP_202_ACCEPTED
        )


class DocumentDetail(generics.RetrieveDestroyAPIView):
    """GET a document; DELETE it with its file, jobs and every vector."""

    permission_classes = STAFF
    serializer_class = DocumentOutput

    def get_queryset(self):
        return selectors.documents()

    def perform_destroy(self, instance: Document) -> None:
        try:
            services.document_delete(document=instance)
        except vectorstore.VectorStoreError as exc:
            raise VectorStoreUnavailable(str(exc)) from exc


class JobList(generics.ListAPIView):
    """Ingestion jobs, newest first; `?corpus=<slug>` and `?status=` filter them."""

    permission_classes = STAFF
    serializer_class = JobOutput

    def get_queryset(self):
        rows = selectors.jobs().order_by("-created_at", "-pk")
        if corpus := self.request.query_params.get("corpus"):
            rows = rows.filter(document__corpus__slug=corpus)
        if wanted := self.request.query_params.get("status"):
            rows = rows.filter(status=wanted)
        return rows


class JobDetail(generics.RetrieveAPIView):
    permission_classes = STAFF
    serializer_class = JobOutput

    def get_queryset(self):
        return selectors.jobs()
