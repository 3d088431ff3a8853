"""Reading a user's headed TSV (CoVoST 2 and others): no quoting, one record per line, bad lines reported."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import BadInput, CorpusError


def read_table(
    path: str | os.PathLike, required: Sequence[str], no_file: str = "no such file"
) -> tuple[list[str], list[tuple[int, bytes]]]:
    """(header, [(line number, raw line)]) of a headed TSV; a missing or empty file, a header that is not UTF-8
    or that lacks a required column raises ``CorpusError`` (``no_file`` is the message for a missing file)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(path, None, no_file)
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
    return header, list(enumerate(lines[1:], start=2))


def decode_line(path: str | os.PathLike, number: int, raw: bytes) -> str:
    """A data line as text (without its \\r), or ``CorpusError`` naming the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
        message = f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); re-encode the file as UTF-8"
        raise CorpusError(Path(path), number, message) from None


def split_escaped(text: str, escape: str = "\\") -> list[str]:
    r"""Tab-separated fields of a record written with an escape character and no quoting, as CoVoST 2's
    get_covost_splits.py writes them (pandas ``to_csv(sep="\t", quoting=csv.QUOTE_NONE, escapechar="\\")``):
    ``\x`` is a literal ``x``, so ``\"`` is ``"``, ``\\`` is ``\``, and an escaped tab or newline belongs to the field.
    """
    if escape not in text:
        return text.split("\t")
    fields, field, chars = [], [], iter(text)
    for c in chars:
        if c == escape:
            field.append(next(chars, escape))  # a lone escape at the very end is kept as it is
        elif c == "\t":
            fields.append("".join(field))
            field = []
        else:
            field.append(c)
    fields.append("".join(field))
    return fields


def _ends_in_escape(text: str, escape: str = "\\") -> bool:
    """True when the line's last character is an escape that is not itself escaped (an escaped newline)."""
    return (len(text) - len(text.rstrip(escape))) % 2 == 1


def _records(path: Path, lines: list[tuple[int, bytes]], bad: BadInput, escaped: bool) -> Iterator[tuple[int, str]]:
    """(number of its first line, text) of each record; with ``escaped`` an escaped newline joins two lines."""
    start, parts = 0, []
    for number, raw in lines:
        try:
            text = decode_line(path, number, raw)
        except CorpusError as e:
            bad(e)
            parts = []
            continue
        start = start if parts else number
        parts.append(text)
        if not (escaped and _ends_in_escape(text)):
            yield start, "\n".join(parts)
            parts = []
    if parts:
        yield start, "\n".join(parts)


def iter_tsv(
    path: str | os.PathLike, required: tuple[str, ...], bad: BadInput, *, escaped: bool = False
) -> Iterator[tuple[int, dict]]:
    r"""(line number, {column: field}) for each well-formed line; missing columns raise, bad lines go to ``bad``.

    Like fairseq's readers, no quoting: a ``"`` is an ordinary character. With ``escaped`` the file is read the
    way CoVoST 2's TSVs are written and fairseq reads them (``escapechar="\\"``): see ``split_escaped``.
    """
    path = Path(path)
    header, lines = read_table(path, required)
    for number, text in _records(path, lines, bad, escaped):
        if not text:
            continue  # an empty line holds no record (a line of tabs does, and is checked)
        fields = split_escaped(text) if escaped else text.split("\t")
        if len(fields) != len(header):
            bad(CorpusError(path, number, f"{len(fields)} tab-separated fields, the header has {len(header)}"))
            continue
        yield number, dict(zip(header, fields, strict=True))
