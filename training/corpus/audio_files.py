"""Audio files of a corpus: header probing, lengths at 16 kHz, and writing 16 kHz mono files safely.

Convention (used by every manifest here and by ``speech_frontend.audio.load_audio_spec``): in an audio field
``path:offset:frames`` the offset and the frame count are in the *file's own* samples (a 44.1 kHz file is
sliced in 44.1 kHz samples); ``n_frames`` is the length after conversion to 16 kHz mono, i.e. the length of
the array that ``load_audio_spec`` returns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from speech_frontend.audio import SAMPLE_RATE, AudioError, parse_audio_spec

AUDIO_FORMATS = {"flac": "FLAC", "wav": "WAV"}  # --format choice -> soundfile format name
PART_SUFFIX = ".part"  # a file being written; renamed into place only once complete
END_TOLERANCE_S = 0.1  # a slice may overrun its file by rounding (MuST-C's yaml, fairseq's TSVs): it is cut at the end


@dataclass(frozen=True)
class AudioHeader:
    """What a file's header says: no samples are decoded."""

    path: str
    sample_rate: int
    frames: int
    channels: int
    format: str


def frames_at_16k(frames: int, sample_rate: int) -> int:
    """Samples that ``frames`` samples at ``sample_rate`` become after resampling to 16 kHz.

    Matches soxr (what ``to_mono_16k`` uses): round half up of ``frames * 16000 / rate``.
    """
    if sample_rate == SAMPLE_RATE:
        return frames
    return (2 * frames * SAMPLE_RATE + sample_rate) // (2 * sample_rate)


def probe_audio(path: str | os.PathLike) -> AudioHeader:
    """Read the header of an audio file; ``AudioError`` naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{path}: not a readable audio file ({str(e).strip().splitlines()[0]})") from None
    if info.frames <= 0:
        raise AudioError(f"{path}: the header says 0 samples")
    return AudioHeader(str(path), int(info.samplerate), int(info.frames), int(info.channels), info.format)


def probe_spec(spec: str) -> tuple[AudioHeader, int]:
    """An audio field (``path`` or ``path:offset:frames``) -> (header, n_frames at 16 kHz), checking bounds."""
    path, offset, frames = parse_audio_spec(spec)
    header = probe_audio(path)
    if offset >= header.frames:
        raise AudioError(f"{path}: offset {offset} is beyond the end ({header.frames} samples)")
    if frames < 0:
        frames = header.frames - offset
    if offset + frames > header.frames:
        raise AudioError(
            f"{path}: slice {offset}+{frames} runs past the end ({header.frames} samples at {header.sample_rate} Hz)"
        )
    return header, frames_at_16k(frames, header.sample_rate)


def cut_at_end(spec: str) -> str:
    """A slice ``path:offset:frames`` that runs past its file's end by at most ``END_TOLERANCE_S``, cut at the end
    (what a reader of the slice gets anyway); any other spec as it is, for ``probe_spec`` to judge."""
    path, offset, frames = parse_audio_spec(spec)
    if frames < 0:
        return spec
    header = probe_audio(path)
    over = offset + frames - header.frames
    if offset < header.frames and 0 < over <= END_TOLERANCE_S * header.sample_rate:
        return f"{path}:{offset}:{header.frames - offset}"
    return spec


def write_audio(path: str | os.PathLike, samples: np.ndarray, audio_format: str = "flac") -> None:
    """Write 16 kHz mono float samples as 16-bit ``flac`` or ``wav``, atomically (temp name, then rename).

    An interrupted run leaves only a ``*.part`` file, never a truncated file under the final name.
    """
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio format {audio_format!r}; choose one of {sorted(AUDIO_FORMATS)}")
    path = Path(path)
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1 or samples.size == 0:
        raise AudioError(f"{path}: refusing to write {samples.shape} samples; expected a non-empty mono array")
    part = path.with_name(path.name + PART_SUFFIX)
    sf.write(str(part), samples, SAMPLE_RATE, format=AUDIO_FORMATS[audio_format], subtype="PCM_16")
    os.replace(part, path)
