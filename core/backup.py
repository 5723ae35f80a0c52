"""Backups of the whole service at one moment, and their restore into a fresh stack.

A backup is one .tar.gz file:

- `database.json`: every row (Django's dumpdata), read in one transaction that sees one
  moment of the database (REPEATABLE READ on PostgreSQL, a locked transaction on SQLite);
- `vectors/corpus-<id>.ids.json` and `.npy`: the dense vectors of every chunk that moment
  calls indexed, read from the vector store while that transaction is open and checked
  against the chunk text it holds. A chunk whose vector is missing or belongs to other
  text (its document was being ingested again) puts its document on the manifest's
  `reindex` list instead: the restore ingests those again, so the restored vector store
  never disagrees with the restored database. BM25 needs no copy: Milvus computes it
  from the chunk text, which the database holds;
- `media/`: the uploaded files of the documents in that moment;
- `manifest.json`: format, time, migrations applied, what each part holds.

Redis is not copied: what it holds is either derived from the database (the ids of
queued questions and ingestion jobs, which the restore enqueues again) or transient (live
answer deltas, worker heartbeats, throttling counters). A copy of its AOF would be from
another moment than the database and could only add duplicates or lose work.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection, transaction
from django.db.migrations.recorder import MigrationRecorder
from django.utils import timezone

from chat.models import Question
from core import vectorstore
from ingestion.models import Chunk, Corpus, Document, IngestionJob

FORMAT = 1
# Tables Django fills itself on migrate; copying them would collide on restore.
_NOT_DUMPED = ["contenttypes", "auth.permission"]
_RESTORE_BATCH = 500


class BackupError(Exception):
    """A backup that cannot be taken or restored, worded for the operator."""


@dataclass
class Summary:
    path: Path
    corpora: int = 0
    documents: int = 0
    vectors: int = 0
    media_files: int = 0
    reindex: list[int] = field(default_factory=list)
    requeued_questions: int = 0
    requeued_documents: int = 0


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(timezone.now().timestamp())
    tar.addfile(info, io.BytesIO(data))


def _unmanaged() -> list[str]:
    # Models without a table of their own (admin pages over Redis, views): nothing to dump.
    return [
        f"{model._meta.app_label}.{model.__name__}"
        for model in apps.get_models()
        if not model._meta.managed
    ]


def _migrations() -> dict[str, list[str]]:
    applied: dict[str, list[str]] = defaultdict(list)
    for app, name in MigrationRecorder(connection).applied_migrations():
        applied[app].append(name)
    return {app: sorted(names) for app, names in sorted(applied.items())}


def backup_create(*, path: Path) -> Summary:
    """Write a backup of the database, vector store and uploaded files to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = Summary(path=path)
    partial = path.with_name(path.name + ".partial")
    connection.ensure_connection()
    with tempfile.TemporaryDirectory() as scratch, tarfile.open(partial, "w:gz") as tar:
        with transaction.atomic():
            if connection.vendor == "postgresql":
                # Every read below sees the same moment, whatever commits meanwhile.
                with connection.cursor() as cursor:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            dump = Path(scratch) / "database.json"
            call_command(
                "dumpdata",
                exclude=_NOT_DUMPED + _unmanaged(),
                natural_foreign=True,
                output=str(dump),
                verbosity=0,
            )
            tar.add(dump, arcname="database.json")
            corpora = {}
            for corpus in Corpus.objects.order_by("pk"):
                corpora[str(corpus.pk)] = _backup_vectors(tar, corpus, summary)
            files = [
                name
                for name in Document.objects.exclude(file="").values_list("file", flat=True)
                if (Path(settings.MEDIA_ROOT) / name).is_file()
            ]
            summary.documents = Document.objects.count()
            migrations = _migrations()
        for name in files:
            tar.add(Path(settings.MEDIA_ROOT) / name, arcname=f"media/{name}")
        summary.media_files = len(files)
        summary.corpora = len(corpora)
        manifest = {
            "format": FORMAT,
            "created_at": timezone.now().isoformat(),
            "database_vendor": connection.vendor,
            "migrations": migrations,
            "corpora": corpora,
            "reindex": sorted(summary.reindex),
            "media_files": len(files),
        }
        _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=1).encode())
    partial.replace(path)
    return summary


def _backup_vectors(tar: tarfile.TarFile, corpus: Corpus, summary: Summary) -> dict:
    expected = {
        f"{document_id}:{index}": (document_id, text)
        for document_id, index, text in Chunk.objects.filter(
            document__corpus=corpus, indexed=True
        ).values_list("document_id", "index", "text")
    }
    ids: list[str] = []
    vectors: list[list[float]] = []
    seen: set[str] = set()
    dense = False
    for vector_id, text, vector in vectorstore.rows(corpus.pk):
        wanted = expected.get(vector_id)
        if wanted is None or wanted[1] != text:
            continue
        seen.add(vector_id)
        if vector is not None:
            dense = True
            ids.append(vector_id)
            vectors.append(vector)
    stale = {document for vector_id, (document, _) in expected.items() if vector_id not in seen}
    summary.reindex.extend(sorted(stale))
    entry = {"slug": corpus.slug, "chunks": len(expected), "dense": dense, "vectors": len(ids)}
    if dense:
        stem = f"vectors/corpus-{corpus.pk}"
        _add_bytes(tar, f"{stem}.ids.json", json.dumps(ids).encode())
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(vectors, dtype=np.float32))
        _add_bytes(tar, f"{stem}.npy", buffer.getvalue())
        entry["files"] = [f"{stem}.ids.json", f"{stem}.npy"]
    summary.vectors += len(ids)
    return entry


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    if member is None:
        raise BackupError(f"The backup has no {name}.")
    return member.read()


def backup_restore(*, path: Path) -> Summary:
    """Restore a backup into an empty database, vector store and media folder, then queue
    again the work that was in flight when it was taken."""
    summary = Summary(path=path)
    try:
        tar = tarfile.open(path, "r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"{path} is not a readable backup: {exc}") from exc
    with tar:
        manifest = json.loads(_read(tar, "manifest.json"))
        if manifest.get("format") != FORMAT:
            raise BackupError(
                f"{path} is a backup of format {manifest.get('format')}; this version "
                f"restores format {FORMAT}."
            )
        # The schema of this version first; rows from an older one load into it, since
        # migrations only ever add what a default can fill.
        call_command("migrate", interactive=False, verbosity=0)
        if Corpus.objects.exists() or get_user_model().objects.exists():
            raise BackupError(
                "The database is not empty: restore into a fresh stack (a new database, "
                "vector store and media folder)."
            )
        with tempfile.TemporaryDirectory() as scratch:
            dump = Path(scratch) / "database.json"
            dump.write_bytes(_read(tar, "database.json"))
            call_command("loaddata", str(dump), verbosity=0)
        media = Path(settings.MEDIA_ROOT)
        files = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("media/")]
        for member in files:
            member.name = member.name.removeprefix("media/")
            tar.extract(member, media, filter="data")
        summary.media_files = len(files)
        reindex = set(manifest.get("reindex", []))
        for corpus_id, entry in manifest["corpora"].items():
            vectors: dict[str, np.ndarray] = {}
            if entry.get("dense"):
                ids = json.loads(_read(tar, entry["files"][0]))
                array = np.load(io.BytesIO(_read(tar, entry["files"][1])))
                vectors = dict(zip(ids, array, strict=True))
            _restore_vectors(
                int(corpus_id), vectors, dense=entry.get("dense", False), reindex=reindex
            )
            summary.vectors += len(vectors)
        summary.corpora = len(manifest["corpora"])
        summary.documents = Document.objects.count()
        summary.reindex = sorted(reindex)
    _requeue_work(summary, reindex)
    return summary


def _restore_vectors(corpus_id: int, vectors: dict, *, dense: bool, reindex: set[int]) -> None:
    # A fresh stack has no collection; one left over would mix two moments.
    vectorstore.drop_corpus(corpus_id)
    rows = (
        Chunk.objects.filter(document__corpus_id=corpus_id, indexed=True)
        .exclude(document_id__in=reindex)
        .select_related("document")
        .order_by("document_id", "index")
    )
    batch: list[vectorstore.Chunk] = []

    def write() -> None:
        embeddings = [vectors[c.vector_id].tolist() for c in batch] if dense else None
        vectorstore.upsert_chunks(corpus_id, batch, embeddings)
        batch.clear()

    for row in rows.iterator():
        chunk = vectorstore.Chunk(
            document_id=row.document_id,
            index=row.index,
            text=row.text,
            title=row.document.title,
            page=row.page,
            start=row.start,
            end=row.end,
        )
        if dense and chunk.vector_id not in vectors:
            reindex.add(row.document_id)
            continue
        batch.append(chunk)
        if len(batch) >= _RESTORE_BATCH:
            write()
    if batch:
        write()
    vectorstore.flush(corpus_id)


def _requeue_work(summary: Summary, reindex: set[int]) -> None:
    """Queue again what was in flight: the broker of the fresh stack knows nothing of it."""
    from chat.tasks import answer_question
    from ingestion import services as ingestion_services

    now = timezone.now()
    # A running question's worker is gone: its lease ends now, so the next claim takes it.
    Question.objects.filter(status=Question.Status.RUNNING).update(
        lease_until=now - timedelta(seconds=1)
    )
    pending = list(
        Question.objects.filter(
            status__in=(Question.Status.QUEUED, Question.Status.RUNNING)
        ).values_list("pk", flat=True)
    )
    Question.objects.filter(pk__in=pending).update(enqueued_at=now)
    for pk in pending:
        answer_question.apply_async(args=[pk])
    summary.requeued_questions = len(pending)

    active = (IngestionJob.Status.QUEUED, IngestionJob.Status.RUNNING)
    interrupted = set(
        IngestionJob.objects.filter(status__in=active).values_list("document_id", flat=True)
    )
    IngestionJob.objects.filter(status__in=active).update(
        status=IngestionJob.Status.FAILED,
        error="Interrupted by a restore from backup; the document was queued again.",
        finished_at=now,
    )
    documents = Document.objects.filter(pk__in=interrupted | reindex).order_by("pk")
    for document in documents:
        ingestion_services.document_ingest(document=document, force=True)
    summary.requeued_documents = len(documents)
