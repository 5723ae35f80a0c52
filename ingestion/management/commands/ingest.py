"""manage.py ingest PATH_OR_URL... --corpus SLUG

Goes through the workers like any ingestion (a URL is fetched by the CPU worker as part of
its job, not here), shows progress, returns when every document is indexed or failed and
prints a summary; exits non-zero if any failed.
"""

import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from ingestion import parsing, services
from ingestion.models import IngestionJob

_POLL_S = 0.25
# Files added per transaction: small documents then share preparing tasks and batches.
_BATCH_FILES = 200
_BATCH_BYTES = 64 * 1024 * 1024


def _is_url(raw: str) -> bool:
    return "://" in raw


class Command(BaseCommand):
    help = "Add files, folders or URLs to a corpus and wait until they are indexed."

    def add_arguments(self, parser):
        parser.add_argument(
            "paths",
            nargs="+",
            metavar="PATH_OR_URL",
            help="Files, folders (searched recursively) or http(s) URLs.",
        )
        parser.add_argument("--corpus", required=True, help="Corpus slug; created if missing.")
        parser.add_argument("--name", default="", help="Corpus name, when it is created.")
        parser.add_argument("--language", default="", choices=["", "it", "en"])
        parser.add_argument(
            "--timeout", type=float, default=3600, help="Give up waiting after this many seconds."
        )

    def handle(self, *args, **options):
        sources = self._collect(options["paths"])
        if not sources:
            raise CommandError(f"No supported files found; supported: {parsing.supported_list()}")
        corpus, created = services.corpus_get_or_create(
            slug=options["corpus"], name=options["name"], language=options["language"]
        )
        if created:
            self.stdout.write(f"Created corpus '{corpus.slug}'.")

        jobs: dict[int, str] = {}
        skipped: list[str] = []
        failed: list[tuple[str, str]] = []

        def note(source: str, added: services.Added) -> None:
            if added.skipped:
                skipped.append(source)
            else:
                jobs[added.job.pk] = source

        for url in (s for s in sources if _is_url(s)):
            note(url, services.document_add_url(corpus=corpus, url=url))
        for batch in self._read(s for s in sources if not _is_url(s)):
            readable = []
            for source, data in batch:
                if isinstance(data, OSError):
                    failed.append((source, f"The file could not be read: {data}"))
                else:
                    readable.append(
                        services.NewDocument(source=source, data=data, title=Path(source).stem)
                    )
            added = services.documents_add(corpus=corpus, documents=readable)
            for item, result in zip(readable, added, strict=True):
                note(item.source, result)

        chunks, unchanged = self._wait(jobs, failed, options["timeout"])
        skipped.extend(unchanged)
        indexed = len(jobs) - len(unchanged) - sum(1 for s, _ in failed if s in jobs.values())
        self.stdout.write(
            f"Documents: {len(sources)} · indexed: {indexed} · chunks: {chunks} · "
            f"unchanged (skipped): {len(skipped)} · failed: {len(failed)}"
        )
        for source, reason in failed:
            self.stderr.write(f"  FAILED {source}: {reason}")
        if failed:
            raise CommandError(f"{len(failed)} document(s) failed.", returncode=1)

    def _read(self, paths):
        """(path, bytes or the OSError) in batches of at most _BATCH_FILES / _BATCH_BYTES."""
        batch, size = [], 0
        for source in paths:
            try:
                data = Path(source).read_bytes()
            except OSError as exc:
                data = exc
            batch.append((source, data))
            size += len(data) if isinstance(data, bytes) else 0
            if len(batch) >= _BATCH_FILES or size >= _BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _collect(self, raw_paths: list[str]) -> list[str]:
        sources: list[str] = []
        for raw in raw_paths:
            if _is_url(raw):
                sources.append(raw)
                continue
            path = Path(raw).expanduser().resolve()
            if path.is_dir():
                sources.extend(
                    str(p)
                    for p in sorted(path.rglob("*"))
                    if p.is_file() and parsing.is_supported(p.name)
                )
            elif path.is_file():
                sources.append(str(path))  # named explicitly: its content decides, or fails
            else:
                raise CommandError(f"No such file or folder: {raw}")
        return sources

    def _wait(self, jobs: dict[int, str], failed: list, timeout: float) -> tuple[int, list[str]]:
        """Chunks indexed, and the sources whose job found them unchanged."""
        if not jobs:
            return 0, []
        deadline = time.monotonic() + timeout
        bar = tqdm(total=0, unit="chunk", desc="Indexing", disable=None)
        pending = set(jobs)
        chunks = 0
        unchanged: list[str] = []
        while True:
            rows = list(IngestionJob.objects.filter(pk__in=jobs))
            bar.total = max(sum(r.chunks_total for r in rows), 1)
            bar.n = sum(r.chunks_done for r in rows)
            finished = sum(1 for r in rows if r.is_final)
            bar.set_postfix_str(f"{finished}/{len(jobs)} documents")
            bar.refresh()
            for row in rows:
                if row.pk in pending and row.is_final:
                    pending.discard(row.pk)
                    if row.status == IngestionJob.Status.FAILED:
                        failed.append((jobs[row.pk], row.error))
                    elif row.status == IngestionJob.Status.SKIPPED:
                        unchanged.append(jobs[row.pk])
                    else:
                        chunks += row.chunks_done
            if not pending:
                break
            if time.monotonic() > deadline:
                for pk in pending:
                    failed.append(
                        (
                            jobs[pk],
                            "Still not indexed when the wait timed out; "
                            "is a worker running (manage.py run_workers)?",
                        )
                    )
                break
            time.sleep(_POLL_S)
        bar.close()
        return chunks, unchanged
