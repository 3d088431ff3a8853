"""MuST-C (a release on the user's disk) to manifests of ``talk.wav:offset:frames`` slices.

Layout read, for a language pair such as ``en-de`` and a split such as ``dev`` or ``tst-COMMON``::

    ROOT/en-de/data/dev/wav/ted_767.wav
    ROOT/en-de/data/dev/txt/dev.yaml   a list of {duration, offset, rw, speaker_id, wav}, seconds
    ROOT/en-de/data/dev/txt/dev.en     one transcript per segment, same order as the yaml
    ROOT/en-de/data/dev/txt/dev.de     one translation per segment

Offsets and frame counts in the manifest are in the wav's own samples (MuST-C ships 16 kHz, so they are also
16 kHz samples). Only wav headers are read: talks are never loaded. Ids are ``<talk>_<n>``, n counting the
segments of that talk from 0 (fairseq's convention).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from speech_frontend.audio import AudioError

from .audio_files import END_TOLERANCE_S, AudioHeader, frames_at_16k, probe_audio
from .errors import BadInput, CorpusError
from .manifest import Row, clean_text

SEGMENT_KEYS = ("duration", "offset", "speaker_id", "wav")


def read_text_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, split on newlines only; ``CorpusError`` naming a line that is not UTF-8."""
    if not path.is_file():
        raise CorpusError(path, None, "no such file; is this the right corpus folder and split?")
    raw = path.read_bytes().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines = []
    for number, line in enumerate(raw, start=1):
        try:
            lines.append(line.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r"))  # a BOM is no text
        except UnicodeDecodeError as e:
            raise CorpusError(
                path,
                number,
                f"not UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1}); re-encode the file as UTF-8",
            ) from None
    return lines


def read_segments(path: Path) -> list[tuple[int, dict[str, str]]]:
    """The yaml's segments as (line, {key: scalar text}), without building Python floats for 200k segments."""
    if not path.is_file():
        raise CorpusError(path, None, "no such file; is this the right corpus folder and split?")
    try:
        loader = (
            yaml.CSafeLoader(path.read_bytes()) if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader(path.read_bytes())
        )
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise CorpusError(path, None, f"not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise CorpusError(path, None, "not UTF-8") from None
    if not isinstance(root, yaml.SequenceNode):
        raise CorpusError(path, None, "expected a YAML list of segments {duration, offset, speaker_id, wav}")
    segments = []
    for item in root.value:
        line = item.start_mark.line + 1
        if not isinstance(item, yaml.MappingNode):
            raise CorpusError(path, line, "a segment is not a mapping {duration, offset, speaker_id, wav}")
        fields = {k.value: v.value for k, v in item.value if isinstance(v, yaml.ScalarNode)}
        missing = [k for k in SEGMENT_KEYS if k not in fields]
        if missing:
            raise CorpusError(path, line, f"segment without {', '.join(missing)}")
        segments.append((line, fields))
    return segments


def parse_lang_pair(text: str) -> tuple[str, str]:
    """``en-de`` (MuST-C's spelling) or ``en_de`` (CoVoST 2's; ``en_zh-CN``) -> ("en", "de"); ``ValueError``
    naming the expected form otherwise."""
    parts = text.split("_") if "_" in text else text.split("-")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{text!r}: expected a source and a target language, e.g. en-de or en_de")
    return parts[0], parts[1]


def _split_order(name: str) -> tuple[int, str]:
    return ({"train": 0, "dev": 1}.get(name, 2), name)


def mustc_split_dir(root: str | os.PathLike, split: str, lang_pair: str = "en-de") -> Path:
    """``ROOT/<lang_pair>/data/<split>``; ROOT may also be the ``<lang_pair>`` folder itself."""
    root = Path(root)
    bases = [base for base in (root / lang_pair / "data", root / "data") if base.is_dir()]
    for base in bases:
        if (base / split).is_dir():
            return base / split
    if bases:
        splits = ", ".join(sorted((d.name for d in bases[0].iterdir() if d.is_dir()), key=_split_order))
        raise CorpusError(bases[0], None, f"no split {split!r} here; it has {splits or 'none'}: pass those to --splits")
    pairs = sorted(d.name for d in root.glob("*-*") if (d / "data").is_dir())
    raise CorpusError(
        root,
        None,
        f"no {lang_pair}/data/{split} folder here; pass the MuST-C release folder (the one holding {lang_pair}/)"
        + (f" or --lang-pair {' / '.join(pairs)}" if pairs else ""),
    )


def _check_aligned(counts: dict[Path, tuple[int, str]]) -> None:
    """One line per segment in each text file: else ``CorpusError`` at the shortest file, with every count."""
    if len({n for n, _ in counts.values()}) == 1:
        return
    short = min(counts, key=lambda p: counts[p][0])
    others = " and ".join(f"{p.name} has {n} {unit}" for p, (n, unit) in counts.items() if p != short)
    n, unit = counts[short]
    yaml_name, *texts = [p.name for p in counts]
    raise CorpusError(
        short,
        None,
        f"{short.name} has {n} {unit} but {others}; MuST-C's {' and '.join(texts)} have one line per segment of "
        f"{yaml_name}: re-extract the release",
    )


def read_mustc(root: str | os.PathLike, split: str, lang_pair: str = "en-de", bad: BadInput | None = None) -> list[Row]:
    """Rows of one MuST-C split. Bad segments raise ``CorpusError`` (or are skipped and counted by ``bad``).

    A yaml whose segment count differs from the text files' line count always raises: with a segment missing
    somewhere, no line can be trusted to belong to its segment. ``lang_pair``: ``en-de`` or ``en_de``.
    """
    bad = bad or BadInput()
    src_lang, tgt_lang = parse_lang_pair(lang_pair)
    split_dir = mustc_split_dir(root, split, f"{src_lang}-{tgt_lang}")
    txt, wav_dir = split_dir / "txt", split_dir / "wav"
    yaml_path, src_path, tgt_path = txt / f"{split}.yaml", txt / f"{split}.{src_lang}", txt / f"{split}.{tgt_lang}"
    segments = read_segments(yaml_path)
    sources, targets = read_text_lines(src_path), read_text_lines(tgt_path)
    _check_aligned(
        {yaml_path: (len(segments), "segments"), src_path: (len(sources), "lines"), tgt_path: (len(targets), "lines")}
    )
    headers: dict[str, AudioHeader | AudioError] = {}
    per_talk: dict[str, int] = {}
    rows = []
    for number, ((yaml_line, seg), src, tgt) in enumerate(zip(segments, sources, targets, strict=True), start=1):
        wav = wav_dir / seg["wav"]
        talk = Path(seg["wav"]).stem
        index = per_talk.get(talk, 0)
        per_talk[talk] = index + 1
        src, tgt = clean_text(src), clean_text(tgt)
        if not src:
            bad(CorpusError(src_path, number, "empty transcript"))
            continue
        if not tgt:
            bad(CorpusError(tgt_path, number, "empty translation"))
            continue
        if seg["wav"] not in headers:
            try:
                headers[seg["wav"]] = probe_audio(wav)
            except AudioError as e:
                headers[seg["wav"]] = e
        header = headers[seg["wav"]]
        if isinstance(header, AudioError):
            bad(CorpusError(yaml_path, yaml_line, f"segment {number}: {header}"))
            continue
        try:
            offset_s, duration_s = float(seg["offset"]), float(seg["duration"])
            if not (math.isfinite(offset_s) and math.isfinite(duration_s)):
                raise ValueError
        except ValueError:
            bad(
                CorpusError(
                    yaml_path, yaml_line, f"offset {seg['offset']!r} or duration {seg['duration']!r} is not a number"
                )
            )
            continue
        rate, total = header.sample_rate, header.frames
        offset, frames = round(offset_s * rate), round(duration_s * rate)
        if offset_s < 0 or frames <= 0:
            bad(
                CorpusError(
                    yaml_path,
                    yaml_line,
                    f"offset {offset_s} s, duration {duration_s} s: a segment needs offset >= 0 and duration > 0",
                )
            )
            continue
        if offset >= total:
            bad(
                CorpusError(
                    yaml_path, yaml_line, f"offset {offset_s} s is beyond the end of {wav.name} ({total / rate:.2f} s)"
                )
            )
            continue
        if offset + frames > total:
            if (offset + frames - total) / rate > END_TOLERANCE_S:
                bad(
                    CorpusError(
                        yaml_path,
                        yaml_line,
                        f"segment {offset_s}+{duration_s} s ends after the end of {wav.name} ({total / rate:.2f} s)",
                    )
                )
                continue
            frames = total - offset
        n_frames = frames_at_16k(frames, rate)
        if n_frames == 0:  # a sample or two at 44.1 kHz: nothing is left at 16 kHz (write_manifest refuses the row)
            bad(
                CorpusError(
                    yaml_path,
                    yaml_line,
                    f"segment {offset_s}+{duration_s} s is {frames} sample(s) at {rate} Hz: no sample at 16 kHz",
                )
            )
            continue
        rows.append(
            Row(
                id=f"{talk}_{index}",
                audio=f"{wav.resolve()}:{offset}:{frames}",
                n_frames=n_frames,
                src_text=src,
                tgt_text=tgt,
                speaker=seg["speaker_id"],
            )
        )
    return rows
