"""manage.py ingest PATH_OR_URL... --corpus SLUG: through the workers, URLs fetched by the
worker, a summary at the end, non-zero exit when something failed."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from core import vectorstore
from ingestion.models import Corpus, Document, IngestionJob
from tests.ingestion_helpers import LocalSite, Route, make_docx, make_pdf

pytestmark = pytest.mark.django_db(transaction=True)


def run(*args) -> tuple[str, str, int]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("ingest", *args, stdout=out, stderr=err)
        code = 0
    except CommandError as exc:
        err.write(str(exc))
        code = exc.returncode
    return out.getvalue(), err.getvalue(), code


def test_files_folders_and_urls_with_a_summary(live, tmp_path):
    folder = tmp_path / "writings"
    folder.mkdir()
    (folder / "a.txt").write_text("Olive groves of Puglia are centuries old.")
    (folder / "b.md").write_text("# Mills\n\nStone mills press the olives.")
    (folder / "skip.bin").write_bytes(b"\x00\x01")  # not a supported name: not collected
    pdf = tmp_path / "harvest.pdf"
    pdf.write_bytes(make_pdf(["Harvest starts in October.", "Oil is stored in the dark."]))
    docx = tmp_path / "press.docx"
    docx.write_bytes(make_docx(["The first pressing is the finest."]))
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"this is no PDF at all")

    with LocalSite() as site:
        site.routes["/oil.html"] = Route(
            body=b"<html><body><p>Extra virgin oil has low acidity.</p></body></html>",
            content_type="text/html; charset=utf-8",
        )
        url = f"{site.url}/oil.html"
        out, err, code = run(
            str(folder),
            str(pdf),
            str(docx),
            str(bad),
            url,
            "ftp://example.org/x.txt",
            "--corpus",
            "olives",
        )
        assert site.count("/oil.html") == 1  # fetched once, by the worker
        assert code == 1, (out, err)
        assert "Created corpus 'olives'." in out
        assert (
            "Documents: 7 · indexed: 5 · chunks: 6 · unchanged (skipped): 0 · failed: 2" in out
        ), out
        assert f"FAILED {bad}: The file is named '.pdf' but its content is text" in err
        assert "FAILED ftp://example.org/x.txt: Only http and https URLs" in err

        corpus = Corpus.objects.get(slug="olives")
        assert vectorstore.count(corpus.pk) == 6
        assert Document.objects.get(source=url).mime_type == "text/html"

        # Again: unchanged files are skipped without a job; the URL is fetched again and
        # its job ends as skipped, with no new vectors.
        out, err, code = run(str(folder), str(pdf), str(docx), url, "--corpus", "olives")
        assert code == 0, err
        assert "Documents: 5 · indexed: 0 · chunks: 0 · unchanged (skipped): 5 · failed: 0" in out
        assert site.count("/oil.html") == 2
    assert IngestionJob.objects.filter(status="skipped").count() == 1
    assert vectorstore.count(corpus.pk) == 6


def test_a_url_that_is_not_found_fails_with_the_status(live):
    with LocalSite() as site:
        out, err, code = run(f"{site.url}/missing.pdf", "--corpus", "urls")
    assert code == 1
    assert "failed: 1" in out
    assert "could not be fetched" in err and "/missing.pdf" in err


def test_missing_path_is_an_error_before_anything_is_queued(live, tmp_path):
    out, err, code = run(str(tmp_path / "nope.txt"), "--corpus", "x")
    assert code == 1 and "No such file or folder" in err
    assert not IngestionJob.objects.exists()
