"""Memory and speed of a 10-minute stream through ``LongStream`` (segments of at most ~30 s, one session each).

    python benchmarks/long_stream.py                      # Whisper tiny.en + SmolLM2-135M from `make assets`
    python benchmarks/long_stream.py --checkpoint runs/offline_speech/final     # a trained checkpoint
    python benchmarks/long_stream.py --tiny               # the tiny random model (seconds)
    python benchmarks/long_stream.py --tiny --tracemalloc # also Python-level allocations (slower)

The audio is synthesised chunk by chunk (never held whole): talk-like bursts of harmonic tones and noise of
1.5-9 s with pauses of 0.2-1.2 s, so the energy VAD cuts at some pauses and the hard limit cuts elsewhere. It is
streamed in 320 ms chunks, with a decision head (default wait-k, k=3: it writes steadily, so the target side of
every segment is exercised). RSS (psutil) is sampled after every chunk; the peak over minutes 1..N must stay
within 10% of the RSS at minute 1 (the memory bound of ``streaming_llm/long_stream.py``).

The last line is one JSON object with ``rss_mib_at_1min``, ``rss_mib_at_10min`` (None when ``--minutes`` or
``--time-limit`` stopped the stream earlier; ``rss_mib_at_last_minute`` then says where it stood),
``peak_rss_mib_after_1min``, ``peak_over_1min`` (that peak / the RSS at minute 1), ``seconds_per_audio_second``
(model time only, not producing the audio) and the run's settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speech_frontend.audio import SAMPLE_RATE  # noqa: E402
from streaming_llm.heads import make_head, parse_head_params  # noqa: E402
from streaming_llm.long_stream import LongStream, SegmentConfig  # noqa: E402

CHUNK = SAMPLE_RATE * 320 // 1000
MIB = 2**20


class Talk:
    """A seeded, endless talk-like signal, produced chunk by chunk: bursts and pauses of random lengths."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.t = 0  # samples produced so far
        self.left = 0  # samples left in the current burst or pause
        self.loud = False
        self.pitch = 150.0

    def next(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.float32)
        filled = 0
        while filled < n:
            if self.left == 0:
                self.loud = not self.loud
                seconds = self.rng.uniform(1.5, 9.0) if self.loud else self.rng.uniform(0.2, 1.2)
                self.left = round(seconds * SAMPLE_RATE)
                self.pitch = self.rng.uniform(100.0, 250.0)
            take = min(n - filled, self.left)
            t = (self.t + np.arange(take)) / SAMPLE_RATE
            if self.loud:
                voiced = sum(0.3 / k * np.sin(2 * np.pi * k * self.pitch * t * (1 + 0.05 * np.sin(3 * t)))
                             for k in range(1, 6))  # fmt: skip
                piece = voiced * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)) + 0.02 * self.rng.standard_normal(take)
            else:
                piece = 0.001 * self.rng.standard_normal(take)  # room noise, -60 dBFS
            out[filled : filled + take] = piece
            filled += take
            self.t += take
            self.left -= take
        return out


def load_model(args):
    if args.tiny:
        from streaming_llm.tiny import tiny_model

        return tiny_model("speech", block_ms=args.block_ms), "tiny random"
    if args.checkpoint:
        from streaming_llm.checkpoint import load_checkpoint

        return load_checkpoint(args.checkpoint, merge_lora=True), str(args.checkpoint)
    from training.config import load_config
    from training.train import build_training_model

    cfg = load_config(
        None, {"llm": "asset:smollm2-135m-instruct", "whisper": "asset:whisper-tiny.en", "block_ms": args.block_ms}
    )
    return build_training_model(cfg).eval(), "whisper-tiny.en + SmolLM2-135M (untrained adapter)"


def rss_mib(process: psutil.Process) -> float:
    return process.memory_info().rss / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random model instead of the real one")
    parser.add_argument("--checkpoint", help="a trained checkpoint directory (streaming_llm.checkpoint)")
    parser.add_argument("--block-ms", type=int, default=640, help="the untrained models' block (checkpoint: its own)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--head", default="wait-k")
    parser.add_argument(
        "--head-param",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="the head's parameters (default: k=3 for wait-k, the head's own defaults otherwise)",
    )
    parser.add_argument("--max-target-tokens", type=int, default=64, help="per segment")
    parser.add_argument("--min-seconds", type=float, default=SegmentConfig.min_seconds)
    parser.add_argument("--time-limit", type=float, default=0.0, help="stop after this many wall seconds (0: none)")
    parser.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations (slower)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    process = psutil.Process()

    model, model_name = load_model(args)
    head_params = args.head_param if args.head_param is not None else (["k=3"] if args.head == "wait-k" else [])
    head = make_head(args.head, **parse_head_params(head_params))
    stream = LongStream(model, head, SegmentConfig(min_seconds=args.min_seconds),
                        max_target_tokens=args.max_target_tokens)  # fmt: skip
    talk = Talk(args.seed)
    total_chunks = round(args.minutes * 60 * SAMPLE_RATE / CHUNK)
    if total_chunks < 1:
        parser.error(f"--minutes {args.minutes:g}: less than one 320 ms chunk")
    minute_samples = 60 * SAMPLE_RATE  # minute m is sampled after the first chunk that ends at or past it
    print(f"model: {model_name}; head {head.describe()}; {args.minutes:g} min in {total_chunks} chunks of 320 ms; "
          f"RSS before streaming {rss_mib(process):.1f} MiB", flush=True)  # fmt: skip
    if args.tracemalloc:
        tracemalloc.start()
    rss_at: dict[int, float] = {}
    traced_at: dict[int, float] = {}
    peak_after_1min = 0.0
    n_words = 0
    started = time.perf_counter()
    compute = 0.0  # seconds in the model, without producing the audio
    chunks_done = 0
    with torch.inference_mode():
        for k in range(1, total_chunks + 1):
            audio = talk.next(CHUNK)
            tick = time.perf_counter()
            n_words += len(stream.finish(audio) if k == total_chunks else stream.push_audio(audio))
            compute += time.perf_counter() - tick
            chunks_done = k
            rss = rss_mib(process)
            if k * CHUNK >= minute_samples:
                peak_after_1min = max(peak_after_1min, rss)
            minute = k * CHUNK // minute_samples  # whole minutes of audio streamed
            if minute > (k - 1) * CHUNK // minute_samples:
                rss_at[minute] = rss
                if args.tracemalloc:
                    traced_at[minute] = tracemalloc.get_traced_memory()[0] / MIB
                audio_s = k * CHUNK / SAMPLE_RATE
                print(f"minute {minute:2d}: RSS {rss:7.1f} MiB, {stream.n_segments} segments, {n_words} words, "
                      f"{compute / audio_s:.3f} s per audio second"
                      + (f", traced {traced_at[minute]:.2f} MiB" if args.tracemalloc else ""), flush=True)  # fmt: skip
            if args.time_limit and time.perf_counter() - started > args.time_limit:
                print(f"time limit of {args.time_limit:g} s reached after {k * CHUNK / SAMPLE_RATE:.0f} s of audio",
                      flush=True)  # fmt: skip
                break
    audio_s = chunks_done * CHUNK / SAMPLE_RATE
    last = max(rss_at) if rss_at else None
    summary = {
        "model": model_name,
        "head": head.describe(),
        "block_ms": model.config.block_ms,
        "minutes_streamed": round(audio_s / 60, 2),
        "segments": stream.n_segments,
        "words": n_words,
        "threads": torch.get_num_threads(),
        "rss_mib_at_1min": round(rss_at[1], 1) if 1 in rss_at else None,
        "rss_mib_at_10min": round(rss_at[10], 1) if 10 in rss_at else None,  # None: minute 10 not reached
        "last_minute": last,
        "rss_mib_at_last_minute": round(rss_at[last], 1) if last is not None else None,
        "peak_rss_mib_after_1min": round(peak_after_1min, 1) if peak_after_1min else None,
        "peak_over_1min": round(peak_after_1min / rss_at[1], 4) if 1 in rss_at else None,
        "seconds_per_audio_second": round(compute / audio_s, 4),
        "rss_mib_by_minute": {m: round(v, 1) for m, v in rss_at.items()},
    }
    if args.tracemalloc:
        summary["traced_mib_by_minute"] = {m: round(v, 3) for m, v in traced_at.items()}
        summary["traced_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / MIB, 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
