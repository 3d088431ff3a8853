"""A user's own parallel data as a headed TSV: audio, source and target columns named by options.

Audio fields may be files or ``path:offset:frames`` slices (offset and frames in the file's own samples),
relative to ``audio_root`` (default: the TSV's folder). Without an audio column the rows are text-to-text.
Headers give ``n_frames`` for WAV/FLAC/OGG; MP3 is decoded to get its exact length.
"""

from __future__ import annotations

import os
from pathlib import Path

from speech_frontend.audio import AudioError, load_audio_spec, parse_audio_spec

from .audio_files import cut_at_end, probe_spec
from .errors import BadInput, CorpusError
from .manifest import Row, clean_text
from .tsv_table import iter_tsv

COMPRESSED_WITHOUT_EXACT_LENGTH = ("MP3",)  # formats whose header length is an estimate


def read_user_tsv(
    tsv: str | os.PathLike,
    *,
    audio_column: str | None = "audio",
    src_column: str = "src_text",
    tgt_column: str = "tgt_text",
    id_column: str | None = None,
    speaker_column: str | None = None,
    audio_root: str | os.PathLike | None = None,
    bad: BadInput | None = None,
) -> list[Row]:
    """Rows of a user's TSV; ids from ``id_column`` or ``<tsv stem>-<line>`` (whitespace
    in the stem becomes ``_``). Bad lines raise or go to ``bad``."""
    bad = bad or BadInput()
    tsv = Path(tsv)
    root = Path(audio_root) if audio_root is not None else tsv.parent
    required = tuple(c for c in (audio_column, src_column, tgt_column, id_column, speaker_column) if c)
    rows, seen = [], set()
    prefix = "_".join(tsv.stem.split()) or "utt"  # default ids may hold no whitespace: "my corpus.tsv" -> my_corpus
    for number, fields in iter_tsv(tsv, required, bad):
        utt_id = fields[id_column].strip() if id_column else f"{prefix}-{number}"
        src, tgt = clean_text(fields[src_column]), clean_text(fields[tgt_column])
        if not utt_id or any(c.isspace() for c in utt_id) or utt_id in seen:
            bad(CorpusError(tsv, number, f"id {utt_id!r} is empty, has whitespace or is a duplicate"))
            continue
        if not src or not tgt:
            bad(CorpusError(tsv, number, f"empty {src_column if not src else tgt_column}"))
            continue
        audio, n_frames = "", 0
        if audio_column:
            path, offset, frames = parse_audio_spec(fields[audio_column].strip())
            if not path:
                bad(CorpusError(tsv, number, f"empty {audio_column}"))
                continue
            path = str((root / path).resolve())
            audio = f"{path}:{offset}:{frames}" if frames >= 0 else path
            try:
                audio = cut_at_end(audio)  # a fairseq slice a few ms past its talk's end, as `mustc` cuts it
                header, n_frames = probe_spec(audio)
                if header.format in COMPRESSED_WITHOUT_EXACT_LENGTH:
                    n_frames = len(load_audio_spec(audio))
            except AudioError as e:
                bad(CorpusError(tsv, number, str(e)))
                continue
            if n_frames == 0:  # e.g. one sample at 48 kHz: nothing is left at 16 kHz
                bad(CorpusError(tsv, number, f"{path}: {header.frames} sample(s) at {header.sample_rate} Hz give "
                                             "no sample at 16 kHz; a speech row needs audio"))  # fmt: skip
                continue
        seen.add(utt_id)
        speaker = clean_text(fields[speaker_column]) if speaker_column else ""
        rows.append(Row(utt_id, audio, n_frames, src, tgt, speaker))
    return rows
