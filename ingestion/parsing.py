"""Turn a document's bytes into text, page by page, and the text into chunks.

The type of a document is decided by its content, never by its name alone: a `.pdf` must
start like a PDF, a `.docx` must be a Word package, and text must be UTF-8 without binary
bytes. A name whose extension disagrees with the content is refused, so a renamed file
cannot slip a format past the parser meant for another.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import PurePath

import filetype
from django.conf import settings
from llama_index.core import Document as LlamaDocument
from llama_index.core.node_parser import SentenceSplitter

logger = logging.getLogger(__name__)

PDF = "pdf"
DOCX = "docx"
HTML = "html"
MARKDOWN = "markdown"
TEXT = "text"

MIME_TYPES = {
    PDF: "application/pdf",
    DOCX: "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    HTML: "text/html",
    MARKDOWN: "text/markdown",
    TEXT: "text/plain",
}
SUFFIX_KINDS = {
    ".txt": TEXT,
    ".text": TEXT,
    ".md": MARKDOWN,
    ".markdown": MARKDOWN,
    ".html": HTML,
    ".htm": HTML,
    ".pdf": PDF,
    ".docx": DOCX,
}
SUPPORTED_SUFFIXES = set(SUFFIX_KINDS)
TEXT_KINDS = {TEXT, MARKDOWN, HTML}
KIND_NAMES = {PDF: "a PDF", DOCX: "a Word document", HTML: "HTML", MARKDOWN: "text", TEXT: "text"}

_SNIFF_BYTES = 8192
_HTML_START = re.compile(
    rb"^\s*(<!--.*?-->\s*)*<(!doctype\s+html|html[\s>]|head[\s>]|body[\s>])",
    re.IGNORECASE | re.DOTALL,
)
# Elements whose text is code, styling or metadata, never prose to answer from.
_HTML_DROP = ("script", "style", "noscript", "template", "svg", "head", "iframe", "object")


class ParseError(Exception):
    """Why a document cannot be read, worded for the person who added it."""


@dataclass(frozen=True)
class Page:
    text: str
    number: int | None  # 1-based; None for formats without pages


@dataclass(frozen=True)
class Parsed:
    kind: str
    pages: list[Page]
    title: str = ""  # the document's own title, when the format has one (HTML <title>)

    @property
    def mime_type(self) -> str:
        return MIME_TYPES[self.kind]

    @property
    def page_count(self) -> int | None:
        numbers = [p.number for p in self.pages if p.number is not None]
        return max(numbers) if numbers else None


@dataclass(frozen=True)
class ChunkText:
    text: str
    page: int | None
    start: int  # character offsets in the page's text (the document's, without pages)
    end: int


def is_supported(name: str) -> bool:
    return PurePath(name).suffix.lower() in SUPPORTED_SUFFIXES


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_SUFFIXES))


def check_size(size: int) -> None:
    limit = settings.RMASSIMO_UPLOAD_MAX_BYTES
    if size > limit:
        raise ParseError(
            f"The file is {size:,} bytes, over the limit of {limit:,} bytes "
            "(RMASSIMO_UPLOAD_MAX_BYTES)."
        )


def detect_file(handle, *, name: str) -> str:
    """detect() for an uploaded file, reading its head (and a Word file's zip directory)
    instead of the whole of it into memory."""
    handle.seek(0)
    head = handle.read(_SNIFF_BYTES)
    handle.seek(0)
    return detect(head, name=name, package=handle)


def detect(data: bytes, *, name: str, content_type: str = "", package=None) -> str:
    """The kind of document the bytes are, checked against the name's extension.

    `content_type` is a server's Content-Type header, used only to tell HTML from plain
    text when the name has no extension (a URL like https://example.org/about).
    `package`, a file object, stands for the whole document when `data` is its head.
    """
    if not data.strip():
        raise ParseError("The file is empty.")
    suffix = PurePath(name).suffix.lower()
    claimed = SUFFIX_KINDS.get(suffix)
    found = _sniff(data, package)
    if found is None:
        guess = filetype.guess(data[:_SNIFF_BYTES])
        what = f"{guess.mime} (.{guess.extension})" if guess else "binary data"
        raise ParseError(
            f"Unsupported file type: the content is {what}, which cannot be indexed; "
            f"supported: {supported_list()}."
        )
    if claimed is None:
        if suffix and not _looks_like_url_path(name):
            raise ParseError(f"Unsupported file type '{suffix}'; supported: {supported_list()}.")
        if found == TEXT and (
            "html" in content_type.lower() or _HTML_START.match(data[:_SNIFF_BYTES])
        ):
            return HTML
        if found == TEXT and "markdown" in content_type.lower():
            return MARKDOWN
        return found
    if found in (PDF, DOCX) or claimed in (PDF, DOCX):
        if found != claimed:
            raise ParseError(
                f"The file is named '{suffix}' but its content is {KIND_NAMES[found]}, "
                f"not {KIND_NAMES[claimed]}."
                + (" (a PDF starts with %PDF)." if claimed == PDF else "")
            )
    return claimed


def _looks_like_url_path(name: str) -> bool:
    # "https://example.org/page.php" or "/docs/v2.1": the suffix says nothing of the content.
    return "://" in name


def _sniff(data: bytes, package=None) -> str | None:
    head = data[:_SNIFF_BYTES]
    if b"%PDF-" in head[:1024]:
        return PDF
    if head.startswith(b"PK\x03\x04"):
        return DOCX if _is_docx(package if package is not None else io.BytesIO(data)) else None
    if filetype.guess(head) is not None:
        return None  # an image, archive, executable, audio...: not something to read
    return TEXT


def _is_docx(handle) -> bool:
    """Whether the zip is a Word package; ParseError when it unpacks to too much."""
    try:
        with zipfile.ZipFile(handle) as package:
            entries = package.infolist()
            if "word/document.xml" not in {entry.filename for entry in entries}:
                return False
            # The sizes in the zip's directory bound what unpacking yields (zipfile stops
            # at the declared size), so they are checked before anything is unpacked.
            unpacked = sum(entry.file_size for entry in entries)
    except (zipfile.BadZipFile, ValueError):
        return False
    finally:
        if hasattr(handle, "seek"):
            handle.seek(0)
    limit = settings.RMASSIMO_DOCX_MAX_UNPACKED_BYTES
    if unpacked > limit:
        raise ParseError(
            f"The Word document unpacks to {unpacked:,} bytes, over the limit of {limit:,} "
            "bytes (RMASSIMO_DOCX_MAX_UNPACKED_BYTES)."
        )
    return True


def parse(data: bytes, *, name: str, content_type: str = "") -> Parsed:
    kind = detect(data, name=name, content_type=content_type)
    if kind == PDF:
        return Parsed(kind=kind, pages=_pdf_pages(data))
    if kind == DOCX:
        return Parsed(kind=kind, pages=[Page(text=_docx_text(data), number=None)])
    text = decode_text(data)
    if kind == HTML:
        title, text = html_text(text)
        return Parsed(kind=kind, pages=[Page(text=text, number=None)], title=title)
    return Parsed(kind=kind, pages=[Page(text=text, number=None)])


def decode_text(data: bytes) -> str:
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise ParseError("The file is binary, not text.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ParseError(
            f"The text is not valid UTF-8 (byte {exc.start}); save it as UTF-8 and add it again."
        ) from exc


def html_text(markup: str) -> tuple[str, str]:
    """(title, visible text) of an HTML page, without scripts, styles or markup."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(markup, "lxml")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for element in soup(_HTML_DROP):
        element.decompose()
    text = soup.get_text("\n")
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.splitlines())
    return title, re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _pdf_pages(data: bytes) -> list[Page]:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                reader.decrypt("")
            except Exception as exc:
                raise FileNotDecryptedError(str(exc)) from exc
        pages = [
            Page(text=(page.extract_text() or "").strip(), number=number)
            for number, page in enumerate(reader.pages, start=1)
        ]
    except FileNotDecryptedError as exc:
        raise ParseError("The PDF is password-protected; add an unprotected copy.") from exc
    except Exception as exc:
        # pypdf raises many types on damaged files (its own, ValueError, KeyError...).
        logger.info("unreadable PDF: %r", exc)
        raise ParseError(
            f"The PDF could not be read; it looks damaged or truncated ({_reason(exc)})."
        ) from exc
    if not any(p.text for p in pages):
        raise ParseError(
            "The PDF has no text to extract (a scan needs OCR before it can be indexed)."
        )
    return pages


def _docx_text(data: bytes) -> str:
    import docx

    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:
        raise ParseError(f"The Word document could not be read ({_reason(exc)}).") from exc
    blocks = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            blocks.append(" | ".join(cell.text.strip() for cell in row.cells))
    return "\n\n".join(b.strip() for b in blocks if b.strip())


def _reason(exc: Exception) -> str:
    return (str(exc) or type(exc).__name__)[:200]


# A sentence ends at . ! ? followed by white space, or at a line break. The splitter only
# takes these as candidate break points and packs sentences into chunks of the token size,
# so an abbreviation taken for an end costs nothing; NLTK's Punkt model, the default, made
# up two thirds of the chunking time.
_SENTENCE = re.compile(r".*?(?:[.!?]+(?=\s)|\n|$)\s*")


def _sentences(text: str) -> list[str]:
    return [m.group(0) for m in _SENTENCE.finditer(text) if m.group(0)]


@functools.lru_cache(maxsize=4)
def _splitter(size: int, overlap: int) -> SentenceSplitter:
    # Building one loads the tokenizer: once per process.
    return SentenceSplitter(
        chunk_size=size, chunk_overlap=overlap, chunking_tokenizer_fn=_sentences
    )


def chunk(pages: list[Page]) -> list[ChunkText]:
    splitter = _splitter(settings.RMASSIMO_CHUNK_SIZE, settings.RMASSIMO_CHUNK_OVERLAP)
    chunks: list[ChunkText] = []
    for page in pages:
        if not page.text.strip():
            continue
        for node in splitter.get_nodes_from_documents([LlamaDocument(text=page.text)]):
            text = node.get_content()
            if not text.strip():
                continue
            start = node.start_char_idx if node.start_char_idx is not None else 0
            end = node.end_char_idx if node.end_char_idx is not None else start + len(text)
            chunks.append(ChunkText(text=text, page=page.number, start=start, end=end))
    return chunks
