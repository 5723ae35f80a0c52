"""Grounding: the passages for a question, whether the corpus holds an answer at all, and
which passages an answer cites.

The answer job and the evaluation runs both go through here, so that what an evaluation
measures is what the chat does.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from core import llm, vectorstore
from ingestion import selectors as corpus_selectors
from ingestion.models import NO_ANSWER_EN, NO_ANSWER_IT, Corpus

NO_ANSWER = {"en": NO_ANSWER_EN, "it": NO_ANSWER_IT}

# A handful of the commonest words tells Italian from English in a one-line question well
# enough, and gives the same verdict every time (statistical detectors do not on short text).
_WORDS = {
    "it": set(
        "il lo la i gli le un una di da del della dei delle in con su per tra che chi cosa "
        "come dove quando quale quali quanto quanti quante perché è sono non si ci mi ti "
        "al alla ai nel nella e o ma anche più qual cos può posso fa fare ha hanno".split()
    ),
    "en": set(
        "the a an of to in on for with from by what who which how where when why is are "
        "was were do does did can could not and or but it this that these those there "
        "has have many much my your their at be".split()
    ),
}
_WORD = re.compile(r"[^\W\d_]+")
_CITATION = re.compile(r"\[(\d{1,3}(?:\s*[,;]\s*\d{1,3})*)\]")


def question_language(text: str, *, default: str) -> str:
    """'it' or 'en' by the common words of the question; `default` when it cannot tell."""
    words = [w.lower() for w in _WORD.findall(text.replace("'", " ").replace("’", " "))]
    scores = {lang: sum(w in vocab for w in words) for lang, vocab in _WORDS.items()}
    if scores["it"] == scores["en"]:
        return default if default in NO_ANSWER else "en"
    return max(scores, key=scores.get)


def no_answer_sentence(corpus: Corpus, language: str) -> str:
    own = {"it": corpus.no_answer_it, "en": corpus.no_answer_en}
    return (own.get(language) or "").strip() or NO_ANSWER.get(language) or NO_ANSWER["en"]


def min_relevance(corpus: Corpus, mode: str) -> float:
    """The corpus' threshold for the retrieval mode, else the setting's default for it."""
    if mode == "hybrid":
        own, default = corpus.min_relevance_dense, settings.RMASSIMO_MIN_RELEVANCE_DENSE
    else:
        own, default = corpus.min_relevance_bm25, settings.RMASSIMO_MIN_RELEVANCE_BM25
    return own if own is not None else default


@dataclass
class Retrieval:
    hits: list[vectorstore.Hit]
    mode: str  # "hybrid" or "bm25"
    # BM25 mode: the best passage's BM25 score; hybrid: the best passage's cosine
    # similarity to the question (fused RRF scores are ranks, not relevance).
    relevance: float
    threshold: float
    ms: float

    @property
    def relevant(self) -> bool:
        return bool(self.hits) and self.relevance >= self.threshold


def retrieve(
    *,
    corpus: Corpus,
    text: str,
    base_url: str,
    top_k: int,
    retry: Callable = lambda call: call(),
) -> Retrieval:
    """Search the corpus for `text`; `retry` wraps each vector store call."""
    started = time.monotonic()
    embed_model = corpus_selectors.embed_model(corpus)
    embedding = None
    if embed_model and retry(lambda: vectorstore.has_dense(corpus.pk)):
        embedding = llm.embed_query(text, model=embed_model, base_url=base_url)
    hits = retry(lambda: vectorstore.search(corpus.pk, text=text, embedding=embedding, top_k=top_k))
    if embedding is not None:
        mode = "hybrid"
        nearest = retry(
            lambda: vectorstore.search(
                corpus.pk, text=text, embedding=embedding, top_k=1, mode="dense"
            )
        )
        relevance = nearest[0].score if nearest else 0.0
    else:
        mode = "bm25"
        relevance = hits[0].score if hits else 0.0
    return Retrieval(
        hits=hits,
        mode=mode,
        relevance=round(relevance, 6),
        threshold=min_relevance(corpus, mode),
        ms=round((time.monotonic() - started) * 1000, 1),
    )


def cited_numbers(answer: str, passages: int) -> list[int]:
    """The passage numbers the answer cites as [n] (also [1, 2]), in order of first citation."""
    seen: list[int] = []
    for match in _CITATION.finditer(answer):
        for part in re.split(r"[,;]", match.group(1)):
            number = int(part)
            if 1 <= number <= passages and number not in seen:
                seen.append(number)
    return seen


def mark_cited(sources: list[dict], answer: str) -> list[dict]:
    cited = set(cited_numbers(answer, len(sources)))
    return [{**source, "cited": n in cited} for n, source in enumerate(sources, start=1)]


def _plain(text: str) -> str:
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c)).replace("’", "'")
    return " ".join(text.split())


def contains(answer: str, fact: str) -> bool:
    """Whether the answer contains the fact, ignoring case, accents and spacing."""
    return _plain(fact) in _plain(answer)


def is_no_answer(answer: str, corpus: Corpus) -> bool:
    """The answer is (or starts with) one of the corpus' "no answer" sentences."""
    plain = _plain(answer)
    return any(plain.startswith(_plain(no_answer_sentence(corpus, lang))) for lang in NO_ANSWER)
