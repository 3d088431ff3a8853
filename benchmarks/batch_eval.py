"""SimulEval one instance at a time against ``simul_agents.batch_eval`` (several at a time), same run.

    python benchmarks/batch_eval.py --checkpoint results/text/model \\
        --source runs/bench/text/simuleval-data/source.txt \\
        --target runs/bench/text/simuleval-data/target.txt --n 32 --batch 16 32 --head entropy --threshold 1.0

Both evaluate the first ``--n`` instances with one torch thread (the sweep runs one process per core), after an
untimed one-instance run that loads the model (model loading is not timed). Prints
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
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32], help="batch sizes to time")
    parser.add_argument("--segment", type=int, default=0, help="--source-segment-size (speech: ms)")
    parser.add_argument("--threads", type=int, default=1)
    args, agent_args = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    common = ["--checkpoint", args.checkpoint, "--source", args.source, "--target", args.target]
    common += ["--no-progress-bar", "--threads", str(args.threads), *agent_args]
    if args.segment:
        common += ["--source-segment-size", str(args.segment)]
    # untimed, one instance: the agent loads (with --compile: compiles) its model once per process, which the
    # first timed run would otherwise pay alone, and the first forwards warm up
    warm_up = [*common, "--end-index", "1"]
    common += ["--end-index", str(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        evaluate_inprocess(ProactiveAgent, [*warm_up, "--output", Path(tmp) / "warm-up"])
        one = Path(tmp) / "simuleval"
        start = time.perf_counter()
        evaluate_inprocess(ProactiveAgent, [*common, "--output", one])
        sequential = time.perf_counter() - start
        a = instances(one)
        print(f"SimulEval, one at a time: {sequential:.1f} s ({sequential / len(a):.3f} s/instance)")
        result = {"instances": len(a), "threads": args.threads}
        result["simuleval_s_per_instance"] = round(sequential / len(a), 3)
        for batch in args.batch:
            many = Path(tmp) / f"batched-{batch}"
            start = time.perf_counter()
            counts = batch_eval(["--batch", str(batch), *common, "--output", many])
            batched = time.perf_counter() - start
            b = instances(many)
            same = sum(
                (x["prediction"], x["delays"]) == (y["prediction"], y["delays"]) for x, y in zip(a, b, strict=True)
            )
            row = {
                "s_per_instance": round(batched / len(b), 3),
                "speedup": round(sequential / batched, 2),
                "same_output": same,
                "requests_per_forward": round(counts["requests"] / max(1, counts["forwards"]), 2),
                "share_in_forwards": round(counts["forward_seconds"] / batched, 3),
            }
            result[f"batch_{batch}"] = row
            print(
                f"batch_eval --batch {batch}: {batched:.1f} s ({row['s_per_instance']} s/instance), "
                f"speed-up {row['speedup']}x, same prediction and delays {same}/{len(a)}, "
                f"{row['requests_per_forward']} session forwards per batched forward, "
                f"{100 * row['share_in_forwards']:.0f}% of the time in LM forwards"
            )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
