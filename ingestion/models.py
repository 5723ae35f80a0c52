from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

DEFAULT_PERSONA = (
    "You are R.Massimo, answering as the author of the writings you are given. Answer in "
    "the language of the question, in the author's voice, using only the passages provided. "
    "If the passages do not contain the answer, say so plainly."
)


class Corpus(models.Model):
    class Language(models.TextChoices):
        ITALIAN = "it", "Italiano"
        ENGLISH = "en", "English"

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    language = models.CharField(max_length=8, choices=Language.choices, default=Language.ITALIAN)
    persona_prompt = models.TextField(default=DEFAULT_PERSONA)
    chat_model = models.CharField(
        max_length=200, blank=True, help_text="Blank: the RMASSIMO_CHAT_MODEL setting."
    )
    embed_model = models.CharField(
        max_length=200,
        blank=True,
        validators=[RegexValidator(r"^[^\s]*$", "No spaces in a model name.")],
        help_text="Blank: the RMASSIMO_EMBED_MODEL setting. 'none': BM25 retrieval only.",
    )
    embed_dim = models.PositiveIntegerField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "corpora"

    def __str__(self) -> str:
        return self.name

    @property
    def effective_chat_model(self) -> str:
        return self.chat_model or settings.RMASSIMO_CHAT_MODEL

    @property
    def effective_embed_model(self) -> str:
        """The embedding model name, or "" when retrieval is BM25 alone."""
        model = self.embed_model or settings.RMASSIMO_EMBED_MODEL
        return "" if model.lower() == "none" else model


class Document(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        INDEXING = "indexing", "Indexing"
        INDEXED = "indexed", "Indexed"
        FAILED = "failed", "Failed"
        REMOVED = "removed", "Removed from index"

    corpus = models.ForeignKey(Corpus, on_delete=models.CASCADE, related_name="documents")
    title = models.CharField(max_length=300)
    source = models.CharField(max_length=1000, help_text="Path, URL or uploaded file name.")
    file = models.FileField(upload_to="documents/%Y/%m/", blank=True)
    content_hash = models.CharField(max_length=64, blank=True, db_index=True)
    indexed_hash = models.CharField(max_length=64, blank=True)
    mime_type = models.CharField(max_length=100, blank=True)
    size = models.PositiveBigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    chunk_count = models.PositiveIntegerField(default=0)
    page_count = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["corpus", "title"]
        constraints = [
            models.UniqueConstraint(fields=["corpus", "source"], name="unique_source_per_corpus")
        ]

    def __str__(self) -> str:
        return self.title


class IngestionJob(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        SKIPPED = "skipped", "Skipped (unchanged)"
        FAILED = "failed", "Failed"

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="jobs")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    chunks_total = models.PositiveIntegerField(default=0)
    chunks_done = models.PositiveIntegerField(default=0)
    attempts = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"job {self.pk} for {self.document}"

    @property
    def is_final(self) -> bool:
        return self.status in (self.Status.DONE, self.Status.SKIPPED, self.Status.FAILED)


class Chunk(models.Model):
    """A piece of a document as indexed; the vector store holds the same id and text."""

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    job = models.ForeignKey(IngestionJob, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    text = models.TextField()
    page = models.PositiveIntegerField(null=True, blank=True)
    start = models.PositiveIntegerField(null=True, blank=True)
    end = models.PositiveIntegerField(null=True, blank=True)
    indexed = models.BooleanField(default=False)

    class Meta:
        ordering = ["document", "index"]
        constraints = [
            models.UniqueConstraint(fields=["document", "index"], name="unique_chunk_index")
        ]

    def __str__(self) -> str:
        return f"{self.document_id}:{self.index}"
