"""Live translation in the terminal: a file at real-time pace, a microphone, or text words at a pace.

    python -m simul_agents.live talk.wav --checkpoint results/speech/model --head entropy --threshold 1.5
    python -m simul_agents.live talk.wav --checkpoint CKPT --fast          # as fast as the model goes
    python -m simul_agents.live --mic --checkpoint CKPT                    # until Ctrl-C (--seconds: a limit)
    python -m simul_agents.live sentences.txt --checkpoint TEXT_CKPT      # one line per utterance, words at a pace

``LiveStream`` is one stream: a ``StreamingSession``, a decision head and its memory, run by the SimulEval agent's
own rules (``heads.decide`` before every word, at most ``a * units + b`` words). A file longer than one utterance
(the model's context, ~30 s) goes through ``SegmentedStream``: cut at pauses, a ``LiveStream`` per segment, as the
agent's ``--long-audio`` does. The WebSocket server
(``simul_agents.serve``) uses it too. The command shows, updating in place on a terminal (one line per event
otherwise), the source time, each READ/WRITE decision and the translation with every word's delay, then AL and
LAAL (``simul_agents.latency``) against the source duration, plain and computation-aware.

Two times per word:

- delay: the source received when the word was written (ms of audio; words for text), as SimulEval's ``delays``;
- elapsed (computation-aware): when the word was out, on a clock where the source arrives in real time. At
  real-time pace and from a microphone it is the wall clock since the source started; with ``--fast`` it is
  simulated from the measured compute time: each chunk is ready when its last sample would have arrived, and the
  model works through the chunks in order (``clock = max(clock, ready) + compute``), so both modes agree.

Without ``--reference`` the hypothesis length stands in for the reference's in AL, so AL and LAAL agree.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import queue
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from speech_frontend.audio import SAMPLE_RATE, AudioError, load_audio
from streaming_llm.batching import forward_one
from streaming_llm.checkpoint import CheckpointError, load_checkpoint, read_meta
from streaming_llm.config import ENCODER_FRAME_MS, SPEECH
from streaming_llm.engine import REENCODE, LMCall, StreamingSession, max_source_samples
from streaming_llm.heads import (
    HEADS,
    READ,
    Decision,
    Head,
    check_given_once,
    decide,
    head_name,
    make_head,
    parse_head_params,
)
from streaming_llm.lean import compile_steps
from streaming_llm.long_stream import EnergySegmenter, SegmentConfig
from streaming_llm.quantize import add_precision_args, precision_from_flags, set_precision

from . import latency as L


class LiveError(ValueError):
    """A setting, file or device that cannot work; the message names it and what to do."""


@dataclass(frozen=True)
class Limits:
    """The SimulEval agent's caps: at most ``floor(max_len_a * units + max_len_b)`` words, ``max_target_tokens``."""

    max_len_a: float = 2.0
    max_len_b: float = 10.0
    max_target_tokens: int = 256

    def __post_init__(self) -> None:  # the flags of live and serve that set them are named in the errors
        if self.max_target_tokens < 1:
            raise ValueError(f"--max-target-tokens {self.max_target_tokens}: at least 1")
        a, b = self.max_len_a, self.max_len_b
        if not (a >= 0 and b >= 0 and math.isfinite(a + b)):
            raise ValueError(f"--max-len-a {a} --max-len-b {b}: give finite numbers >= 0 (the cap is a * source "
                             "units + b words)")  # fmt: skip


# ---- one stream ------------------------------------------------------------------------------------------


def build_head(checkpoint: str | Path | None, name: str, params: dict | None = None) -> Head:
    """A head by name for live use: the checkpoint's stored defaults, overridden by ``params``.

    Heads that need the whole source (the oracle) are refused: they are analysis tools, not live policies.
    """
    key = head_name(name)
    merged: dict = {}
    if checkpoint is not None:
        try:
            merged.update(read_meta(checkpoint).get("extra", {}).get("heads", {}).get(key, {}))
        except CheckpointError:
            pass  # loading the model reports it
    merged.update(params or {})
    head = make_head(key, **merged)
    if head.needs_full_source:
        live = ", ".join(n for n, cls in HEADS.items() if not cls.needs_full_source)
        raise ValueError(f"the {key} head needs the whole source in advance, so it cannot run live; use one of {live}")
    return head


def max_source(model) -> float:
    """The longest source one session takes: seconds of audio (speech) or source tokens (text)."""
    config = model.config
    if config.modality == SPEECH:  # within the LLM's source capacity and the encoder's context, as a session
        return max_source_samples(model) / SAMPLE_RATE
    return float(config.source_capacity)


class LiveStream:
    """One utterance streamed through a shared model: push source, then ``step()`` until it returns None.

    ``step()`` asks the head (through ``heads.decide``) and writes one word on WRITE; it returns None on READ, at the
    word cap, or when the translation is complete (``done``). ``delays`` hold each word's delay in ``unit``.
    Not thread-safe: one caller at a time (the server runs a stream's jobs one after another).
    """

    def __init__(self, model, head: Head, limits: Limits = Limits(), lm_call: LMCall = forward_one,
                 reencode: str = "never"):  # fmt: skip
        """``lm_call``: how the session runs the LM (the server passes its ``LMBatcher``); ``reencode``: when the
        words written are re-read under more source (``StreamingSession.flush``)."""
        if head.needs_full_source:
            raise ValueError(f"the {head.name} head needs the whole source in advance; it cannot run live")
        self.model = model
        self.head = head
        self.limits = limits
        self.speech = model.config.modality == SPEECH
        self.unit = "ms" if self.speech else "words"
        self.session = StreamingSession(
            model, max_target_tokens=limits.max_target_tokens, lm_call=lm_call, reencode=reencode,
            **head.session_options(model),
        )
        self.memory: dict = {}
        self.received = 0  # samples (speech) or words (text) pushed
        self.delays: list[float] = []
        self._words: list[str] = []
        self.done = False
        self.decision: Decision | None = None  # the last decision
        self.entropy: float | None = None  # next-token entropy at the last decision (not for fixed schedules)
        self.n_reads = 0  # READ decisions taken on new source
        self._read_at = -1  # units_read when the last READ was counted

    @property
    def source(self) -> float:
        """The source received so far, in ``unit``."""
        return self.received * 1000 / SAMPLE_RATE if self.speech else float(self.received)

    @property
    def words(self) -> list[str]:
        """The words written, each without inner whitespace (as ``step()`` returned them)."""
        return self._words

    def push_audio(self, samples: np.ndarray) -> int:
        """16 kHz mono samples (float or int PCM) -> new source units read."""
        samples = np.asarray(samples)
        units = self.session.push_audio(samples, SAMPLE_RATE)
        self.received += samples.shape[0]
        return units

    def push_words(self, words: Sequence[str]) -> int:
        words = [w for w in words if w.strip()]
        units = self.session.push_words(words)
        self.received += len(words)
        return units

    def finish(self) -> None:
        """The source is complete; the remaining words come from ``step()``."""
        if self.speech and self.received == 0:
            raise ValueError("the stream ended before any audio; send audio before 'end'")
        if not self.speech and self.received == 0:
            raise ValueError("the stream ended before any words; send words before 'end'")
        self.session.finish_source()

    def step(self) -> str | None:
        """Decide; on WRITE write one word and return it, else None (READ, the word cap, or the end)."""
        session = self.session
        while True:
            if self.done or session.finished:
                self.done = True
                return None
            cap = int(self.limits.max_len_a * session.units_read + self.limits.max_len_b)
            if len(session.words) >= cap:  # the session's count: a whitespace-only word counts, as in the agent
                self.done = session.source_finished
                return None
            if not self.head.fixed_schedule:  # a fixed schedule decides from counts: no LM output is needed
                self.entropy = session.signals().entropy
            self.decision = decide(self.head, session, self.memory)
            if self.decision is READ:
                if session.units_read != self._read_at:
                    self.n_reads += 1
                    self._read_at = session.units_read
                return None
            word = session.write_word()
            if word is None:  # the model ended the sentence (source finished), hit the token cap, or wrote nothing
                self.done = session.source_finished or session.finished
                return None
            word = "".join(word.split())  # one model word is one SimulEval word
            if word:  # a whitespace-only word is dropped, and the head decides again (as the agent does)
                self.delays.append(self.source)
                self._words.append(word)
                return word

    def drain(self) -> list[str]:
        """Every word the head writes now."""
        words = []
        while (word := self.step()) is not None:
            words.append(word)
        return words


class SegmentedStream:
    """A speech stream longer than one utterance (a talk): cut at pauses by ``EnergySegmenter`` (as the agent's
    ``--long-audio`` and ``LongStream`` do), each segment a ``LiveStream`` of its own over the shared model.

    The same interface as ``LiveStream`` for ``run_stream`` and ``Display``; ``source``, ``words`` and ``delays``
    are the whole stream's (a word's delay: the audio received when it was written, from the stream's start).
    A segment never sees the text of the one before."""

    def __init__(self, model, head: Head, limits: Limits = Limits(), reencode: str = "never",
                 segments: SegmentConfig | None = None, lm_call: LMCall = forward_one):  # fmt: skip
        segments = segments or SegmentConfig()
        self.make = lambda: LiveStream(model, head, limits, lm_call=lm_call, reencode=reencode)
        self.current = self.make()
        self.segmenter = EnergySegmenter(segments, segments.max_samples(max_source_samples(model)))
        self.speech, self.unit = True, "ms"
        self.received = 0
        self.delays: list[float] = []
        self.words: list[str] = []
        self.n_segments = 0
        self._ended: list[str] = []  # words of finished segments that step() has not returned yet

    @property
    def source(self) -> float:
        return self.received * 1000 / SAMPLE_RATE

    @property
    def session(self) -> StreamingSession:
        return self.current.session

    @property
    def decision(self) -> Decision | None:
        return self.current.decision

    @property
    def entropy(self) -> float | None:
        return self.current.entropy

    @property
    def n_reads(self) -> int:
        return self.current.n_reads

    @property
    def done(self) -> bool:
        return not self._ended and self.current.done

    def push_audio(self, samples: np.ndarray) -> int:
        """16 kHz mono samples -> new source units read (in the current segment)."""
        units = 0
        for piece, cut in self.segmenter.split(np.asarray(samples, dtype=np.float32)):
            if piece.shape[0]:
                units += self.current.push_audio(piece)
                self.received += piece.shape[0]
            if cut and self.current.received:
                self.current.finish()
                self._ended += self.current.drain()  # the segment's source is over: all its words are due now
                self.current = self.make()
                self.n_segments += 1
        return units

    def finish(self) -> None:
        if self.current.received:
            self.current.finish()
            self.n_segments += 1
        elif not self.received:
            raise ValueError("the stream ended before any audio; send audio before 'end'")
        else:
            self.current.done = True  # the last cut ended the stream: nothing more to write

    def step(self) -> str | None:
        word = self._ended.pop(0) if self._ended else self.current.step()
        if word is not None:
            self.words.append(word)
            self.delays.append(self.source)
        return word

    drain = LiveStream.drain  # every word the current segment's head writes now


def latency_summary(
    delays: Sequence[float], elapsed: Sequence[float] | None, source_length: float, reference_length: int | None = None
) -> dict[str, float | None]:
    """AL and LAAL (``simul_agents.latency``, SimulEval's formulas) from delays, and from elapsed as ``_CA``.

    ``reference_length`` defaults to the hypothesis length (no reference live); values are None without words.
    """
    result: dict[str, float | None] = {"AL": None, "LAAL": None, "AL_CA": None, "LAAL_CA": None}
    if not delays or source_length <= 0:
        return result
    ref = reference_length or len(delays)
    result["AL"] = L.average_lagging(delays, source_length, ref)
    result["LAAL"] = L.length_adaptive_average_lagging(delays, source_length, ref)
    if elapsed:
        result["AL_CA"] = L.average_lagging(elapsed, source_length, ref)
        result["LAAL_CA"] = L.length_adaptive_average_lagging(elapsed, source_length, ref)
    return result


# ---- sources as chunks: (payload, ready) with ready the source time (ms) at which the chunk is complete ----


def audio_chunks(audio: np.ndarray, chunk_ms: int) -> Iterator[tuple[np.ndarray, float]]:
    step = max(1, chunk_ms * SAMPLE_RATE // 1000)
    for start in range(0, audio.shape[0], step):
        chunk = audio[start : start + step]
        yield chunk, (start + chunk.shape[0]) * 1000 / SAMPLE_RATE


def word_chunks(words: Sequence[str], word_ms: int) -> Iterator[tuple[list[str], float]]:
    for i, word in enumerate(words):
        yield [word], (i + 1) * word_ms


def microphone_chunks(
    chunk_ms: int, max_seconds: float | None, device=None, stop: threading.Event | None = None
) -> Iterator[tuple[np.ndarray, float]]:
    """Record until Ctrl-C, ``stop`` is set or ``max_seconds`` (None: no limit); yields 16 kHz mono chunks as they
    arrive."""
    sd = import_sounddevice()
    try:
        info = sd.query_devices(device, kind="input")
    except (sd.PortAudioError, ValueError) as e:
        raise LiveError(f"--mic: no microphone found ({e}); plug one in or pass a FILE instead") from None
    rate = int(info["default_samplerate"]) or SAMPLE_RATE
    try:
        sd.check_input_settings(device=device, samplerate=SAMPLE_RATE, channels=1, dtype="float32")
        rate = SAMPLE_RATE
    except (sd.PortAudioError, ValueError):
        pass  # record at the device's own rate and resample
    resampler = None
    if rate != SAMPLE_RATE:
        import soxr

        resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    arrived: queue.Queue[np.ndarray] = queue.Queue()

    def callback(indata, frames, time_info, status):  # PortAudio's thread: hand the samples over, nothing more
        arrived.put(indata[:, 0].copy())

    blocksize = max(1, chunk_ms * rate // 1000)
    try:
        stream = sd.InputStream(
            device=device, samplerate=rate, channels=1, dtype="float32", blocksize=blocksize, callback=callback
        )
    except sd.PortAudioError as e:
        raise LiveError(f"--mic: the microphone cannot be opened ({e})") from None
    received = 0
    limit = int(max_seconds * SAMPLE_RATE) if max_seconds is not None else None
    with stream:
        try:
            while (limit is None or received < limit) and not (stop is not None and stop.is_set()):
                try:
                    chunk = arrived.get(timeout=1.0)
                except queue.Empty:
                    continue
                if resampler is not None:
                    chunk = resampler.resample_chunk(chunk)
                chunk = chunk if limit is None else chunk[: limit - received]
                if chunk.shape[0]:
                    received += chunk.shape[0]
                    yield chunk, received * 1000 / SAMPLE_RATE
        except KeyboardInterrupt:
            return


@contextlib.contextmanager
def ctrl_c_ends_recording(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C sets ``stop`` instead of raising wherever the program is: a recording ends at the next chunk, and the
    chunk being translated, the end of the source and the summary still run. A second Ctrl-C interrupts."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def import_sounddevice():
    try:
        import sounddevice
    except ImportError:
        raise LiveError("--mic needs the sounddevice package: pip install -r requirements.txt") from None
    except OSError as e:  # sounddevice raises OSError when the PortAudio library is missing
        raise LiveError(
            f"--mic needs the PortAudio library ({e}); install it (Debian/Ubuntu: apt-get install libportaudio2)"
        ) from None
    return sounddevice


# ---- the display -----------------------------------------------------------------------------------------


@dataclass
class Display:
    """Updates in place on a terminal (ANSI); prints one line per event to anything else (a pipe, a log)."""

    out: TextIO
    unit: str  # "ms" or "words"
    total: float | None = None  # the source length when known, in unit
    tty: bool = False
    _lines: int = 0  # terminal lines of the last frame
    _words: list[str] = dataclasses.field(default_factory=list)
    _shown_units: int | None = None  # units_read at the last READ line printed

    def fmt(self, value: float) -> str:
        return f"{value / 1000:.2f} s" if self.unit == "ms" else f"{value:.0f} w"

    def chunk_done(self, stream: LiveStream) -> None:
        """After a chunk: the head's last decision (a READ line once per new source unit)."""
        if self.tty:
            self._render(stream)
        elif stream.decision is READ and stream.session.units_read != self._shown_units:
            self._shown_units = stream.session.units_read
            entropy = f"  entropy {stream.entropy:.2f}" if stream.entropy is not None else ""
            self.out.write(f"{self.fmt(stream.source):>9}  READ {entropy}\n")
            self.out.flush()

    def word(self, stream: LiveStream, word: str, elapsed: float) -> None:
        delay = stream.delays[-1]
        word = printable(word)
        self._words.append(f"{word}\033[2m[{self.fmt(delay)}]\033[0m" if self.tty else word)
        if self.tty:
            self._render(stream)
        else:
            times = f"delay {self.fmt(delay)}, elapsed {elapsed / 1000:.2f} s"
            self.out.write(f"{self.fmt(stream.source):>9}  WRITE {word}  ({times})\n")
            self.out.flush()

    def _render(self, stream: LiveStream) -> None:
        width, rows = shutil.get_terminal_size((100, 20))
        total = f" / {self.fmt(self.total)}" if self.total else ""
        state = stream.decision.value if stream.decision is not None else "…"
        entropy = f"  entropy {stream.entropy:5.2f}" if stream.entropy is not None else ""
        status = f"source {self.fmt(stream.source)}{total}   {state:<5}{entropy}   reads {stream.n_reads}  writes"
        status += f" {len(stream.delays)}"
        lines = [status[:width], *wrap(self._words, width)[-max(1, rows - 2) :]]  # cursor-up stops at the top
        up = f"\033[{self._lines - 1}A" if self._lines > 1 else ""
        self.out.write(up + "\r\033[J" + "\n".join(lines))
        self.out.flush()
        self._lines = len(lines)

    def finish(self) -> None:
        if self.tty and self._lines:
            self.out.write("\n")
        self._lines = 0
        self._words = []


def printable(text: str) -> str:
    """Control characters (a model can write an escape code) shown as U+FFFD, so they never drive the terminal."""
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def wrap(words: list[str], width: int) -> list[str]:
    """Words with ANSI markup -> lines no wider than ``width`` visible characters."""
    lines, line, used = [], [], 0
    for word in words:
        visible = len(word) - sum(len(code) for code in ("\033[2m", "\033[0m") if code in word)
        if line and used + 1 + visible > width:
            lines.append(" ".join(line))
            line, used = [], 0
        line.append(word)
        used += visible + (1 if used else 0)
    if line:
        lines.append(" ".join(line))
    return lines


# ---- running one stream ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    words: list[str]
    delays: list[float]  # in unit
    elapsed: list[float]  # ms
    source_length: float  # in unit
    unit: str
    compute_s: float  # model time, all chunks

    @property
    def text(self) -> str:
        return " ".join(self.words)


def run_stream(
    stream: LiveStream,
    chunks: Iterable[tuple[object, float]],
    *,
    pace: bool,
    wall_clock: bool,
    display: Display | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    t0: float | None = None,
) -> Result:
    """Push each chunk (at its ready time when ``pace``), then step until READ; finish; return the words and times.

    ``wall_clock``: elapsed is the wall clock since the source started (real-time pace, microphone); otherwise it is
    simulated from the compute time (``--fast``; see the module docstring). ``t0``: when the source started (on
    ``clock``), if before this call (a microphone already recording).
    """
    push = stream.push_audio if stream.speech else stream.push_words
    elapsed: list[float] = []
    busy_until = 0.0  # simulated clock (ms)
    compute = 0.0
    t0 = clock() if t0 is None else t0
    ready = 0.0

    def work(action: Callable[[], None], ready_ms: float) -> None:
        nonlocal busy_until, compute
        start, shown = clock(), 0.0  # shown: time spent drawing, not computing
        busy_until = max(busy_until, ready_ms)
        action()
        while (word := stream.step()) is not None:
            now = clock()
            elapsed.append((now - t0) * 1000 if wall_clock else busy_until + (now - start - shown) * 1000)
            if display is not None:
                display.word(stream, word, elapsed[-1])
                shown += clock() - now
        spent = clock() - start - shown
        compute += spent
        busy_until += spent * 1000
        if display is not None:
            display.chunk_done(stream)

    for payload, ready in chunks:
        if pace:
            wait = t0 + ready / 1000 - clock()
            if wait > 0:
                sleep(wait)
        work(lambda payload=payload: push(payload), ready)
    if stream.received:
        work(stream.finish, ready)
    if display is not None:
        display.finish()
    return Result(list(stream.words), list(stream.delays), elapsed, stream.source, stream.unit, compute)


# ---- the command -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m simul_agents.live",
        description="Translate a file or a microphone live, showing each READ/WRITE decision and word delay.",
    )
    p.add_argument("file", nargs="?", help="audio file (any rate, mono or not) or, for a text model, a text file")
    p.add_argument("--mic", action="store_true", help="record from the default microphone instead of a file")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (streaming_llm.checkpoint)")
    p.add_argument("--head", default="entropy", help=f"decision head: {', '.join(HEADS)} (not oracle)")
    p.add_argument("--threshold", type=float, default=None, help="the head's threshold (entropy: nats)")
    p.add_argument("--head-param", action="append", default=[], metavar="KEY=VALUE", help="any head parameter")
    p.add_argument("--fast", action="store_true", help="as fast as the model goes, not at real-time pace")
    p.add_argument("--chunk-ms", type=int, default=320, help="audio chunk (ms) pushed at a time (default 320)")
    p.add_argument("--word-ms", type=int, default=400, help="text: one source word every this many ms (default 400)")
    p.add_argument("--seconds", type=float, default=None, help="--mic: stop after this long (default: at Ctrl-C)")
    p.add_argument("--reference", default=None, help="a reference translation: its length is AL's |Y|")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_precision_args(p)
    p.add_argument("--max-target-tokens", type=int, default=Limits.max_target_tokens,
                   help="at most this many target tokens (default: %(default)s)")  # fmt: skip
    words = "at most a * source units + b target words, as the agent's"
    p.add_argument("--max-len-a", type=float, default=Limits.max_len_a, help=f"{words} (default: %(default)s)")
    p.add_argument("--max-len-b", type=float, default=Limits.max_len_b, help=f"{words} (default: %(default)s)")
    p.add_argument("--reencode", choices=REENCODE, default="never",
                   help="re-read the words written under more source: never, end (once it ends), read (every read)")
    return p.parse_args(argv)


def head_from_args(args: argparse.Namespace) -> Head:
    params = parse_head_params(args.head_param)
    if args.threshold is not None:
        name = head_name(args.head)
        fields = {f.name for f in dataclasses.fields(HEADS[name])}
        if "threshold" not in fields:
            what = "use --head-param" if fields else "it takes no parameters"
            raise LiveError(f"--threshold does not apply to the {name!r} head; {what}")
        check_given_once("--threshold", args.threshold, "threshold", params)
        params["threshold"] = args.threshold
    return build_head(args.checkpoint, args.head, params)


def check_args(args: argparse.Namespace) -> None:
    if args.mic and args.file:
        raise LiveError("give a FILE or --mic, not both")
    if not args.mic and not args.file:
        raise LiveError("give a FILE to translate, or --mic to record from the microphone")
    if args.file and not Path(args.file).is_file():
        raise LiveError(f"{args.file}: no such file")
    if args.chunk_ms < 10 or args.word_ms < 1:
        raise LiveError(f"--chunk-ms {args.chunk_ms} / --word-ms {args.word_ms}: use at least 10 ms chunks, 1 ms/word")
    if args.threads < 0:
        raise LiveError(f"--threads {args.threads}: give a number of threads, or 0 for torch's default")
    if args.seconds is not None and not (args.seconds > 0 and math.isfinite(args.seconds)):
        raise LiveError(f"--seconds {args.seconds}: give how long to record (more than 0), or leave it out for Ctrl-C")


def load_text(path: str, model) -> list[list[str]]:
    """The sentences of a text file, one per non-blank line; a line longer than one session takes is named here,
    before any is translated."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LiveError(f"{path}: not UTF-8 text (this checkpoint translates text, one sentence per line)") from None
    sentences = [(number, line.split()) for number, line in enumerate(lines, start=1) if line.strip()]
    if not sentences:
        raise LiveError(f"{path}: no words; a text source needs one sentence per line")
    for number, words in sentences:
        if problem := model.source_overflow(words):
            raise LiveError(f"{path} line {number}: {problem}; split the line into sentences, one per line")
    return [words for _, words in sentences]


def summary_line(result: Result, reference: str | None) -> str:
    ref = len(reference.split(" ")) if reference else None
    if not result.words:
        return f"source {result.source_length:.0f} {result.unit}: no words written"
    if result.unit == "ms":
        scores = latency_summary(result.delays, result.elapsed, result.source_length, ref)
        rtf = result.compute_s * 1000 / result.source_length
        return (
            f"source {result.source_length / 1000:.2f} s, {len(result.words)} words | AL {scores['AL']:.0f} ms, "
            f"LAAL {scores['LAAL']:.0f} ms | computation-aware: AL {scores['AL_CA']:.0f} ms, "
            f"LAAL {scores['LAAL_CA']:.0f} ms | compute {result.compute_s:.2f} s (real-time factor {rtf:.2f})"
        )
    scores = latency_summary(result.delays, None, result.source_length, ref)
    return (
        f"source {result.source_length:.0f} words, {len(result.words)} words | AL {scores['AL']:.2f} words, "
        f"LAAL {scores['LAAL']:.2f} words | compute {result.compute_s:.2f} s"
    )


def text_summary_line(result: Result, word_ms: int, reference: str | None) -> str:
    """Text: plain latency in words; computation-aware in words too, elapsed ms / the word interval."""
    line = summary_line(result, reference)
    if result.words:
        ref = len(reference.split(" ")) if reference else None
        in_words = [e / word_ms for e in result.elapsed]
        scores = latency_summary(result.delays, in_words, result.source_length, ref)
        line += f" | computation-aware: AL {scores['AL_CA']:.2f} words, LAAL {scores['LAAL_CA']:.2f} words"
    return line


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = parse_args(argv)
    out = out or sys.stdout
    try:
        check_args(args)
        limits = Limits(args.max_len_a, args.max_len_b, args.max_target_tokens)  # checks them, before any loading
        head = head_from_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        precision = precision_from_flags(args.int8, args.fp16, args.int4)
        model = load_checkpoint(args.checkpoint, merge_lora=True)  # in eval mode
        # the input checked against the model before --int4's calibration or --compile (minutes): a mistake in it
        # stops the command before any such work
        head.session_options(model)  # checks the head fits the model (a probe present, layers in range)
        speech = model.config.modality == SPEECH
        if args.mic and not speech:
            raise LiveError(f"--mic needs a speech checkpoint; {args.checkpoint} translates text")
        if args.mic:
            import_sounddevice()  # PortAudio's absence named now
        source = None if args.mic else read_audio(args.file) if speech else load_text(args.file, model)
        model = set_precision(model, precision, args.checkpoint)
        if args.compile:
            out.write("compiling the LLM's streaming steps (--compile; about a minute) ...\n")
            out.flush()
            out.write(f"compiled in {compile_steps(model.llm):.0f} s\n")
        tty = out.isatty()
        mode = "real-time pace" if not args.fast else "as fast as possible"
        out.write(f"{args.checkpoint}: {model.config.modality} model, head {head.describe()}, {mode}\n")
        if speech:
            run_speech(args, model, head, limits, out, tty, source)
        else:
            run_text(args, model, head, limits, out, tty, source)
    except (LiveError, CheckpointError, AudioError, ValueError) as e:
        print(f"live: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlive: interrupted", file=sys.stderr)
        return 130
    return 0


def read_audio(path: str) -> np.ndarray:
    """The audio file a speech checkpoint translates, as 16 kHz mono samples."""
    try:
        return load_audio(path)
    except AudioError as e:
        raise LiveError(f"{e} (this checkpoint translates speech: give it an audio file)") from None


def run_speech(args, model, head: Head, limits: Limits, out: TextIO, tty: bool, audio: np.ndarray | None) -> None:
    """``audio``: the file's samples (``read_audio``); None with ``--mic``."""
    limit = max_source(model)
    if args.mic:
        seconds = args.seconds  # None: until Ctrl-C; past the model's context, cut at pauses
        stop = threading.Event()  # Ctrl-C: the recording ends, its translation is finished and summed up
        with ctrl_c_ends_recording(stop):
            chunks = microphone_chunks(args.chunk_ms, seconds, stop=stop)
            first = next(chunks, None)  # opens the device (errors here), before the display starts
            if first is None:
                raise LiveError("--mic: the microphone gave no audio")
            started = time.perf_counter() - first[1] / 1000  # the first chunk has just arrived
            until = f"up to {seconds:.1f} s" if seconds is not None else "until Ctrl-C"
            out.write(f"recording {until} (one utterance: {limit:.1f} s; longer speech is cut at pauses)\n")
            display = Display(out, "ms", None, tty)
            if seconds is not None and seconds <= limit:
                stream = LiveStream(model, head, limits, reencode=args.reencode)
            else:
                stream = SegmentedStream(model, head, limits, reencode=args.reencode)
            result = run_stream(stream, _chain(first, chunks), pace=False, wall_clock=True, display=display,
                                t0=started)  # fmt: skip
    else:
        seconds = audio.shape[0] / SAMPLE_RATE
        display = Display(out, "ms", seconds * 1000, tty)
        if seconds > limit:  # one session hears one utterance: a talk is cut at pauses, a session per segment
            out.write(
                f"{args.file} is {seconds:.1f} s, longer than one utterance ({limit:.1f} s: "
                f"{model.config.source_capacity} source embeddings of {model.config.stack * ENCODER_FRAME_MS} ms): "
                "cut at pauses into segments, each translated on its own\n"
            )
            stream = SegmentedStream(model, head, limits, reencode=args.reencode)
        else:
            stream = LiveStream(model, head, limits, reencode=args.reencode)
        chunks = audio_chunks(audio, args.chunk_ms)
        result = run_stream(stream, chunks, pace=not args.fast, wall_clock=not args.fast, display=display)
    out.write(f"translation: {printable(result.text)}\n{summary_line(result, args.reference)}\n")


def run_text(args, model, head: Head, limits: Limits, out: TextIO, tty: bool, sentences: list[list[str]]) -> None:
    """``sentences``: the file's (``load_text``), each translated as one stream."""
    for words in sentences:
        display = Display(out, "words", float(len(words)), tty)
        out.write(f"source: {' '.join(words)}\n")
        stream = LiveStream(model, head, limits, reencode=args.reencode)
        chunks = word_chunks(words, args.word_ms)
        result = run_stream(stream, chunks, pace=not args.fast, wall_clock=not args.fast, display=display)
        out.write(f"translation: {printable(result.text)}\n{text_summary_line(result, args.word_ms, args.reference)}\n")


def _chain(first, rest):
    yield first
    yield from rest


if __name__ == "__main__":
    sys.exit(main())
