"""A WebSocket server for live translation, with the browser page at ``/`` on the same port.

    python -m simul_agents.serve --checkpoint results/speech/model [--host 127.0.0.1] [--port 8765]

The model is loaded once and shared; every connection gets its own ``LiveStream`` (``simul_agents.live``: one
``StreamingSession``, one head, one memory). A stream's model work runs as small jobs (a frame of source, or one
word), one after another, off the asyncio loop, which never waits on the model. By default every job runs on
one model thread, one at a time, streams taking turns word by word. With ``--batch`` the jobs of different streams
run at the same time, each on a worker thread of its own with one torch thread, and their LM forwards meet in one
packed forward on the model thread (``streaming_llm.batching.LMBatcher``; ``Translator`` has the measurements).
Binds to loopback unless ``--host`` says otherwise; there is no authentication.

Protocol (JSON text messages, binary audio; one stream at a time per connection, any number one after another):

client -> server
  {"type": "start", "format": "float32"|"pcm16"|"text", "sample_rate": 16000, "head": "entropy",
   "threshold": 1.5, "params": {"k": 3}}            every field optional (defaults: float32 or text by the model,
                                                    16000, the server's --head with its --threshold and
                                                    --head-param, else the head's own parameters)
  binary frames                                     mono little-endian samples in the stated format and rate
  {"type": "words", "words": ["I", "would"]}        text streams ({"type": "words", "text": "I would"} too)
  {"type": "end"}                                   the source is complete

server -> client
  {"type": "started", "modality", "head", "format", "sample_rate", "max_source", "unit"}
  {"type": "write", "text", "index", "delay_ms", "elapsed_ms"}      text streams add "delay_words"
  {"type": "read", "source_ms", "units"}            after each source frame, when the head waits for more
                                                    (units: of the current utterance, when --max-stream is
                                                    longer than one and the stream is cut at pauses)
  {"type": "end", "text", "words", "unit", "source_length", "AL", "LAAL", "AL_CA", "LAAL_CA", "compute_ms",
   "busy_ms", "rtf"}
  {"type": "error", "code", "message"}

Times: ``delay_ms`` is the audio received when the word was written (SimulEval's delay); ``elapsed_ms`` adds the
time from the arrival of the newest frame read to the word going out (computation-aware, on the clock of a
client that sends in real time). For text, ``delay_ms`` is the arrival of the newest word read and ``elapsed_ms``
the send time, both since the first words message; ``delay_words`` is SimulEval's delay, and the end's AL and LAAL
are in words. ``compute_ms`` is the stream's model time (batched: its jobs' time, shared forwards included),
``busy_ms`` that plus its jobs' wait behind other streams, and ``rtf`` = busy_ms / source_ms: above 1 the server
cannot keep up with this client.

Errors never stop the server. A malformed or unexpected message (codes: bad_json, bad_message, bad_start,
not_started, wrong_mode, bad_audio, too_large, too_long), or one the session refuses (bad_input), is answered with an
error event and dropped; the connection stays usable. Events keep the order of the messages they answer: a bad
frame's error comes after the read and write events of the frames sent before it. model_error drops the stream (its
frames are ignored up to its end: send end, which is answered with an end event marked "dropped", then a new
start). busy (the server is full) and idle (no message within --idle-timeout) close the connection; a frame beyond
the hard limit closes it with code 1009.
A bounded queue per connection gives back-pressure: when the model falls behind, the server stops reading.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import http
import ipaddress
import json
import logging
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from speech_frontend.audio import SAMPLE_RATE
from streaming_llm.batching import LMBatcher, forward_one
from streaming_llm.config import SPEECH
from streaming_llm.engine import REENCODE, SourceTooLong, StreamingSession
from streaming_llm.heads import check_given_once, finite, parse_head_params, shown
from streaming_llm.lean import compile_steps
from streaming_llm.quantize import add_precision_args, precision_from_flags, set_precision

from .live import Limits, LiveStream, SegmentedStream, build_head, latency_summary, max_source

logger = logging.getLogger("simul_agents.serve")

STATIC = Path(__file__).parent / "static"
FORMATS = {"pcm16": np.dtype("<i2"), "float32": np.dtype("<f4")}
MIN_RATE, MAX_RATE = 8000, 192000
START_FIELDS = {"type", "format", "sample_rate", "head", "threshold", "params"}


@dataclass(frozen=True)
class ServeConfig:
    """Limits of one server; every one is a command-line option."""

    max_clients: int = 16  # connections at once; more are refused with 'busy'
    queue_frames: int = 32  # frames a connection may have waiting for the model before the server stops reading
    idle_timeout_s: float = 30.0  # no message (and no work pending) for this long closes the connection
    max_stream_s: float = 0.0  # longest speech stream; 0: the model's context; more: cut at pauses into utterances
    max_frame_bytes: int = 1 << 20  # a larger message gets 'too_large' and is dropped
    hard_frame_bytes: int = 8 << 20  # a larger message closes the connection (1009), before it is buffered
    head: str = "entropy"  # the head when a start names none
    head_params: tuple[tuple[str, str], ...] = ()  # its parameters (--threshold, --head-param); a start's override them
    limits: Limits = Limits()
    batch: bool = False  # streams' LM forwards batched on the model thread (``Translator``); else one job at a time
    reencode: str = "never"  # when a stream's written words are re-read under more source (StreamingSession.flush)


class ProtocolError(ValueError):
    """A client message that cannot be used; ``code`` is the error event's code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StreamSpec:
    """What a start message asked for, checked."""

    format: str
    sample_rate: int
    head: Any  # streaming_llm.heads.Head


def model_thread() -> ThreadPoolExecutor:
    """The one thread that runs the LM: every batched forward (``--batch``), or every job (``--no-batch``).

    Load the model on it too (``main`` does): PyTorch's OpenMP keeps one thread pool per thread that calls it,
    and the main thread's pool (left by loading, quantizing, compiling) and the model thread's then share the
    cores. On 2 cores that made each stream's steps about 1.5x slower (``benchmarks/serve_load.py``: one
    client's real-time factor 0.51 against 0.29 for the same stream run on the main thread)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


class Translator:
    """The shared model, the threads that run the streams' jobs, and counts of connections and streams.

    Batched (``ServeConfig.batch``, ``--batch``): a LM step of SmolLM2-135M reads every weight for a row or two,
    so several streams' rows in one forward cost little more than one stream's. Each job runs on a worker thread
    with one torch thread (the encoder, the head; no OpenMP pool of its own) and hands its LM forwards to the
    ``LMBatcher``, which runs them, packed with every other waiting stream's, on the model thread with its
    ``--threads``. Measured on 2 cores (README, ``benchmarks/serve_load.py``): with eager steps (float32, 4-bit)
    each client's real-time factor at 2-8 clients is 12-29% lower than one job at a time; with ``--compile`` it
    is higher (the compiled one-row step is already cheap, and the hand-offs and single-threaded encoders cost
    more than the packing saves), so batching is off by default. A packed product sums in another order than a
    one-row product: in float32 a stream writes what it writes alone; with int8 or 4-bit weights (bfloat16
    activations) a close decision can go the other way under load, so its words can differ from the agent's.
    """

    def __init__(self, model, checkpoint: str | None = None, config: ServeConfig = ServeConfig(),
                 executor: ThreadPoolExecutor | None = None):  # fmt: skip
        """``executor``: the model thread, where ``main`` loaded the model (``model_thread``); a new one if None."""
        self.model = model
        self.checkpoint = checkpoint
        self.config = config
        self.speech = model.config.modality == SPEECH
        model_limit = max_source(model)
        self.max_source = config.max_stream_s if self.speech and config.max_stream_s > 0 else model_limit
        self.segmented = self.max_source > model_limit  # longer than one utterance: cut at pauses (SegmentedStream)
        self.executor = executor or model_thread()
        # batched: each stream's jobs run on a worker thread of their own, single-threaded, and their LM forwards
        # meet in one LMBatcher whose forwards run on the model thread; else every job runs on the model thread
        self.batcher = LMBatcher(model.llm, runner=self.executor) if config.batch else None
        self.workers = self.executor
        if config.batch:
            # the sessions' shared start state (the prompt through the LM, alone) made here, by the model thread:
            # made by the first stream on its single-threaded worker, it would run the (compiled) LM there
            self.executor.submit(StreamingSession, model).result()
            self.workers = ThreadPoolExecutor(max_workers=config.max_clients, thread_name_prefix="stream",
                                              initializer=torch.set_num_threads, initargs=(1,))  # fmt: skip
        self.connections = 0
        self.streams = 0  # open streams (a LiveStream exists)
        self.served = 0  # streams that reached 'end'
        self.errors = 0  # error events sent
        self.peak_backlog = 0  # most frames one connection had read from its socket but not yet run

    async def run(self, timing: list[float], fn, *args):
        """Run ``fn(*args)`` on the model thread; add its run time and its submit-to-done time to ``timing``."""
        submitted = time.perf_counter()
        started = [0.0]

        def job():
            started[0] = time.perf_counter()
            if self.batcher is None:
                return fn(*args)
            with self.batcher.member():
                return fn(*args)

        try:
            return await asyncio.get_running_loop().run_in_executor(self.workers, job)
        finally:
            done = time.perf_counter()
            if started[0]:
                timing[0] += done - started[0]
            timing[1] += done - submitted

    def live_stream(self, head) -> LiveStream | SegmentedStream:
        """A new stream's LiveStream (on a worker), its LM calls going through the batcher when batching; a
        SegmentedStream (a LiveStream per segment, cut at pauses) when streams may be longer than one utterance."""
        lm_call = forward_one if self.batcher is None else self.batcher
        if self.segmented:
            return SegmentedStream(self.model, head, self.config.limits, reencode=self.config.reencode,
                                   lm_call=lm_call)  # fmt: skip
        return LiveStream(self.model, head, self.config.limits, lm_call=lm_call, reencode=self.config.reencode)

    def stats(self) -> dict:
        stats = {"connections": self.connections, "streams": self.streams, "served": self.served,
                 "errors": self.errors, "modality": self.model.config.modality}  # fmt: skip
        if self.batcher is not None:
            stats["lm_forwards"], stats["lm_requests"] = self.batcher.n_forwards, self.batcher.n_requests
        return stats

    def parse_start(self, message: dict) -> StreamSpec:
        unknown = sorted(set(message) - START_FIELDS)
        if unknown:
            known = ", ".join(sorted(START_FIELDS))
            raise ProtocolError("bad_start", f"start: unknown field {', '.join(unknown)}; known fields: {known}")
        fmt = message.get("format", "float32" if self.speech else "text")
        if fmt not in (*FORMATS, "text"):
            raise ProtocolError("bad_start", f"start: format {fmt!r}; expected 'pcm16', 'float32' or 'text'")
        if self.speech and fmt == "text":
            raise ProtocolError("bad_start", "start: this server's model translates speech; send format pcm16/float32")
        if not self.speech and fmt != "text":
            raise ProtocolError("bad_start", "start: this server's model translates text; send format 'text' and words")
        rate = message.get("sample_rate", SAMPLE_RATE)
        if not isinstance(rate, int) or isinstance(rate, bool) or not MIN_RATE <= rate <= MAX_RATE:
            raise ProtocolError("bad_start", f"start: sample_rate {rate!r}; expected an integer {MIN_RATE}-{MAX_RATE}")
        params = message.get("params", {})
        if not isinstance(params, dict):
            raise ProtocolError("bad_start", "start: params must be an object of head parameters, e.g. {\"k\": 3}")
        params = dict(params)
        if "threshold" in message:
            threshold = message["threshold"]
            if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not finite(threshold):
                raise ProtocolError("bad_start", f"start: threshold {shown(threshold)} is not a finite number")
            params["threshold"] = threshold
        name = message.get("head", self.config.head)
        if not isinstance(name, str):
            raise ProtocolError("bad_start", f"start: head {name!r} is not a name")
        if name == self.config.head:  # the server's own head: its settings, then the client's
            params = {**dict(self.config.head_params), **params}
        try:
            head = build_head(self.checkpoint, name, params)
            head.session_options(self.model)
        except ValueError as e:
            raise ProtocolError("bad_start", f"start: {e}") from None
        return StreamSpec(fmt, rate, head)


# ---- one connection --------------------------------------------------------------------------------------


class Connection:
    """Reads messages (checks them, queues them, bounded) while a worker task runs them on the model thread."""

    def __init__(self, translator: Translator, ws: ServerConnection):
        self.t = translator
        self.ws = ws
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=translator.config.queue_frames)
        self.spec: StreamSpec | None = None  # the open stream, as the reader sees it
        self.received = 0.0  # 16 kHz samples (speech) or words (text) accepted into the open stream
        self.working = False
        self.stream: _Stream | None = None  # the open stream, as the worker sees it
        self.parsed = 0  # frames taken from the socket
        self.processed = 0  # frames the worker has run

    async def send(self, event: dict) -> None:
        if event["type"] == "error":
            self.t.errors += 1
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(json.dumps(event))

    async def error(self, code: str, message: str) -> None:
        await self.send({"type": "error", "code": code, "message": message})

    async def serve(self) -> None:
        worker = asyncio.create_task(self.work())
        try:
            await self.read()
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker

    # -- reading --

    async def read(self) -> None:
        idle = self.t.config.idle_timeout_s
        last = time.monotonic()
        while True:
            try:
                message = await asyncio.wait_for(self.ws.recv(), timeout=max(0.05, last + idle - time.monotonic()))
            except TimeoutError:
                if self.working or not self.queue.empty():
                    last = time.monotonic()  # the client waits on us: not idle
                    continue
                await self.error("idle", f"no message for {idle:g} s; closing (send audio or words, or 'end')")
                await self.ws.close(1000, "idle timeout")
                return
            except ConnectionClosed:
                return
            last = time.monotonic()
            try:
                item = self.parse(message)
            except ProtocolError as e:  # answered in turn, after the events of the frames before it
                item = ("error", e.code, str(e))
            if item is not None:
                await self.queue.put(item)  # blocks when full: back-pressure on the socket
                self.parsed += 1
                self.t.peak_backlog = max(self.t.peak_backlog, self.parsed - self.processed)

    def parse(self, message: str | bytes) -> tuple | None:
        limit = self.t.config.max_frame_bytes
        if len(message) > limit:
            raise ProtocolError("too_large", f"a {len(message)}-byte message is over the {limit}-byte limit; "
                                "send smaller chunks (e.g. 100-500 ms of audio)")  # fmt: skip
        if isinstance(message, bytes):
            return self.parse_audio(message)
        try:
            data = json.loads(message)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer of more than 4300 digits
            raise ProtocolError("bad_json", f"a text message is not JSON ({e}); send a JSON object") from None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise ProtocolError("bad_message", 'a JSON message must be an object with a "type" (start, words, end)')
        kind = data["type"]
        if kind == "start":
            if self.spec is not None:
                raise ProtocolError("bad_message", "start: a stream is already open; send end first")
            self.spec = self.t.parse_start(data)
            self.received = 0.0
            return ("start", self.spec)
        if kind == "end":
            if self.spec is None:
                raise ProtocolError("not_started", "end without a stream; send start first")
            self.spec = None
            return ("end", time.perf_counter())
        if kind == "words":
            return self.parse_words(data)
        raise ProtocolError("bad_message", f"unknown message type {kind!r}; expected start, words or end")

    def parse_audio(self, frame: bytes) -> tuple | None:
        spec = self.spec
        if spec is None:
            raise ProtocolError("not_started", "audio before start; send a start message first")
        if spec.format == "text":
            raise ProtocolError("wrong_mode", "binary audio on a text stream; send {\"type\": \"words\", ...}")
        dtype = FORMATS[spec.format]
        if len(frame) % dtype.itemsize:
            raise ProtocolError("bad_audio", f"{len(frame)} bytes is not a whole number of {spec.format} samples "
                                f"({dtype.itemsize} bytes each)")  # fmt: skip
        samples = np.frombuffer(frame, dtype=dtype)
        if samples.size == 0:
            return None
        if dtype.kind == "f" and not np.isfinite(samples).all():
            raise ProtocolError("bad_audio", "the frame holds NaN or Inf samples; send finite float32 in [-1, 1]")
        n16 = samples.size * SAMPLE_RATE / spec.sample_rate
        limit = self.t.max_source * SAMPLE_RATE
        if self.received + n16 > limit + 1e-6:
            raise ProtocolError("too_long", f"the stream is over {self.t.max_source:.2f} s, the longest this server "
                                "takes in one stream; send end and start a new stream")  # fmt: skip
        self.received += n16
        return ("audio", samples, time.perf_counter())

    def parse_words(self, data: dict) -> tuple:
        spec = self.spec
        if spec is None:
            raise ProtocolError("not_started", "words before start; send a start message first")
        if spec.format != "text":
            raise ProtocolError("wrong_mode", "words on a speech stream; send binary audio frames")
        if isinstance(data.get("words"), list) and all(isinstance(w, str) for w in data["words"]):
            words = [w for item in data["words"] for w in item.split()]
        elif isinstance(data.get("text"), str):
            words = data["text"].split()
        else:
            raise ProtocolError("bad_message", 'words: expected "words": ["a", "b"] or "text": "a b"')
        try:
            "".join(words).encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate, which no tokenizer takes
            raise ProtocolError("bad_message", "words: the text holds a lone surrogate (e.g. \\ud800), not Unicode "
                                "text; send UTF-8 words") from None  # fmt: skip
        if self.received + len(words) > self.t.max_source:
            raise ProtocolError("too_long", f"the stream is over {self.t.max_source:.0f} source tokens; send end")
        self.received += len(words)
        return ("words", words, time.perf_counter())

    # -- working --

    async def work(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                self.working = True
                try:
                    await self.handle(item)
                except ConnectionClosed:
                    return
                except SourceTooLong as e:  # more source than one session holds (text: tokens, counted here)
                    await self.error("too_long", f"this input would take the stream past the model's context of "
                                     f"{e.limit}; it is dropped: send end and start a new stream")  # fmt: skip
                except ValueError as e:  # the session refused this input (checked before it changes anything)
                    await self.error("bad_input", f"{e}; the frame is dropped")
                except Exception as e:  # the model failed: report it, drop the stream, keep serving
                    logger.exception("model error")
                    if self.stream is not None:
                        self.stream.dropped = True
                    await self.error("model_error", f"{type(e).__name__}: {e}; the stream is dropped: send end, "
                                     "then a new start")  # fmt: skip
                finally:
                    self.working = False
                    self.processed += 1
        finally:
            if self.stream is not None:
                self.stream = None
                self.t.streams -= 1

    async def handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "error":  # the reader refused a message
            await self.error(item[1], item[2])
            return
        if kind == "start":
            spec: StreamSpec = item[1]
            self.stream = stream = _Stream(spec, int(self.t.max_source * SAMPLE_RATE) if self.t.speech else 0)
            self.t.streams += 1
            stream.live = await self.t.run(stream.timing, self.t.live_stream, spec.head)
            if spec.sample_rate != SAMPLE_RATE:
                import soxr

                stream.resampler = soxr.ResampleStream(spec.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            await self.send({
                "type": "started", "modality": self.t.model.config.modality, "head": spec.head.describe(),
                "format": spec.format, "sample_rate": spec.sample_rate, "max_source": self.t.max_source,
                "unit": "s" if self.t.speech else "tokens",
            })  # fmt: skip
            return
        stream = self.stream
        assert stream is not None, "the reader queues frames only inside a stream"
        if kind == "end":  # always answered with an end event, so a client waiting for it never hangs
            self.stream = None
            self.t.streams -= 1
            if not stream.dropped:
                try:
                    await self.t.run(stream.timing, stream.finish)
                    await self.write_words(stream)
                except ConnectionClosed:
                    raise
                except Exception as e:
                    logger.exception("model error at the end of a stream")
                    stream.dropped = True
                    await self.error("model_error", f"{type(e).__name__}: {e}; the stream is dropped")
            if stream.dropped:
                await self.send({"type": "end", "text": "", "words": 0, "dropped": True})
                return
            await self.send(stream.summary())
            self.t.served += 1
            return
        if stream.dropped:
            return  # frames of a stream the model dropped, up to its end
        if kind == "audio":
            await self.t.run(stream.timing, stream.push_audio, item[1])
            stream.last_arrival = item[2]
            await self.write_words(stream)
            await self.send({"type": "read", "source_ms": round(stream.live.source, 3),
                             "units": stream.live.session.units_read})  # fmt: skip
            return
        if kind == "words":
            if stream.origin is None:
                stream.origin = item[2]
            await self.t.run(stream.timing, stream.live.push_words, item[1])
            stream.last_arrival = item[2]
            await self.write_words(stream)
            await self.send({"type": "read", "source_ms": round((item[2] - stream.origin) * 1000, 3),
                             "units": stream.live.session.units_read})  # fmt: skip
            return
        raise AssertionError(kind)

    async def write_words(self, stream: _Stream) -> None:
        while True:
            word = await self.t.run(stream.timing, stream.live.step)
            if word is None:
                return
            await self.send(stream.write_event(word, time.perf_counter()))


class _Stream:
    """One stream's model-side state: the LiveStream, the resampler, arrival times and timing."""

    def __init__(self, spec: StreamSpec, max_samples: int):
        self.spec = spec
        self.max_samples = max_samples  # speech: the resampler's output is cut here (its count can overshoot)
        self.live: LiveStream | None = None
        self.resampler = None
        self.timing = [0.0, 0.0]  # model run time, submit-to-done time (s)
        self.dropped = False  # the model failed on this stream
        self.last_arrival = time.perf_counter()
        self.origin: float | None = None  # text: arrival of the first words
        self.elapsed: list[float] = []
        self.delays_ms: list[float] = []

    def push_audio(self, samples: np.ndarray) -> None:  # model thread
        if samples.dtype.kind == "i":
            audio = samples.astype(np.float32) / 32768.0
        else:  # clipped as to_mono_16k clips, but before the resampler, whose filter overflows on huge samples
            audio = np.clip(samples.astype(np.float32), -1.0, 1.0)
        if self.resampler is not None:
            audio = self.resampler.resample_chunk(audio)
        self._push(audio)

    def _push(self, audio: np.ndarray) -> None:
        audio = audio[: max(0, self.max_samples - self.live.received)]
        if audio.size:
            self.live.push_audio(audio)

    def finish(self) -> None:  # model thread
        if self.resampler is not None:
            self._push(self.resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        if self.live.received:
            self.live.finish()

    def write_event(self, word: str, now: float) -> dict:
        live = self.live
        if live.speech:
            delay = live.delays[-1]
            elapsed = delay + (now - self.last_arrival) * 1000
            event = {"type": "write", "text": word, "index": len(live.delays) - 1, "delay_ms": round(delay, 3),
                     "elapsed_ms": round(elapsed, 3)}  # fmt: skip
        else:
            delay = (self.last_arrival - self.origin) * 1000
            elapsed = (now - self.origin) * 1000
            event = {"type": "write", "text": word, "index": len(live.delays) - 1, "delay_ms": round(delay, 3),
                     "elapsed_ms": round(elapsed, 3), "delay_words": live.delays[-1]}  # fmt: skip
        self.elapsed.append(elapsed)
        return event

    def summary(self) -> dict:
        live = self.live
        compute_ms, busy_ms = self.timing[0] * 1000, self.timing[1] * 1000
        if live.speech:
            scores = latency_summary(live.delays, self.elapsed, live.source)
            source_ms = live.source
        else:
            scores = latency_summary(live.delays, None, live.source)
            source_ms = (self.last_arrival - self.origin) * 1000 if self.origin is not None else 0.0
        return {
            "type": "end", "text": " ".join(live.words), "words": len(live.words), "unit": live.unit,
            "source_length": live.source, "source_ms": round(source_ms, 3),
            **{k: (round(v, 3) if v is not None else None) for k, v in scores.items()},
            "compute_ms": round(compute_ms, 3), "busy_ms": round(busy_ms, 3),
            "rtf": round(busy_ms / source_ms, 4) if live.speech and source_ms > 0 else None,
        }  # fmt: skip


# ---- HTTP: the page and the stats -----------------------------------------------------------------------


def http_response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store"), ("Connection", "close")])  # fmt: skip
    return Response(status.value, status.phrase, headers, body)


def make_process_request(translator: Translator):
    page = (STATIC / "index.html").read_bytes()

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            origin = request.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc != request.headers.get("Host"):
                message = f"origin {origin} is not this server's; open the page this server serves at /\n"
                return http_response(http.HTTPStatus.FORBIDDEN, message.encode(), "text/plain; charset=utf-8")
            return None  # a full server accepts, then sends 'busy' and closes: a browser shows no refusal reason
        path = urlsplit(request.path).path
        if path in ("/", "/index.html"):
            return http_response(http.HTTPStatus.OK, page, "text/html; charset=utf-8")
        if path == "/stats":
            return http_response(http.HTTPStatus.OK, json.dumps(translator.stats()).encode(), "application/json")
        message = f"{path}: not found; the page is at / and the WebSocket on any path\n"
        return http_response(http.HTTPStatus.NOT_FOUND, message.encode(), "text/plain; charset=utf-8")

    return process_request


def make_handler(translator: Translator):
    async def handler(ws: ServerConnection) -> None:
        if translator.connections >= translator.config.max_clients:
            message = f"the server is full ({translator.config.max_clients} clients); try again later"
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"type": "error", "code": "busy", "message": message}))
                await ws.close(1013, "server full")
            translator.errors += 1
            return
        translator.connections += 1
        try:
            await Connection(translator, ws).serve()
        finally:
            translator.connections -= 1

    return handler


def start_server(translator: Translator, host: str, port: int):
    """websockets' server (an async context manager) for ``translator``."""
    return serve(
        make_handler(translator), host, port, process_request=make_process_request(translator),
        max_size=translator.config.hard_frame_bytes, max_queue=16, ping_interval=20, ping_timeout=20,
    )  # fmt: skip


class BackgroundServer:
    """The server on its own thread and event loop (tests, notebooks): ``with BackgroundServer(t) as s: s.url``."""

    def __init__(self, translator: Translator, host: str = "127.0.0.1", port: int = 0):
        self.translator, self.host, self.port = translator, host, port
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="serve", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def _run(self) -> None:
        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                async with start_server(self.translator, self.host, self.port) as server:
                    self.port = server.sockets[0].getsockname()[1]
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as e:
                self._error = e
                self._ready.set()

        asyncio.run(main())

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


# ---- the command -----------------------------------------------------------------------------------------


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0..65535 (0: any free port, which the server picks and logs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value}: must be 0..65535 (0: any free port)")
    return value


def _threads(text: str) -> int:
    """An argparse type: torch CPU threads, 0 (torch's default) or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 (torch's default) or a positive number of threads")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    defaults = ServeConfig()
    p = argparse.ArgumentParser(prog="python -m simul_agents.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (streaming_llm.checkpoint)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, loopback; 0.0.0.0 exposes it)")  # fmt: skip
    p.add_argument("--port", type=_port, default=8765,
                   help="port (0: any free port; the log line names it; default: %(default)s)")  # fmt: skip
    p.add_argument("--head", default=defaults.head,
                   help="the head when a client's start names none (default: %(default)s)")  # fmt: skip
    p.add_argument("--threshold", type=float, default=None,
                   help="--head's threshold (default: the checkpoint's, else the head's own); a start's overrides it")
    p.add_argument("--head-param", action="append", default=None, metavar="KEY=VALUE",
                   help="any parameter of --head, repeatable (e.g. k=3, min_lag=1); a start's params override them")
    p.add_argument("--max-clients", type=int, default=defaults.max_clients,
                   help="connections at once; more are refused with 'busy' (default: %(default)s)")  # fmt: skip
    p.add_argument("--queue-frames", type=int, default=defaults.queue_frames,
                   help="frames queued per client before the server stops reading (default: %(default)s)")  # fmt: skip
    p.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout_s,
                   help="seconds without a message before a connection is closed (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-stream", type=float, default=defaults.max_stream_s,
                   help="longest speech stream in seconds (0: the model's context, one utterance; longer: cut at "
                   "pauses into utterances, each translated on its own; default: %(default)s)")  # fmt: skip
    p.add_argument("--max-frame-bytes", type=int, default=defaults.max_frame_bytes,
                   help="a larger message gets 'too_large' and is dropped; one over max(8 MiB, 4 times this) "
                   "closes the connection (code 1009) (default: %(default)s)")  # fmt: skip
    p.add_argument("--threads", type=_threads, default=0,
                   help="torch CPU threads for the model (0: torch's default; default: %(default)s)")  # fmt: skip
    add_precision_args(p)
    p.add_argument("--batch", action=argparse.BooleanOptionalAction, default=ServeConfig.batch,
                   help="batch the LM forwards of concurrent streams into one (each stream's other work on a "
                   "thread of its own): 12-29%% less time per client with eager steps, not with --compile "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--reencode", choices=REENCODE, default=defaults.reencode,
                   help="re-read the words written under more source: never, end (once it ends), read (every read) "
                   "(default: %(default)s)")  # fmt: skip
    words = "each stream writes at most a * source units + b words, as the agent"
    p.add_argument("--max-len-a", type=float, default=defaults.limits.max_len_a, help=f"{words} (default: %(default)s)")
    p.add_argument("--max-len-b", type=float, default=defaults.limits.max_len_b, help=f"{words} (default: %(default)s)")
    p.add_argument("--max-target-tokens", type=int, default=defaults.limits.max_target_tokens,
                   help="each stream writes at most this many target tokens (default: %(default)s)")  # fmt: skip
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    if args.max_clients < 1 or args.queue_frames < 1 or args.idle_timeout <= 0 or args.max_frame_bytes < 1024:
        raise ValueError("--max-clients, --queue-frames must be >= 1, --idle-timeout > 0, --max-frame-bytes >= 1024")
    if not math.isfinite(args.idle_timeout):
        raise ValueError(f"--idle-timeout {args.idle_timeout}: give a number of seconds")
    if not (math.isfinite(args.max_stream) and args.max_stream >= 0):
        raise ValueError(f"--max-stream {args.max_stream}: give seconds >= 0 (0: the model's context)")
    params = parse_head_params(args.head_param or [])
    if args.threshold is not None:
        check_given_once("--threshold", args.threshold, "threshold", params)
        params["threshold"] = str(args.threshold)
    return dataclasses.replace(
        ServeConfig(), max_clients=args.max_clients, queue_frames=args.queue_frames, idle_timeout_s=args.idle_timeout,
        max_stream_s=args.max_stream, max_frame_bytes=args.max_frame_bytes, head=args.head, batch=args.batch,
        reencode=args.reencode, head_params=tuple(params.items()),
        limits=Limits(args.max_len_a, args.max_len_b, args.max_target_tokens),  # checks them
        hard_frame_bytes=max(ServeConfig.hard_frame_bytes, 4 * args.max_frame_bytes),
    )  # fmt: skip


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_forever(translator: Translator, host: str, port: int) -> None:
    async with start_server(translator, host, port) as server:
        bound = server.sockets[0].getsockname()
        print(f"serving on http://{bound[0]}:{bound[1]}/ (WebSocket on the same port)", flush=True)
        await server.serve_forever()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        from streaming_llm.checkpoint import CheckpointError, load_checkpoint

        config = config_from_args(args)
        build_head(args.checkpoint, args.head, dict(config.head_params))  # a bad --head fails now, not at a client
        precision = precision_from_flags(args.int8, args.fp16, args.int4)
        executor = model_thread()

        def load():  # on the model thread, which then runs every step (model_thread says why)
            if args.threads:
                torch.set_num_threads(args.threads)
            model = load_checkpoint(args.checkpoint, merge_lora=True)  # in eval mode
            # and fits the model (a probe head needs the checkpoint's probe, attention layers in range): checked
            # now, not by every client whose start names no head, and before --int4's calibration or --compile
            build_head(args.checkpoint, args.head, dict(config.head_params)).session_options(model)
            model = set_precision(model, precision, args.checkpoint)
            if args.compile:
                logger.info("compiling the LLM's streaming steps (--compile; about a minute)")
                logger.info("compiled in %.0f s", compile_steps(model.llm))
            return model

        model = executor.submit(load).result()
    except (CheckpointError, ValueError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    if not is_loopback(args.host):
        logger.warning("binding %s: anyone who can reach this address can use the model (no authentication)", args.host)
    translator = Translator(model, args.checkpoint, config, executor)
    try:
        asyncio.run(serve_forever(translator, args.host, args.port))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"serve: error: cannot listen on {args.host}:{args.port} ({e}); pick another --port", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
