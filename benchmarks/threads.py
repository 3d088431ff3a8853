"""One process on every core, or one process per core? Training throughput under each thread layout.

A stand-in for a training step of the offline default: forward and backward of four decoder-sized layers
(SmolLM2-135M's width 576, 9 heads, MLP 1536) on a batch of 16 sequences of 40 tokens, fp32, AdamW. Each layout
runs the same number of steps in fresh processes (OpenMP settings must be set before torch starts):

- ``1 x N``: one process with N threads (torch's default on an N-core machine);
- ``1 x N passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep instead of spinning);
- ``1 x 1``: one process, one thread;
- ``N x 1``: N processes at once, one thread each (as two bench stages side by side).

Prints steps per second for each layout (for ``N x 1``: all processes together) and, last, one JSON object.
On a healthy N-core machine ``1 x N`` is close to ``N x 1``; where ``N x 1`` is well ahead, run long jobs
(training, sweeps) as one thread per process. Run: ``python benchmarks/threads.py [--steps 30]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WIDTH, HEADS, MLP, LAYERS = 576, 9, 1536, 4  # SmolLM2-135M's layer shape
BATCH, TOKENS = 16, 40  # a text training batch of the offline default


def worker(steps: int) -> float:
    """Run ``steps`` training steps in this process -> seconds taken (after two warm-up steps)."""
    import torch

    torch.manual_seed(0)
    layer = dict(d_model=WIDTH, nhead=HEADS, dim_feedforward=MLP, batch_first=True, norm_first=True, dropout=0.0)
    model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(**layer), LAYERS, enable_nested_tensor=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(BATCH, TOKENS, WIDTH)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(TOKENS)

    def step() -> None:
        optimizer.zero_grad()
        model(x, mask=causal, is_causal=True).pow(2).mean().backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def run_layout(processes: int, threads: int, steps: int, passive: bool = False) -> float:
    """Steps per second of ``processes`` workers started together, ``threads`` OpenMP threads each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    command = [sys.executable, __file__, "--worker", "--steps", str(steps)]
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    seconds = []
    for w in workers:
        out, _ = w.communicate()
        if w.returncode != 0:
            raise SystemExit(f"a worker ({threads} thread(s)) failed with exit code {w.returncode}")
        seconds.append(float(out.strip().splitlines()[-1]))
    return sum(steps / s for s in seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per process (default 30)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="N (default: this machine's cores)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.cores < 1:
        parser.error("--steps and --cores must be at least 1")
    if args.worker:
        print(worker(args.steps))
        return 0
    n = args.cores
    layouts = {
        f"1 x {n}": (1, n, False),
        f"1 x {n} passive": (1, n, True),
        "1 x 1": (1, 1, False),
        f"{n} x 1": (n, 1, False),
    }
    results = {}
    for name, (processes, threads, passive) in layouts.items():
        results[name] = round(run_layout(processes, threads, args.steps, passive), 3)
        print(f"{name:16s} {results[name]:7.3f} steps/s", flush=True)
    print(json.dumps({"steps": args.steps, "cores": n, "steps_per_second": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
