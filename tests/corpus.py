"""Building small corpora through the real ingestion path."""

from __future__ import annotations

from ingestion import services
from ingestion.models import Corpus, IngestionJob
from tests.processes import wait_for

DOCS = {
    "volcanoes.txt": (
        "Vesuvius is the volcano above Naples. Its eruption in 79 AD buried Pompeii and "
        "Herculaneum under ash and pumice. Volcanologists watch its magma chamber closely."
    ),
    "bakery.md": (
        "# Sourdough\n\nA sourdough starter is flour and water fermented by wild yeast and "
        "lactobacilli. Feed the starter daily and bake the loaf in a hot Dutch oven."
    ),
    "chess.txt": (
        "The Sicilian Defence answers 1.e4 with c5. Grandmasters favour the Najdorf "
        "variation for its counterattacking chances in the middlegame."
    ),
}


def build_corpus(
    slug: str = "demo", docs: dict[str, str] | None = None, *, timeout: float = 60, **fields
) -> Corpus:
    corpus, _ = services.corpus_get_or_create(slug=slug)
    if fields:
        for key, value in fields.items():
            setattr(corpus, key, value)
        corpus.save()
    ingest(corpus, docs if docs is not None else DOCS, timeout=timeout)
    return corpus


def ingest(corpus: Corpus, docs: dict[str, str], *, timeout: float = 60) -> list[IngestionJob]:
    jobs = []
    for name, text in docs.items():
        added = services.document_add(corpus=corpus, source=name, data=text.encode())
        if added.job:
            jobs.append(added.job)
    ids = [job.pk for job in jobs]

    def finished():
        rows = list(IngestionJob.objects.filter(pk__in=ids))
        return all(r.is_final for r in rows)

    wait_for(finished, timeout=timeout, what="ingestion jobs to finish")
    return list(IngestionJob.objects.filter(pk__in=ids))
