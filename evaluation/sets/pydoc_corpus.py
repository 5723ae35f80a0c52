"""Write CPython's documentation topics (`pydoc_data.topics`, the text behind `help("if")`)
as one text file per topic, the corpus of the `pydoc` evaluation set:

    python evaluation/sets/pydoc_corpus.py var/pydoc-topics
    python manage.py ingest var/pydoc-topics --corpus pydoc --language en
    python manage.py evaluate import evaluation/sets/pydoc.jsonl --corpus pydoc --set pydoc

A document's title is its topic name (the file name without `.txt`), which is what the set's
items name. The topics come with the Python that runs this; the set was written against 3.11.
"""

import sys
from pathlib import Path
from pydoc_data.topics import topics


def main(target: str) -> None:
    folder = Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(topics.items()):
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    print(f"{len(topics)} topics written to {folder}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
