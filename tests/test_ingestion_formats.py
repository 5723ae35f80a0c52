"""Formats: .txt, .md, .html (text only), .pdf (pages kept), .docx; the type is checked by
content, and what cannot be read says why."""

from __future__ import annotations

import pytest

from core import vectorstore
from ingestion import parsing, services
from ingestion.models import Chunk, Document
from tests.ingestion_helpers import make_docx, make_pdf, wait_job

PDF_PAGES = [
    "Chapter one. The lighthouse keeper of Capo Testa trims the wick every evening.",
    "Chapter two. Vesuvius erupted in 79 AD and buried Pompeii under ash and pumice.",
    "Chapter three. Sourdough starter is fed with flour and water every morning.",
]
HTML = """<!DOCTYPE html>
<html><head><title>Harbour notes</title>
<style>body { color: red; } .secret { display: none }</style>
<script>var trackingCode = "do-not-index"; alert("x");</script></head>
<body><nav>Home</nav><h1>The harbour</h1>
<p>Fishing boats return to the harbour at dawn.</p>
<noscript>Enable scripts</noscript>
<script type="module">import "./also-not-text.js";</script>
<p>Gulls follow them &amp; wait for scraps.</p></body></html>"""


def test_pdf_keeps_page_numbers():
    parsed = parsing.parse(make_pdf(PDF_PAGES), name="book.pdf")
    assert parsed.kind == "pdf" and parsed.mime_type == "application/pdf"
    assert [p.number for p in parsed.pages] == [1, 2, 3]
    assert "Vesuvius" in parsed.pages[1].text
    assert parsed.page_count == 3
    chunks = parsing.chunk(parsed.pages)
    assert [c.page for c in chunks] == [1, 2, 3]
    vesuvius = chunks[1]
    assert parsed.pages[1].text[vesuvius.start : vesuvius.end] == vesuvius.text


def test_docx_paragraphs_and_tables():
    data = make_docx(
        ["Trulli are stone huts of Apulia.", "Their roofs are conical."],
        table=[["town", "Alberobello"]],
    )
    parsed = parsing.parse(data, name="trulli.docx")
    assert parsed.kind == "docx"
    text = parsed.pages[0].text
    assert "Trulli are stone huts" in text and "conical" in text and "Alberobello" in text
    assert parsed.page_count is None


def test_html_is_text_only():
    parsed = parsing.parse(HTML.encode(), name="harbour.html")
    assert parsed.kind == "html" and parsed.title == "Harbour notes"
    text = parsed.pages[0].text
    assert "Fishing boats return" in text and "Gulls follow them & wait" in text
    for hidden in ("trackingCode", "do-not-index", "color: red", "also-not-text", "<p>"):
        assert hidden not in text


def test_text_and_markdown():
    assert parsing.parse(b"# Title\n\nbody", name="a.md").kind == "markdown"
    parsed = parsing.parse("\ufeffcittà è bella".encode(), name="a.txt")
    assert parsed.kind == "text" and parsed.pages[0].text == "città è bella"


def test_url_without_extension_is_typed_by_content():
    assert parsing.detect(HTML.encode(), name="https://example.org/harbour") == "html"
    assert parsing.detect(b"plain words", name="https://example.org/notes") == "text"
    assert (
        parsing.detect(b"<p>hi</p>", name="https://example.org/x", content_type="text/html")
        == "html"
    )
    pdf = make_pdf(["one"])
    assert parsing.detect(pdf, name="https://example.org/download?id=3") == "pdf"


@pytest.mark.parametrize(
    ("data", "name", "message"),
    [
        (b"", "empty.txt", "The file is empty."),
        (b"  \n\t ", "blank.md", "The file is empty."),
        (b"plain text pretending", "fake.pdf", "named '.pdf' but its content is text"),
        (b"%PDF-1.4\n" + b"garbage " * 20, "broken.pdf", "The PDF could not be read"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "photo.txt", "the content is image/png"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "photo.png", "the content is image/png"),
        (b"MZ\x90\x00" + b"\x00\xff" * 64, "tool.txt", "application/x-msdownload"),
        (b"\x01\x02data\x00\x00\x07" * 16, "dump.txt", "The file is binary, not text."),
        ("caffè".encode("latin-1"), "latin1.txt", "not valid UTF-8 (byte 4)"),
        (b"PK\x03\x04" + b"\x00" * 40, "broken.docx", "the content is"),
        (b"just words", "notes.exe", "Unsupported file type '.exe'"),
    ],
)
def test_bad_input_is_refused_with_a_reason(data, name, message):
    with pytest.raises(parsing.ParseError) as caught:
        parsing.parse(data, name=name)
    assert message in str(caught.value)


def test_a_pdf_named_txt_is_refused():
    with pytest.raises(parsing.ParseError, match="named '.txt' but its content is a PDF"):
        parsing.parse(make_pdf(["x"]), name="report.txt")


def test_docx_named_pdf_is_refused():
    with pytest.raises(parsing.ParseError, match="content is a Word document, not a PDF"):
        parsing.detect(make_docx(["x"]), name="report.pdf")


def test_truncated_pdf_is_refused():
    data = make_pdf(PDF_PAGES)
    with pytest.raises(parsing.ParseError, match="damaged or truncated"):
        parsing.parse(data[: len(data) // 2], name="cut.pdf")


@pytest.mark.django_db(transaction=True)
def test_every_format_goes_through_the_workers(live):
    corpus, _ = services.corpus_get_or_create(slug="formats")
    files = {
        "book.pdf": make_pdf(PDF_PAGES),
        "trulli.docx": make_docx(["Trulli are stone huts of Apulia with conical roofs."]),
        "harbour.html": HTML.encode(),
        "notes.md": b"# Notes\n\nThe Dolomites glow pink at sunset.",
        "plain.txt": "Il Po è il fiume più lungo d'Italia.".encode(),
    }
    jobs = {
        name: services.document_add(corpus=corpus, source=name, data=data).job
        for name, data in files.items()
    }
    for name, job in jobs.items():
        job = wait_job(job.pk)
        assert job.status == "done", (name, job.error)
        document = Document.objects.get(pk=job.document_id)
        assert document.status == "indexed"
        assert vectorstore.count(corpus.pk, document_id=document.pk) == document.chunk_count > 0

    book = Document.objects.get(source="book.pdf")
    assert book.page_count == 3 and book.mime_type == "application/pdf"
    assert list(Chunk.objects.filter(document=book).values_list("page", flat=True)) == [1, 2, 3]
    html = Document.objects.get(source="harbour.html")
    indexed = " ".join(Chunk.objects.filter(document=html).values_list("text", flat=True))
    assert "Fishing boats" in indexed and "trackingCode" not in indexed
    assert Document.objects.get(source="trulli.docx").mime_type.endswith("document")

    hits = vectorstore.search(corpus.pk, text="Vesuvius Pompeii", embedding=None, top_k=1)
    assert hits[0].document_id == book.pk and hits[0].page == 2
