"""The corpus in the Django admin: upload (files and URLs), progress, actions that go through
the services (no vectors left behind), retry of failed jobs; chat records, read-mostly."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from chat.models import Conversation, Question
from core import vectorstore
from ingestion import services
from ingestion.models import Corpus, Document, IngestionJob
from tests.ingestion_helpers import consumed, long_text, make_pdf, wait_job, wait_jobs
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

UPLOAD = "/admin/ingestion/document/upload/"
DOCUMENTS = "/admin/ingestion/document/"
JOBS = "/admin/ingestion/ingestionjob/"


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("boss", "boss@example.org", "pw-boss")


@pytest.fixture
def browser(admin_user) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


@pytest.fixture
def corpus(db):
    corpus, _ = services.corpus_get_or_create(slug="admin-corpus", name="Admin corpus")
    return corpus


def action(browser: Client, url: str, name: str, objects, **extra):
    return browser.post(
        url,
        {"action": name, "_selected_action": [o.pk for o in objects], **extra},
        follow=True,
    )


def upload(browser: Client, corpus: Corpus, files=(), urls: str = ""):
    return browser.post(
        UPLOAD,
        {
            "corpus": corpus.pk,
            "files": [SimpleUploadedFile(name, data) for name, data in files],
            "urls": urls,
        },
    )


def test_upload_a_pdf_watch_it_then_ask_and_see_the_page(browser, admin_user, corpus, live):
    page = browser.get(UPLOAD + f"?corpus={corpus.pk}")
    assert page.status_code == 200
    assert b'type="file" name="files"' in page.content and b"multiple" in page.content
    assert browser.get(DOCUMENTS + "add/").url == UPLOAD  # "add" is the upload form

    pdf = make_pdf(
        [
            "Contents: rivers, mountains and islands of Italy.",
            "The island of Stromboli has erupted almost continuously for two thousand "
            "years; sailors call it the lighthouse of the Mediterranean.",
        ]
    )
    live.configure(embed_latency=0.5)
    response = upload(
        browser,
        corpus,
        files=[("islands.pdf", pdf), ("notes.txt", b"Capri is reached by ferry from Naples.")],
    )
    assert response.status_code == 302
    assert response.url == reverse("admin:ingestion_document_changelist") + (
        f"?corpus__id__exact={corpus.pk}"
    )
    jobs = list(IngestionJob.objects.order_by("pk"))
    assert len(jobs) == 2
    # While the jobs run, the lists refresh themselves.
    listing = browser.get(JOBS)
    assert b'http-equiv="refresh"' in listing.content
    live.configure(embed_latency=0.0)
    wait_jobs([j.pk for j in jobs])

    listing = browser.get(JOBS).content.decode()
    assert 'http-equiv="refresh"' not in listing
    assert "2 / 2" in listing  # the PDF's two pages, embedded
    assert "gpu0@tests" in listing
    documents = browser.get(DOCUMENTS + f"?corpus__id__exact={corpus.pk}").content.decode()
    islands = Document.objects.get(source="islands.pdf")
    assert "islands" in documents and islands.content_hash[:12] in documents
    assert f"#{jobs[0].pk} done" in documents
    detail = browser.get(DOCUMENTS + f"{islands.pk}/change/").content.decode()
    assert islands.content_hash in detail and "application/pdf" in detail

    api = APIClient()
    api.force_authenticate(admin_user)
    asked = api.post(
        "/api/v1/questions/",
        {"text": "Which island is the lighthouse of the Mediterranean?", "corpus": corpus.slug},
    ).json()
    result = wait_for(
        lambda: (
            (r := api.get(f"/api/v1/questions/{asked['id']}/").json())["status"] == "done" and r
        ),
        what="the answer",
    )
    assert result["sources"][0]["title"] == "islands"
    assert result["sources"][0]["page"] == 2
    assert "Stromboli" in result["sources"][0]["text"]


def test_upload_refuses_files_by_content_and_size(browser, corpus, settings):
    response = upload(
        browser,
        corpus,
        files=[("fake.pdf", b"not a pdf"), ("ok.txt", b"fine text")],
        urls="ftp://example.org/x",
    )
    assert response.status_code == 200
    page = response.content.decode()
    assert "fake.pdf: The file is named &#x27;.pdf&#x27; but its content is text" in page
    assert "Only http and https URLs" in page
    settings.RMASSIMO_UPLOAD_MAX_BYTES = 50
    response = upload(browser, corpus, files=[("big.txt", b"x" * 51)])
    assert "big.txt: The file is 51 bytes, over the limit of 50 bytes" in response.content.decode()
    response = upload(browser, corpus)
    assert "Choose at least one file or give a URL." in response.content.decode()
    assert not Document.objects.exists()


def test_document_actions_go_through_the_services(browser, corpus, live):
    added = [
        services.document_add(corpus=corpus, source=f"d{i}.txt", data=text.encode())
        for i, text in enumerate(["Alpha text on lakes.", long_text("beta", 150), "Gamma."])
    ]
    wait_jobs([a.job.pk for a in added])
    one, two, three = (Document.objects.get(pk=a.document.pk) for a in added)
    assert vectorstore.count(corpus.pk) == 1 + two.chunk_count + 1

    response = action(browser, DOCUMENTS, "remove_from_index", [one])
    assert b"1 document(s) removed from the index." in response.content
    one.refresh_from_db()
    assert one.status == "removed" and vectorstore.count(corpus.pk, document_id=one.pk) == 0

    response = action(browser, DOCUMENTS, "ingest", [one, two])
    assert b"1 document(s) queued" in response.content  # two is indexed already
    wait_job(one.jobs.first().pk)
    assert vectorstore.count(corpus.pk, document_id=one.pk) == 1

    response = action(browser, DOCUMENTS, "reingest", [two])
    assert b"1 document(s) queued for re-ingestion." in response.content
    job = wait_job(two.jobs.order_by("-pk").first().pk)
    assert job.status == "done"
    assert vectorstore.count(corpus.pk, document_id=two.pk) == two.chunk_count

    # The stock "delete selected" action, confirmed: vectors go with the rows.
    response = action(browser, DOCUMENTS, "delete_selected", [two, three], post="yes")
    assert b"Successfully deleted 2" in response.content
    assert vectorstore.count(corpus.pk, document_id=two.pk) == 0
    assert vectorstore.count(corpus.pk, document_id=three.pk) == 0
    # And the delete page of one document.
    response = browser.post(DOCUMENTS + f"{one.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert vectorstore.count(corpus.pk) == 0
    assert not Document.objects.exists()


def test_retry_failed_jobs_from_the_admin(browser, corpus, live):
    live.configure(fail_status=500, fail_message="model crashed", fail_count=-1)
    job = services.document_add(corpus=corpus, source="r.txt", data=b"Retry me, please.").job
    job = wait_job(job.pk)
    assert job.status == "failed"
    listing = browser.get(JOBS).content.decode()
    assert "model crashed" in listing

    live.configure(fail_count=0)
    response = action(browser, JOBS, "retry", [job])
    assert b"1 job(s) queued again." in response.content
    job = wait_job(job.pk)
    assert job.status == "done" and job.attempts == 1
    assert vectorstore.count(corpus.pk, document_id=job.document_id) == 1
    response = action(browser, JOBS, "retry", [job])
    assert b"0 job(s) queued again; 1 were neither failed nor stalled" in response.content
    # Jobs are records: no add, change or delete from the admin.
    assert browser.get(JOBS + "add/").status_code == 403
    assert browser.post(JOBS + f"{job.pk}/delete/", {"post": "yes"}).status_code == 403
    consumed()  # anything the refused delete might have sent
    assert IngestionJob.objects.filter(pk=job.pk).exists()


def test_corpus_admin_and_delete_drops_its_vectors(browser, live):
    response = browser.post(
        "/admin/ingestion/corpus/add/",
        {
            "name": "Poems",
            "slug": "poems",
            "description": "",
            "language": "en",
            "persona_prompt": "You are a poet.",
            "chat_model": "",
            "embed_model": "none",
        },
    )
    assert response.status_code == 302, response.content
    corpus = Corpus.objects.get(slug="poems")
    job = services.document_add(corpus=corpus, source="p.txt", data=b"Roses are red.").job
    wait_job(job.pk)
    listing = browser.get("/admin/ingestion/corpus/").content.decode()
    assert "BM25 only" in listing and "Upload documents" in listing
    assert vectorstore.count(corpus.pk) == 1
    response = browser.post(f"/admin/ingestion/corpus/{corpus.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Corpus.objects.filter(pk=corpus.pk).exists()
    assert vectorstore.count(corpus.pk) == 0


def test_chat_records_are_listed_and_searchable(browser, admin_user, corpus):
    conversation = Conversation.objects.create(owner=admin_user, corpus=corpus, title="Trip")
    Question.objects.create(
        conversation=conversation, text="Where is Matera?", status="done", gpu="gpu1"
    )
    Question.objects.create(
        conversation=conversation,
        text="What about <b>Bari</b>?",
        status="failed",
        error="The model server at http://gpu3:11434 could not be reached.",
    )
    listing = browser.get("/admin/chat/question/").content.decode()
    assert "Where is Matera?" in listing and "gpu1" in listing
    assert "could not be reached" in listing
    assert "&lt;b&gt;Bari&lt;/b&gt;" in listing and "<b>Bari</b>" not in listing
    found = browser.get("/admin/chat/question/?q=Matera").content.decode()
    assert "Where is Matera?" in found and "Bari" not in found
    question = Question.objects.get(text="Where is Matera?")
    assert browser.get(f"/admin/chat/question/{question.pk}/change/").status_code == 200
    assert browser.get("/admin/chat/question/add/").status_code == 403
    convs = browser.get("/admin/chat/conversation/?q=Matera").content.decode()
    assert "Trip" in convs


def test_only_staff_with_permissions_get_in(make_user, corpus):
    plain = Client()
    plain.force_login(make_user("reader"))
    assert plain.get(UPLOAD).status_code == 302  # to the admin login
    assert plain.get(DOCUMENTS).status_code == 302
    staff = Client()
    staff.force_login(make_user("intern", staff=True))  # staff, but no permissions
    assert staff.get(UPLOAD).status_code == 403
    assert staff.get(DOCUMENTS).status_code == 403
    assert Client().get(UPLOAD).status_code == 302
