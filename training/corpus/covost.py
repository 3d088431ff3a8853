r"""CoVoST 2 (its TSVs plus the Common Voice clips on the user's disk) to manifests.

Read: ``covost_v2.en_de.<split>.tsv`` with columns ``path, sentence, translation, client_id`` (any others are
ignored) and ``CV_ROOT/clips/<path>`` (MP3, decoded by soundfile/libsndfile). The TSVs are read the way
CoVoST's get_covost_splits.py writes them and fairseq reads them: no quoting, ``escapechar="\\"`` (``\"`` in
the file is ``"``, ``\\`` is ``\``). Every clip is decoded once, so a clip that does not decode is reported
here rather than in the middle of training; ``n_frames`` is then the exact decoded length at 16 kHz. With
``to_flac`` each clip is also written there as 16 kHz mono FLAC, once (an existing FLAC is reused), and the
manifest points at the FLAC files.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from speech_frontend.audio import AudioError, load_audio

from .audio_files import frames_at_16k, probe_audio, write_audio
from .errors import BadInput, CorpusError
from .manifest import Row, clean_text
from .tsv_table import iter_tsv

COVOST_COLUMNS = ("path", "sentence", "translation", "client_id")


def covost_tsv_name(split: str, lang_pair: str = "en_de") -> str:
    return f"covost_v2.{lang_pair}.{split}.tsv"


def read_covost(
    tsv: str | os.PathLike,
    clips_dir: str | os.PathLike,
    *,
    to_flac: str | os.PathLike | None = None,
    decode: bool = True,
    bad: BadInput | None = None,
    progress: bool = True,
) -> list[Row]:
    """Rows of one CoVoST 2 split TSV. ``decode=False`` reads only headers (fast, but a clip that fails to
    decode is then found at training time). Bad lines raise ``CorpusError`` or go to ``bad``."""
    bad = bad or BadInput()
    tsv, clips_dir = Path(tsv), Path(clips_dir)
    if not clips_dir.is_dir():
        raise CorpusError(clips_dir, None, "no such folder; pass Common Voice's clips/ folder with --clips")
    flac_dir = Path(to_flac) if to_flac is not None else None
    if flac_dir is not None:
        flac_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    first_line: dict[str, int] = {}  # id (the clip's name) -> the line of its row
    for number, fields in tqdm(
        list(iter_tsv(tsv, COVOST_COLUMNS, bad, escaped=True)), unit="clip", desc=tsv.name, disable=not progress
    ):
        src, tgt = clean_text(fields["sentence"]), clean_text(fields["translation"])
        if not src or not tgt:
            bad(CorpusError(tsv, number, f"empty {'sentence' if not src else 'translation'}"))
            continue
        clip = clips_dir / fields["path"]
        utt_id = Path(fields["path"]).stem
        if utt_id in first_line:  # a manifest's ids must be unique: say so here, not as the writer's traceback
            bad(CorpusError(tsv, number, f"clip {fields['path']} is also on line {first_line[utt_id]}; "
                                         "each clip may appear once in a split"))  # fmt: skip
            continue
        try:
            if flac_dir is not None and (flac_dir / f"{utt_id}.flac").is_file():
                audio = flac_dir / f"{utt_id}.flac"
                n_frames = probe_audio(audio).frames  # written by an earlier run, already 16 kHz
            elif flac_dir is not None or decode:
                samples = load_audio(clip)
                n_frames, audio = len(samples), clip
                if flac_dir is not None:
                    audio = flac_dir / f"{utt_id}.flac"
                    write_audio(audio, samples, "flac")
            else:
                header = probe_audio(clip)
                n_frames, audio = frames_at_16k(header.frames, header.sample_rate), clip
        except AudioError as e:
            bad(CorpusError(tsv, number, f"clip {e}"))
            continue
        first_line[utt_id] = number
        rows.append(Row(utt_id, str(audio.resolve()), n_frames, src, tgt, clean_text(fields["client_id"])))
    return rows
