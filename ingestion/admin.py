"""The corpus in the Django admin: corpora, documents (upload, ingest, remove, delete) and
ingestion jobs (progress, retry). Adding, ingesting, removing and deleting documents, and
deleting corpora, go through ingestion.services, so the admin never leaves vectors behind;
a corpus' own fields (name, persona, models) are edited as plain rows."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, Q, Sum
from django.http import HttpResponseRedirect
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.text import Truncator

from core import vectorstore
from ingestion import fetching, parsing, selectors, services
from ingestion.jobs import ACTIVE
from ingestion.models import Corpus, Document, IngestionJob

_REFRESH_S = 3


def _short(text: str, length: int = 160) -> str:
    return Truncator(text or "").chars(length)


def _progress(job: IngestionJob) -> str:
    total = max(job.chunks_total, 1)
    return format_html(
        '<progress value="{}" max="{}" style="width:7em"></progress> {} / {}',
        job.chunks_done,
        total,
        job.chunks_done,
        job.chunks_total,
    )


def _any_active(jobs) -> bool:
    return jobs.filter(status__in=ACTIVE).exists()


class _DeletesThroughServices:
    """Jobs and chunks cannot be deleted on their own, but they go with their document."""

    def get_deleted_objects(self, objs, request):
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        perms_needed.discard(IngestionJob._meta.verbose_name)
        return deleted, counts, perms_needed, protected


# Uploading


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput())
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        single = super().clean
        if isinstance(data, list | tuple):
            return [single(item, initial) for item in data]
        return [single(data, initial)] if data else []


class UploadForm(forms.Form):
    corpus = forms.ModelChoiceField(queryset=Corpus.objects.order_by("name"))
    files = MultipleFileField(
        required=False,
        allow_empty_file=True,
        help_text="One or more files: " + parsing.supported_list() + ".",
    )
    urls = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
        help_text="Web pages or files to fetch (http or https), one per line.",
    )

    def clean_files(self):
        # Past a few MB Django has written each file to disk as it arrived; it is checked
        # from its head and copied to storage in chunks, never held whole in memory.
        checked, problems = [], []
        for upload in self.cleaned_data["files"]:
            try:
                parsing.check_size(upload.size)
                parsing.detect_file(upload, name=upload.name)
            except parsing.ParseError as exc:
                problems.append(f"{upload.name}: {exc}")
                continue
            checked.append(upload)
        if problems:
            raise ValidationError(problems)
        return checked

    def clean_urls(self):
        urls = [line.strip() for line in self.cleaned_data["urls"].splitlines() if line.strip()]
        problems = []
        for url in urls:
            try:
                fetching.check_url(url)
            except parsing.ParseError as exc:
                problems.append(str(exc))
        if problems:
            raise ValidationError(problems)
        return urls

    def clean(self):
        data = super().clean()
        if not self.errors and not data.get("files") and not data.get("urls"):
            raise ValidationError("Choose at least one file or give a URL.")
        return data


# Corpora


@admin.register(Corpus)
class CorpusAdmin(_DeletesThroughServices, admin.ModelAdmin):
    list_display = [
        "name",
        "slug",
        "language",
        "chat_model_shown",
        "retrieval",
        "documents_indexed",
        "chunks",
        "upload_link",
    ]
    search_fields = ["name", "slug", "description"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["embed_dim", "created_at", "upload_link"]
    fieldsets = [
        (None, {"fields": ["name", "slug", "description", "language", "upload_link"]}),
        ("Persona", {"fields": ["persona_prompt"]}),
        ("Models", {"fields": ["chat_model", "embed_model", "embed_dim"]}),
        (
            "When the corpus holds no answer",
            {
                "fields": [
                    "no_answer_en",
                    "no_answer_it",
                    "min_relevance_bm25",
                    "min_relevance_dense",
                ]
            },
        ),
        (None, {"fields": ["created_at"]}),
    ]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                _indexed=Count("documents", filter=Q(documents__status=Document.Status.INDEXED)),
                _chunks=Sum("documents__chunk_count"),
            )
        )

    @admin.display(description="chat model")
    def chat_model_shown(self, corpus: Corpus) -> str:
        # The model that answers: without Ollama the embedded one, whatever the corpus names.
        return _answering_model(corpus.effective_chat_model)

    @admin.display(description="retrieval")
    def retrieval(self, corpus: Corpus) -> str:
        model = selectors.embed_model(corpus)
        if model and selectors.corpus_retrieval(corpus) == "bm25":
            return "BM25 only (indexed without embeddings)"
        return f"hybrid ({model} + BM25)" if model else "BM25 only"

    @admin.display(description="indexed documents", ordering="_indexed")
    def documents_indexed(self, corpus: Corpus) -> int:
        return corpus._indexed

    @admin.display(description="chunks", ordering="_chunks")
    def chunks(self, corpus: Corpus) -> int:
        return corpus._chunks or 0

    @admin.display(description="")
    def upload_link(self, corpus: Corpus) -> str:
        if not corpus.pk:
            return "-"
        url = reverse("admin:ingestion_document_upload") + f"?corpus={corpus.pk}"
        return format_html('<a href="{}">Upload documents</a>', url)

    def delete_model(self, request, obj: Corpus) -> None:
        services.corpus_delete(corpus=obj)

    def delete_queryset(self, request, queryset) -> None:
        for corpus in queryset:
            services.corpus_delete(corpus=corpus)


# Documents


class JobInline(admin.TabularInline):
    model = IngestionJob
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True
    ordering = ["-created_at"]
    fields = ["status", "progress", "attempts", "worker", "started_at", "finished_at", "error"]
    readonly_fields = fields

    @admin.display(description="progress")
    def progress(self, job: IngestionJob) -> str:
        return _progress(job)


@admin.register(Document)
class DocumentAdmin(_DeletesThroughServices, admin.ModelAdmin):
    change_list_template = "admin/ingestion/document/change_list.html"
    change_form_template = "admin/ingestion/document/change_form.html"
    list_display = [
        "title",
        "corpus",
        "status",
        "chunk_count",
        "page_count",
        "short_hash",
        "last_job",
        "error_short",
        "updated_at",
    ]
    list_filter = ["corpus", "status", "mime_type"]
    search_fields = ["title", "source", "content_hash"]
    list_select_related = ["corpus"]
    readonly_fields = [
        "corpus",
        "title",
        "source",
        "file",
        "mime_type",
        "size",
        "status",
        "chunk_count",
        "page_count",
        "content_hash",
        "indexed_hash",
        "error",
        "created_at",
        "updated_at",
    ]
    inlines = [JobInline]
    actions = ["ingest", "reingest", "remove_from_index", "delete_selected"]

    def get_queryset(self, request):
        return selectors.documents()

    def has_change_permission(self, request, obj=None) -> bool:
        # Everything shown is written by the pipeline; the actions are the way to change it.
        return False

    @admin.display(description="hash", ordering="content_hash")
    def short_hash(self, document: Document) -> str:
        return document.content_hash[:12]

    @admin.display(description="last job", ordering="last_job_status")
    def last_job(self, document: Document) -> str:
        if not document.last_job_id:
            return "-"
        url = reverse("admin:ingestion_ingestionjob_change", args=[document.last_job_id])
        return format_html(
            '<a href="{}">#{} {}</a>', url, document.last_job_id, document.last_job_status
        )

    @admin.display(description="error")
    def error_short(self, document: Document) -> str:
        return _short(document.error)

    def get_urls(self):
        upload = path(
            "upload/",
            self.admin_site.admin_view(self.upload_view),
            name="ingestion_document_upload",
        )
        return [upload, *super().get_urls()]

    def add_view(self, request, form_url="", extra_context=None):
        return redirect("admin:ingestion_document_upload")

    def upload_view(self, request):
        if not self.has_add_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            form = UploadForm(request.POST, request.FILES)
            if form.is_valid():
                return self._add_all(request, form.cleaned_data)
        else:
            form = UploadForm(initial={"corpus": request.GET.get("corpus")})
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Upload documents",
            "form": form,
            "max_bytes": settings.RMASSIMO_UPLOAD_MAX_BYTES,
        }
        return TemplateResponse(request, "admin/ingestion/document/upload.html", context)

    def _add_all(self, request, data) -> HttpResponseRedirect:
        corpus = data["corpus"]
        queued = unchanged = failed = 0
        files = [services.NewDocument(source=f.name, upload=f) for f in data["files"]]
        for added in services.documents_add(corpus=corpus, documents=files):
            queued, unchanged, failed = _count(added, queued, unchanged, failed)
        for url in data["urls"]:
            added = services.document_add_url(corpus=corpus, url=url)
            queued, unchanged, failed = _count(added, queued, unchanged, failed)
        self.message_user(
            request,
            f"{queued} queued for ingestion, {unchanged} unchanged (already indexed), "
            f"{failed} refused.",
            messages.WARNING if failed else messages.SUCCESS,
        )
        changelist = reverse("admin:ingestion_document_changelist")
        return HttpResponseRedirect(f"{changelist}?corpus__id__exact={corpus.pk}")

    def changelist_view(self, request, extra_context=None):
        extra_context = {
            **(extra_context or {}),
            "auto_refresh": _REFRESH_S if _any_active(IngestionJob.objects) else None,
        }
        return super().changelist_view(request, extra_context)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        active = object_id.isdigit() and _any_active(
            IngestionJob.objects.filter(document=object_id)
        )
        extra_context = {**(extra_context or {}), "auto_refresh": _REFRESH_S if active else None}
        return super().change_view(request, object_id, form_url, extra_context)

    def has_ingest_permission(self, request) -> bool:
        # Ingesting, re-ingesting and removing from the index change a document's state,
        # though its fields are never edited in a form.
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")

    @admin.action(
        description="Ingest selected documents (those not indexed)", permissions=["ingest"]
    )
    def ingest(self, request, queryset):
        jobs = [services.document_ingest(document=d) for d in queryset]
        count = sum(1 for job in jobs if job is not None)
        self.message_user(request, f"{count} document(s) queued; the others were indexed.")

    @admin.action(
        description="Re-ingest selected documents (parse and embed again)",
        permissions=["ingest"],
    )
    def reingest(self, request, queryset):
        count = sum(1 for d in queryset if services.document_ingest(document=d, force=True))
        self.message_user(request, f"{count} document(s) queued for re-ingestion.")

    @admin.action(
        description="Remove selected documents from the index (keep them listed)",
        permissions=["ingest"],
    )
    def remove_from_index(self, request, queryset):
        try:
            for document in queryset:
                services.document_remove_from_index(document=document)
        except vectorstore.VectorStoreError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        self.message_user(request, f"{queryset.count()} document(s) removed from the index.")

    def delete_model(self, request, obj: Document) -> None:
        try:
            services.document_delete(document=obj)
        except vectorstore.VectorStoreError as exc:
            self.message_user(request, f"Not deleted: {exc}", messages.ERROR)

    def delete_queryset(self, request, queryset) -> None:
        try:
            services.documents_delete(documents=queryset)
        except vectorstore.VectorStoreError as exc:
            # The documents before the failure are gone with their vectors; the rest stay.
            self.message_user(request, f"Not all deleted: {exc}", messages.ERROR)


def _count(added: services.Added, queued: int, unchanged: int, failed: int):
    if added.skipped:
        return queued, unchanged + 1, failed
    if added.job.status == IngestionJob.Status.FAILED:
        return queued, unchanged, failed + 1
    return queued + 1, unchanged, failed


# Jobs


@admin.register(IngestionJob)
class IngestionJobAdmin(admin.ModelAdmin):
    change_list_template = "admin/ingestion/ingestionjob/change_list.html"
    list_display = [
        "id",
        "document_link",
        "corpus",
        "status",
        "progress",
        "attempts",
        "worker",
        "created_at",
        "started_at",
        "duration",
        "embed_seconds",
        "error_short",
    ]
    list_filter = ["status", "document__corpus", "worker"]
    search_fields = ["document__title", "document__source", "error", "worker"]
    list_select_related = ["document__corpus"]
    readonly_fields = [
        "document",
        "status",
        "progress",
        "chunks_done",
        "chunks_total",
        "attempts",
        "worker",
        "error",
        "created_at",
        "started_at",
        "heartbeat_at",
        "finished_at",
        "duration",
        "prepare_seconds",
        "embed_seconds",
    ]
    fields = readonly_fields
    actions = ["retry"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        # A job owns the chunk rows of what it indexed; it goes with its document.
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="document", ordering="document__title")
    def document_link(self, job: IngestionJob) -> str:
        url = reverse("admin:ingestion_document_change", args=[job.document_id])
        return format_html('<a href="{}">{}</a>', url, job.document.title)

    @admin.display(description="corpus", ordering="document__corpus__name")
    def corpus(self, job: IngestionJob) -> str:
        return job.document.corpus.name

    @admin.display(description="chunks embedded")
    def progress(self, job: IngestionJob) -> str:
        return _progress(job)

    @admin.display(description="duration (s)")
    def duration(self, job: IngestionJob) -> float | None:
        return job.duration_seconds

    @admin.display(description="error")
    def error_short(self, job: IngestionJob) -> str:
        return _short(job.error)

    def changelist_view(self, request, extra_context=None):
        extra_context = {
            **(extra_context or {}),
            "auto_refresh": _REFRESH_S if _any_active(IngestionJob.objects) else None,
        }
        return super().changelist_view(request, extra_context)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        active = object_id.isdigit() and _any_active(IngestionJob.objects.filter(pk=object_id))
        extra_context = {**(extra_context or {}), "auto_refresh": _REFRESH_S if active else None}
        return super().change_view(request, object_id, form_url, extra_context)

    def has_retry_permission(self, request) -> bool:
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")

    @admin.action(description="Retry failed (or stalled) jobs", permissions=["retry"])
    def retry(self, request, queryset):
        count = services.jobs_retry(jobs=queryset)
        skipped = queryset.count() - count
        note = f"; {skipped} were neither failed nor stalled, or not their document's newest job"
        self.message_user(request, f"{count} job(s) queued again" + (note if skipped else "."))


def _answering_model(model: str) -> str:
    from core import llm

    try:
        return llm.answering_model(model)
    except llm.LLMError:
        return model
