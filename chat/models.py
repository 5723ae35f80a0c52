from django.conf import settings
from django.db import models

from ingestion.models import Corpus


class Conversation(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    corpus = models.ForeignKey(Corpus, on_delete=models.PROTECT, related_name="conversations")
    title = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]

    def __str__(self) -> str:
        return self.title or f"conversation {self.pk}"


class Question(models.Model):
    """One question and its answer: the record of the job, whatever the broker does."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    FINAL = (Status.DONE, Status.FAILED, Status.CANCELLED)

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="questions"
    )
    text = models.TextField()
    standalone_text = models.TextField(
        blank=True, help_text="The question rewritten with the conversation, used to retrieve."
    )
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    answer = models.TextField(blank=True)
    # The answer was cut by a stop on its length or on repetition, not ended by the model.
    truncated = models.BooleanField(default=False)
    sources = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    gpu = models.CharField(max_length=32, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    model = models.CharField(max_length=200, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    lease_until = models.DateTimeField(
        null=True, blank=True, help_text="A running attempt renews this; past it, it is dead."
    )
    enqueued_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    first_token_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    retrieval_ms = models.FloatField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    generation_ms = models.FloatField(null=True, blank=True)
    feedback = models.SmallIntegerField(
        null=True, blank=True, choices=[(1, "Thumbs up"), (-1, "Thumbs down")]
    )

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return self.text[:60]

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL

    @property
    def timings(self) -> dict:
        def ms(a, b):
            return round((b - a).total_seconds() * 1000, 1) if a and b else None

        tokens_per_s = None
        if self.completion_tokens and self.generation_ms:
            tokens_per_s = round(self.completion_tokens / (self.generation_ms / 1000), 1)
        return {
            "queued_at": self.created_at,
            "started_at": self.started_at,
            "first_token_at": self.first_token_at,
            "finished_at": self.finished_at,
            "wait_ms": ms(self.created_at, self.started_at),
            "retrieval_ms": self.retrieval_ms,
            "first_token_ms": ms(self.started_at, self.first_token_at),
            "total_ms": ms(self.created_at, self.finished_at),
            "generation_ms": self.generation_ms,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": tokens_per_s,
        }
