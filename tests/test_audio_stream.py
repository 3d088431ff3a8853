"""SimulEval hands the agent audio at the file's own rate, a segment at a time: the 16 kHz samples it makes
must be those of the whole file resampled, also at the end of each segment, where the filter needs input
that has not arrived yet."""

from __future__ import annotations

import numpy as np
import pytest

from simul_agents.proactive_agent import AudioInput
from speech_frontend.audio import SAMPLE_RATE, AudioError, StreamTo16k, extrapolate, to_mono_16k


def voice(seconds: float, rate: int) -> np.ndarray:
    """A voiced sound: 29 harmonics of a gliding 80-160 Hz pitch under a syllable-rate envelope."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(120 + 40 * np.sin(2 * np.pi * 0.7 * t)) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (0.2 * envelope * sum(np.sin(h * phase) / h for h in range(1, 30))).astype(np.float32)


@pytest.mark.parametrize(("rate", "bound"), [(8000, 0.05), (22050, 0.002)])
def test_segments_resampled_one_by_one_give_the_whole_files_samples(rate, bound):
    audio = voice(2.0, rate)
    whole = to_mono_16k(audio, rate)
    stream, step = AudioInput(), int(0.32 * rate)  # SimulEval's 320 ms segments
    pieces = [stream.push(audio[i : i + step].tolist(), rate) for i in range(0, len(audio), step)]
    streamed = np.concatenate(pieces)
    assert len(streamed) == len(whole)
    # an odd reflection at the growing end gave 0.175 (8 kHz) and 0.0046 (22.05 kHz) at segment ends here
    assert np.abs(streamed - whole).max() < bound


def test_linear_prediction_continues_a_voice_where_a_reflection_does_not():
    rate = 44100
    audio = voice(0.5, rate)
    head, truth = audio[:-64], audio[-64:]
    predicted = extrapolate(head, 64)
    reflected = np.pad(head, (0, 64), mode="reflect", reflect_type="odd")[-64:]
    assert np.abs(predicted - truth).max() < 0.25 * np.abs(reflected - truth).max()  # 0.027 against 0.215


def test_extrapolating_silence_or_a_few_samples_is_quiet_and_finite():
    assert not extrapolate(np.zeros(2000, dtype=np.float32), 128).any()
    for n in (0, 1, 5, 64):
        out = extrapolate(np.linspace(-0.5, 0.5, n, dtype=np.float32), 128)
        assert out.shape == (128,) and np.isfinite(out).all() and np.abs(out).max() <= 1.0


def square(seconds: float, rate: int) -> np.ndarray:
    """A full-scale 440 Hz square wave: resampled, its edges ring past +-1 (Gibbs) unless clipped."""
    t = np.arange(int(seconds * rate)) / rate
    return np.sign(np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_streamed_full_scale_audio_stays_within_plus_minus_one(rate: int):
    stream = StreamTo16k("square")
    audio = square(1.0, rate)
    pieces = [stream.push(audio[i : i + 3000], rate) for i in range(0, len(audio), 3000)] + [stream.flush()]
    out = np.concatenate(pieces)  # out: (n16k,)
    assert out.shape[0] > 0.9 * SAMPLE_RATE and np.abs(out).max() <= 1.0


def test_an_empty_chunk_gives_no_samples_and_no_error():
    stream = StreamTo16k("mic")
    assert stream.push(np.zeros(0, np.float32), 44100).shape == (0,)
    assert stream.push(voice(0.1, 44100), 44100).dtype == np.float32
    empty = stream.push(np.zeros((0, 2), np.int16), 44100, channels_last=True)
    assert empty.shape == (0,) and empty.dtype == np.float32


def test_a_stream_whose_sample_rate_changes_is_refused_naming_both_rates():
    stream = StreamTo16k("mic")
    stream.push(voice(0.1, 44100), 44100)
    with pytest.raises(AudioError, match=r"^mic: the sample rate changed from 44100 to 48000 Hz$"):
        stream.push(voice(0.1, 48000), 48000)


def test_after_flush_the_same_stream_converts_the_next_source_like_a_fresh_one():
    first, second = voice(0.5, 22050), voice(0.3, 22050)[::-1].copy()
    reused = StreamTo16k("mic")
    np.concatenate([reused.push(first, 22050), reused.flush()])
    again = np.concatenate([reused.push(second, 22050), reused.flush()])
    fresh = StreamTo16k("mic")
    expected = np.concatenate([fresh.push(second, 22050), fresh.flush()])
    assert again.shape == expected.shape
    np.testing.assert_allclose(again, expected, atol=1e-6)
