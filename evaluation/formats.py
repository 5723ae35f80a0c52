"""Reading evaluation sets from JSONL or CSV.

A JSONL line: {"question": "...", "language": "en", "documents": ["<title or source>", ...],
"page": 3, "facts": ["..."], "answerable": true}; `page` and `facts` optional, `answerable`
defaults to true, an unanswerable item has no documents. CSV has the same columns, with
`documents` and `facts` separated by `|`. Every line is checked before anything is kept.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field

FIELDS = ("question", "language", "documents", "page", "facts", "answerable")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")
_TRUE = {"true", "1", "yes", "y"}
_FALSE = {"false", "0", "no", "n"}


@dataclass
class Item:
    question: str
    language: str
    documents: list[str] = field(default_factory=list)
    page: int | None = None
    facts: list[str] = field(default_factory=list)
    answerable: bool = True


class BadFile(Exception):
    """Lines that cannot be imported, each with its line number."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"line {n}: {m}" for n, m in problems))


def parse(text: str, *, kind: str) -> list[Item]:
    """`kind` is "jsonl" or "csv". Raises BadFile listing every bad line."""
    rows = _jsonl_rows(text) if kind == "jsonl" else _csv_rows(text)
    items: list[Item] = []
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for number, row in rows:
        if isinstance(row, str):
            problems.append((number, row))
            continue
        try:
            item = _item(row)
        except ValueError as exc:
            problems.append((number, str(exc)))
            continue
        if item.question in seen:
            problems.append((number, f"the same question as line {seen[item.question]}"))
            continue
        seen[item.question] = number
        items.append(item)
    if not items and not problems:
        problems.append((1, "no items in the file"))
    if problems:
        raise BadFile(problems)
    return items


def kind_of(path: str) -> str:
    return "csv" if path.lower().endswith(".csv") else "jsonl"


def _jsonl_rows(text: str):
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, f"not valid JSON ({exc.msg} at column {exc.colno})"
            continue
        yield number, row if isinstance(row, dict) else "not a JSON object"


def _csv_rows(text: str):
    reader = csv.DictReader(io.StringIO(text))
    unknown = set(reader.fieldnames or []) - set(FIELDS)
    if unknown:
        yield 1, f"unknown column(s): {', '.join(sorted(unknown))}"
        return
    for row in reader:
        number = reader.line_num
        parsed: dict = {}
        for key, value in row.items():
            value = (value or "").strip()
            if key is None or not value:
                continue
            if key in ("documents", "facts"):
                parsed[key] = [part.strip() for part in value.split("|") if part.strip()]
            elif key == "page":
                parsed[key] = int(value) if value.isdigit() else value
            elif key == "answerable":
                low = value.lower()
                parsed[key] = True if low in _TRUE else False if low in _FALSE else value
            else:
                parsed[key] = value
        yield number, parsed


def _strings(row: dict, key: str) -> list[str]:
    value = row.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f'"{key}" must be a list of non-empty strings')
    return [v.strip() for v in value]


def _item(row: dict) -> Item:
    unknown = set(row) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError('"question" must be a non-empty string')
    language = row.get("language")
    if not isinstance(language, str) or not _LANGUAGE.match(language):
        raise ValueError('"language" must be a language code such as "en" or "it"')
    answerable = row.get("answerable", True)
    if not isinstance(answerable, bool):
        raise ValueError('"answerable" must be true or false')
    documents = _strings(row, "documents")
    facts = _strings(row, "facts")
    page = row.get("page")
    if page is not None and (isinstance(page, bool) or not isinstance(page, int) or page < 1):
        raise ValueError('"page" must be a whole number from 1')
    if answerable and not documents:
        raise ValueError('an answerable item needs "documents"')
    if not answerable and (documents or page is not None or facts):
        raise ValueError('an unanswerable item has no "documents", "page" or "facts"')
    return Item(
        question=question.strip(),
        language=language,
        documents=documents,
        page=page,
        facts=facts,
        answerable=answerable,
    )
