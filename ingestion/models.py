from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

DEFAULT_PERSONA = (
    "You are R.Massimo, answering as the author of the writings you are given. Answer in "
    "the language of the question, in the author's voice, using only the passages provided. "
    "If the passages do not contain the answer, say so plainly."
)
NO_ANSWER_EN = "I don't know: the writings I have do not answer this question."
NO_ANSWER_IT = "Non lo so: gli scritti che ho non rispondono a questa domanda."


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
    # Blank falls back to the built-in sentence, so a corpus form need not repeat it.
    no_answer_en = models.TextField(
        default=NO_ANSWER_EN,
        blank=True,
        help_text="The answer when the corpus holds none, in English. Blank: the default.",
    )
    no_answer_it = models.TextField(
        default=NO_ANSWER_IT,
        blank=True,
        help_text="The answer when the corpus holds none, in Italian. Blank: the default.",
    )
    min_relevance_bm25 = models.FloatField(
        null=True,
        blank=True,
        help_text="BM25 retrieval: below this best-passage score the answer is the 'no "
        "answer' sentence, without asking the model. Blank: RMASSIMO_MIN_RELEVANCE_BM25.",
    )
    min_relevance_dense = models.FloatField(
        null=True,
        blank=True,
        help_text="Hybrid retrieval: below this cosine similarity of the nearest passage the "
        "answer is the 'no answer' sentence. Blank: RMASSIMO_MIN_RELEVANCE_DENSE.",
    )
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
    def configured_embed_model(self) -> str:
        """The embedding model configured, or "" for BM25 alone; which one is really used
        also depends on the LLM backend: `ingestion.selectors.embed_model`."""
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

    @property
    def is_url(self) -> bool:
        """Added by URL: every job fetches the source again."""
        return "://" in self.source


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
    attempts = models.PositiveIntegerField(
        default=0, help_text="Starts of the preparing step since the job was last queued."
    )
    # Every start of the preparing step gets a new run number; embedding batches carry it, so
    # a batch left over from an earlier run does nothing.
    run = models.PositiveIntegerField(default=0, editable=False)
    # The broker's id of the preparing message that holds the job: the same id arriving
    # again is a redelivery after its worker died, not a second copy racing the first.
    task_id = models.CharField(max_length=64, blank=True, editable=False)
    worker = models.CharField(max_length=200, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="Last sign of life from a worker on this job."
    )
    finished_at = models.DateTimeField(null=True, blank=True)
    prepare_seconds = models.FloatField(
        default=0, help_text="Fetching, parsing and chunking (CPU worker)."
    )
    embed_seconds = models.FloatField(
        default=0, help_text="Time inside embedding calls, all batches together."
    )

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return f"job {self.pk} for {self.document}"

    FINAL = (Status.DONE, Status.SKIPPED, Status.FAILED)

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL

    @property
    def progress(self) -> str:
        return f"{self.chunks_done} / {self.chunks_total}"

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at and self.finished_at:
            return round((self.finished_at - self.started_at).total_seconds(), 2)
        return None


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
