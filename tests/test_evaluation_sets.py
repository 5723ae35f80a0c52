"""Evaluation sets: the JSONL/CSV import, all or nothing."""

from __future__ import annotations

import json

import pytest
from django.core.management import CommandError, call_command

from evaluation.models import EvaluationSet
from ingestion.models import Corpus
from tests.conftest import _client_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def corpus():
    return Corpus.objects.create(slug="demo", name="Demo")


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_import_keeps_every_field_and_reimport_updates_in_place(corpus, tmp_path, capsys):
    rows = [
        {
            "question": "What is the largest document accepted?",
            "language": "en",
            "documents": ["adding-documents", "demo/sharing-gpus.md"],
            "page": 3,
            "facts": ["50 MB"],
        },
        {"question": "Qual è la capitale del Portogallo?", "language": "it", "answerable": False},
    ]
    call_command(
        "evaluate", "import", _write(tmp_path / "s.jsonl", rows), "--corpus", "demo", "--set", "s"
    )
    items = list(EvaluationSet.objects.get(corpus=corpus, name="s").items.all())
    assert [
        (i.question, i.language, i.documents, i.page, i.facts, i.answerable) for i in items
    ] == [
        (
            "What is the largest document accepted?",
            "en",
            ["adding-documents", "demo/sharing-gpus.md"],
            3,
            ["50 MB"],
            True,
        ),
        ("Qual è la capitale del Portogallo?", "it", [], None, [], False),
    ]
    first_id = items[0].pk
    rows[0]["facts"] = ["50 MB", "RMASSIMO_UPLOAD_MAX_BYTES"]
    call_command(
        "evaluate",
        "import",
        _write(tmp_path / "s.jsonl", rows[:1]),
        "--corpus",
        "demo",
        "--set",
        "s",
    )
    (item,) = EvaluationSet.objects.get(corpus=corpus, name="s").items.all()
    assert item.pk == first_id and item.facts == ["50 MB", "RMASSIMO_UPLOAD_MAX_BYTES"]
    assert "1 changed, 1 removed" in capsys.readouterr().out


def test_a_bad_line_is_reported_by_number_and_nothing_is_imported(corpus, tmp_path, capsys):
    good = {"question": "Which port?", "language": "en", "documents": ["what-is-r-massimo"]}
    path = _write(
        tmp_path / "bad.jsonl",
        [
            good,
            '{"question": "broken", ',
            {"question": "No documents?", "language": "en"},
            {"question": "Both?", "language": "en", "answerable": False, "documents": ["x"]},
            {"question": "Typo", "language": "en", "document": ["x"]},
            {"question": "Page", "language": "en", "documents": ["x"], "page": 0},
        ],
    )
    with pytest.raises(CommandError, match="Nothing imported: 5 bad line"):
        call_command("evaluate", "import", path, "--corpus", "demo", "--set", "s")
    err = capsys.readouterr().err
    for number in (2, 3, 4, 5, 6):
        assert f"bad.jsonl:{number}:" in err
    assert "bad.jsonl:1:" not in err
    assert not EvaluationSet.objects.filter(name="s").exists()


def test_csv_import(corpus, tmp_path):
    path = tmp_path / "s.csv"
    path.write_text(
        "question,language,documents,page,facts,answerable\n"
        "Which port?,en,what-is-r-massimo|sharing-gpus,,8000|API,\n"
        "Chi ha scritto I promessi sposi?,it,,,,no\n"
    )
    call_command("evaluate", "import", str(path), "--corpus", "demo", "--set", "c")
    items = list(EvaluationSet.objects.get(name="c").items.all())
    assert items[0].documents == ["what-is-r-massimo", "sharing-gpus"]
    assert items[0].facts == ["8000", "API"] and items[0].answerable
    assert not items[1].answerable and items[1].documents == []


def test_shipped_sets_import(corpus, settings):
    root = settings.BASE_DIR / "evaluation" / "sets"
    call_command(
        "evaluate", "import", str(root / "demo.jsonl"), "--corpus", "demo", "--set", "demo"
    )
    demo = EvaluationSet.objects.get(name="demo").items
    assert {"en", "it"} <= set(demo.values_list("language", flat=True))
    assert demo.filter(answerable=False, language="it").exists()
    assert demo.filter(answerable=False, language="en").exists()
    call_command(
        "evaluate", "import", str(root / "pydoc.jsonl"), "--corpus", "demo", "--set", "pydoc"
    )
    assert EvaluationSet.objects.get(name="pydoc").items.filter(answerable=True).count() >= 100


def test_runs_api_is_for_staff_with_the_permissions(corpus, api, make_user, tmp_path):
    evaluator = _client_for(
        make_user(
            "evaluator",
            staff=True,
            permissions=("evaluation.view_evaluationrun", "evaluation.add_evaluationrun"),
        )
    )
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"question": "Which port?", "language": "en", "documents": ["x"]}))
    call_command("evaluate", "import", str(path), "--corpus", "demo", "--set", "s")
    body = {"corpus": "demo", "set": "s", "retrieval_only": True}
    assert api.anon.post("/api/v1/evaluation/runs/", body, format="json").status_code == 401
    assert api.owner.post("/api/v1/evaluation/runs/", body, format="json").status_code == 403
    assert api.owner.get("/api/v1/evaluation/runs/").status_code == 403
    # Staff without the evaluation permissions (the admin's) may not either.
    assert api.staff.post("/api/v1/evaluation/runs/", body, format="json").status_code == 403
    assert api.staff.get("/api/v1/evaluation/runs/").status_code == 403
    started = evaluator.post("/api/v1/evaluation/runs/", body, format="json")
    assert started.status_code == 202, started.content
    run = started.json()
    assert (run["corpus"], run["set"], run["status"], run["items"]) == ("demo", "s", "queued", 1)
    assert set(run["metrics"]) >= {"hit@1", "recall@k", "mrr", "ndcg@k", "refused_answerable"}
    assert api.owner.get(f"/api/v1/evaluation/runs/{run['id']}/").status_code == 403
    assert api.anon.get(f"/api/v1/evaluation/runs/{run['id']}/").status_code == 401
    assert api.staff.get(f"/api/v1/evaluation/runs/{run['id']}/").status_code == 403
    detail = evaluator.get(f"/api/v1/evaluation/runs/{run['id']}/").json()
    assert detail["id"] == run["id"] and detail["retrieval_only"] is True
    assert [
        r["id"] for r in evaluator.get("/api/v1/evaluation/runs/?corpus=demo").json()["results"]
    ] == [run["id"]]
    missing = evaluator.post("/api/v1/evaluation/runs/", {**body, "set": "nope"}, format="json")
    assert missing.status_code == 400


def test_an_item_with_a_page_needs_that_page_retrieved():
    from evaluation import metrics

    hits = [
        {"document": 7, "page": 2},
        {"document": 9, "page": 3},
        {"document": 7, "page": 3},
        {"document": 7, "page": 2},
    ]
    by_document = metrics.retrieval(expected=[7], unmatched=0, page=None, retrieved=hits, k=4)
    assert by_document["hit@1"] == 1.0 and by_document["mrr"] == 1.0
    by_page = metrics.retrieval(expected=[7], unmatched=0, page=3, retrieved=hits, k=4)
    assert by_page["hit@1"] == 0.0 and by_page["mrr"] == pytest.approx(1 / 3)
    missing = metrics.retrieval(expected=[7], unmatched=1, page=None, retrieved=hits, k=4)
    assert missing["recall@k"] == 0.5  # a named document that is not in the corpus counts
