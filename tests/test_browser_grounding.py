"""In a real browser: the chat links each [n] marker to its passage and shows cited
passages first; the admin compares two evaluation runs side by side."""

from __future__ import annotations

import pytest

from evaluation.models import EvaluationItem, EvaluationResult, EvaluationRun, EvaluationSet
from ingestion.models import Corpus
from tests.browser import chromium, web_server  # noqa: F401  (fixtures)
from tests.corpus import build_corpus
from tests.test_browser import open_page, shot, start_conversation, turn, wait_status  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _top(page, selector: str) -> float:
    return page.locator(selector).evaluate("e => e.getBoundingClientRect().top")


def test_markers_link_to_their_passages_and_cited_ones_come_first(live, make_user, open_page):  # noqa: F811
    corpus = build_corpus(slug="marks", embed_model="none", min_relevance_bm25=0.0)
    make_user("reader")
    page = open_page("reader")
    conversation = start_conversation(
        page, corpus.slug, "Vesuvius sourdough Najdorf? [2] [[tokens=400]]"
    )
    wait_status(page, 0, "done")
    question = turn(page, 0).get_attribute("data-question")
    for where in ("live", "reloaded"):
        first = turn(page, 0)
        marker = first.locator(".a-body a.cite").first
        assert marker.inner_text() == "[2]"
        assert marker.get_attribute("href") == f"#q{question}-p2"
        cited = first.locator(f"#q{question}-p2")
        assert "cited" in cited.get_attribute("class")
        # The cited passage is shown above passage 1, which the answer did not cite.
        assert _top(page, f"#q{question}-p2") < _top(page, f"#q{question}-p1")
        marker.click()
        assert page.evaluate("location.hash") == f"#q{question}-p2"
        shot(page, f"citations-{where}", cited)
        if where == "live":
            page.goto(f"/c/{conversation}/")
            wait_status(page, 0, "done")


def _run(evaluation_set, items, verdicts, metrics) -> EvaluationRun:
    run = EvaluationRun.objects.create(
        evaluation_set=evaluation_set,
        status="done",
        metrics=metrics,
        settings={"top_k": 4, "retrieval": ["bm25"]},
        items_total=len(items),
        items_done=len(items),
    )
    for item, right in zip(items, verdicts, strict=True):
        EvaluationResult.objects.create(
            run=run, item=item, question=item.question, language="en", status="done", right=right
        )
    return run


def test_two_runs_side_by_side_in_the_admin(django_user_model, open_page, transactional_db):  # noqa: F811
    django_user_model.objects.create_superuser("owner", password="pw-owner")
    corpus = Corpus.objects.create(slug="compared", name="Compared")
    evaluation_set = EvaluationSet.objects.create(corpus=corpus, name="s")
    items = [
        EvaluationItem.objects.create(
            evaluation_set=evaluation_set, question=q, language="en", documents=["d"]
        )
        for q in ("Stays right?", "Gets broken?", "Gets fixed?")
    ]
    a = _run(evaluation_set, items, [True, True, False], {"mrr": 0.5, "refused_answerable": 0.1})
    b = _run(evaluation_set, items, [True, False, True], {"mrr": 0.75, "refused_answerable": 0.3})
    page = open_page("owner")
    page.goto("/admin/evaluation/evaluationrun/")
    page.check(f"input[name=_selected_action][value='{a.pk}']")
    page.check(f"input[name=_selected_action][value='{b.pk}']")
    page.select_option("select[name=action]", "compare")
    page.click("button[name=index]")
    page.wait_for_selector("#metric-deltas")
    mrr = page.locator("#metric-deltas tr[data-metric='mrr'] .delta").inner_text()
    assert mrr == "+0.250 (better)"
    refused = page.locator("#metric-deltas tr[data-metric='refused_answerable'] .delta")
    assert refused.inner_text() == "+0.200 (worse)"  # more answerable questions refused
    assert page.locator("#metric-deltas tr[data-metric='hit@1'] .delta").inner_text() == "-"
    assert page.locator("#broken li").all_inner_texts() == ["Gets broken?"]
    assert page.locator("#fixed li").all_inner_texts() == ["Gets fixed?"]
    shot(page, "evaluation-compare")
