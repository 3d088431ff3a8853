"""Causal, streaming log-mel features with Whisper's filters and STFT settings.

What differs from ``whisper.audio.log_mel_spectrogram`` (and why):

- Frame placement. Whisper centres frame t on sample t * HOP_LENGTH and reflect-pads both ends, so every
  frame looks 200 samples (12.5 ms) ahead. Here frame t is the N_FFT window that *ends* at sample
  (t + 1) * HOP_LENGTH: the signal is left-padded with N_FFT - HOP_LENGTH = 240 zeros and nothing is added
  on the right. N samples give exactly N // HOP_LENGTH frames (as whisper's) and a frame is ready as soon as
  its hop has arrived. Each frame sits 40 samples (2.5 ms) earlier than whisper's frame of the same index,
  and the first frame sees zeros where whisper sees a reflection.
- Normalisation. Whisper clips at ``max - 8`` with the max over the whole utterance, which is not causal.
  Here the max is the running (cumulative) max over the frames so far, per utterance. Once the loudest frame
  has passed, both agree; before it, quiet frames are clipped less.

Everything else is whisper's: hann window of N_FFT = 400, hop 160, power spectrum, ``mel_filters`` (80 or
128 bins), ``log10(clamp(mel, 1e-10))``, then ``(x + 4) / 4``.

Chunk edges do not matter: ``StreamingMel`` keeps the samples of the window not yet complete and the
running max, so pushing a signal in chunks of any sizes and concatenating the outputs gives ``log_mel`` of
the whole signal (to float rounding, about 1e-6).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from whisper.audio import mel_filters

from .audio import SAMPLE_RATE

N_FFT = 400
HOP_LENGTH = 160
LEFT_PAD = N_FFT - HOP_LENGTH  # zeros before the first sample, so frame 0 ends at sample HOP_LENGTH
N_MELS_SUPPORTED = (80, 128)  # the filter banks that ship with whisper
CLIP_DB = 8.0  # log10 units below the (running) max that are kept, as in whisper
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100: one mel frame is 10 ms

__all__ = ["FRAMES_PER_SECOND", "HOP_LENGTH", "N_FFT", "SAMPLE_RATE", "StreamingMel", "log_mel"]


def _as_tensor(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    audio = audio if torch.is_tensor(audio) else torch.from_numpy(np.asarray(audio))
    if audio.ndim != 1:
        raise ValueError(f"audio of shape {tuple(audio.shape)}; expected (n,) samples of 16 kHz mono")
    return audio.float()


def _log_power_mel(padded: torch.Tensor, n_mels: int) -> torch.Tensor:
    """padded: (LEFT_PAD + n,) samples, already left-padded -> (n_mels, n // HOP_LENGTH) log10 mel power."""
    if n_mels not in N_MELS_SUPPORTED:
        raise ValueError(f"n_mels={n_mels}; whisper's filter banks have {N_MELS_SUPPORTED} bins")
    n_frames = (padded.shape[-1] - LEFT_PAD) // HOP_LENGTH
    if n_frames <= 0:
        return torch.zeros(n_mels, 0, device=padded.device)
    padded = padded[: LEFT_PAD + n_frames * HOP_LENGTH]
    window = torch.hann_window(N_FFT, device=padded.device)
    stft = torch.stft(padded, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
    magnitudes = stft.abs() ** 2  # (N_FFT // 2 + 1, n_frames)
    mel_spec = mel_filters(padded.device, n_mels) @ magnitudes
    return torch.clamp(mel_spec, min=1e-10).log10()


def _normalise(log_spec: torch.Tensor, running_max: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip each frame at (max over the frames so far) - CLIP_DB and rescale like whisper.

    log_spec: (n_mels, n_frames); running_max: () max of all earlier frames, or None at the start.
    Returns the features (n_mels, n_frames) and the new running max.
    """
    frame_max = log_spec.amax(dim=0)  # (n_frames,)
    if running_max is not None:
        frame_max = torch.maximum(frame_max, running_max)
    cum_max = torch.cummax(frame_max, dim=0).values
    features = (torch.maximum(log_spec, cum_max - CLIP_DB) + 4.0) / 4.0
    return features, cum_max[-1]


def log_mel(audio: np.ndarray | torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """audio: (n,) float 16 kHz mono -> (n_mels, n // HOP_LENGTH) causal log-mel features.

    Equal to pushing the same samples through a ``StreamingMel`` in any chunks.
    """
    audio = _as_tensor(audio)
    log_spec = _log_power_mel(F.pad(audio, (LEFT_PAD, 0)), n_mels)
    if log_spec.shape[-1] == 0:
        return log_spec
    return _normalise(log_spec, None)[0]


class StreamingMel:
    """Feed 16 kHz samples as they arrive; get each mel frame as soon as its hop is complete.

    One instance per utterance: the running max that normalises the features is per utterance.
    """

    def __init__(self, n_mels: int = 80):
        if n_mels not in N_MELS_SUPPORTED:
            raise ValueError(f"n_mels={n_mels}; whisper's filter banks have {N_MELS_SUPPORTED} bins")
        self.n_mels = n_mels
        self.frames_emitted = 0
        self._pending = torch.zeros(LEFT_PAD)  # the last LEFT_PAD samples used + samples not yet in a frame
        self._running_max: torch.Tensor | None = None

    def push(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """samples: (k,) float 16 kHz, k >= 0 -> (n_mels, new_frames) features, possibly 0 frames."""
        samples = _as_tensor(samples).to(self._pending.device)
        buffer = torch.cat([self._pending, samples])
        n_frames = (buffer.shape[0] - LEFT_PAD) // HOP_LENGTH
        if n_frames == 0:
            self._pending = buffer
            return torch.zeros(self.n_mels, 0)
        log_spec = _log_power_mel(buffer, self.n_mels)
        features, self._running_max = _normalise(log_spec, self._running_max)
        self._pending = buffer[n_frames * HOP_LENGTH :]
        self.frames_emitted += n_frames
        return features
