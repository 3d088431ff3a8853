"""SimulEval one instance at a time against ``simul_agents.batch_eval`` (several at a time), same run.

    python benchmarks/batch_eval.py --checkpoint results/text/model \\
        --source runs/bench/text/simuleval-data/source.txt \\
        --target runs/bench/text/simuleval-data/target.txt --n 24 --batch 8 --head entropy --threshold 1.0

Both evaluate the first ``--n`` instances with one torch thread (the sweep runs one process per core). Prints
seconds per instance for each, the speed-up, and how many instances got the same prediction and delays (the
batched forward differs only in float summation order, so a near-tie may rarely flip a greedy word). The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simul_agents import evaluate_inprocess  # noqa: E402
from simul_agents.batch_eval import run as batch_eval  # noqa: E402
from simul_agents.proactive_agent import ProactiveAgent  # noqa: E402


def instances(output: Path) -> list[dict]:
    lines = (output / "instances.log").read_text(encoding="utf-8").splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda ins: ins["index"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--n", type=int, default=24, help="instances (the first n)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--segment", type=int, default=0, help="--source-segment-size (speech: ms)")
    parser.add_argument("--threads", type=int, default=1)
    args, agent_args = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    common = ["--checkpoint", args.checkpoint, "--source", args.source, "--target", args.target]
    common += ["--end-index", str(args.n), "--no-progress-bar", "--threads", str(args.threads), *agent_args]
    if args.segment:
        common += ["--source-segment-size", str(args.segment)]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "simuleval", Path(tmp) / "batched"
        start = time.perf_counter()
        evaluate_inprocess(ProactiveAgent, [*common, "--output", one])
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        counts = batch_eval(["--batch", str(args.batch), *common, "--output", many])
        batched = time.perf_counter() - start
        a, b = instances(one), instances(many)
    same = sum((x["prediction"], x["delays"]) == (y["prediction"], y["delays"]) for x, y in zip(a, b, strict=True))
    result = {
        "instances": len(a),
        "batch": args.batch,
        "threads": args.threads,
        "simuleval_s_per_instance": round(sequential / len(a), 3),
        "batched_s_per_instance": round(batched / len(b), 3),
        "speedup": round(sequential / batched, 2),
        "same_output": same,
        "requests_per_forward": round(counts["requests"] / max(1, counts["forwards"]), 2),
        "share_in_forwards": round(counts["forward_seconds"] / batched, 3),
    }
    print(f"SimulEval, one at a time: {sequential:.1f} s ({result['simuleval_s_per_instance']} s/instance)")
    print(f"batch_eval --batch {args.batch}: {batched:.1f} s ({result['batched_s_per_instance']} s/instance)")
    print(f"speed-up {result['speedup']}x; same prediction and delays: {same}/{len(a)}")
    print(
        f"{result['requests_per_forward']} session forwards per batched forward; "
        f"{100 * result['share_in_forwards']:.0f}% of the batched time in LM forwards (the rest: Python, one GIL)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
