"""Audio in: any PCM array or file that soundfile reads becomes 16 kHz mono float32.

Errors are raised here, at the boundary, as ``AudioError`` (a ``ValueError``) with one line that names the
source and what is wrong, so no user mistake ever surfaces as a traceback from deep inside torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000  # every model in this toolkit hears 16 kHz mono
MIN_RATE, MAX_RATE = 1000, 768000  # sample rates converted; others are surely a mistake (1 Hz: 16000x the data)
MAX_CHANNELS = 8  # a 2-D array whose first axis is at most this long and the shorter one is (channels, n)


class AudioError(ValueError):
    """A source that cannot become 16 kHz mono audio; the message names it and the problem."""


def to_mono(
    samples: np.ndarray, sample_rate: int, name: str = "audio", *, channels_last: bool | None = None
) -> np.ndarray:
    """samples: (n,) or (n, channels), any int or float dtype -> (n,) float64 in [-1, 1] at ``sample_rate``.

    Integers are scaled by their full range (unsigned ones are centred); values outside [-1, 1] (clipped
    full-scale audio, loud float files) are clipped; channels are averaged.
    ``channels_last``: the layout of a 2-D array; None guesses (channels, n) when the first axis is at most
    ``MAX_CHANNELS`` long and shorter than the second (``load_audio`` passes True: soundfile's layout).
    Raises ``AudioError`` naming ``name``, and nothing else, for: a dtype that is not int or float, a shape
    that is not 1-D or 2-D, no samples or no channels, a rate outside ``MIN_RATE``..``MAX_RATE`` Hz (or not an
    integer), and NaN or Inf samples.
    """
    samples = np.asarray(samples)
    if samples.dtype.kind not in "iuf":
        raise AudioError(f"{name}: samples of dtype {samples.dtype} are not PCM; pass an int or float array")
    if samples.ndim not in (1, 2):
        raise AudioError(f"{name}: samples of shape {samples.shape}; expected (n,) or (n, channels)")
    if samples.ndim == 2:
        if channels_last is None:
            channels_last = not (samples.shape[0] < samples.shape[1] and samples.shape[0] <= MAX_CHANNELS)
        if not channels_last:
            samples = samples.T  # (channels, n) given: soundfile's layout is (n, channels)
        if samples.shape[1] == 0:
            raise AudioError(f"{name}: samples of shape {samples.shape} have no channels")
    if samples.shape[0] == 0:
        raise AudioError(f"{name}: 0 samples; a source needs audio")
    if isinstance(sample_rate, (bool, np.bool_)) or not isinstance(sample_rate, (int, np.integer)):
        raise AudioError(f"{name}: sample rate {sample_rate!r} is not an integer number of Hz")
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise AudioError(f"{name}: sample rate {sample_rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")

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
    audio = np.clip(audio, -1.0, 1.0)  # before averaging: huge finite floats cannot overflow to inf
    return audio.mean(axis=1) if audio.ndim == 2 else audio


def to_mono_16k(
    samples: np.ndarray, sample_rate: int, name: str = "audio", *, channels_last: bool | None = None
) -> np.ndarray:
    """samples: (n,) or (n, channels), any int or float dtype -> (n',) float32 at 16 kHz in [-1, 1].

    ``to_mono`` (its checks and ``AudioError`` cases), then other rates are resampled with soxr; input too
    short to give one sample at 16 kHz is an ``AudioError`` too.
    """
    audio = to_mono(samples, sample_rate, name, channels_last=channels_last)
    if sample_rate != SAMPLE_RATE:
        audio = soxr.resample(audio, int(sample_rate), SAMPLE_RATE, quality="HQ")
        if audio.shape[0] == 0:  # a handful of samples at a high rate can resample to nothing
            raise AudioError(f"{name}: too short to resample from {sample_rate} Hz to {SAMPLE_RATE} Hz")
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def extrapolate(audio: np.ndarray, n: int, order: int = 32, context: int = 1024) -> np.ndarray:
    """audio: (m,) -> (n,) samples that continue it, by linear prediction: a Hann-windowed autocorrelation over
    its last ``context`` samples, Levinson-Durbin for ``order`` coefficients (the windowed autocorrelation makes
    the predictor stable, so the continuation decays rather than grows), run on past its end.

    Resampling the prefix of a stream needs input beyond its end (the filter's other half): a continuation that
    follows the signal keeps the last resampled samples near those of the whole file, at any rate. Too short a
    prefix for ``order`` falls back to an odd reflection."""
    x = np.asarray(audio, dtype=np.float64)[-context:]
    if x.shape[0] <= 2 * order:
        pad = min(n, x.shape[0] - 1)
        if pad < 1:
            return np.full(n, x[-1] if x.size else 0.0, dtype=np.float32)
        out = np.pad(x, (0, pad), mode="reflect", reflect_type="odd")[x.shape[0] :]
        return np.clip(np.pad(out, (0, n - pad), mode="edge"), -1.0, 1.0).astype(np.float32)
    w = x * np.hanning(x.shape[0])
    r = np.correlate(w, w, "full")[w.shape[0] - 1 : w.shape[0] + order]
    r[0] = r[0] * (1 + 1e-6) + 1e-12  # a little white noise: silence gives zeros, not a division by zero
    a, err = np.zeros(order + 1), r[0]
    a[0] = 1.0
    for i in range(1, order + 1):  # Levinson-Durbin: a[1:] predicts x[t] from x[t-1], ..., x[t-order]
        k = -(r[i] + a[1:i] @ r[i - 1 : 0 : -1]) / err
        a[1 : i + 1] += k * a[i - 1 :: -1][:i]
        err *= 1 - k * k
    a *= 0.999 ** np.arange(order + 1)  # a touch of bandwidth expansion: a margin of stability
    history = list(x[-order:])
    out = np.empty(n)
    for t in range(n):
        out[t] = -np.dot(a[1:], history[: -order - 1 : -1])
        history = history[1:] + [out[t]]
    return np.clip(out, -1.0, 1.0).astype(np.float32)


class StreamTo16k:
    """Chunks of one stream (any rate, channels, dtype) -> 16 kHz mono float32, in bounded memory.

    The concatenated output equals ``to_mono_16k`` of the whole stream (soxr's streaming resampler; tested);
    the resampler holds back a few ms of filter delay until ``flush``. At 16 kHz samples pass straight
    through. The rate may not change within a stream (``AudioError``).
    """

    def __init__(self, name: str = "stream"):
        self.name = name
        self.rate: int | None = None
        self._stream: soxr.ResampleStream | None = None

    def push(self, samples: np.ndarray, sample_rate: int, *, channels_last: bool | None = None) -> np.ndarray:
        """(n,) or (n, channels) samples -> the new (m,) 16 kHz samples (m may be 0 while the filter fills).

        ``channels_last`` as for ``to_mono``: pass it for multichannel chunks (a short chunk's layout is a guess).
        """
        if np.asarray(samples).size == 0:
            return np.zeros(0, dtype=np.float32)
        audio = to_mono(samples, sample_rate, self.name, channels_last=channels_last)
        if self.rate is not None and sample_rate != self.rate:
            raise AudioError(f"{self.name}: the sample rate changed from {self.rate} to {sample_rate} Hz")
        self.rate = int(sample_rate)
        if self.rate == SAMPLE_RATE:
            return audio.astype(np.float32)
        if self._stream is None:
            self._stream = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float64", quality="HQ")
        return np.clip(self._stream.resample_chunk(audio, last=False), -1.0, 1.0).astype(np.float32)

    def flush(self) -> np.ndarray:
        """The samples the resampler still holds, at the end of the stream."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out = self._stream.resample_chunk(np.zeros(0), last=True)
        self._stream = None
        return np.clip(out, -1.0, 1.0).astype(np.float32)


OVERRUN_TOLERANCE = 100  # a slice may run 1/100 s past its file's end unremarked (MuST-C's segment times round)
_WARNED_OVERRUN: set[Path] = set()  # files whose overrun was logged (once each: a manifest has many segments)
log = logging.getLogger(__name__)


def load_audio(path: str | os.PathLike, offset: int = 0, frames: int = -1) -> np.ndarray:
    """Read a file (WAV, FLAC, OGG, MP3, ...: whatever soundfile reads) -> (n,) float32, 16 kHz mono.

    ``offset`` and ``frames`` are in the file's own samples and are read by seeking, so a segment of a
    long talk never loads the whole talk. A slice that runs past the file's end reads what is there (as fairseq
    does), with a warning once per file when it is more than rounding.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if not path.is_file():
        raise AudioError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        with sf.SoundFile(str(path)) as f:
            rate = f.samplerate
            if offset:
                if offset >= f.frames:
                    raise AudioError(f"{path}: offset {offset} is beyond the end ({f.frames} samples)")
                f.seek(offset)
            samples = f.read(frames=frames, dtype="float32", always_2d=True)  # (n, channels)
    except AudioError:
        raise
    except OSError as e:
        raise AudioError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AudioError(f"{path}: cannot be decoded as audio ({first})") from None
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: holds no audio (0 samples)")
    short = frames - samples.shape[0] if frames > 0 else 0
    if short > rate // OVERRUN_TOLERANCE and path not in _WARNED_OVERRUN:  # a few samples: segment times rounded
        _WARNED_OVERRUN.add(path)
        log.warning("%s: the slice %d:%d runs %.2f s past the end of the file (%d samples at %d Hz); reading what "
                    "is there. A manifest with another sample rate than the file's?", path, offset, frames,
                    short / rate, offset + samples.shape[0], rate)  # fmt: skip
    return to_mono_16k(samples, rate, name=str(path), channels_last=True)


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
