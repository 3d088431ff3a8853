import numpy as np
import pytest
import torch
import whisper
from hypothesis import given, settings
from hypothesis import strategies as st

from speech_frontend.mel import HOP_LENGTH, SAMPLE_RATE, StreamingMel, log_mel


def speechlike(n: int, seed: int = 0) -> np.ndarray:
    """Harmonics with a syllable-rate envelope that gets louder over time (so the running max moves)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * np.linspace(0.05, 0.5, n)
    return (envelope * voiced / 3 + 0.003 * rng.standard_normal(n)).astype(np.float32)


def stream(audio: np.ndarray, sizes: list[int], n_mels: int = 80) -> tuple[torch.Tensor, StreamingMel]:
    mel = StreamingMel(n_mels)
    outs, i, k = [], 0, 0
    while i < len(audio):
        size = sizes[k % len(sizes)]
        outs.append(mel.push(audio[i : i + size]))
        i, k = i + size, k + 1
    return torch.cat(outs, dim=1), mel


@pytest.mark.parametrize("n", [0, 1, 159, 160, 161, 319, 320, 16000, 16159])
def test_frame_count(n):
    audio = speechlike(n) if n else np.zeros(0, np.float32)
    assert log_mel(audio).shape == (80, n // HOP_LENGTH)


@pytest.mark.parametrize("sizes", [[1], [7], [160], [5120], [1, 7, 160, 5120], [159, 161, 0, 3], [100000]])
def test_chunked_equals_whole(sizes):
    audio = speechlike(2400 if sizes == [1] else 20000, seed=1)
    streamed, mel = stream(audio, sizes)
    whole = log_mel(audio)
    assert streamed.shape == whole.shape
    assert mel.frames_emitted == whole.shape[1]
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=0)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2000), min_size=1, max_size=20), st.integers(0, 3))
def test_chunked_equals_whole_any_chunking(sizes, seed):
    if not any(sizes):
        sizes = sizes + [1]
    audio = speechlike(4000, seed=seed)
    streamed, _ = stream(audio, sizes)
    torch.testing.assert_close(streamed, log_mel(audio), atol=1e-5, rtol=0)


def test_frames_after_the_loudest_stay_clipped_8_log10_units_below_it_in_any_chunks():
    """Loud, then quiet, then silent: the running max of the loud start clips everything after it at whisper's
    ``max - 8`` (2.0 in feature units), also in chunks that hold only the quiet part (the max carries over)."""
    loud = speechlike(SAMPLE_RATE // 2)[::-1].copy() * 2  # loudest first
    audio = np.concatenate([loud, 0.001 * loud, np.zeros(SAMPLE_RATE // 4, dtype=np.float32)])
    whole = log_mel(audio)
    quiet = whole[:, len(loud) // HOP_LENGTH + 2 :]
    assert float(quiet.min()) == pytest.approx(float(whole.max()) - 2.0, abs=1e-5)
    pieces, _ = stream(audio, [len(loud), 1600, 3200])
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-5)


def test_128_bins_and_tensor_input():
    audio = speechlike(4800)
    whole = log_mel(torch.from_numpy(audio), n_mels=128)
    assert whole.shape == (128, 30)
    torch.testing.assert_close(stream(audio, [333], n_mels=128)[0], whole, atol=1e-5, rtol=0)


def test_causal_no_lookahead():
    """A frame depends only on the samples up to the end of its hop."""
    audio = speechlike(8000)
    changed = audio.copy()
    changed[3200:] = 0.9  # from frame 20 on: frames 0..19 end at sample 3200
    a, b = log_mel(audio), log_mel(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20], b[:, 20])


def test_close_to_whisper_in_the_interior():
    """Same filters and STFT; frames sit 2.5 ms earlier and the clip is a running max. Once the loudest frame
    has passed the two agree closely (measured here: mean |diff| ~0.03 of a feature range ~2.5)."""
    audio = speechlike(SAMPLE_RATE * 3)
    audio[:1600] *= 20  # the loudest part first, so the running max equals the global max early on
    ours, theirs = log_mel(audio), whisper.log_mel_spectrogram(audio)
    assert ours.shape == theirs.shape
    interior = slice(10, -10)
    diff = (ours[:, interior] - theirs[:, interior]).abs()
    assert diff.mean() < 0.05, diff.mean()
    corr = np.corrcoef(ours[:, interior].flatten(), theirs[:, interior].flatten())[0, 1]
    assert corr > 0.98, corr


def test_bad_input():
    with pytest.raises(ValueError, match="n_mels"):
        log_mel(speechlike(800), n_mels=64)
    with pytest.raises(ValueError, match="n_mels"):
        StreamingMel(40)
    with pytest.raises(ValueError, match="expected"):
        log_mel(np.zeros((2, 800), np.float32))


def test_frames_are_whispers_frames_40_samples_earlier_once_the_loudest_has_passed():
    """Frame t here ends at sample (t + 1) * 160; whisper's frame t is centred on t * 160. Dropping the first 40
    samples lines them up: after the loudest frame (so both clip at the same max) they are whisper's numbers,
    same hann window, power spectrum, filters and scaling."""
    audio = speechlike(SAMPLE_RATE)
    t = np.arange(1600) / SAMPLE_RATE
    audio[3200:4800] += (0.9 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # the loudest, frames 20..30
    ours = log_mel(audio[40:])  # mel: (80, frames)
    theirs = whisper.log_mel_spectrogram(audio)
    after_the_loudest = slice(32, ours.shape[1])
    torch.testing.assert_close(ours[:, after_the_loudest], theirs[:, after_the_loudest], atol=1e-4, rtol=0)


def test_digital_silence_is_whispers_floor():
    """All-zero audio: every feature is whisper's floor, (log10(1e-10) + 4) / 4 = -1.5, as whisper gives."""
    silence = np.zeros(SAMPLE_RATE // 2, np.float32)
    ours = log_mel(silence)
    torch.testing.assert_close(ours, torch.full_like(ours, -1.5))
    torch.testing.assert_close(ours, whisper.log_mel_spectrogram(silence))


def test_float64_samples_give_the_float32_features_whole_and_streamed():
    """``to_mono`` hands out float64: those samples give the same float32 features as float32 ones."""
    audio = speechlike(4000).astype(np.float64)
    expected = log_mel(audio.astype(np.float32))
    whole = log_mel(audio)
    assert whole.dtype == torch.float32
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(stream(audio, [700])[0], expected, atol=1e-5, rtol=0)


def test_128_bins_streamed_in_chunks_shorter_than_a_hop():
    """Chunks that complete no frame yield (128, 0), not (80, 0), so they join the 128-bin frames around them."""
    audio = speechlike(2400)
    streamed, _ = stream(audio, [100], n_mels=128)  # mel: (128, frames)
    torch.testing.assert_close(streamed, log_mel(audio, n_mels=128), atol=1e-5, rtol=0)
