"""manage.py ingest PATH... --corpus SLUG

Goes through the workers like any ingestion, shows progress, returns when every document
is indexed or failed; exits non-zero if any failed.
"""

import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from ingestion import parsing, services
from ingestion.models import IngestionJob

_POLL_S = 0.25


class Command(BaseCommand):
    help = "Add files or folders to a corpus and wait until they are indexed."

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+", help="Files or folders (searched recursively).")
        parser.add_argument("--corpus", required=True, help="Corpus slug; created if missing.")
        parser.add_argument("--name", default="", help="Corpus name, when it is created.")
        parser.add_argument("--language", default="", choices=["", "it", "en"])
        parser.add_argument(
            "--timeout", type=float, default=3600, help="Give up waiting after this many seconds."
        )

    def handle(self, *args, **options):
        files = self._collect(options["paths"])
        if not files:
            raise CommandError(
                "No supported files found; supported: "
                + ", ".join(sorted(parsing.SUPPORTED_SUFFIXES))
            )
        corpus, created = services.corpus_get_or_create(
            slug=options["corpus"], name=options["name"], language=options["language"]
        )
        if created:
            self.stdout.write(f"Created corpus '{corpus.slug}'.")

        jobs: dict[int, Path] = {}
        skipped: list[Path] = []
        failed: list[tuple[Path, str]] = []
        for path in files:
            try:
                added = services.document_add(
                    corpus=corpus, source=str(path), data=path.read_bytes(), title=path.stem
                )
            except (parsing.ParseError, OSError) as exc:
                failed.append((path, str(exc)))
                continue
            if added.skipped:
                skipped.append(path)
            else:
                jobs[added.job.pk] = path

        chunks = self._wait(jobs, failed, options["timeout"])
        indexed = len(jobs) - sum(1 for p, _ in failed if p in jobs.values())
        self.stdout.write(
            f"Documents: {len(files)} · indexed: {indexed} · chunks: {chunks} · "
            f"unchanged (skipped): {len(skipped)} · failed: {len(failed)}"
        )
        for path, reason in failed:
            self.stderr.write(f"  FAILED {path}: {reason}")
        if failed:
            raise CommandError(f"{len(failed)} document(s) failed.", returncode=1)

    def _collect(self, raw_paths: list[str]) -> list[Path]:
        files: list[Path] = []
        for raw in raw_paths:
            path = Path(raw).expanduser().resolve()
            if path.is_dir():
                files.extend(
                    p
                    for p in sorted(path.rglob("*"))
                    if p.is_file() and parsing.is_supported(p.name)
                )
            elif path.is_file():
                files.append(path)
            else:
                raise CommandError(f"No such file or folder: {raw}")
        return files

    def _wait(self, jobs: dict[int, Path], failed: list, timeout: float) -> int:
        if not jobs:
            return 0
        deadline = time.monotonic() + timeout
        bar = tqdm(total=0, unit="chunk", desc="Indexing", disable=None)
        pending = set(jobs)
        chunks = 0
        while True:
            rows = list(IngestionJob.objects.filter(pk__in=jobs))
            total = sum(r.chunks_total for r in rows)
            done = sum(r.chunks_done for r in rows)
            bar.total = max(total, 1)
            bar.n = done
            finished = sum(1 for r in rows if r.is_final)
            bar.set_postfix_str(f"{finished}/{len(jobs)} documents")
            bar.refresh()
            for row in rows:
                if row.pk in pending and row.is_final:
                    pending.discard(row.pk)
                    if row.status == IngestionJob.Status.FAILED:
                        failed.append((jobs[row.pk], row.error))
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
        return chunks
