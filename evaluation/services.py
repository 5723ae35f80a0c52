"""Writes for evaluation: importing sets, starting runs, and the item job the GPU workers run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from statistics import fmean

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from chat import grounding, prompts
from core import llm, vectorstore
from evaluation import metrics
from evaluation.formats import Item
from evaluation.models import EvaluationItem, EvaluationResult, EvaluationRun, EvaluationSet
from ingestion.models import Corpus, Document
from workers import identity

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Imported:
    evaluation_set: EvaluationSet
    created: int
    updated: int
    removed: int


def set_import(*, corpus: Corpus, name: str, items: list[Item]) -> Imported:
    """Make the set `name` of `corpus` hold exactly `items`, in their order.

    An item keeps its row (and so its history across runs) while its question text stays
    the same; items no longer in the file are removed. All or nothing.
    """
    with transaction.atomic():
        evaluation_set, _ = EvaluationSet.objects.get_or_create(corpus=corpus, name=name)
        existing = {row.question: row for row in evaluation_set.items.all()}
        created = updated = 0
        for position, item in enumerate(items):
            fields = {
                "position": position,
                "language": item.language,
                "documents": item.documents,
                "page": item.page,
                "facts": item.facts,
                "answerable": item.answerable,
            }
            row = existing.pop(item.question, None)
            if row is None:
                EvaluationItem.objects.create(
                    evaluation_set=evaluation_set, question=item.question, **fields
                )
                created += 1
            elif any(getattr(row, key) != value for key, value in fields.items()):
                for key, value in fields.items():
                    setattr(row, key, value)
                row.save()
                updated += 1
        removed = len(existing)
        EvaluationItem.objects.filter(pk__in=[row.pk for row in existing.values()]).delete()
        evaluation_set.save(update_fields=["updated_at"])
    return Imported(evaluation_set, created, updated, removed)


# --- runs -------------------------------------------------------------------------------


def _document_index(corpus: Corpus) -> dict[str, int]:
    """Every name an item may use for a document: its title, source, and the source's file
    name with and without extension."""
    index: dict[str, int] = {}
    rows = (
        Document.objects.filter(corpus=corpus)
        .exclude(status=Document.Status.REMOVED)
        .order_by("pk")
        .values_list("pk", "title", "source")
    )
    for pk, title, source in rows:
        name = PurePosixPath(source.replace("\\", "/").rstrip("/")).name
        for key in (title, source, name, PurePosixPath(name).stem):
            index.setdefault(key, pk)
    return index


def run_start(
    *,
    evaluation_set: EvaluationSet,
    retrieval_only: bool = False,
    judge_model: str = "",
    created_by=None,
) -> EvaluationRun:
    """Record a run and one result per item, and queue the items at batch priority once
    committed (questions from people keep going first)."""
    from evaluation.tasks import evaluate_item

    corpus = evaluation_set.corpus
    items = list(evaluation_set.items.all())
    if not items:
        raise ValueError(f"The set '{evaluation_set}' has no items.")
    index = _document_index(corpus)
    unmatched: set[str] = set()
    run_settings = {
        "llm_backend": settings.RMASSIMO_LLM_BACKEND,
        "chat_model": corpus.effective_chat_model,
        "embed_model": corpus.embed_model or settings.RMASSIMO_EMBED_MODEL,
        "top_k": settings.RMASSIMO_TOP_K,
        "chunk_size": settings.RMASSIMO_CHUNK_SIZE,
        "chunk_overlap": settings.RMASSIMO_CHUNK_OVERLAP,
        "min_relevance_bm25": grounding.min_relevance(corpus, "bm25"),
        "min_relevance_dense": grounding.min_relevance(corpus, "hybrid"),
    }
    with transaction.atomic():
        run = EvaluationRun.objects.create(
            evaluation_set=evaluation_set,
            retrieval_only=retrieval_only,
            judge_model=judge_model if not retrieval_only else "",
            settings=run_settings,
            items_total=len(items),
            created_by=created_by,
        )
        results = []
        for item in items:
            expected = [index[name] for name in item.documents if name in index]
            unmatched.update(name for name in item.documents if name not in index)
            results.append(
                EvaluationResult(
                    run=run,
                    item=item,
                    question=item.question,
                    language=item.language,
                    answerable=item.answerable,
                    expected=sorted(set(expected)),
                    page=item.page,
                    facts=item.facts,
                    metrics={"unmatched": len(item.documents) - len(set(expected))},
                )
            )
        EvaluationResult.objects.bulk_create(results)
        if unmatched:
            run.settings["unmatched_documents"] = sorted(unmatched)
            run.save(update_fields=["settings"])
        ids = list(run.results.values_list("pk", flat=True))
        transaction.on_commit(lambda: [evaluate_item.apply_async(args=[pk]) for pk in ids])
    return run


def result_evaluate(*, result_id: int) -> None:
    """One item on this worker: retrieve, answer (unless retrieval only), measure. A second
    delivery of the same item does nothing (the claim decides)."""
    now = timezone.now()
    claimed = EvaluationResult.objects.filter(
        pk=result_id, status=EvaluationResult.Status.QUEUED
    ).update(
        status=EvaluationResult.Status.RUNNING,
        started_at=now,
        attempts=F("attempts") + 1,
        worker=identity.worker_name(),
    )
    if not claimed:
        return
    result = EvaluationResult.objects.select_related("run__evaluation_set__corpus").get(
        pk=result_id
    )
    run = result.run
    EvaluationRun.objects.filter(pk=run.pk, status=EvaluationRun.Status.QUEUED).update(
        status=EvaluationRun.Status.RUNNING, started_at=now
    )
    try:
        fields = _evaluate(result, run, run.evaluation_set.corpus)
        status = EvaluationResult.Status.DONE
    except (llm.LLMError, vectorstore.VectorStoreError) as exc:
        logger.warning("evaluation item %s failed: %s", result_id, exc)
        fields, status = {"error": str(exc)[:2000]}, EvaluationResult.Status.FAILED
    except Exception:
        logger.exception("evaluation item %s failed unexpectedly", result_id)
        fields = {"error": "An internal error stopped this item; see the worker's log."}
        status = EvaluationResult.Status.FAILED
    with transaction.atomic():
        finished = EvaluationResult.objects.filter(
            pk=result_id, status=EvaluationResult.Status.RUNNING
        ).update(status=status, finished_at=timezone.now(), **fields)
        if finished:
            EvaluationRun.objects.filter(pk=run.pk).update(
                items_done=F("items_done") + 1,
                items_failed=F("items_failed") + int(status == EvaluationResult.Status.FAILED),
            )
    run_finish(run_id=run.pk)


def _evaluate(result: EvaluationResult, run: EvaluationRun, corpus: Corpus) -> dict:
    base_url = identity.ollama_url()
    found = grounding.retrieve(
        corpus=corpus, text=result.question, base_url=base_url, top_k=run.settings["top_k"]
    )
    retrieved = [
        {
            "document": hit.document_id,
            "title": hit.title,
            "page": hit.page,
            "chunk": hit.chunk_index,
            "score": hit.score,
            "text": hit.text[:_PASSAGE_CHARS],
        }
        for hit in found.hits
    ]
    values: dict = {}
    if result.answerable:
        values.update(
            metrics.retrieval(
                expected=result.expected,
                unmatched=result.metrics.get("unmatched", 0),
                page=result.page,
                retrieved=retrieved,
                k=run.settings["top_k"],
            )
        )
    fields = {
        "retrieved": retrieved,
        "retrieval_mode": found.mode,
        "relevance": found.relevance,
    }
    abstained = not found.relevant
    if run.retrieval_only:
        values.update(metrics.abstention(answerable=result.answerable, abstained=abstained))
    else:
        language = grounding.question_language(result.question, default=corpus.language)
        sentence = grounding.no_answer_sentence(corpus, language)
        chat_model = corpus.effective_chat_model
        fields["model"] = llm.answering_model(chat_model)
        cited: list[int] = []
        if abstained:
            text = sentence  # the chat does not ask the model to answer from nothing
        else:
            messages = prompts.answer_messages(
                persona=corpus.persona_prompt,
                history=[],
                hits=found.hits,
                question=result.question,
                no_answer=sentence,
            )
            text = llm.complete_chat(messages, model=chat_model, base_url=base_url)
            abstained = grounding.is_no_answer(text, corpus)
            cited = grounding.cited_numbers(text, len(found.hits))
        values.update(
            metrics.answer(
                answerable=result.answerable,
                expected=result.expected,
                facts=result.facts,
                passages=retrieved,
                text=text,
                abstained=abstained,
                cited=cited,
            )
        )
        fields.update(answer=text, cited=cited)
        if run.judge_model and not abstained and found.hits:
            fields.update(_judge(run.judge_model, found.hits, result.question, text, base_url))
    fields["abstained"] = abstained
    fields["right"] = metrics.is_right(
        answerable=result.answerable,
        values=values,
        abstained=abstained,
        answered=not run.retrieval_only,
    )
    fields["metrics"] = {**values, "unmatched": result.metrics.get("unmatched", 0)}
    return fields


_PASSAGE_CHARS = 1000
JUDGE_PROMPT = (
    "You check whether an answer is supported by the passages it was written from.\n\n"
    "Passages:\n{passages}\n\nQuestion: {question}\n\nAnswer: {answer}\n\n"
    "Is every statement in the answer supported by the passages? Reply with one word: "
    "YES or NO."
)


def _judge(model: str, hits, question: str, answer: str, base_url: str) -> dict:
    """Faithfulness by a judge model; a failure or an unreadable verdict is recorded as
    such and counted, never guessed."""
    passages = "\n\n".join(f"[{n}] {hit.text}" for n, hit in enumerate(hits, start=1))
    prompt = JUDGE_PROMPT.format(passages=passages, question=question, answer=answer)
    try:
        verdict = llm.complete_chat(
            [{"role": "user", "content": prompt}], model=model, base_url=base_url
        ).strip()
    except llm.LLMError as exc:
        verdict = f"(failed: {exc})"
    return {"judge_prompt": prompt, "judge_verdict": verdict[:2000]}


def judge_value(verdict: str) -> float | None:
    words = verdict.strip().split()
    first = words[0].strip(".,:;!*").upper() if words else ""
    return {"YES": 1.0, "NO": 0.0}.get(first)


def run_finish(*, run_id: int) -> bool:
    """Once no item is left, compute the run's means; idempotent."""
    results = EvaluationResult.objects.filter(run_id=run_id)
    if results.filter(
        status__in=[EvaluationResult.Status.QUEUED, EvaluationResult.Status.RUNNING]
    ).exists():
        return False
    done = list(
        results.filter(status=EvaluationResult.Status.DONE).values(
            "language", "metrics", "judge_prompt", "judge_verdict", "retrieval_mode", "model"
        )
    )
    by_language: dict[str, list[dict]] = {}
    for row in done:
        by_language.setdefault(row["language"], []).append(row["metrics"])
    judged = [row for row in done if row["judge_prompt"]]
    verdicts = [judge_value(row["judge_verdict"]) for row in judged]
    readable = [v for v in verdicts if v is not None]
    judge = {}
    if judged:
        judge = {
            "faithfulness": round(fmean(readable), 4) if readable else None,
            "judged": len(readable),
            "failures": len(verdicts) - len(readable),
        }
    run = EvaluationRun.objects.get(pk=run_id)
    run_settings = {
        **run.settings,
        "retrieval": sorted({row["retrieval_mode"] for row in done if row["retrieval_mode"]}),
    }
    models_used = sorted({row["model"] for row in done if row["model"]})
    if models_used:
        run_settings["answering_model"] = models_used
    failed = results.filter(status=EvaluationResult.Status.FAILED).count()
    return bool(
        EvaluationRun.objects.filter(
            pk=run_id, status__in=[EvaluationRun.Status.QUEUED, EvaluationRun.Status.RUNNING]
        ).update(
            status=EvaluationRun.Status.DONE if done else EvaluationRun.Status.FAILED,
            metrics=metrics.means([row["metrics"] for row in done]),
            metrics_by_language={
                lang: metrics.means(rows) for lang, rows in sorted(by_language.items())
            },
            judge=judge,
            settings=run_settings,
            items_done=len(done) + failed,
            items_failed=failed,
            finished_at=timezone.now(),
        )
    )
