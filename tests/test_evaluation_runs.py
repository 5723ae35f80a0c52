"""Evaluation runs through the real queue and worker, checked against figures worked out by
hand for a three-item set over the three-document test corpus (BM25 retrieval)."""

from __future__ import annotations

import io
import json
import math

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from chat.models import Question
from evaluation import services
from evaluation.models import EvaluationResult, EvaluationRun, EvaluationSet
from tests.corpus import build_corpus
from tests.processes import wait_for
from tests.test_pipeline import ask, poll

pytestmark = pytest.mark.django_db(transaction=True)

# The stand-in echoes the last user message (passages, then the question) word by word;
# [[tokens=N]] makes it echo all of it, so "[1]" in a question is a citation of passage 1.
# No digits in the pages: the questions' "[1]" and "[[tokens=400]]" must not match them.
DOCS = {
    "volcanoes.txt": (
        "Vesuvius is the volcano above Naples. Its eruption in seventy-nine AD buried Pompeii "
        "and Herculaneum under ash and pumice."
    ),
    "bakery.md": (
        "# Sourdough\n\nA sourdough starter is flour and water fermented by wild yeast. Feed "
        "the starter daily and bake the loaf in a hot Dutch oven."
    ),
    "chess.txt": "The Sicilian Defence is a chess opening; grandmasters favour the Najdorf.",
}
SET = [
    # Right: the volcano page is the only match.
    {
        "question": "When did Vesuvius bury Pompeii? [1] [[tokens=400]]",
        "language": "en",
        "documents": ["volcanoes"],
        "facts": ["seventy-nine AD", "Etna"],
    },
    # Wrong at the top: the bakery page matches three words, the expected volcano page one,
    # so it comes second; the answer cites passage 1, the bakery.
    {
        "question": "Feed sourdough starter near Vesuvius? [1] [[tokens=400]]",
        "language": "en",
        "documents": ["volcanoes.txt"],
        "facts": ["pumice"],
    },
    # Nothing in the corpus: "I don't know" without asking the model.
    {"question": "Capitale dell'Australia?", "language": "it", "answerable": False},
]


def _corpus(tmp_path):
    corpus = build_corpus(slug="evalcorpus", docs=DOCS, embed_model="none", min_relevance_bm25=0.1)
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in SET))
    call_command("evaluate", "import", str(path), "--corpus", corpus.slug, "--set", "hand")
    return corpus


def _run(*args) -> dict:
    out = io.StringIO()
    call_command(
        "evaluate",
        "run",
        "--corpus",
        "evalcorpus",
        "--set",
        "hand",
        "--json",
        "--timeout",
        "120",
        *args,
        stdout=out,
    )
    return json.loads(out.getvalue())


def test_a_run_gives_the_figures_worked_out_by_hand(live, tmp_path):
    _corpus(tmp_path)
    live.reset_calls()
    summary = _run()
    ndcg_second = 1 / math.log2(3)  # the relevant document at rank 2
    assert summary["items"] == 3 and summary["failed"] == 0
    assert summary["metrics"] == pytest.approx(
        {
            "hit@1": 0.5,
            "recall@k": 1.0,
            "mrr": (1 + 1 / 2) / 2,
            "ndcg@k": (1 + ndcg_second) / 2,
            "citation_precision": (1 + 0) / 2,
            "citation_recall": (1 + 0) / 2,
            "fact_recall": (1 / 2 + 1) / 2,
            "abstained_unanswerable": 1.0,
            "refused_answerable": 0.0,
        },
        abs=1e-4,
    )
    assert summary["by_language"]["it"]["abstained_unanswerable"] == 1.0
    assert summary["by_language"]["it"]["mrr"] is None
    assert summary["by_language"]["en"]["mrr"] == pytest.approx(0.75)
    # The model was asked the two answerable questions only.
    prompts = [c["body"]["messages"][-1]["content"] for c in live.calls if c["path"] == "/api/chat"]
    assert len(prompts) == 2
    assert not any("Australia" in prompt for prompt in prompts)

    run = EvaluationRun.objects.get(pk=summary["run"])
    assert run.settings["retrieval"] == ["bm25"] and run.settings["top_k"] >= 2
    second = run.results.get(question__startswith="Feed")
    assert [hit["title"] for hit in second.retrieved][:2] == ["bakery", "volcanoes"]
    assert second.cited == [1]
    # An item's verdict (for comparing runs): expected page found and every fact given.
    assert second.right is True
    assert run.results.get(question__startswith="When").right is False  # no "Etna"
    unanswerable = run.results.get(answerable=False)
    assert unanswerable.abstained and unanswerable.right and unanswerable.retrieved == []
    assert unanswerable.answer.startswith("Non lo so")


def test_retrieval_only_measures_no_answers_and_fail_under_sets_the_exit_code(live, tmp_path):
    _corpus(tmp_path)
    live.reset_calls()
    summary = _run("--retrieval-only", "--fail-under", "mrr=0.7")
    assert summary["metrics"]["mrr"] == pytest.approx(0.75)
    for key in ("citation_precision", "citation_recall", "fact_recall"):
        assert summary["metrics"][key] is None
    assert summary["metrics"]["abstained_unanswerable"] == 1.0
    assert not [c for c in live.calls if c["path"] == "/api/chat"]
    assert EvaluationResult.objects.filter(run_id=summary["run"], answer="").count() == 3

    with pytest.raises(CommandError, match=r"mrr = 0.75 \(below 0.8\)") as failed:
        _run("--retrieval-only", "--fail-under", "mrr=0.8")
    assert failed.value.returncode == 1
    with pytest.raises(CommandError, match="fact_recall was not measured") as failed:
        _run("--retrieval-only", "--fail-under", "fact_recall=0.1")
    assert failed.value.returncode == 1
    assert EvaluationSet.objects.get(name="hand").runs.count() == 3


def test_a_judge_that_gives_no_verdict_is_counted_not_guessed(live, tmp_path):
    _corpus(tmp_path)
    live.reset_calls()
    # The stand-in echoes the judge's prompt instead of saying YES or NO.
    summary = _run("--judge-model", settings.RMASSIMO_CHAT_MODEL)
    assert summary["judge"] == {"faithfulness": None, "judged": 0, "failures": 2}
    judged = EvaluationResult.objects.filter(run_id=summary["run"]).exclude(judge_prompt="")
    assert judged.count() == 2  # the unanswerable item was not answered, so not judged
    for result in judged:
        assert result.answer in result.judge_prompt and result.judge_verdict.startswith("Echo:")


def test_a_question_goes_before_the_waiting_evaluation_items(live, api, tmp_path):
    corpus = _corpus(tmp_path)
    items = [
        {"question": f"Vesuvius Pompeii number {n}?", "language": "en", "documents": ["volcanoes"]}
        for n in range(6)
    ]
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in items))
    call_command("evaluate", "import", str(path), "--corpus", corpus.slug, "--set", "many")
    live.configure(latency=0.5)  # each answer takes half a second on the one GPU worker
    run = services.run_start(evaluation_set=EvaluationSet.objects.get(name="many"))
    wait_for(
        lambda: run.results.filter(status="running").exists(), timeout=60, what="an item to start"
    )
    asked = ask(api.owner, text="When did Vesuvius bury Pompeii?", corpus=corpus.slug)
    answered = poll(api.owner, asked["id"], timeout=60)
    assert answered["status"] == "done"
    finished_at = Question.objects.get(pk=asked["id"]).finished_at
    # At most the item running when it was asked (and one the worker had already taken).
    assert run.results.filter(finished_at__lt=finished_at).count() <= 2
    wait_for(lambda: EvaluationRun.objects.get(pk=run.pk).is_final, timeout=60, what="the run")
