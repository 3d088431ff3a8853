"""What the incremental engine saves: stream 20 s of audio in 320 ms chunks and write 20 words, three ways.

    (a) incremental  StreamingSession: each encoder block once, KV caches reused
    (b) recompute    at every step (chunk or word) re-encode all audio so far and re-run the LM over all of it
    (c) offline      one pass over the whole input (encoder, prefill) and the same 20 words

    python benchmarks/streaming_cost.py            # tiny random model
    python benchmarks/streaming_cost.py --real     # Whisper tiny.en + SmolLM2-135M (needs `make assets`)
    python benchmarks/streaming_cost.py --real --int8   # the same with the LLM in int8 (streaming_llm/quantize.py)
    python benchmarks/streaming_cost.py --real --fp16   # the same with the LLM in float16
    python benchmarks/streaming_cost.py --real --compile   # the LLM's steps compiled (streaming_llm/lean.py)

The source is fed lazily (``StreamingSession`` docstring): the steady-lag schedule below asks for the model's
output only when it writes, as wait-k does. Times are wall-clock (the best of ``--repeats``); ``*_cpu_s`` are
this process's CPU seconds over the same runs, which a busy machine inflates less.

The last line is one JSON object with ``incremental_over_offline``, ``recompute_over_incremental`` and
``ms_per_320ms_chunk`` (the incremental engine's wall time per 320 ms of audio, words included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speech_frontend.audio import SAMPLE_RATE  # noqa: E402
from streaming_llm.engine import StreamingSession  # noqa: E402

CHUNK_MS = 320
WORDS = (
    "Ich möchte heute Abend mit meinen Freunden in das neue Restaurant am Marktplatz gehen, "
    "weil das Essen dort sehr gut sein soll und die Preise fair sind."
).split()[:20]


def load_model(real: bool, block_ms: int, precision: str = "fp32"):
    if not real:
        from streaming_llm.tiny import tiny_model

        model = tiny_model("speech", block_ms=block_ms)
    else:
        from training.config import load_config
        from training.train import build_training_model

        cfg = load_config(
            None, {"llm": "asset:smollm2-135m-instruct", "whisper": "asset:whisper-tiny.en", "block_ms": block_ms}
        )
        model = build_training_model(cfg).eval()
    from streaming_llm.quantize import set_precision

    return set_precision(model.eval(), precision)


def word_tokens(model) -> list[list[int]]:
    return [model._ids(" " + w) for w in WORDS]


def schedule(n_chunks: int, n_words: int) -> list[int]:
    """Words written after each chunk: spread evenly, as a policy with a steady lag would."""
    return [round(n_words * (k + 1) / n_chunks) for k in range(n_chunks)]


def incremental(model, audio: np.ndarray, words: list[list[int]]) -> float:
    chunk = SAMPLE_RATE * CHUNK_MS // 1000
    n_chunks = -(-len(audio) // chunk)
    plan = schedule(n_chunks, len(words))
    start = time.perf_counter()
    session = StreamingSession(model)
    written = 0
    for k in range(n_chunks):
        session.push_audio(audio[k * chunk : (k + 1) * chunk])
        if k == n_chunks - 1:
            session.finish_source()
        while written < plan[k]:
            session.signals()
            session.force_target(words[written])
            written += 1
    return time.perf_counter() - start


def recompute(model, audio: np.ndarray, words: list[list[int]]) -> float:
    """Everything from scratch at every step: the encoder over all audio so far, the LM over all of it."""
    chunk = SAMPLE_RATE * CHUNK_MS // 1000
    n_chunks = -(-len(audio) // chunk)
    plan = schedule(n_chunks, len(words))
    start = time.perf_counter()
    written: list[int] = []
    n_words = 0
    with torch.inference_mode():
        for k in range(n_chunks):
            steps = max(1, plan[k] - n_words)  # one step per chunk, or one per word written after it
            for _ in range(steps):
                units = model.speech_units(model.encode_speech(audio[: (k + 1) * chunk]))
                target = written + [model.eos_id]
                embeds, positions, layouts = model.assemble([units], [target])
                hidden = model.hidden(embeds, positions, layouts, [layouts[0].full_phi()])
                model.lm_logits(hidden[:, -1])  # the next token's logits, as (a) and (c) compute them
                if n_words < plan[k]:
                    written += words[n_words]
                    n_words += 1
    return time.perf_counter() - start


def offline(model, audio: np.ndarray, words: list[list[int]]) -> float:
    start = time.perf_counter()
    session = StreamingSession(model)
    session.push_audio(audio)
    session.finish_source()
    for w in words:
        session.signals()
        session.force_target(w)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="store_true", help="Whisper tiny.en + SmolLM2-135M from `make assets`")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--block-ms", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--int8", action="store_true", help="quantize the LLM to int8 (inference only)")
    parser.add_argument("--fp16", action="store_true", help="the LLM in float16 (inference only)")
    parser.add_argument("--compile", action="store_true", help="compile the LLM's steps first (torch.compile)")
    args = parser.parse_args()
    from streaming_llm.quantize import precision_from_flags

    precision = precision_from_flags(args.int8, args.fp16)
    model = load_model(args.real, args.block_ms, precision)
    if args.compile:
        from streaming_llm.lean import compile_steps

        print(f"compiled the LLM's steps in {compile_steps(model.llm):.0f} s", flush=True)
    audio = (0.05 * np.random.default_rng(0).standard_normal(int(SAMPLE_RATE * args.seconds))).astype(np.float32)
    words = word_tokens(model)
    offline(model, audio[: SAMPLE_RATE * 2], words[:2])  # warm-up
    results, cpu = {}, {}
    for name, fn in (("incremental", incremental), ("recompute", recompute), ("offline", offline)):
        started = time.process_time()
        results[name] = min(fn(model, audio, words) for _ in range(args.repeats))
        cpu[name] = (time.process_time() - started) / args.repeats
        print(f"{name:12s} {results[name]:8.3f} s wall  {cpu[name]:8.3f} s CPU", flush=True)
    n_chunks = -(-len(audio) // (SAMPLE_RATE * CHUNK_MS // 1000))
    summary = {
        "model": ("tiny.en+SmolLM2-135M" if args.real else "tiny") + ("" if precision == "fp32" else f" {precision}")
        + (" compiled" if args.compile else ""),
        "seconds_of_audio": args.seconds,
        "block_ms": args.block_ms,
        "words": len(words),
        "threads": torch.get_num_threads(),
        **{f"{k}_s": round(v, 3) for k, v in results.items()},
        **{f"{k}_cpu_s": round(v, 3) for k, v in cpu.items()},
        "incremental_over_offline": round(results["incremental"] / results["offline"], 3),
        "recompute_over_incremental": round(results["recompute"] / results["incremental"], 2),
        "ms_per_320ms_chunk": round(1000 * results["incremental"] / n_chunks, 1),
        "real_time_factor": round(results["incremental"] / args.seconds, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
