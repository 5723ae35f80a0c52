"""Ingestion writes that cannot cross each other: a superseded embedding batch cannot
overwrite a newer version's vectors, document files live and die with their rows, no Milvus
call is made while a row lock is held, and two workers creating one collection both succeed.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import connection, transaction
from django.utils import timezone

from core import vectorstore
from ingestion import embedding, services
from ingestion.models import Chunk, Corpus, Document, IngestionJob
from tests.ingestion_helpers import LocalSite, Route, wait_job
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def media_files(stem: str) -> list[Path]:
    return sorted(p for p in Path(settings.MEDIA_ROOT).rglob(f"{stem}*") if p.is_file())


def test_a_superseded_batch_cannot_overwrite_the_newer_version(worker, live, monkeypatch):
    """Version 1's batch passes its run check, then stalls before its upsert (a slow
    Milvus, a paused process); version 2 is added meanwhile. The end state is version 2's
    vectors alone, whichever order the writes would otherwise land in."""
    corpus = Corpus.objects.create(slug="versions", name="Versions", embed_model="none")
    document = Document.objects.create(
        corpus=corpus, title="draft", source="draft.txt", status=Document.Status.INDEXING
    )
    document.file.save("draft.txt", ContentFile(b"first version"), save=True)
    # Version 1 as its prepare step leaves it: running, its chunk rows stored.
    old = IngestionJob.objects.create(
        document=document, status="running", run=1, chunks_total=3, heartbeat_at=timezone.now()
    )
    Chunk.objects.bulk_create(
        Chunk(document=document, job=old, index=i, text=f"Obsolete basalt passage {i}.")
        for i in range(3)
    )

    real_upsert = vectorstore.upsert_chunks
    upserting, release = threading.Event(), threading.Event()

    def stalled_upsert(corpus_id, chunks, embeddings):
        upserting.set()
        assert release.wait(120), "the test never released the stale batch"
        real_upsert(corpus_id, chunks, embeddings)

    monkeypatch.setattr(vectorstore, "upsert_chunks", stalled_upsert)

    def stale_batch() -> None:
        try:
            embedding.job_embed_batch(ranges=[(old.pk, 1, 0, 3)])
        finally:
            connection.close()

    batch = threading.Thread(target=stale_batch)
    batch.start()
    try:
        assert upserting.wait(60), "the stale batch did not reach its upsert"
        waits_before = worker.output().count(f"lock vectors:{corpus.pk} is held elsewhere")
        new = services.document_add(
            corpus=corpus, source="draft.txt", data=b"Granite is the final word."
        ).job
        # Either version 2 gets all the way through while version 1 stalls (the writes
        # cross), or a write of version 2 waits for version 1's to land.
        wait_for(
            lambda: (
                IngestionJob.objects.get(pk=new.pk).is_final
                or worker.output().count(f"lock vectors:{corpus.pk} is held elsewhere")
                > waits_before
            ),
            timeout=60,
            what="version 2 to finish or to wait for version 1's write",
        )
    finally:
        release.set()
        batch.join(60)
    new = wait_job(new.pk)
    assert new.status == "done", new.error
    old.refresh_from_db()
    assert old.status == "failed" and "Superseded" in old.error
    texts = {vector_id: text for vector_id, text, _ in vectorstore.rows(corpus.pk)}
    assert texts == {f"{document.pk}:0": "Granite is the final word."}


def test_an_add_that_fails_after_storing_its_file_leaves_no_file(worker, monkeypatch):
    corpus, _ = services.corpus_get_or_create(slug="files")
    stem = f"orphan-{uuid.uuid4().hex[:8]}"

    def broker_refuses(job_ids):
        raise RuntimeError("the transaction fails after the file was stored")

    monkeypatch.setattr(services, "_queue_prepare", broker_refuses)
    with pytest.raises(RuntimeError):
        services.document_add(corpus=corpus, source=f"{stem}.txt", data=b"Lost words.")
    with pytest.raises(RuntimeError):
        services.documents_add(
            corpus=corpus,
            documents=[
                services.NewDocument(source=f"{stem}-{i}.txt", data=f"Words {i}.".encode())
                for i in range(3)
            ],
        )
    assert not Document.objects.filter(source__startswith=stem).exists()
    assert media_files(stem) == []


def test_a_replacement_rolled_back_keeps_the_old_file_and_a_committed_one_drops_it(
    worker, monkeypatch
):
    corpus, _ = services.corpus_get_or_create(slug="files")
    stem = f"replaced-{uuid.uuid4().hex[:8]}"
    document = Document.objects.create(corpus=corpus, title=stem, source=f"{stem}.txt")
    document.file.save(f"{stem}.txt", ContentFile(b"Version one."), save=True)
    first = Path(document.file.path)

    def broker_refuses(job_ids):
        raise RuntimeError("the transaction fails after the new file was stored")

    with monkeypatch.context() as patched:
        patched.setattr(services, "_queue_prepare", broker_refuses)
        with pytest.raises(RuntimeError):
            services.document_add(corpus=corpus, source=f"{stem}.txt", data=b"Version two.")
    document.refresh_from_db()
    assert Path(document.file.path) == first and first.read_bytes() == b"Version one."
    assert media_files(stem) == [first]  # nor is the new one left behind

    services.document_add(corpus=corpus, source=f"{stem}.txt", data=b"Version two.")
    document.refresh_from_db()
    assert Path(document.file.path).read_bytes() == b"Version two."
    assert media_files(stem) == [Path(document.file.path)]


def test_a_fetched_file_of_a_document_deleted_meanwhile_is_not_kept(worker, live):
    corpus, _ = services.corpus_get_or_create(slug="files")
    stem = f"vanish-{uuid.uuid4().hex[:8]}"
    with LocalSite() as site:
        # Answered a few seconds late: the document is deleted while it is being fetched.
        site.routes[f"/{stem}.txt"] = Route(body=b"Fetched too late.", delay=5)
        site.routes["/next.txt"] = Route(body=b"The next document.")
        job = services.document_add_url(corpus=corpus, url=f"{site.url}/{stem}.txt").job
        wait_for(lambda: site.count(f"/{stem}.txt") == 1, timeout=60, what="the fetch")
        services.document_delete(document=Document.objects.get(pk=job.document_id))
        # One worker, one task at a time: once the next job is done, so is the first.
        after = services.document_add_url(corpus=corpus, url=f"{site.url}/next.txt").job
        assert wait_job(after.pk).status == "done"
    assert media_files(stem) == []


def test_a_delete_rolled_back_keeps_the_file_and_calls_milvus_outside_the_transaction(
    worker, monkeypatch
):
    """As the admin's delete page does it: inside a transaction of its own, which may roll
    back. The file goes only once the delete commits, and Milvus is called while no row
    stays locked: before the delete's transaction, and once the enclosing one commits."""
    corpus, _ = services.corpus_get_or_create(slug="files")
    stem = f"deleted-{uuid.uuid4().hex[:8]}"
    document = Document.objects.create(corpus=corpus, title=stem, source=f"{stem}.txt")
    document.file.save(f"{stem}.txt", ContentFile(b"Keep me."), save=True)
    path = Path(document.file.path)

    real_delete = vectorstore.delete_document
    in_transaction: list[bool] = []

    def watched_delete(*args, **kwargs):
        in_transaction.append(connection.in_atomic_block)
        return real_delete(*args, **kwargs)

    monkeypatch.setattr(vectorstore, "delete_document", watched_delete)

    with pytest.raises(RuntimeError), transaction.atomic():
        services.document_delete(document=document)
        raise RuntimeError("the enclosing transaction rolls back")
    assert Document.objects.filter(pk=document.pk).exists() and path.exists()

    with transaction.atomic():
        services.document_delete(document=document)
        assert path.exists()  # not before the commit
    assert not Document.objects.filter(pk=document.pk).exists() and not path.exists()
    # Both times: before the delete's transaction (inside the caller's, which had locked
    # nothing yet), and after the commit, never in between.
    assert in_transaction.count(True) == 2 and in_transaction.count(False) == 1


def test_two_workers_creating_one_collection_at_once_both_succeed(milvus):
    """Two first batches of one corpus (two prepare groups), each seeing no collection."""
    base = 900_000 + uuid.uuid4().int % 50_000 * 20
    for corpus_id in range(base, base + 5):
        start = threading.Barrier(2)
        errors: list[BaseException] = []

        def create(dim, corpus_id=corpus_id, start=start, errors=errors):
            start.wait()
            try:
                store = vectorstore.store(corpus_id, dim=dim)
                vectorstore.upsert_chunks(
                    corpus_id,
                    [vectorstore.Chunk(document_id=dim or 1, index=0, text="Etna", title="t")],
                    [[1.0] + [0.0] * 7] if store.enable_dense else None,
                )
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=create, args=(8,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        try:
            assert errors == []
            assert vectorstore.has_dense(corpus_id)
            assert vectorstore.count(corpus_id) == 1  # both upserts: the same id
        finally:
            vectorstore.drop_corpus(corpus_id)
