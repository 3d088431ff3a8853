"""Long streams: the energy segmenter, LongStream's bounded state, and the agent's --long-audio modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from simul_agents import evaluate_inprocess
from simul_agents.proactive_agent import ProactiveAgent
from streaming_llm.checkpoint import build_model, save_checkpoint
from streaming_llm.engine import StreamingSession, max_source_samples
from streaming_llm.heads import READ, decide, make_head
from streaming_llm.long_stream import FRAME, EnergySegmenter, LongStream, SegmentConfig
from streaming_llm.tiny import tiny_config, tiny_tokenizer

RATE = 16000


def untied_tiny(**overrides):
    config = tiny_config("speech", **overrides)
    config = config.replace(llm_config={**config.llm_config, "tie_word_embeddings": False})
    torch.manual_seed(0)
    return build_model(config, tiny_tokenizer()).eval()


@pytest.fixture(scope="module")
def model():
    return untied_tiny()


def noise(seconds: float, seed: int = 0, level: float = 0.1) -> np.ndarray:
    return (level * np.random.default_rng(seed).standard_normal(round(seconds * RATE))).astype(np.float32)


def talk(*parts: tuple[float, float]) -> np.ndarray:
    """(seconds of sound, seconds of silence after it), ..."""
    return np.concatenate([np.concatenate([noise(s, seed=i), np.zeros(round(p * RATE), np.float32)])
                           for i, (s, p) in enumerate(parts)])  # fmt: skip


def segments_of(segmenter: EnergySegmenter, audio: np.ndarray, chunk: int) -> list[int]:
    """Segment lengths in samples, pushing ``chunk`` samples at a time."""
    lengths, current = [], 0
    for start in range(0, audio.shape[0], chunk):
        for piece, cut in segmenter.split(audio[start : start + chunk]):
            current += piece.shape[0]
            if cut:
                lengths.append(current)
                current = 0
    return lengths + ([current] if current else [])


# ---- the segmenter ---------------------------------------------------------------------------------------


def test_a_pause_cuts_only_once_the_segment_is_long_enough():
    config = SegmentConfig(min_seconds=5.0, pause_seconds=0.5)
    audio = talk((2.0, 1.0), (4.0, 0.6), (7.0, 0.3), (1.0, 0.0))  # pauses at 3 s (too early), 7.6 s, 15.9 s (short)
    lengths = segments_of(EnergySegmenter(config, 30 * RATE), audio, 5120)
    assert sum(lengths) == audio.shape[0]
    assert lengths[0] == round((2 + 1 + 4 + 0.5) * RATE)  # cut at the end of the first pause after 5 s
    assert len(lengths) == 2  # the 0.3 s pause is too short: no cut


def test_a_pause_that_ends_exactly_at_min_seconds_cuts_there():
    """The segment is min_seconds long when the pause completes: that is long enough, the cut falls there."""
    config = SegmentConfig(min_seconds=1.0, pause_seconds=0.5)
    audio = talk((0.5, 1.0), (1.0, 0.0))  # the pause is complete at exactly 1.0 s
    assert segments_of(EnergySegmenter(config, 30 * RATE), audio, 5120)[0] == RATE


def test_a_long_silence_is_cut_every_pause_seconds_not_every_frame():
    """After a cut the pause count starts again: with no minimum length, silence is cut once per pause."""
    config = SegmentConfig(min_seconds=0.0, pause_seconds=0.5)
    audio = talk((0.5, 2.0))
    assert segments_of(EnergySegmenter(config, 30 * RATE), audio, 5120) == [RATE] + [RATE // 2] * 3


def test_without_a_pause_the_hard_limit_cuts_at_exactly_max_samples():
    segmenter = EnergySegmenter(SegmentConfig(min_seconds=1.0), max_samples=100 * FRAME)
    lengths = segments_of(segmenter, noise(10.0), 777)
    assert lengths[:-1] == [100 * FRAME] * (len(lengths) - 1) and sum(lengths) == 10 * RATE


@pytest.mark.parametrize("chunk", [1, 319, 320, 5120, 44100])
def test_cuts_do_not_depend_on_how_the_audio_is_chunked(chunk):
    config = SegmentConfig(min_seconds=2.0, pause_seconds=0.3)
    audio = talk((2.5, 0.4), (1.0, 0.2), (3.0, 1.0), (0.5, 0.35), (2.0, 0.0))
    reference = segments_of(EnergySegmenter(config, 3 * RATE), audio, audio.shape[0])
    assert segments_of(EnergySegmenter(config, 3 * RATE), audio, chunk) == reference
    assert all(length <= 3 * RATE for length in reference) and len(reference) >= 4


def test_segment_limits_never_exceed_one_session(model):
    capacity = max_source_samples(model)
    assert capacity == 93 * 5120  # Whisper's 1500 frames, 320 ms blocks of 4 embeddings: 29.76 s
    assert SegmentConfig().max_samples(capacity) == capacity
    assert SegmentConfig(max_seconds=600).max_samples(capacity) == capacity
    assert SegmentConfig(max_seconds=12.345).max_samples(capacity) == 617 * FRAME  # whole 20 ms frames
    with pytest.raises(ValueError, match="max_seconds=2.0 is below min_seconds=10.0"):
        SegmentConfig(max_seconds=2.0)


# ---- LongStream ------------------------------------------------------------------------------------------


def one_session_words(model, head, audio: np.ndarray, chunk: int) -> list[str]:
    """The agent's loop over one StreamingSession."""
    session = StreamingSession(model, max_target_tokens=24, **head.session_options(model))
    memory, words = {}, []

    def write():
        while not session.finished and len(session.words) < 2 * session.units_read + 10:
            if decide(head, session, memory) is READ:
                break
            word = session.write_word()
            if word is None:
                break
            words.append(word)

    for start in range(0, audio.shape[0], chunk):
        session.push_audio(audio[start : start + chunk])
        write()
    session.finish_source()
    write()
    return words


@pytest.mark.parametrize("head", [("wait-k", {"k": 2}), ("entropy", {"threshold": 6.0}), ("attention", {})])
def test_an_utterance_shorter_than_min_seconds_is_one_plain_session(model, head):
    head = make_head(head[0], **head[1])
    audio = talk((1.5, 0.5), (2.0, 0.0))
    stream = LongStream(model, head, SegmentConfig(min_seconds=10.0), max_target_tokens=24)
    words = []
    for start in range(0, audio.shape[0], 5120):
        words += stream.push_audio(audio[start : start + 5120])
    words += stream.finish()
    assert words == one_session_words(model, head, audio, 5120)
    assert stream.n_segments == 1 and stream.finished


def test_a_stream_finished_with_its_last_audio_decides_on_it_only_once_the_source_has_ended(model):
    """``finish(samples)`` is the caller's last chunk: as a StreamingSession's caller pushes it, finishes the source
    and only then writes, the words of that audio are written under the ended source (with its end marker), the
    same words at the same call as one session gives, not words decided on before the source had ended."""
    head = make_head("wait-k", k=1)
    audio = talk((1.5, 0.5), (2.0, 0.0))
    chunk, last = 5120, audio.shape[0] - 2 * 5120  # the last chunk: the stream's final 0.64 s
    session = StreamingSession(model, max_target_tokens=200, **head.session_options(model))
    memory: dict = {}

    def write() -> list[str]:
        words = []
        while not session.finished and len(session.words) < 2 * session.units_read + 10:
            if decide(head, session, memory) is READ or (word := session.write_word()) is None:
                break
            words.append(word)
        return words

    expected = []  # (words returned by a push, ...), then the words returned by the end of the source
    for start in range(0, last, chunk):
        session.push_audio(audio[start : min(start + chunk, last)])
        expected.append(write())
    session.push_audio(audio[last:])
    session.finish_source()
    expected.append(write())

    stream = LongStream(model, head, SegmentConfig(min_seconds=10.0), max_target_tokens=200)
    got = [stream.push_audio(audio[start : min(start + chunk, last)]) for start in range(0, last, chunk)]
    got.append(stream.finish(audio[last:]))
    assert len(expected[-1]) > 1 and got == expected


def test_a_segment_writes_at_most_max_len_a_times_its_units_plus_max_len_b_words(model):
    """With max_len_a=0 and max_len_b=2 a segment stops at two words, even once its source has ended."""
    audio = talk((1.5, 0.5), (2.0, 0.0))
    words = {}
    for cap in (2.0, 100.0):
        stream = LongStream(model, make_head("wait-k", k=1), SegmentConfig(min_seconds=10.0), max_target_tokens=24,
                            max_len_a=0.0, max_len_b=cap)  # fmt: skip
        words[cap] = stream.push_audio(audio) + stream.finish()
    assert len(words[100.0]) > 2 and words[2.0] == words[100.0][:2]


def test_long_stream_state_stays_bounded_over_many_segments(model):
    """Two minutes, segments of at most 6 s: the caches never hold more than one segment's worth."""
    audio = talk(*[(4.0 + (i % 3), 0.6) for i in range(24)])[: 120 * RATE]
    stream = LongStream(model, make_head("wait-k", k=1), SegmentConfig(min_seconds=3.0, max_seconds=6.0),
                        max_target_tokens=24)  # fmt: skip
    prompt = len(model.prompt_ids) + len(model.prefix_ids)
    largest_llm, largest_encoder = 0, 0
    for start in range(0, audio.shape[0], 5120):
        stream.push_audio(audio[start : start + 5120])
        if stream.session is not None:
            largest_llm = max(largest_llm, stream.session.cache.get_seq_length())
            largest_encoder = max(largest_encoder, stream.session.encoder_cache.n_frames)
    stream.finish()
    blocks = int(np.ceil(6.0 / 0.32))
    assert stream.n_segments >= 20 and stream.samples_in == audio.shape[0]
    assert largest_encoder <= blocks * 16  # encoder frames of one 6 s segment
    assert largest_llm <= prompt + blocks * 4 + 1 + 24 + 1  # prompt, source, end marker, target cap (+ its end)


def test_long_stream_resamples_in_a_stream_and_never_hits_the_capacity(model):
    audio44 = talk((20.0, 0.2), (25.0, 0.0))  # 45 s with no usable pause: a hard cut at 29.76 s
    stream = LongStream(model, make_head("wait-k", k=3), max_target_tokens=8)
    import soxr

    resampled = soxr.resample(audio44, RATE, 44100)
    for start in range(0, resampled.shape[0], 14112):
        stream.push_audio(resampled[start : start + 14112], 44100)
    stream.finish()
    assert stream.n_segments == 2 and abs(stream.samples_in - audio44.shape[0]) <= 1


def test_long_stream_refuses_a_head_that_needs_the_whole_source(model):
    with pytest.raises(ValueError, match="the oracle head needs the whole source up front"):
        LongStream(model, make_head("oracle"))


def test_a_stream_without_audio_writes_nothing(model):
    stream = LongStream(model, make_head("wait-k"))
    assert stream.push_audio(np.zeros(0, np.float32)) == [] and stream.finish() == [] and stream.n_segments == 0
    with pytest.raises(ValueError, match="push_audio after finish"):
        stream.push_audio(np.zeros(10, np.float32))


# ---- the agent -------------------------------------------------------------------------------------------


def test_agent_long_audio_modes_agree_on_utterances_that_fit(tmp_path):
    """--long-audio segment on sources under min_seconds gives exactly what one session gives."""
    save_checkpoint(untied_tiny(), tmp_path / "ckpt")
    paths = []
    for i, parts in enumerate([((1.5, 0.3), (1.0, 0.0)), ((2.5, 0.0),), ((0.7, 0.2), (0.9, 0.0))]):
        sf.write(tmp_path / f"s{i}.wav", talk(*parts), RATE, subtype="FLOAT")
        paths.append(str(tmp_path / f"s{i}.wav"))
    (tmp_path / "source.txt").write_text("\n".join(paths) + "\n")
    (tmp_path / "target.txt").write_text("Hallo .\n" * len(paths))
    runs = {}
    for mode in ("off", "auto", "segment"):
        argv = ["--checkpoint", tmp_path / "ckpt", "--source", tmp_path / "source.txt", "--target",
                tmp_path / "target.txt", "--output", tmp_path / mode, "--source-segment-size", "320",
                "--max-target-tokens", "24", "--no-progress-bar", "--head", "entropy", "--threshold", "6",
                "--long-audio", mode]  # fmt: skip
        evaluate_inprocess(ProactiveAgent, argv)
        lines = (tmp_path / mode / "instances.log").read_text().splitlines()
        runs[mode] = [(r["prediction"], r["delays"]) for r in map(json.loads, lines)]
    assert runs["off"] == runs["auto"] == runs["segment"]
    assert all(prediction for prediction, _ in runs["off"])
