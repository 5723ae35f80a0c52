"""The metrics of one evaluation item, and their means over a run.

Retrieval measures come from ir-measures (pytrec_eval underneath), over the ranked list of
distinct documents the passages came from (or document pages, where the item names one).
Answer measures are simple shares, described in docs/evaluation.md.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import fmean

import ir_measures
from ir_measures import RR, Success, nDCG
from ir_measures import R as Recall

from chat import grounding
from evaluation.models import METRICS

RETRIEVAL = ("hit@1", "recall@k", "mrr", "ndcg@k")
ANSWER = ("citation_precision", "citation_recall", "fact_recall")
ABSTENTION = ("abstained_unanswerable", "refused_answerable")


def _unit(document: int, page: int | None, by_page: bool) -> str:
    return f"{document}:p{page}" if by_page else str(document)


def retrieval(
    *, expected: list[int], unmatched: int, page: int | None, retrieved: list[dict], k: int
) -> dict:
    """hit@1, recall@k, MRR and nDCG@k of one answerable item.

    An expected document missing from the corpus still counts as relevant: a set that
    names a document nobody ingested scores lower, it is not quietly shortened.
    """
    by_page = page is not None
    relevant = {_unit(doc, page, by_page) for doc in expected}
    relevant |= {f"missing:{n}" for n in range(unmatched)}
    ranked: list[str] = []
    for hit in retrieved:
        unit = _unit(hit["document"], hit.get("page"), by_page)
        if unit not in ranked:
            ranked.append(unit)
    qrels = [ir_measures.Qrel("q", unit, 1) for unit in relevant]
    # Scores that keep the search's order (pytrec_eval sorts by score).
    run = [
        ir_measures.ScoredDoc("q", unit, float(len(ranked) - i)) for i, unit in enumerate(ranked)
    ]
    names = {Success @ 1: "hit@1", Recall @ k: "recall@k", RR: "mrr", nDCG @ k: "ndcg@k"}
    values = dict.fromkeys(RETRIEVAL, 0.0)  # nothing retrieved: every measure is 0
    if run:
        for metric in ir_measures.iter_calc(list(names), qrels, run):
            values[names[metric.measure]] = round(float(metric.value), 6)
    return values


def answer(
    *,
    answerable: bool,
    expected: list[int],
    facts: list[str],
    passages: list[dict],
    text: str,
    abstained: bool,
    cited: list[int],
) -> dict:
    values: dict[str, float | None] = dict.fromkeys(ANSWER)
    values.update(abstention(answerable=answerable, abstained=abstained))
    if not answerable:
        return values
    expected_set = set(expected)
    cited_docs = [passages[n - 1]["document"] for n in cited if 0 < n <= len(passages)]
    if cited_docs:
        values["citation_precision"] = sum(d in expected_set for d in cited_docs) / len(cited_docs)
    offered = expected_set & {p["document"] for p in passages}
    if offered and not abstained:
        values["citation_recall"] = len(offered & set(cited_docs)) / len(offered)
    if facts:
        values["fact_recall"] = sum(grounding.contains(text, f) for f in facts) / len(facts)
    return {key: (round(v, 6) if v is not None else None) for key, v in values.items()}


def abstention(*, answerable: bool, abstained: bool) -> dict:
    if answerable:
        return {"abstained_unanswerable": None, "refused_answerable": float(abstained)}
    return {"abstained_unanswerable": float(abstained), "refused_answerable": None}


def is_right(*, answerable: bool, values: dict, abstained: bool, answered: bool) -> bool:
    """One verdict per item, for comparing runs: the expected document was retrieved and
    (when answers were made) the answer was given with all its facts; or, for an
    unanswerable item, "I don't know"."""
    if not answerable:
        return abstained
    if not values.get("recall@k"):
        return False
    if answered:
        return not abstained and values.get("fact_recall") in (None, 1.0)
    return True


def means(rows: list[dict]) -> dict:
    """The mean of each metric over the items that have it; None where none has."""
    collected: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for key in METRICS:
            if row.get(key) is not None:
                collected[key].append(row[key])
    return {key: (round(fmean(collected[key]), 4) if collected[key] else None) for key in METRICS}
