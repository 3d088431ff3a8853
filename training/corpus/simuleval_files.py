"""SimulEval's input files for any manifest: ``source.txt`` (one audio path, or one source sentence, per line)
and ``target.txt`` (one reference per line), plus ``ids.txt`` to map lines back to manifest ids.

Speech sources are absolute paths. A whole 16 kHz mono WAV or FLAC is used where it is; a slice
(``path:offset:frames``) or any other file is first written to ``OUT/wav/<id>.wav`` at 16 kHz mono (an id that is
not a plain file name: a cleaned id plus a hash of it, so that every file stays in ``OUT/wav``).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from speech_frontend.audio import SAMPLE_RATE, AudioError, load_audio_spec, parse_audio_spec

from .audio_files import probe_audio, write_audio
from .errors import CorpusError
from .manifest import Row, read_numbered_manifest

T = TypeVar("T")
USABLE_AS_IS = ("WAV", "FLAC")
WAV_DIR = "wav"


@dataclass(frozen=True)
class SimulEvalFiles:
    source: Path
    target: Path
    ids: Path
    count: int


def choose_rows(rows: Sequence[T], max_utterances: int | None = None, seed: int | None = None) -> list[T]:
    """All rows, the first ``max_utterances``, or (with ``seed``) a seeded random subset in manifest order."""
    if max_utterances is not None and max_utterances < 1:
        raise ValueError(f"max_utterances {max_utterances}: at least 1 (or None for all rows)")
    if max_utterances is None or max_utterances >= len(rows):
        return list(rows)
    if seed is None:
        return rows[:max_utterances]
    keep = sorted(random.Random(seed).sample(range(len(rows)), max_utterances))
    return [rows[i] for i in keep]


def wav_name(row_id: str) -> str:
    """A file name under ``OUT/wav`` for a manifest id: the id itself when it is a plain name, else (an id with
    ``/``, ``..`` or other characters a file name should not hold) a sanitised id plus a hash of the id, so
    that no id writes outside ``OUT/wav`` and two ids never share a file."""
    if re.fullmatch(r"[\w.+-]+", row_id) and not row_id.startswith("."):
        return f"{row_id}.wav"
    safe = re.sub(r"[^\w.+-]+", "_", row_id).lstrip(".")[:100]
    return f"{safe}-{hashlib.sha1(row_id.encode()).hexdigest()[:8]}.wav"


def _source_path(row: Row, wav_dir: Path) -> str:
    path, _, frames = parse_audio_spec(row.audio)
    if frames < 0:
        header = probe_audio(path)
        if header.format in USABLE_AS_IS and header.sample_rate == SAMPLE_RATE and header.channels == 1:
            return str(Path(path).resolve())
    out = wav_dir / wav_name(row.id)
    write_audio(out, load_audio_spec(row.audio), "wav")
    return str(out.resolve())


def write_simuleval_files(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_utterances: int | None = None,
    seed: int | None = None,
    text: bool = False,
    progress: bool = True,
) -> SimulEvalFiles:
    """Write ``source.txt``, ``target.txt`` and ``ids.txt`` under ``out_dir`` for a manifest (split)."""
    manifest = Path(manifest)
    numbered = choose_rows(read_numbered_manifest(manifest), max_utterances, seed)
    rows = [row for _, row in numbered]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if text:
        sources = [row.src_text for row in rows]
    else:
        speechless = [row.id for row in rows if row.is_text]
        if speechless:
            raise CorpusError(
                manifest,
                None,
                f"{len(speechless)} rows have no audio (e.g. {speechless[0]}); "
                "pass --text for text-to-text SimulEval files",
            )
        wav_dir = out_dir / WAV_DIR
        wav_dir.mkdir(exist_ok=True)
        sources = []
        for number, row in tqdm(numbered, unit="utt", desc="sources", disable=not progress):
            try:
                sources.append(_source_path(row, wav_dir))
            except AudioError as e:
                raise CorpusError(
                    manifest,
                    number,
                    f"id {row.id}: {e}; fix or drop the row (`python -m training.corpus check` lists every problem)",
                ) from None
    files = SimulEvalFiles(out_dir / "source.txt", out_dir / "target.txt", out_dir / "ids.txt", len(rows))
    for path, lines in (
        (files.source, sources),
        (files.target, [r.tgt_text for r in rows]),
        (files.ids, [r.id for r in rows]),
    ):
        path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return files
