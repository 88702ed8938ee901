"""Write a benchmark's table into a Markdown page between ``<!-- <key>:begin -->`` and ``<!-- <key>:end -->``
(appended with its markers the first time), so the figures in docs/ come from the command that made them."""

from __future__ import annotations

from pathlib import Path


def write_block(doc: Path, key: str, body: str) -> None:
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n\n{body.strip()}\n\n{end}"
    text = doc.read_text() if doc.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
