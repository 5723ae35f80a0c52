"""Ingestion jobs on the real worker: deterministic and repeatable, incremental re-index,
deletes that leave no vectors, bad input that fails only its own job, and retries."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.utils import timezone

from core import vectorstore
from ingestion import reaper, services
from ingestion.models import Chunk, Document, IngestionJob
from ingestion.tasks import embed_batch, prepare_jobs
from tests.ingestion_helpers import consumed, jobs_done, long_text, make_pdf, wait_job, wait_jobs
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def corpus(live):
    corpus, _ = services.corpus_get_or_create(slug="jobs")
    return corpus


def add(corpus, name: str, data: bytes | str) -> IngestionJob:
    data = data.encode() if isinstance(data, str) else data
    added = services.document_add(corpus=corpus, source=name, data=data)
    assert added.job is not None
    return wait_job(added.job.pk)


def hits_for(corpus, text: str, document: Document) -> list[vectorstore.Hit]:
    hits = vectorstore.search(corpus.pk, text=text, embedding=None, top_k=50)
    return [h for h in hits if h.document_id == document.pk]


def test_same_bytes_again_make_no_new_vectors(corpus, live):
    text = long_text("lagoon", 120)
    job = add(corpus, "lagoon.txt", text)
    document = Document.objects.get(pk=job.document_id)
    assert document.content_hash and document.indexed_hash == document.content_hash
    count = vectorstore.count(corpus.pk)
    assert count == document.chunk_count > 1
    live.reset_calls()
    again = services.document_add(corpus=corpus, source="lagoon.txt", data=text.encode())
    assert again.skipped and again.job is None
    consumed()  # anything it might have sent
    assert vectorstore.count(corpus.pk) == count
    assert IngestionJob.objects.filter(document=document).count() == 1
    assert not [c for c in live.calls if c["path"] == "/api/embed"]


def test_changed_document_replaces_all_its_chunks(corpus):
    first = add(corpus, "river.txt", long_text("meander", 150) + " Oxbow lakes form there.")
    document = Document.objects.get(pk=first.document_id)
    old_count = document.chunk_count
    assert old_count >= 3 and hits_for(corpus, "Oxbow", document)
    other = add(corpus, "other.txt", "Estuaries mix salt and fresh water.")

    second = add(corpus, "river.txt", "Deltas spread where a river meets the sea.")
    assert second.status == "done", second.error
    document.refresh_from_db()
    assert document.chunk_count == 1 < old_count
    assert document.indexed_hash == document.content_hash
    assert vectorstore.count(corpus.pk, document_id=document.pk) == 1
    assert not hits_for(corpus, "Oxbow meander", document)  # no orphan of the old version
    assert hits_for(corpus, "Deltas", document)
    assert list(Chunk.objects.filter(document=document).values_list("job", flat=True)) == [
        second.pk
    ]
    assert vectorstore.count(corpus.pk, document_id=other.document_id) == 1


def test_a_newer_version_supersedes_a_job_in_flight(corpus, live):
    live.configure(embed_latency=0.3)
    old = services.document_add(
        corpus=corpus, source="draft.txt", data=long_text("draft", 1800).encode()
    ).job
    wait_for(lambda: IngestionJob.objects.get(pk=old.pk).chunks_done > 0, what="a first batch")
    new = services.document_add(
        corpus=corpus, source="draft.txt", data=b"The final text is one short paragraph."
    ).job
    live.configure(embed_latency=0.0)
    old, new = wait_jobs([old.pk, new.pk])
    assert old.status == "failed" and "Superseded" in old.error
    assert new.status == "done", new.error
    consumed()  # a batch of the old version still in flight has landed by now
    document = Document.objects.get(pk=new.document_id)
    assert document.chunk_count == 1
    assert vectorstore.count(corpus.pk, document_id=document.pk) == 1


def test_delete_leaves_no_vectors(corpus):
    keep = add(corpus, "keep.txt", "Cypress trees line the road to Bolgheri.")
    gone = add(corpus, "gone.txt", long_text("basalt", 150))
    document = Document.objects.get(pk=gone.document_id)
    assert vectorstore.count(corpus.pk, document_id=document.pk) == document.chunk_count > 1
    path = document.file.path
    services.document_delete(document=document)
    assert vectorstore.count(corpus.pk, document_id=document.pk) == 0
    assert not Document.objects.filter(pk=document.pk).exists()
    assert not Chunk.objects.filter(document_id=document.pk).exists()
    assert not IngestionJob.objects.filter(pk=gone.pk).exists()
    wait_for(lambda: not os.path.exists(path), what="the file to be deleted")
    assert vectorstore.count(corpus.pk, document_id=keep.document_id) == 1


def test_delete_while_embedding_leaves_no_vectors(corpus, live):
    live.configure(embed_latency=0.5)
    job = services.document_add(
        corpus=corpus, source="busy.txt", data=long_text("busy", 1800).encode()
    ).job
    wait_for(lambda: IngestionJob.objects.get(pk=job.pk).chunks_done > 0, what="a first batch")
    document = Document.objects.get(pk=job.document_id)
    services.document_delete(document=document)
    live.configure(embed_latency=0.0)
    consumed()  # the batch that was embedding finishes and finds its document gone
    assert vectorstore.count(corpus.pk, document_id=document.pk) == 0


def test_remove_from_index_then_ingest_again(corpus):
    job = add(corpus, "dunes.txt", "Dunes of Piscinas move with the mistral.")
    document = Document.objects.get(pk=job.document_id)
    services.document_remove_from_index(document=document)
    document.refresh_from_db()
    assert document.status == "removed" and document.chunk_count == 0
    assert vectorstore.count(corpus.pk, document_id=document.pk) == 0
    again = services.document_ingest(document=document)
    assert again is not None
    assert wait_job(again.pk).status == "done"
    assert vectorstore.count(corpus.pk, document_id=document.pk) == 1


def test_a_job_run_again_or_redelivered_ends_in_the_same_state(corpus, live):
    job = add(corpus, "tide.txt", long_text("tide", 1800))
    document = Document.objects.get(pk=job.document_id)
    total = job.chunks_total
    assert total > 64 and vectorstore.count(corpus.pk, document_id=document.pk) == total
    rows = list(Chunk.objects.filter(document=document).values_list("pk", "index", "text"))
    live.reset_calls()

    before = jobs_done()
    prepare_jobs.apply_async(args=[[job.pk]])  # a second copy of the message
    embed_batch.apply_async(kwargs={"ranges": [[job.pk, job.run, 0, 32]]})  # redelivered
    embed_batch.apply_async(kwargs={"ranges": [[job.pk, job.run - 1, 32, 64]]})  # older run
    consumed(sent=3, before=before)
    job.refresh_from_db()
    assert job.status == "done" and job.attempts == 1 and job.chunks_done == total
    assert list(Chunk.objects.filter(document=document).values_list("pk", "index", "text")) == rows
    assert vectorstore.count(corpus.pk, document_id=document.pk) == total
    assert not live.calls

    # Forced again from the start: same ids, same number of vectors.
    rerun = services.document_ingest(document=document, force=True)
    rerun = wait_job(rerun.pk)
    assert rerun.status == "done" and rerun.chunks_total == total
    assert vectorstore.count(corpus.pk, document_id=document.pk) == total
    assert vectorstore.count(corpus.pk) == total


def test_a_job_that_failed_part_way_is_retried_and_finishes(corpus, live):
    live.configure(embed_latency=0.3)
    job = services.document_add(
        corpus=corpus, source="long.txt", data=long_text("moraine", 1800).encode()
    ).job
    wait_for(lambda: IngestionJob.objects.get(pk=job.pk).chunks_done > 0, what="a first batch")
    live.configure(fail_status=500, fail_message="CUDA out of memory", fail_count=-1)
    job = wait_job(job.pk)
    assert job.status == "failed" and "CUDA out of memory" in job.error
    assert 0 < job.chunks_done < job.chunks_total
    assert Document.objects.get(pk=job.document_id).status == "failed"

    live.configure(fail_count=0, embed_latency=0.0)
    assert services.jobs_retry(jobs=IngestionJob.objects.filter(pk=job.pk)) == 1
    job = wait_job(job.pk)
    assert job.status == "done", job.error
    assert job.attempts == 1 and job.chunks_done == job.chunks_total
    document = Document.objects.get(pk=job.document_id)
    assert document.status == "indexed" and document.error == ""
    assert vectorstore.count(corpus.pk, document_id=document.pk) == job.chunks_total
    # A finished job is not retried.
    assert services.jobs_retry(jobs=IngestionJob.objects.filter(pk=job.pk)) == 0


def test_a_stalled_job_whose_message_was_lost_can_be_retried(corpus, settings):
    # As if its worker's host died and the broker lost the message: running, silent.
    document = Document.objects.create(corpus=corpus, title="lost", source="lost.txt")
    document.file.save("lost.txt", ContentFile(b"Nuraghe towers dot Sardinia."), save=True)
    long_ago = timezone.now() - timedelta(seconds=settings.RMASSIMO_JOB_STALL_AFTER + 60)
    stalled = IngestionJob.objects.create(
        document=document, status="running", attempts=1, heartbeat_at=long_ago
    )
    fresh_doc = Document.objects.create(corpus=corpus, title="busy", source="busy.txt")
    busy = IngestionJob.objects.create(
        document=fresh_doc, status="running", heartbeat_at=timezone.now()
    )
    assert services.jobs_retry(jobs=IngestionJob.objects.all()) == 1
    stalled = wait_job(stalled.pk)
    assert stalled.status == "done", stalled.error
    assert vectorstore.count(corpus.pk, document_id=document.pk) == 1
    busy.refresh_from_db()
    assert busy.status == "running"  # alive as far as anyone can tell: left alone


def test_the_reaper_puts_back_jobs_whose_message_or_worker_was_lost(corpus, settings):
    def lost_job(name: str, **fields) -> IngestionJob:
        document = Document.objects.create(corpus=corpus, title=name, source=f"{name}.txt")
        document.file.save(f"{name}.txt", ContentFile(f"{name} stands by the sea.".encode()))
        return IngestionJob.objects.create(document=document, **fields)

    now = timezone.now()
    # Queued, its message gone with the broker; running, its worker's host gone.
    queued = lost_job(
        "Cagliari",
        heartbeat_at=now - timedelta(seconds=settings.RMASSIMO_REQUEUE_AFTER_S + 60),
    )
    stalled = lost_job(
        "Alghero",
        status="running",
        attempts=1,
        heartbeat_at=now - timedelta(seconds=settings.RMASSIMO_JOB_STALL_AFTER + 60),
    )
    busy = lost_job("Olbia", status="running", heartbeat_at=now)
    assert reaper.requeue_stale_jobs() == {"requeued": 1, "stalled": 1}
    for job in (queued, stalled):
        job = wait_job(job.pk)
        assert job.status == "done", job.error
        assert vectorstore.count(corpus.pk, document_id=job.document_id) == 1
    assert IngestionJob.objects.get(pk=stalled.pk).attempts == 2
    busy.refresh_from_db()
    assert busy.status == "running"  # alive as far as anyone can tell: left alone


def test_bad_input_fails_its_own_job_and_harms_nothing_else(corpus, settings):
    good = add(corpus, "good.txt", "Good text about the Tiber river in Rome.")
    assert good.status == "done"
    indexed = add(corpus, "atlas.pdf", make_pdf(["Atlas of the Alps, first page."]))
    assert indexed.status == "done"
    settings.RMASSIMO_UPLOAD_MAX_BYTES = 2000  # checked where the file is added
    cases = {
        "empty.txt": (b"", "The file is empty."),
        "fake.pdf": (b"just some words, no PDF here", "its content is text, not a PDF"),
        "atlas.pdf": (b"%PDF-1.7\n" + b"\x00garbage" * 50, "The PDF could not be read"),
        "latin1.txt": ("perché".encode("latin-1"), "not valid UTF-8"),
        "image.md": (b"GIF89a" + b"\x00\x01" * 40, "image/gif"),
        "huge.txt": (b"words " * 1000, "over the limit of 2,000 bytes"),
    }
    jobs = {
        name: services.document_add(corpus=corpus, source=name, data=data).job
        for name, (data, _) in cases.items()
    }
    ftp = services.document_add_url(corpus=corpus, url="ftp://example.org/file.txt").job
    local = services.document_add_url(corpus=corpus, url="file:///etc/passwd").job
    for name, job in jobs.items():
        job = wait_job(job.pk)
        assert job.status == "failed", name
        assert cases[name][1] in job.error, (name, job.error)
        assert Document.objects.get(pk=job.document_id).error == job.error
    assert ftp.status == "failed" and "Only http and https URLs" in ftp.error
    assert local.status == "failed" and "not 'file:'" in local.error
    assert not Document.objects.get(source="huge.txt").file  # over the limit: not stored

    # Everything else is as it was: the good documents and their vectors.
    assert vectorstore.count(corpus.pk, document_id=good.document_id) == 1
    # A damaged new version of an indexed PDF leaves the indexed one searchable.
    atlas = Document.objects.get(source="atlas.pdf")
    assert vectorstore.count(corpus.pk, document_id=atlas.pk) == 1
    assert hits_for(corpus, "Atlas Alps", atlas)
    assert vectorstore.count(corpus.pk) == 2
