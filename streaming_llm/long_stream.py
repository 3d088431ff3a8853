"""Speech of any length through a model whose source holds about 30 s, in bounded memory.

One ``StreamingSession`` is one utterance: Whisper's encoder context is 1500 frames (30 s) and the LLM's source
group holds ``config.source_capacity`` embeddings, so a session takes at most ``max_source_samples(model)``
(93 blocks of 320 ms = 29.76 s for Whisper with stack 4), and a longer stream MUST be segmented. ``LongStream``
cuts a stream of any length into segments, each translated by a fresh session over the one shared model:

- an energy VAD marks each 20 ms frame silent when its RMS is below ``silence_db`` dBFS; once a segment is
  ``min_seconds`` long, the end of the first pause of ``pause_seconds`` cuts it;
- a segment that reaches ``max_seconds`` (default, and never more than, one session's capacity) is cut there,
  pause or not.

Within a segment the decision head decides READ or WRITE before every word exactly as for one utterance
(``streaming_llm.heads.decide``, at most ``max_len_a * units + max_len_b`` words and ``max_target_tokens``
tokens). At a cut the segment's source is finished and its translation flushed; the next segment starts with
a fresh session and fresh head memory, so a segment never sees the text of the one before.

Memory bound. What a ``LongStream`` holds at any moment is one session: the encoder's K/V cache for at most
``max_seconds`` of audio (1500 frames), the LLM's KV cache for the prompt + at most ``source_capacity`` source
embeddings + the end-of-source marker + at most ``max_target_tokens`` target tokens, and under one block of mel
frames; plus one 20 ms VAD frame and soxr's resampler state. Words are returned, not kept. Nothing of that
grows with the length of the stream: the state of a 10-hour stream is that of one ``max_seconds`` utterance
(``benchmarks/long_stream.py`` measures it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from speech_frontend.audio import SAMPLE_RATE, StreamTo16k

from .engine import StreamingSession, max_source_samples
from .heads import READ, Head, decide
from .model import SpeechLLM

FRAME = SAMPLE_RATE // 50  # one 20 ms VAD frame, 320 samples (a block is a whole number of frames)


@dataclass(frozen=True)
class SegmentConfig:
    """Where a long stream is cut (seconds at 16 kHz)."""

    min_seconds: float = 10.0  # a pause cuts a segment only once it is at least this long
    max_seconds: float = 0.0  # a hard cut at this length; 0 (and anything larger): one session's capacity
    pause_seconds: float = 0.5  # this long below silence_db is a pause
    silence_db: float = -40.0  # a 20 ms frame whose RMS is below this (dBFS) is silent

    def __post_init__(self) -> None:
        if self.min_seconds < 0 or self.max_seconds < 0 or self.pause_seconds <= 0:
            raise ValueError(
                f"segments: min_seconds={self.min_seconds}, max_seconds={self.max_seconds} must be >= 0 and "
                f"pause_seconds={self.pause_seconds} > 0"
            )
        if self.max_seconds and self.max_seconds < self.min_seconds:
            raise ValueError(f"segments: max_seconds={self.max_seconds} is below min_seconds={self.min_seconds}")

    def max_samples(self, capacity: int) -> int:
        """The hard cut in 16 kHz samples: max_seconds (or ``capacity``), whole 20 ms frames, at most ``capacity``."""
        wanted = round(self.max_seconds * SAMPLE_RATE) if self.max_seconds else capacity
        frames = min(wanted, capacity) // FRAME
        if frames < 1:
            raise ValueError(f"segments: max_seconds={self.max_seconds} is shorter than one 20 ms frame")
        return frames * FRAME


class EnergySegmenter:
    """Cuts a 16 kHz stream into segments of at most ``max_samples`` (see ``SegmentConfig``); no model.

    Cuts fall on the 20 ms frame grid of the stream. Holds one partial frame of samples, nothing else.
    """

    def __init__(self, config: SegmentConfig, max_samples: int):
        if max_samples < FRAME or max_samples % FRAME:
            raise ValueError(f"max_samples={max_samples}; a positive multiple of {FRAME} (20 ms) is needed")
        self.config = config
        self.max_samples = max_samples
        self.min_samples = min(round(config.min_seconds * SAMPLE_RATE), max_samples)
        self.pause_frames = max(1, math.ceil(config.pause_seconds * SAMPLE_RATE / FRAME))
        self.threshold = 10.0 ** (config.silence_db / 20.0)  # RMS below this is silent
        self.segment_samples = 0  # samples of the current segment so far
        self.silent_frames = 0  # silent frames at the end of the current segment
        self._frame = np.zeros(0, dtype=np.float32)  # the partial frame at the end of the stream so far

    def split(self, audio: np.ndarray) -> Iterator[tuple[np.ndarray, bool]]:
        """audio: (n,) 16 kHz float -> (piece, cut) in order: the pieces concatenate to ``audio``; ``cut`` says
        the segment ends after that piece (the next piece starts a new segment)."""
        start, position, n = 0, 0, audio.shape[0]
        while position < n:
            take = min(n - position, FRAME - self._frame.shape[0], self.max_samples - self.segment_samples)
            self._frame = np.concatenate([self._frame, audio[position : position + take]])
            position += take
            self.segment_samples += take
            if self._frame.shape[0] < FRAME:
                continue
            rms = float(np.sqrt(np.mean(np.square(self._frame, dtype=np.float64))))
            self.silent_frames = self.silent_frames + 1 if rms < self.threshold else 0
            self._frame = self._frame[:0]
            full = self.segment_samples >= self.max_samples
            paused = self.segment_samples >= self.min_samples and self.silent_frames >= self.pause_frames
            if full or paused:
                yield audio[start:position], True
                start = position
                self.segment_samples = self.silent_frames = 0
        if start < n:
            yield audio[start:], False


class LongStream:
    """A stream of any length: segmented by ``EnergySegmenter``, one ``StreamingSession`` per segment, one head.

    ``push_audio`` (any rate, channels, dtype; converted in a streaming way) and ``finish`` return the words
    written in response; the caller keeps the translation. Not thread-safe; one per stream, the model shared.
    """

    def __init__(
        self,
        model: SpeechLLM,
        head: Head,
        segments: SegmentConfig = SegmentConfig(),
        *,
        max_target_tokens: int = 256,
        max_len_a: float = 2.0,
        max_len_b: float = 10.0,
        reencode: str = "never",
        hold_end: bool = False,
    ):
        """``reencode``, ``hold_end``: each segment's session's (``StreamingSession.flush``, ``write_word``: a word
        closing a sentence waits for the end of its segment's source)."""
        if head.needs_full_source:
            raise ValueError(f"the {head.name} head needs the whole source up front; it cannot run on a long stream")
        self.model = model
        self.head = head
        self.session_options = {**head.session_options(model), "reencode": reencode, "hold_end": hold_end}
        self.max_target_tokens = max_target_tokens
        self.max_len_a, self.max_len_b = max_len_a, max_len_b
        self.segmenter = EnergySegmenter(segments, segments.max_samples(max_source_samples(model)))
        self.audio = StreamTo16k("long stream")
        self.session: StreamingSession | None = None
        self.memory: dict = {}  # the head's memory for the current segment
        self.samples_in = 0  # 16 kHz samples given to sessions so far
        self.n_segments = 0  # segments finished so far
        self.n_words = 0  # words written so far
        self.finished = False

    def push_audio(
        self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE, *, channels_last: bool | None = None
    ) -> list[str]:
        """Append audio -> the words written in response (those of any segment this audio completed first).

        ``channels_last``: the layout of 2-D samples (see ``speech_frontend.audio.to_mono``)."""
        if self.finished:
            raise ValueError("push_audio after finish; start a new LongStream for a new stream")
        return self._feed(self.audio.push(samples, sample_rate, channels_last=channels_last))

    def finish(
        self, samples: np.ndarray | None = None, sample_rate: int = SAMPLE_RATE, *, channels_last: bool | None = None
    ) -> list[str]:
        """The stream is over (``samples``: its last audio, if any): finish the last segment and flush its
        translation. The last audio is not decided on before the source is finished, as ``StreamingSession``'s
        callers do with a last chunk. No audio at all: no words."""
        if self.finished:
            return []
        tail = (
            self.audio.push(samples, sample_rate, channels_last=channels_last)
            if samples is not None
            else np.zeros(0, np.float32)
        )
        words = self._feed(np.concatenate([tail, self.audio.flush()]), last=True)
        self.finished = True
        if self.session is not None:
            words += self._end_segment()
        return words

    # ---- segments ------------------------------------------------------------------------------------

    def _feed(self, audio: np.ndarray, last: bool = False) -> list[str]:
        """Push 16 kHz audio through the segmenter; decide after each piece (but after the stream's last one)."""
        words: list[str] = []
        pieces = list(self.segmenter.split(audio)) if last else self.segmenter.split(audio)
        for i, (piece, cut) in enumerate(pieces):
            if piece.shape[0]:
                if self.session is None:
                    self.session = StreamingSession(
                        self.model, max_target_tokens=self.max_target_tokens, **self.session_options
                    )
                    self.memory = {}
                self.session.push_audio(piece)
                self.samples_in += piece.shape[0]
            if cut:
                words += self._end_segment()
            elif not (last and i == len(pieces) - 1):
                words += self._decide()
        return words

    def _end_segment(self) -> list[str]:
        """Finish the current session's source, flush its words, and drop it (the next piece starts a new one)."""
        session = self.session
        session.finish_source()
        words = self._decide()
        self.session, self.memory = None, {}
        self.n_segments += 1
        return words

    def _decide(self) -> list[str]:
        """Write words while the head says WRITE (the shared rules flush a finished source)."""
        session = self.session
        words: list[str] = []
        if session is None:
            return words
        while not session.finished:
            if len(session.words) >= math.floor(self.max_len_a * session.units_read + self.max_len_b):
                break
            if decide(self.head, session, self.memory) is READ:
                break
            word = session.write_word()
            if word is None:
                break
            words.append(word)
        self.n_words += len(words)
        return words
