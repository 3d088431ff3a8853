"""The one manifest format of the toolkit: a fairseq S2T style TSV with a header.

Columns, in this order: ``id, audio, n_frames, src_text, tgt_text, speaker``.

- ``audio``: a file (``clips/a.flac``) or a slice of a long file (``talk.wav:offset:frames``, offset and frames
  in the file's own samples). Relative paths are relative to the manifest's folder. Empty for a
  text-to-text row.
- ``n_frames``: the length at 16 kHz mono after conversion (what ``load_audio_spec`` returns); 0 for a
  text-to-text row.
- ``src_text`` (the source transcript or sentence) and ``tgt_text`` (the translation): never empty.
- ``speaker``: free text, may be empty.

Fields are separated by tabs with no quoting; tabs and newlines inside text are turned into spaces on writing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from speech_frontend.audio import SAMPLE_RATE, parse_audio_spec

from .errors import CorpusError
from .tsv_table import decode_line, read_table

MANIFEST_COLUMNS = ("id", "audio", "n_frames", "src_text", "tgt_text", "speaker")
SPLITS = ("train", "dev", "test")  # the splits the offline corpus writes, as DIR/{split}.tsv


@dataclass(frozen=True)
class Row:
    """One utterance (or one sentence pair when ``audio`` is empty)."""

    id: str
    audio: str  # absolute after read_manifest; "" for text-to-text
    n_frames: int  # at 16 kHz mono
    src_text: str
    tgt_text: str
    speaker: str = ""

    @property
    def is_text(self) -> bool:
        return not self.audio

    @property
    def audio_path(self) -> str:
        """The file part of ``audio`` (without ``:offset:frames``)."""
        return parse_audio_spec(self.audio)[0] if self.audio else ""

    @property
    def duration_s(self) -> float:
        return self.n_frames / SAMPLE_RATE


def clean_text(text: str) -> str:
    """Collapse every run of whitespace (tabs and newlines included) to one space, strip the ends."""
    return " ".join(text.split())


def row_problem(row: Row) -> str | None:
    """What is wrong with a row, or None."""
    if not row.id or any(c.isspace() for c in row.id):
        return f"id {row.id!r} is empty or contains whitespace"
    if not row.src_text.strip():
        return "empty src_text"
    if not row.tgt_text.strip():
        return "empty tgt_text"
    if row.n_frames < 0:
        return f"n_frames {row.n_frames} is negative"
    if row.audio and row.n_frames == 0:
        return "n_frames is 0 for a row with audio; a speech row needs its length at 16 kHz"
    if not row.audio and row.n_frames != 0:
        return f"n_frames {row.n_frames} for a text-to-text row (empty audio); it must be 0"
    return None


def _resolve(audio: str, folder: Path) -> str:
    if not audio:
        return ""
    path, offset, frames = parse_audio_spec(audio)
    resolved = str((folder / path).resolve()) if not os.path.isabs(path) else path
    return f"{resolved}:{offset}:{frames}" if frames >= 0 else resolved


def _relativise(audio: str, folder: Path) -> str:
    if not audio:
        return ""
    path, offset, frames = parse_audio_spec(audio)
    absolute = Path(path).resolve()  # a relative path in a Row is relative to the working directory
    try:
        path = str(absolute.relative_to(folder.resolve()))
    except ValueError:
        path = str(absolute)
    return f"{path}:{offset}:{frames}" if frames >= 0 else path


def _no_manifest(path: Path) -> str:
    """What to do about a manifest that is not there: the commands that make one in its folder."""
    return (
        f"no such manifest; make one with `python -m training.corpus build --out {path.parent} --text-only` "
        "(text-to-text; without --text-only: speech), or convert a corpus (`python -m training.corpus --help`)"
    )


def read_manifest(path: str | os.PathLike, on_error: Callable[[CorpusError], None] | None = None) -> list[Row]:
    """Read a manifest; audio paths come back absolute.

    Blank lines are skipped. Each bad line (a repeated id included) raises ``CorpusError`` naming the file and
    the line (1-based, the header is line 1), unless ``on_error`` is given: it then receives the error
    (``BadInput(skip_bad=True)`` logs and counts it; ``list.append`` collects it) and the line is left out.
    """
    return [row for _, row in read_numbered_manifest(path, on_error)]


def read_numbered_manifest(
    path: str | os.PathLike, on_error: Callable[[CorpusError], None] | None = None
) -> list[tuple[int, Row]]:
    """``read_manifest`` with each row's line number, for errors found later that must name the line."""
    path = Path(path)

    def bad(line: int | None, message: str) -> None:
        error = CorpusError(path, line, message)
        if on_error is None:
            raise error
        on_error(error)

    header, lines = read_table(path, MANIFEST_COLUMNS, no_file=_no_manifest(path))
    index = {c: header.index(c) for c in MANIFEST_COLUMNS}
    folder = path.parent
    rows = []
    first_line: dict[str, int] = {}  # id -> the line it first appears on
    for number, raw in lines:
        try:
            text = decode_line(path, number, raw)
        except CorpusError as e:
            bad(number, e.message)
            continue
        if not text:
            continue  # a blank line holds no row (as in every TSV reader here)
        fields = text.split("\t")
        if len(fields) != len(header):
            bad(number, f"{len(fields)} tab-separated fields, the header has {len(header)}")
            continue
        try:
            n_frames = int(fields[index["n_frames"]])
        except ValueError:
            bad(number, f"n_frames {fields[index['n_frames']]!r} is not an integer")
            continue
        row = Row(
            id=fields[index["id"]],
            audio=_resolve(fields[index["audio"]], folder),
            n_frames=n_frames,
            src_text=fields[index["src_text"]],
            tgt_text=fields[index["tgt_text"]],
            speaker=fields[index["speaker"]],
        )
        problem = row_problem(row)
        if problem:
            bad(number, problem)
            continue
        if row.id in first_line:
            bad(number, f"id {row.id} is also on line {first_line[row.id]}; ids must be unique")
            continue
        first_line[row.id] = number
        rows.append((number, row))
    return rows


def write_manifest(path: str | os.PathLike, rows: Iterable[Row]) -> int:
    """Write rows (atomically: temp name, then rename); audio under the manifest's folder is stored relative.

    A relative ``Row.audio`` is taken as relative to the current working directory (``read_manifest``
    returns absolute paths, so rows read from one manifest can be written to another anywhere).
    Returns the number of rows. Text is whitespace-cleaned; a row that is still invalid, or whose id another row
    has, raises ``ValueError``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent
    lines = ["\t".join(MANIFEST_COLUMNS)]
    seen: set[str] = set()
    for row in rows:
        if row.id in seen:  # read_manifest refuses a repeated id: never write one
            raise ValueError(f"{path}: row {row.id!r}: that id is already used by another row; ids must be unique")
        seen.add(row.id)
        row = Row(
            row.id, row.audio, row.n_frames, clean_text(row.src_text), clean_text(row.tgt_text), clean_text(row.speaker)
        )
        problem = row_problem(row)
        if problem:
            raise ValueError(f"{path}: row {row.id!r}: {problem}")
        audio = _relativise(row.audio, folder)
        if "\t" in audio or "\n" in audio:
            raise ValueError(f"{path}: row {row.id!r}: the audio path contains a tab or newline")
        lines.append("\t".join((row.id, audio, str(row.n_frames), row.src_text, row.tgt_text, row.speaker)))
    part = path.with_name(path.name + ".part")
    part.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(part, path)
    return len(lines) - 1
