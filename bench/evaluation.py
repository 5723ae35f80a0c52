"""The shipped evaluation sets on their corpora, BM25 and hybrid, through the real stack.

    python bench/evaluation.py            # figures for docs/evaluation.md

Builds the demo corpus (demo/) and the CPython documentation topics corpus twice each: BM25
only, and hybrid with the Ollama stand-in's embeddings (a hashed bag of words: close vectors
for shared words, nothing semantic; real embedding models score differently). Runs each set
retrieval-only with no "I don't know" threshold, then proposes per retrieval mode the
highest threshold that refuses at most 5% of each set's answerable items, and runs again
with it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import ROOT, Stack  # noqa: E402

SETS = ROOT / "evaluation" / "sets"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder.parent)): p.read_bytes() for p in sorted(folder.iterdir())}


def _ingest(corpus, files: dict[str, bytes]) -> None:
    from pathlib import PurePath

    from bench.stack import wait
    from ingestion import services
    from ingestion.models import IngestionJob

    added = services.documents_add(
        corpus=corpus,
        documents=[
            services.NewDocument(source=s, data=d, title=PurePath(s).stem) for s, d in files.items()
        ],
    )
    ids = [a.job.pk for a in added if a.job]
    wait(
        lambda: all(j.is_final for j in IngestionJob.objects.filter(pk__in=ids)),
        1800,
        "ingestion",
    )
    failed = IngestionJob.objects.filter(pk__in=ids, status="failed").count()
    assert not failed, f"{failed} ingestion jobs failed"


def _run(corpus, set_name: str) -> tuple[dict, list]:
    import io

    from django.core.management import call_command

    from evaluation.models import EvaluationRun

    out = io.StringIO()
    call_command(
        "evaluate",
        "run",
        "--corpus",
        corpus.slug,
        "--set",
        set_name,
        "--retrieval-only",
        "--json",
        stdout=out,
    )
    summary = json.loads(out.getvalue())
    run = EvaluationRun.objects.get(pk=summary["run"])
    scores = list(run.results.values_list("answerable", "relevance", "retrieval_mode"))
    return summary, scores


# A refused answerable question costs more than an unanswerable one answered (the model is
# told to say when the passages do not hold the answer): the default refuses at most this
# share of each set's answerable items.
MAX_REFUSED = 0.05


def _threshold(per_set: dict[str, list]) -> float:
    """The highest threshold that refuses at most MAX_REFUSED of each set's answerable items."""
    limits = []
    for rows in per_set.values():
        answerable = sorted(r for a, r, _ in rows if a)
        limits.append(answerable[int(MAX_REFUSED * len(answerable))])
    return round(min(limits), 4)


def _spread(rows: list) -> str:
    def q(values, f):
        values = sorted(values)
        return values[min(len(values) - 1, int(f * len(values)))] if values else float("nan")

    answerable = [r for a, r, _ in rows if a]
    unanswerable = [r for a, r, _ in rows if not a]
    return (
        f"answerable min {min(answerable):.3f} p10 {q(answerable, 0.1):.3f} "
        f"median {q(answerable, 0.5):.3f}; unanswerable median {q(unanswerable, 0.5):.3f} "
        f"max {max(unanswerable):.3f}"
    )


def main() -> None:
    stack = Stack(name="evaluation", redis_db=int(os.environ.get("BENCH_REDIS_DB", "9")))
    try:
        from django.core.management import call_command

        from evaluation.sets import pydoc_corpus
        from ingestion import services

        stub = stack.stub(name="gpu0")
        stack.worker(
            name="gpu0@evaluation",
            queues=["interactive", "batch", "gpu.0", "cpu"],
            ollama_url=stub.url,
            gpu="gpu0",
        )
        topics = Path(tempfile.mkdtemp(prefix="pydoc-topics-")) / "pydoc"
        pydoc_corpus.main(str(topics))
        corpora = {}
        for mode, embed in (("bm25", "none"), ("hybrid", "")):
            for name, folder in (("demo", ROOT / "demo"), ("pydoc", topics)):
                corpus, _ = services.corpus_get_or_create(slug=f"{name}-{mode}")
                corpus.embed_model = embed
                corpus.min_relevance_bm25 = 0.0
                corpus.min_relevance_dense = -1.0
                corpus.save()
                _ingest(corpus, _files(folder))
                call_command(
                    "evaluate", "import", str(SETS / f"{name}.jsonl"),
                    "--corpus", corpus.slug, "--set", name, verbosity=0,
                )  # fmt: skip
                corpora[(name, mode)] = corpus
        figures = {}
        for mode in ("bm25", "hybrid"):
            per_set = {}
            for name in ("demo", "pydoc"):
                summary, rows = _run(corpora[(name, mode)], name)
                per_set[name] = rows
                figures[(name, mode, "no threshold")] = summary["metrics"]
                print(f"{name} {mode} relevance: {_spread(rows)}")
            threshold = _threshold(per_set)
            print(f"{mode}: proposed threshold {threshold}")
            for name in ("demo", "pydoc"):
                corpus = corpora[(name, mode)]
                if mode == "bm25":
                    corpus.min_relevance_bm25 = threshold
                else:
                    corpus.min_relevance_dense = threshold
                corpus.save()
                summary, _ = _run(corpus, name)
                figures[(name, mode, f"threshold {threshold}")] = summary["metrics"]
        keys = [
            "hit@1",
            "recall@k",
            "mrr",
            "ndcg@k",
            "abstained_unanswerable",
            "refused_answerable",
        ]
        print("| set | retrieval | 'I don't know' | " + " | ".join(keys) + " |")
        print("|---|---|---|" + "---|" * len(keys))
        for (name, mode, label), values in figures.items():
            cells = " | ".join("-" if values[k] is None else f"{values[k]:.3f}" for k in keys)
            print(f"| {name} | {mode} | {label} | {cells} |")
    finally:
        stack.close()


if __name__ == "__main__":
    main()
