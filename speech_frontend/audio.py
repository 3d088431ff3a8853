"""Audio in: any PCM array or file that soundfile reads becomes 16 kHz mono float32.

Errors are raised here, at the boundary, as ``AudioError`` (a ``ValueError``) with one line that names the
source and what is wrong, so no user mistake ever surfaces as a traceback from deep inside torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000  # every model in this toolkit hears 16 kHz mono


class AudioError(ValueError):
    """A source that cannot become 16 kHz mono audio; the message names it and the problem."""


def to_mono_16k(samples: np.ndarray, sample_rate: int, name: str = "audio") -> np.ndarray:
    """samples: (n,) or (n, channels), any int or float dtype -> (n',) float32 at 16 kHz in [-1, 1].

    Integers are scaled by their full range; channels are averaged; other rates are resampled with soxr.
    NaN or Inf samples and empty input raise ``AudioError``.
    """
    samples = np.asarray(samples)
    if samples.dtype.kind not in "iuf":
        raise AudioError(f"{name}: samples of dtype {samples.dtype} are not PCM; pass an int or float array")
    if samples.ndim == 2 and samples.shape[1] > samples.shape[0] and samples.shape[0] <= 8:
        samples = samples.T  # (channels, n) given: soundfile's layout is (n, channels)
    if samples.ndim not in (1, 2):
        raise AudioError(f"{name}: samples of shape {samples.shape}; expected (n,) or (n, channels)")
    if samples.shape[0] == 0:
        raise AudioError(f"{name}: 0 samples; a source needs audio")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioError(f"{name}: sample rate {sample_rate!r} is not a positive integer")

    if samples.dtype.kind == "i":
        audio = samples.astype(np.float64) / float(2 ** (8 * samples.dtype.itemsize - 1))
    elif samples.dtype.kind == "u":  # unsigned PCM (8-bit WAV) is centred on half its range
        half = float(2 ** (8 * samples.dtype.itemsize - 1))
        audio = (samples.astype(np.float64) - half) / half
    else:
        audio = samples.astype(np.float64)
    if not np.isfinite(audio).all():
        bad = int((~np.isfinite(audio)).sum())
        raise AudioError(f"{name}: {bad} NaN or Inf samples; clean the signal before streaming it")
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        audio = soxr.resample(audio, int(sample_rate), SAMPLE_RATE, quality="HQ")
        if audio.shape[0] == 0:  # a handful of samples at a high rate can resample to nothing
            raise AudioError(f"{name}: too short to resample from {sample_rate} Hz to {SAMPLE_RATE} Hz")
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def load_audio(path: str | os.PathLike, offset: int = 0, frames: int = -1) -> np.ndarray:
    """Read a file (WAV, FLAC, OGG, MP3, ...: whatever soundfile reads) -> (n,) float32, 16 kHz mono.

    ``offset`` and ``frames`` are in the file's own samples and are read by seeking, so a segment of a
    long talk never loads the whole talk.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        with sf.SoundFile(str(path)) as f:
            rate = f.samplerate
            if offset:
                if offset >= f.frames:
                    raise AudioError(f"{path}: offset {offset} is beyond the end ({f.frames} samples)")
                f.seek(offset)
            samples = f.read(frames=frames, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{path}: cannot be decoded as audio ({str(e).strip().splitlines()[0]})") from None
    return to_mono_16k(samples, rate, name=str(path))


def parse_audio_spec(spec: str) -> tuple[str, int, int]:
    """'talk.wav' or 'talk.wav:offset:frames' (fairseq style) -> (path, offset, frames)."""
    parts = spec.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], int(parts[1]), int(parts[2])
    return spec, 0, -1


def load_audio_spec(spec: str) -> np.ndarray:
    """Load a manifest's audio field, a whole file or a ``path:offset:frames`` slice."""
    path, offset, frames = parse_audio_spec(spec)
    return load_audio(path, offset, frames)
