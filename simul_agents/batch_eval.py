"""SimulEval's sentence-level evaluation, several instances at a time: the same log, several times faster on CPU.

    python -m simul_agents.batch_eval --batch 32 --checkpoint CKPT --head entropy --threshold 1.0 \\
        --source source.txt --target target.txt --output OUT [any simuleval option of the agent]

The command line is SimulEval's (``simuleval --agent simul_agents/proactive_agent.py ...``) plus ``--batch``.
SimulEval runs one instance after another, and each step of the agent is one LM forward of one row, which on a
CPU costs what reading the weights costs. Here ``--batch`` worker threads each run SimulEval's own loop
(``instance.send_source`` / ``agent.pushpop`` / ``instance.receive_prediction``, its own instance classes and
delays) with their own agent, and every agent's sessions share one ``LMBatcher``: the forwards of all
workers run as one batch (``streaming_llm/batching.py``).

What is the same as SimulEval: every instance's prediction and delays (the policy sees the same states; the
batched forward equals the single one up to float summation order, so a near-tie can rarely flip a greedy
word), ``instances.log`` (one JSON line per instance, in the order instances finish; the scorers sort by index),
``config.yaml``, and SimulEval's own ``scores`` at the end. What is not: ``elapsed`` (wall-clock time per
word) means nothing when instances share forwards, so it is written empty and computation-aware latency is not
available: ``--computation-aware`` is refused (run ``simuleval`` itself for that, one instance at a time).

``--continue-unfinished`` (SimulEval's flag) resumes a killed run: the instances already in ``instances.log``
are kept and only the others are run. (SimulEval's own resume restarts after the last line's index, which
assumes instances finish in order; here they do not.)
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("simul_agents.batch_eval")
DEFAULT_BATCH = 32  # instances at a time; on 2 CPU cores: 8 was 3.8x SimulEval, 16 4.4x, 32 1.35x faster than 16


def _pop_batch(argv: list[str]) -> tuple[int, list[str]]:
    """Take ``--batch N`` (or ``--batch=N``) out of a SimulEval command line, and ``--agent FILE`` (the agent is
    always ``simul_agents/proactive_agent.py``; a copied simuleval command line may name it)."""
    rest, batch, i = [], DEFAULT_BATCH, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--agent":
            i += 2
            continue
        if arg == "--batch" or arg.startswith("--batch="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            try:
                batch = int(value)
            except ValueError:
                raise SystemExit(f"batch_eval: error: --batch {value!r}: expected a whole number") from None
            continue
        rest.append(arg)
        i += 1
    if batch < 1:
        raise SystemExit(f"batch_eval: error: --batch {batch}: at least 1 instance at a time")
    return batch, rest


def _pop_flag(argv: list[str], flag: str) -> tuple[bool, list[str]]:
    """Take a boolean ``flag`` out of a command line."""
    return flag in argv, [arg for arg in argv if arg != flag]


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` (the last one given), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _lines_by_index(path: Path) -> dict[int, str]:
    """index -> first line of each complete record in a killed run's ``instances.log`` or ``failed.jsonl``
    (``--skip-failed``), so that a resume keeps them (a line cut by the kill is dropped)."""
    done: dict[int, str] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            index = json.loads(line)["index"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if isinstance(index, int):
            done.setdefault(index, line)
    return done


def run(argv: Sequence[str]) -> dict:
    """Evaluate with SimulEval's command line ``argv`` (plus ``--batch N``) in this process -> batching counts."""
    from simuleval.evaluator import build_evaluator
    from simuleval.utils.agent import EVALUATION_SYSTEM_LIST, build_system_args

    from simul_agents.proactive_agent import ProactiveAgent
    from streaming_llm.batching import LMBatcher

    batch, rest = _pop_batch([str(a) for a in argv])
    resume, rest = _pop_flag(rest, "--continue-unfinished")
    output = _option(rest, "--output")
    finished_before = _lines_by_index(Path(output) / "instances.log") if resume and output else {}
    failed_before = _lines_by_index(Path(output) / "failed.jsonl") if resume and output else {}
    quiet, rest = _pop_flag(rest, "--no-progress-bar")
    saved_argv, saved_systems = sys.argv, list(EVALUATION_SYSTEM_LIST)
    # SimulEval reads its options from sys.argv (as simul_agents.evaluate_inprocess); its own progress bar would
    # stand at 0% (this loop is not its iterator): it is off, and ours counts the instances
    sys.argv = ["simuleval", *rest, "--no-progress-bar"]
    EVALUATION_SYSTEM_LIST[:] = [ProactiveAgent]
    try:
        system, args = build_system_args({}, None)
        if getattr(args, "computation_aware", False):
            raise SystemExit(
                "batch_eval: error: --computation-aware needs one instance at a time (elapsed time is shared "
                "here); run simuleval --agent simul_agents/proactive_agent.py for computation-aware latency"
            )
        evaluator = build_evaluator(args)
    finally:
        sys.argv = saved_argv
        EVALUATION_SYSTEM_LIST[:] = saved_systems

    log_path = evaluator.output / "instances.log" if evaluator.output else None
    kept = {i: line for i, line in finished_before.items() if i in evaluator.instances}
    if log_path is not None and kept:  # SimulEval emptied the log: the finished instances go back first
        log_path.write_text("".join(kept[i] + "\n" for i in sorted(kept)), encoding="utf-8")
        # the agent (made without --continue-unfinished) deleted failed.jsonl: the kept instances' failures go back
        failures = [failed_before[i] for i in sorted(kept) if i in failed_before]
        if failures:
            (evaluator.output / "failed.jsonl").write_text("".join(f + "\n" for f in failures), encoding="utf-8")
        logger.info("resuming: %d of %d instances were finished before", len(kept), len(evaluator.instances))
    todo = sorted((i, ins) for i, ins in evaluator.instances.items() if i not in kept)
    batcher = LMBatcher(system.model.llm)
    agents = [system] + [type(system)(args, model=system.model, head=system.head, sources=system.sources,
                                      first=system.index)
                         for _ in range(min(batch, max(1, len(todo))) - 1)]  # fmt: skip
    for agent in agents:
        agent.lm_call = batcher
    pending = iter(todo)
    lock = threading.Lock()
    errors: list[BaseException] = []
    progress = tqdm(total=len(evaluator.instances), initial=len(kept), disable=quiet,
                    desc="instances", unit="inst")  # fmt: skip

    def next_instance():
        with lock:
            if errors:
                return None
            return next(pending, (None, None))[1]

    def finished(summary: dict) -> None:
        with lock:
            if log_path is not None:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(summary) + "\n")
            progress.update()

    def work(agent) -> None:
        with batcher.member():
            try:
                while (instance := next_instance()) is not None:
                    agent.index = instance.index
                    agent.reset()
                    while not evaluator.is_finished(instance):
                        segment = instance.send_source(evaluator.source_segment_size)
                        instance.receive_prediction(agent.pushpop(segment))
                        if instance.finish_prediction:
                            agent.reset()
                    summary = instance.summarize()
                    summary["elapsed"] = []  # shared forwards: no per-instance computation time
                    finished(summary)
            except BaseException as e:  # stop the others at their next instance; re-raised below
                with lock:
                    errors.append(e)

    threads = [threading.Thread(target=work, args=(agent,), name=f"batch-eval-{i}") for i, agent in enumerate(agents)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    progress.close()
    if errors:
        raise errors[0]
    logger.info(
        "%d instances, %d batched LM forwards for %d requests (%.1f per forward), %.1f s in forwards",
        len(evaluator.instances), batcher.n_forwards, batcher.n_requests,
        batcher.n_requests / max(1, batcher.n_forwards), batcher.seconds,
    )  # fmt: skip
    if evaluator.output:
        evaluator.build_instances_from_log()
    if not args.no_scoring:
        evaluator.dump_results()
        evaluator.dump_metrics()
    return {"forwards": batcher.n_forwards, "requests": batcher.n_requests, "forward_seconds": batcher.seconds}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(f"--batch N: instances at a time (default {DEFAULT_BATCH}). The agent's and SimulEval's options:\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
