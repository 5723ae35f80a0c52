"""Evaluation sets (questions with their expected documents, facts, or "unanswerable"),
runs of a set through the workers, and each item's result with its metrics."""

from django.conf import settings as conf
from django.db import models

from ingestion.models import Corpus

# The metrics of a run, in the order they are shown; `null` where a run could not measure one.
METRICS = (
    "hit@1",
    "recall@k",
    "mrr",
    "ndcg@k",
    "citation_precision",
    "citation_recall",
    "fact_recall",
    "abstained_unanswerable",
    "refused_answerable",
)
# Lower is better for these; for every other metric higher is better.
LOWER_IS_BETTER = frozenset({"refused_answerable"})


class EvaluationSet(models.Model):
    corpus = models.ForeignKey(Corpus, on_delete=models.CASCADE, related_name="evaluation_sets")
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["corpus", "name"]
        constraints = [
            models.UniqueConstraint(fields=["corpus", "name"], name="unique_set_name_per_corpus")
        ]

    def __str__(self) -> str:
        return f"{self.corpus.slug}/{self.name}"


class EvaluationItem(models.Model):
    evaluation_set = models.ForeignKey(
        EvaluationSet, on_delete=models.CASCADE, related_name="items"
    )
    position = models.PositiveIntegerField(default=0)
    question = models.TextField()
    language = models.CharField(max_length=8)
    documents = models.JSONField(
        default=list, blank=True, help_text="Expected documents, by title or source."
    )
    page = models.PositiveIntegerField(
        null=True, blank=True, help_text="The page of the expected document that answers it."
    )
    facts = models.JSONField(
        default=list, blank=True, help_text="Short strings a right answer contains."
    )
    answerable = models.BooleanField(
        default=True, help_text="Off: the corpus does not hold the answer; 'I don't know' is right."
    )

    class Meta:
        ordering = ["evaluation_set", "position", "id"]

    def __str__(self) -> str:
        return self.question[:80]


class EvaluationRun(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    evaluation_set = models.ForeignKey(EvaluationSet, on_delete=models.CASCADE, related_name="runs")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    retrieval_only = models.BooleanField(default=False)
    judge_model = models.CharField(max_length=200, blank=True)
    settings = models.JSONField(
        default=dict, blank=True, help_text="Models, retrieval mode, top-k and chunking used."
    )
    metrics = models.JSONField(default=dict, blank=True)
    metrics_by_language = models.JSONField(default=dict, blank=True)
    judge = models.JSONField(
        default=dict, blank=True, help_text="Faithfulness by the judge model and its failures."
    )
    items_total = models.PositiveIntegerField(default=0)
    items_done = models.PositiveIntegerField(default=0)
    items_failed = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(
        conf.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    FINAL = (Status.DONE, Status.FAILED)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"run {self.pk} of {self.evaluation_set}"

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL

    @property
    def progress(self) -> str:
        return f"{self.items_done} / {self.items_total}"


class EvaluationResult(models.Model):
    """One item of a run: what was retrieved, the answer, what it cited and its metrics."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    run = models.ForeignKey(EvaluationRun, on_delete=models.CASCADE, related_name="results")
    item = models.ForeignKey(
        EvaluationItem, null=True, on_delete=models.SET_NULL, related_name="results"
    )
    # The item as it was when the run started: sets can be edited or imported again.
    question = models.TextField()
    language = models.CharField(max_length=8)
    answerable = models.BooleanField(default=True)
    expected = models.JSONField(
        default=list, blank=True, help_text="Ids of the expected documents found in the corpus."
    )
    page = models.PositiveIntegerField(null=True, blank=True)
    facts = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    attempts = models.PositiveIntegerField(default=0)
    retrieved = models.JSONField(default=list, blank=True)
    retrieval_mode = models.CharField(max_length=16, blank=True)
    model = models.CharField(max_length=200, blank=True)
    relevance = models.FloatField(
        null=True, blank=True, help_text="The score the 'I don't know' threshold is compared to."
    )
    abstained = models.BooleanField(null=True, blank=True)
    answer = models.TextField(blank=True)
    cited = models.JSONField(default=list, blank=True, help_text="Passage numbers cited.")
    metrics = models.JSONField(default=dict, blank=True)
    right = models.BooleanField(null=True, blank=True)
    judge_prompt = models.TextField(blank=True)
    judge_verdict = models.TextField(blank=True)
    error = models.TextField(blank=True)
    worker = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "id"]

    def __str__(self) -> str:
        return self.question[:80]
