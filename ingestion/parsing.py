"""Turn a document's bytes into text, page by page, and the text into chunks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from django.conf import settings
from llama_index.core import Document as LlamaDocument
from llama_index.core.node_parser import SentenceSplitter

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES


class ParseError(Exception):
    """Why a document cannot be read, worded for the person who added it."""


@dataclass(frozen=True)
class Page:
    text: str
    number: int | None  # 1-based; None for formats without pages


@dataclass(frozen=True)
class ChunkText:
    text: str
    page: int | None
    start: int
    end: int


def is_supported(name: str) -> bool:
    return PurePath(name).suffix.lower() in SUPPORTED_SUFFIXES


def parse(data: bytes, *, name: str) -> list[Page]:
    if not data.strip():
        raise ParseError("The file is empty.")
    suffix = PurePath(name).suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return [Page(text=_decode_text(data), number=None)]
    raise ParseError(
        f"Unsupported file type '{suffix or name}'; supported: "
        f"{', '.join(sorted(SUPPORTED_SUFFIXES))}."
    )


def _decode_text(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise ParseError("The file is binary, not text.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ParseError(
            f"The text is not valid UTF-8 (byte {exc.start}); save it as UTF-8 and add it again."
        ) from exc


def chunk(pages: list[Page]) -> list[ChunkText]:
    splitter = SentenceSplitter(
        chunk_size=settings.RMASSIMO_CHUNK_SIZE, chunk_overlap=settings.RMASSIMO_CHUNK_OVERLAP
    )
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
