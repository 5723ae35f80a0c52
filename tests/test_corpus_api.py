"""The corpus API for staff: upload (202 + job), list documents, job status, delete (vectors
gone). Non-staff get 403, anonymous 401; the corpus list stays open to any signed-in user."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from core import vectorstore
from ingestion import services
from ingestion.models import Document, IngestionJob
from tests.ingestion_helpers import LocalSite, Route, make_pdf, wait_job

pytestmark = pytest.mark.django_db(transaction=True)


def upload(client, slug: str, name: str, data: bytes, **extra):
    return client.post(
        f"/api/v1/corpora/{slug}/documents/",
        {"file": SimpleUploadedFile(name, data), **extra},
        format="multipart",
    )


@pytest.fixture
def corpus(db):
    corpus, _ = services.corpus_get_or_create(slug="api")
    return corpus


def test_who_may_do_what(api, corpus):
    document = Document.objects.create(corpus=corpus, title="t", source="t.txt")
    job = IngestionJob.objects.create(document=document, status="failed", error="x")
    endpoints = [
        ("get", f"/api/v1/corpora/{corpus.slug}/documents/"),
        ("post", f"/api/v1/corpora/{corpus.slug}/documents/"),
        ("get", f"/api/v1/documents/{document.pk}/"),
        ("delete", f"/api/v1/documents/{document.pk}/"),
        ("get", "/api/v1/jobs/"),
        ("get", f"/api/v1/jobs/{job.pk}/"),
    ]
    for method, url in endpoints:
        assert getattr(api.anon, method)(url).status_code == 401, url
        for client in (api.owner, api.other):
            response = getattr(client, method)(url)
            assert response.status_code == 403, url
            assert "staff" in response.json()["detail"]
    assert Document.objects.filter(pk=document.pk).exists()
    # Any signed-in user still lists the corpora; anonymous may not.
    assert api.other.get("/api/v1/corpora/").status_code == 200
    assert api.anon.get("/api/v1/corpora/").status_code == 401
    # Staff: unknown corpus, document or job is a 404.
    assert api.staff.get("/api/v1/corpora/nope/documents/").status_code == 404
    assert api.staff.get("/api/v1/documents/999999/").status_code == 404
    assert api.staff.get("/api/v1/jobs/999999/").status_code == 404


def test_upload_follow_the_job_list_and_delete(api, live):
    corpus, _ = services.corpus_get_or_create(slug="api")
    pdf = make_pdf(["Marble is quarried at Carrara.", "Michelangelo chose his blocks there."])
    response = upload(api.staff, corpus.slug, "marble.pdf", pdf, title="Marble")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["unchanged"] is False
    assert body["document"]["title"] == "Marble" and body["document"]["corpus"] == "api"
    assert body["job"]["status"] == "queued"
    job_id, document_id = body["job"]["id"], body["document"]["id"]

    wait_job(job_id)
    job = api.staff.get(f"/api/v1/jobs/{job_id}/").json()
    assert job["status"] == "done" and job["chunks_done"] == job["chunks_total"] == 2
    assert job["document"] == document_id and job["attempts"] == 1 and job["worker"]
    assert job["finished_at"] and job["error"] == ""

    listed = api.staff.get(f"/api/v1/corpora/{corpus.slug}/documents/").json()
    assert listed["count"] == 1
    (row,) = listed["results"]
    assert row["status"] == "indexed" and row["chunk_count"] == 2 and row["page_count"] == 2
    assert row["mime_type"] == "application/pdf" and len(row["content_hash"]) == 64
    assert row["last_job"] == {"id": job_id, "status": "done"}

    jobs = api.staff.get(f"/api/v1/jobs/?corpus={corpus.slug}&status=done").json()
    assert [j["id"] for j in jobs["results"]] == [job_id]

    # The same bytes again: nothing to do.
    again = upload(api.staff, corpus.slug, "marble.pdf", pdf)
    assert again.status_code == 200 and again.json()["unchanged"] is True
    assert again.json()["job"] is None

    assert vectorstore.count(corpus.pk, document_id=document_id) == 2
    assert api.staff.delete(f"/api/v1/documents/{document_id}/").status_code == 204
    assert vectorstore.count(corpus.pk, document_id=document_id) == 0
    assert api.staff.get(f"/api/v1/documents/{document_id}/").status_code == 404
    assert api.staff.get(f"/api/v1/jobs/{job_id}/").status_code == 404


def test_upload_is_checked_by_content_and_size(api, corpus, settings):
    cases = [
        ("fake.pdf", b"no pdf here", "its content is text, not a PDF"),
        ("empty.txt", b"", "The file is empty."),
        ("photo.txt", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png"),
    ]
    for name, data, message in cases:
        response = upload(api.staff, corpus.slug, name, data)
        assert response.status_code == 400, name
        assert message in response.json()["file"][0]
    settings.RMASSIMO_UPLOAD_MAX_BYTES = 100
    response = upload(api.staff, corpus.slug, "big.txt", b"x" * 101)
    assert response.status_code == 400
    assert "over the limit of 100 bytes" in response.json()["file"][0]
    response = api.staff.post(
        f"/api/v1/corpora/{corpus.slug}/documents/", {"url": "ftp://x.org/a"}, format="json"
    )
    assert response.status_code == 400
    response = api.staff.post(f"/api/v1/corpora/{corpus.slug}/documents/", {}, format="json")
    assert response.status_code == 400
    assert not Document.objects.exists() and not IngestionJob.objects.exists()


def test_add_by_url(api, live):
    corpus, _ = services.corpus_get_or_create(slug="api")
    with LocalSite() as site:
        site.routes["/etna"] = Route(
            body=b"<html><title>Etna</title><p>Etna is the tallest active volcano.</p></html>",
            content_type="text/html",
        )
        response = api.staff.post(
            f"/api/v1/corpora/{corpus.slug}/documents/",
            {"url": f"{site.url}/etna"},
            format="json",
        )
        assert response.status_code == 202, response.content
        job = wait_job(response.json()["job"]["id"])
    assert job.status == "done", job.error
    document = api.staff.get(f"/api/v1/documents/{job.document_id}/").json()
    assert document["title"] == "Etna" and document["status"] == "indexed"
    assert document["source"] == f"{site.url}/etna"
