"""Reading a user's headed TSV (CoVoST 2 and others): no quoting, one record per line, bad lines reported."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from .errors import BadInput, CorpusError


def iter_tsv(path: str | os.PathLike, required: tuple[str, ...], bad: BadInput) -> Iterator[tuple[int, dict]]:
    """(line number, {column: field}) for each well-formed line; missing columns raise, bad lines go to ``bad``.

    Like fairseq's readers, no quoting: a ``"`` is an ordinary character (CoVoST sentences contain them).
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(path, None, "no such file")
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise CorpusError(path, 1, f"empty file; expected a header naming {', '.join(required)}")
    try:
        header = lines[0].decode("utf-8-sig").rstrip("\r").split("\t")
    except UnicodeDecodeError:
        raise CorpusError(path, 1, "the header is not UTF-8") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise CorpusError(path, 1, f"missing column(s) {', '.join(missing)}; the header has {', '.join(header)}")
    for number, raw in enumerate(lines[1:], start=2):
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            bad(
                CorpusError(
                    path,
                    number,
                    f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); re-encode the file as UTF-8",
                )
            )
            continue
        if not text:
            continue  # an empty line holds no record (a line of tabs does, and is checked)
        fields = text.split("\t")
        if len(fields) != len(header):
            bad(CorpusError(path, number, f"{len(fields)} tab-separated fields, the header has {len(header)}"))
            continue
        yield number, dict(zip(header, fields, strict=True))
