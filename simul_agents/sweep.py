"""Sweep decision heads and their thresholds with SimulEval; one CSV, one Markdown table, one plot.

    python -m simul_agents.sweep eval_configs/offline-text-en-de.yaml [--jobs N] [--shards K] [--batch B]

The YAML (see ``eval_configs/``)::

    task: offline-text-en-de
    checkpoint: results/text/model
    source: data/offline/simuleval/text/source.txt
    target: data/offline/simuleval/text/target.txt
    output: runs/offline-text-en-de
    source_segment_size: 320      # speech only, in ms
    shards: 1                     # split the test set into this many SimulEval processes per run
    batch: 1                      # instances at a time per process (simul_agents.batch_eval); 1: SimulEval itself
    agent_args: {max_len_a: 2, max_len_b: 10}   # passed to every run as --max-len-a 2 ...
    heads:
      entropy: {threshold: [0.5, 1.0, 2.0]}     # a list is swept, a scalar is fixed
      wait-k: {k: [1, 3, 5]}
      probe:                                    # a list of settings: each swept in turn
        - {threshold: [0.6, 0.8]}
        - {threshold: [0.8], min_lag: [1], max_lag: [3]}

Every (head, parameter combination) is one run in ``output/<head>/<param>``, ``<param>`` naming the swept
parameters and any lag bound that is on (``threshold=0.8,min_lag=1,max_lag=3``); the ``offline`` head (READ until
the source ends: the full-source decode) is added unless ``heads`` says ``offline: false``, and drawn as a
horizontal line. Paths are relative to the current directory (run from the repository root).

- ``--jobs 1`` (default) runs SimulEval in this process, one run after another (the checkpoint loads once);
  ``--jobs N`` runs up to N SimulEval subprocesses at once (``simuleval --agent simul_agents/proactive_agent.py``),
  each with ``cpu_count // N`` torch threads and its log in ``<run>/simuleval.log``.
- ``--shards K`` splits each run's instances into K ranges (``--start-index/--end-index``), run as separate
  jobs; their ``instances.log`` files are merged (by index) into the run's before scoring.
- ``--batch B`` (B > 1) runs each job with ``simul_agents.batch_eval``: SimulEval's loop over B instances at
  a time whose LM forwards are batched, the same predictions and delays about 4x faster on a CPU, but no
  ``elapsed``, so the ``*_CA`` columns stay empty (measure computation-aware latency with ``--batch 1``).
- Resumable: a run (or shard) whose ``instances.log`` holds every index of its range is not run again; an
  incomplete batched one (``--batch`` > 1) continues with the instances it has not finished
  (``batch_eval --continue-unfinished``), an incomplete SimulEval one is run again from its start.
- A run keeps what made it in ``<run>/settings.json`` (the checkpoint's and the source and target files' SHA-256,
  ``source_segment_size``, the head's parameters, ``agent_args``; not ``--batch``, ``--shards`` or ``threads``,
  which give the same predictions and delays). A run with results made under other settings stops the sweep
  before any run, naming what changed; ``--redo`` deletes such runs and runs them again. A run from before
  these records (none in its folder) counts as made under the current settings, which are recorded then.
- Scores come from ``simul_agents.score`` (recomputed from ``instances.log``), written to ``sweep.csv`` as
  each run finishes, and to ``sweep.md`` and ``sweep.png`` (BLEU and chrF against LAAL) in ``output`` at the end.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm

from speech_frontend.assets import file_sha256

from .score import ScoreError, score_output

AGENT_FILE = Path(__file__).with_name("proactive_agent.py")
CHRF_MODULE = Path(__file__).with_name("chrf_scorer")  # --user-dir takes the module path without .py
MIN_SPAN = {"BLEU": 2.0, "chrF": 4.0}  # the plot's y axes cover at least this many points
LATENCY_METRICS = ("AL", "LAAL", "DAL", "AP", "ATD", "StartOffset", "EndOffset")
COLUMNS = (
    "task", "head", "param", "BLEU", "chrF", "len_ratio", "AL", "LAAL", "DAL", "AP", "ATD", "StartOffset", "EndOffset",
    "AL_CA", "LAAL_CA", "DAL_CA", "AP_CA", "ATD_CA", "RCO", "AIL", "n_instances", "n_failed", "n_empty",
    "mean_source_length", "latency_unit", "output",
)  # fmt: skip
SETTINGS = "settings.json"  # in each run's folder: what made it (``run_settings``)
CHECKPOINT_FILES = ("checkpoint.json", "config.json", "model.safetensors")  # what a checkpoint's identity hashes
NOT_DEFINING = {"threads"}  # agent_args that change the speed, not the outputs
SWEEP_SETS = {"checkpoint", "head", "head_param", "threshold", "k", "source", "target", "output", "source_segment_size",
              "start_index", "end_index", "quality_metrics", "latency_metrics", "user_dir", "continue_unfinished",
              "score_only", "agent", "agent_class", "batch"}  # agent_args that would override the sweep's own
LOG_NOISE = ("Couldn't find ffmpeg",)  # lines of a subprocess's log left out of a failure's tail (pydub's warning)
KNOWN_KEYS = {"task", "checkpoint", "source", "target", "output", "source_segment_size", "shards", "batch",
              "agent_args", "heads"}  # fmt: skip


class SweepError(ValueError):
    """A sweep configuration that cannot run; the message says what to fix."""


@dataclass(frozen=True)
class SweepConfig:
    task: str
    checkpoint: str
    source: str
    target: str
    output: Path
    heads: dict
    source_segment_size: int | None = None
    shards: int = 1
    batch: int = 1  # instances at a time (simul_agents.batch_eval) when > 1
    agent_args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    head: str
    params: tuple[tuple[str, object], ...]  # every parameter given to the head
    label: str  # the swept ones, 'k=3' ('-' if none)
    output: Path


@dataclass(frozen=True)
class Job:
    run: Run
    start: int
    end: int
    output: Path  # the run's output, or one shard's


def load_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SweepError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise SweepError(f"{path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a mapping with task, checkpoint, source, target, output, heads")
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown keys {unknown}; known: {sorted(KNOWN_KEYS)}")
    missing = [k for k in ("task", "checkpoint", "source", "target", "output", "heads") if not data.get(k)]
    if missing:
        raise SweepError(f"{path}: missing {', '.join(missing)}")
    for key in ("heads", "agent_args"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise SweepError(f"{path}: {key} must be a mapping (name: settings), not {type(data[key]).__name__}")
    heads = dict(data["heads"])
    if "offline" not in heads:
        heads["offline"] = {}
    heads = {name: (params or {}) for name, params in heads.items() if params is not False}
    for name, params in heads.items():
        blocks = setting_blocks(params)
        if not blocks or not all(isinstance(block, dict) for block in blocks):
            raise SweepError(f"{path}: heads.{name} must map parameter names to a value or a list of values "
                             "(or be a list of such mappings, swept one after another)")  # fmt: skip
    return SweepConfig(
        task=str(data["task"]),
        checkpoint=str(data["checkpoint"]),
        source=str(data["source"]),
        target=str(data["target"]),
        output=Path(data["output"]),
        heads=heads,
        source_segment_size=_count(path, data, "source_segment_size", None),
        shards=_count(path, data, "shards", 1),
        batch=_count(path, data, "batch", 1),
        agent_args=dict(data.get("agent_args") or {}),
    )


def _count(path: Path, data: dict, key: str, default: int | None) -> int | None:
    """A whole number of at least 1 from the YAML (absent or empty: ``default``)."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SweepError(f"{path}: {key}: {value!r}; expected a whole number of at least 1")
    return value


def setting_blocks(params: dict | list) -> list:
    """A head's settings in a sweep: one mapping, or a list of mappings swept one after another."""
    return list(params) if isinstance(params, list) else [params]


def expand_runs(config: SweepConfig) -> list[Run]:
    """One run per head and combination of its list-valued parameters (per block of settings)."""
    from streaming_llm.heads import LAG_BOUNDS, head_name, make_head

    runs: list[Run] = []
    for name, params in config.heads.items():
        try:
            canonical = head_name(name)
        except ValueError as e:
            raise SweepError(str(e)) from None
        for block in setting_blocks(params):
            swept = {k: v for k, v in block.items() if isinstance(v, list)}
            for key, values in swept.items():
                if not values:
                    raise SweepError(f"heads.{name}.{key}: an empty list; give at least one value, or leave {key} out")
            fixed = {k: v for k, v in block.items() if not isinstance(v, list)}
            for values in itertools.product(*swept.values()):
                chosen = dict(zip(swept, values, strict=True))
                every = {**fixed, **chosen}
                spaced = next((k for k, v in every.items() if len(str(v).split()) > 1), None)
                if spaced is not None:  # the agent's --head-param splits on whitespace
                    raise SweepError(f"heads.{name}.{spaced}: {every[spaced]!r} holds a space; write it without one")
                try:
                    head = make_head(canonical, **every)  # fail here, not in the 40th subprocess
                except ValueError as e:
                    raise SweepError(f"heads.{name}: {e}") from None
                # a lag bound that is on is named even when fixed: a bounded run is another policy's point
                named = {k: every[k] for k in block if k in chosen or (k in LAG_BOUNDS and getattr(head, k) != 0)}
                label = ",".join(f"{k}={v}" for k, v in named.items()) or "-"
                output = run_output(config.output, canonical, label)
                if any(run.output == output for run in runs):
                    raise SweepError(f"heads.{name}: two settings give the same run {canonical} {label}; "
                                     "list each setting once")  # fmt: skip
                runs.append(Run(canonical, tuple(every.items()), label, output))
    return runs


def label_settings(label: str) -> dict[str, str]:
    """A run's label as its settings: 'threshold=3.0,min_lag=2' -> {'threshold': '3.0', 'min_lag': '2'}."""
    return dict(part.split("=", 1) for part in str(label).split(",") if "=" in part)


def bounded_curve(head: str) -> str:
    """The curve of a head's runs between lag bounds: 'entropy, lag-bounded'."""
    return f"{head}, lag-bounded"


def curve_name(head: str, label: str) -> str:
    """The curve a run belongs to: its head, or ``bounded_curve(head)`` when a lag bound is on (another policy:
    Zheng et al. 2020's between two wait-k schedules)."""
    from streaming_llm.heads import LAG_BOUNDS  # imported here: streaming_llm.heads loads torch

    settings = label_settings(label)
    return bounded_curve(head) if any(settings.get(k, "0") != "0" for k in LAG_BOUNDS) else head


def short_label(label: str) -> str:
    """A point's label on the plot: 'threshold=3.0,min_lag=2,max_lag=4' -> '3.0 [2,4]', 'k=3' -> 'k=3'."""
    from streaming_llm.heads import LAG_BOUNDS

    settings = label_settings(label)
    bounds = [settings.pop(k, "0") for k in LAG_BOUNDS]
    text = ",".join(v if k == "threshold" else f"{k}={v}" for k, v in settings.items())
    if any(b != "0" for b in bounds):
        text += f" [{bounds[0]},{bounds[1] if bounds[1] != '0' else '-'}]"
    return text


def run_output(output: Path, head: str, label: str) -> Path:
    """Where a sweep writes the run of ``head`` with parameters ``label`` ("threshold=0.5", "-")."""
    return output / head / label.replace("/", "_")


def count_instances(source: str) -> int:
    n = count_lines("source", source)
    if n == 0:
        raise SweepError(f"source {source}: empty; a sweep needs at least one instance (one line per source)")
    return n


def count_lines(kind: str, name: str) -> int:
    """The lines of the ``kind`` ("source", "target") file ``name``, read as SimulEval reads them."""
    path = Path(name)
    if not path.is_file():
        raise SweepError(f"{kind} {path}: no such file (paths are relative to the current directory; "
                         "`python -m training.corpus simuleval MANIFEST --out DIR [--text]` writes DIR/source.txt "
                         "and DIR/target.txt)")  # fmt: skip
    try:
        with open(path, encoding="utf-8") as f:
            return len(f.readlines())
    except UnicodeDecodeError as e:
        raise SweepError(f"{kind} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_target(target: str, n: int) -> None:
    """One reference per source line, or SimulEval stops each run on an assertion."""
    lines = count_lines("target", target)
    if lines != n:
        raise SweepError(f"target {target}: {lines} lines, the source has {n}; give one reference per source line")


def checkpoint_identity(checkpoint: str) -> str:
    """SHA-256 of the checkpoint's metadata, config and weights; refuses a folder that is not a checkpoint."""
    from streaming_llm.checkpoint import CheckpointError, read_meta

    path = Path(checkpoint)
    if not path.is_dir():
        raise SweepError(f"checkpoint {path}: no such folder (paths are relative to the current directory); "
                         "give a folder written by training.train")  # fmt: skip
    try:
        read_meta(path)
    except CheckpointError as e:
        raise SweepError(f"checkpoint {e}") from None
    if not (path / CHECKPOINT_FILES[-1]).is_file():
        raise SweepError(f"checkpoint {path}: no {CHECKPOINT_FILES[-1]}; give a folder written by training.train")
    digest = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        if (path / name).is_file():
            digest.update(f"{name}:{file_sha256(path / name)};".encode())
    return digest.hexdigest()


def option_name(key: object) -> str:
    """An ``agent_args`` key as argparse names its option: ``eval-latency-unit`` and ``eval_latency_unit`` alike."""
    return str(key).replace("-", "_")


class _CheckingParser(argparse.ArgumentParser):
    """SimulEval's and the agent's options, whose errors are raised (not printed with the usage, then exit)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SweepError(f"agent_args: {message}")


def check_agent_args(config: SweepConfig, run: Run, n: int) -> None:
    """Parse the command line ``run`` would get with SimulEval's and the agent's parser, running nothing: an
    option neither knows, or a value it refuses, is named here, not in a usage dump per run. An option the sweep
    sets itself (it would silently override the run's head, range or files), or one that changes what SimulEval
    measures in a way ``simul_agents.score`` does not follow, is refused."""
    for key, value in config.agent_args.items():
        name = option_name(key)
        if name in SWEEP_SETS:
            raise SweepError(f"agent_args.{key}: the sweep sets this itself for every run (heads, shards, files); "
                             "remove it from agent_args")  # fmt: skip
        if (name == "eval_latency_unit" and str(value) != "word") or (name == "no_use_ref_len" and value):
            raise SweepError(f"agent_args.{key}: {value}: the sweep's latencies (simul_agents.score) count words "
                             "against the reference length, as SimulEval's defaults do; remove it")  # fmt: skip
    from simuleval import options

    from simul_agents.proactive_agent import ProactiveAgent

    argv = simuleval_args(config, Job(run, 0, n, run.output), n)
    saved = sys.argv
    sys.argv = ["simuleval", *argv]  # SimulEval's parsers read --user-dir from sys.argv
    try:
        parser = options.general_parser(None, _CheckingParser(add_help=False, conflict_handler="resolve"))
        options.add_evaluator_args(parser)
        options.add_scorer_args(parser, argv)
        options.add_dataloader_args(parser, argv)
        ProactiveAgent.add_args(parser)
        _, unknown = parser.parse_known_args(argv)
    finally:
        sys.argv = saved
    flags = [flag for flag in unknown if flag.startswith("--")]
    if flags:
        key = next((k for k in config.agent_args if "--" + str(k).replace("_", "-") == flags[0]), flags[0])
        known = [f for f in parser._option_string_actions if f.startswith("--")]
        close = difflib.get_close_matches(flags[0], known, n=1)
        hint = f"did you mean {close[0][2:].replace('-', '_')}?" if close else "remove it"
        raise SweepError(f"agent_args.{key}: no such option of the agent or SimulEval; {hint} (the options: "
                         "simuleval --agent simul_agents/proactive_agent.py --help)")  # fmt: skip


def cli_values(values: dict) -> dict:
    """Settings as a run's command line gets them: True stays a flag, False and None are left out, the rest text."""
    return {str(k): v if v is True else str(v) for k, v in values.items() if v is not False and v is not None}


def sweep_settings(config: SweepConfig) -> dict:
    """What makes every run of ``config`` (its head's parameters are added per run: ``run_settings``)."""
    return {
        "checkpoint": config.checkpoint,
        "checkpoint_sha256": checkpoint_identity(config.checkpoint),
        "source": config.source,
        "source_sha256": file_sha256(Path(config.source)),
        "target": config.target,
        "target_sha256": file_sha256(Path(config.target)),
        "source_segment_size": config.source_segment_size,
        "agent_args": {k: v for k, v in cli_values(config.agent_args).items() if k not in NOT_DEFINING},
    }


def run_settings(shared: dict, run: Run) -> dict:
    return {**shared, "head": run.head, "head_params": cli_values(dict(run.params))}


def settings_changes(old: dict, new: dict) -> list[str]:
    """What differs between two runs' settings, as 'name old -> new' (paths alone do not count: a file is its
    content)."""
    changes = []
    for name in ("checkpoint", "source", "target"):
        if old.get(f"{name}_sha256") != new[f"{name}_sha256"]:
            was = old.get(name)
            changes.append(f"{name} {was} -> {new[name]}" if was != new[name] else f"{name} {was}: its content changed")
    if old.get("source_segment_size") != new["source_segment_size"]:
        changes.append(f"source_segment_size {old.get('source_segment_size')} -> {new['source_segment_size']}")
    for group in ("agent_args", "head_params"):
        before, after = old.get(group) or {}, new[group]
        for key in dict.fromkeys([*before, *after]):
            if before.get(key) != after.get(key):
                changes.append(f"{group}.{key} {before.get(key, '(unset)')} -> {after.get(key, '(unset)')}")
    return changes


def read_settings(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SETTINGS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def has_results(folder: Path) -> bool:
    """Whether a run's folder holds an instance that a resumed run would keep (its own log or a shard's)."""
    logs = [folder / "instances.log", *(folder / "shards").glob("*/instances.log")]
    return any(log.is_file() and log.stat().st_size > 0 for log in logs)


def changed_runs(settings: dict[Run, dict]) -> dict[Run, list[str]]:
    """The runs with results made under other settings than theirs now, and what changed."""
    changed = {}
    for run, current in settings.items():
        old = read_settings(run.output)
        if old is not None and has_results(run.output):
            changes = settings_changes(old, current)
            if changes:
                changed[run] = changes
    return changed


def refuse_changed(changed: dict[Run, list[str]]) -> None:
    run, changes = next(iter(changed.items()))
    others = f" and {len(changed) - 1} other run(s)" if len(changed) > 1 else ""
    raise SweepError(f"{run.head} {run.label} ({run.output}){others} were made with other settings: "
                     f"{'; '.join(changes)}; run them again with --redo (deletes their results), give another "
                     "output folder, or restore the settings")  # fmt: skip


def prepare(config: SweepConfig) -> tuple[list[Run], int, dict[Run, dict]]:
    """Check everything a run needs before any runs -> (the runs, the instances, each run's settings)."""
    runs = expand_runs(config)
    if not runs:
        raise SweepError("heads: every head is off (false); give at least one head to sweep")
    n = count_instances(config.source)
    check_target(config.target, n)
    shared = sweep_settings(config)
    check_agent_args(config, runs[0], n)
    return runs, n, {run: run_settings(shared, run) for run in runs}


def record_settings(settings: dict[Run, dict], redo: bool) -> None:
    """Refuse runs made under other settings (``redo``: delete them), then write every run's settings where the
    folder has none or no results; a run from before these records keeps its results and gets today's."""
    changed = changed_runs(settings)
    if changed and not redo:
        refuse_changed(changed)
    for run in changed:
        shutil.rmtree(run.output)
    for run, current in settings.items():
        if run in changed or read_settings(run.output) is None or not has_results(run.output):
            run.output.mkdir(parents=True, exist_ok=True)
            (run.output / SETTINGS).write_text(json.dumps(current, indent=2) + "\n", encoding="utf-8")


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """[0, n) in ``shards`` contiguous ranges of near-equal size (fewer if n is small)."""
    shards = max(1, min(shards, n))
    bounds = [round(i * n / shards) for i in range(shards + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def is_complete(output: Path, start: int, end: int) -> bool:
    """``output/instances.log`` holds exactly the indices start..end-1."""
    log = output / "instances.log"
    if not log.is_file():
        return False
    try:
        indices = [json.loads(line)["index"] for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    return sorted(indices) == list(range(start, end))


def simuleval_args(config: SweepConfig, job: Job, n_instances: int, threads: int = 0) -> list[str]:
    """The SimulEval command line of one job (without the program and --agent)."""
    args = ["--checkpoint", config.checkpoint, "--head", job.run.head]
    for key, value in job.run.params:
        args += ["--head-param", f"{key}={value}"]
    args += ["--source", config.source, "--target", config.target, "--output", str(job.output)]
    if config.source_segment_size:
        args += ["--source-segment-size", str(config.source_segment_size)]
    if (job.start, job.end) != (0, n_instances):
        args += ["--start-index", str(job.start), "--end-index", str(job.end)]
    args += ["--quality-metrics", "BLEU", "CHRF", "--user-dir", str(CHRF_MODULE)]
    args += ["--latency-metrics", *LATENCY_METRICS, "--no-progress-bar"]
    if threads:
        args += ["--threads", str(threads)]
    for key, value in config.agent_args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def run_job_inprocess(config: SweepConfig, job: Job, n_instances: int) -> str | None:
    """Run one job in this process -> None, or the error."""
    from simul_agents import evaluate_inprocess
    from simul_agents.batch_eval import run as batch_eval
    from simul_agents.proactive_agent import ProactiveAgent

    try:
        if config.batch > 1:
            batched = ["--batch", str(config.batch), "--continue-unfinished"]  # a killed shard keeps what it did
            batch_eval([*batched, *simuleval_args(config, job, n_instances)])
        else:
            evaluate_inprocess(ProactiveAgent, simuleval_args(config, job, n_instances))
    except SystemExit as e:
        return str(e.code)
    except Exception as e:  # one failed run must not stop the sweep
        return f"{type(e).__name__}: {e}"
    return None


def run_job_subprocess(config: SweepConfig, job: Job, n_instances: int, threads: int) -> str | None:
    """Run one job as a SimulEval subprocess -> None, or the error (the tail of its log)."""
    job.output.mkdir(parents=True, exist_ok=True)
    if config.batch > 1:
        command = [sys.executable, "-m", "simul_agents.batch_eval", "--batch", str(config.batch)]
        command.append("--continue-unfinished")  # a killed shard keeps the instances it finished
    else:
        command = [sys.executable, "-m", "simuleval.cli", "--agent", str(AGENT_FILE)]
    command += simuleval_args(config, job, n_instances, threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = job.output / "simuleval.log"
    with open(log, "w", encoding="utf-8") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        tail = [line.strip() for line in lines if line.strip() and not any(noise in line for noise in LOG_NOISE)]
        return f"exit code {code}: " + " | ".join(tail[-3:])
    return None


def merge_shards(run: Run, jobs: Sequence[Job]) -> None:
    """Concatenate the shards' instances.log (sorted by index) and failed.jsonl into the run's directory."""
    lines = []
    for job in jobs:
        lines += [line for line in (job.output / "instances.log").read_text(encoding="utf-8").splitlines() if line]
    lines.sort(key=lambda line: json.loads(line)["index"])
    run.output.mkdir(parents=True, exist_ok=True)
    (run.output / "instances.log").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    shutil.copyfile(jobs[0].output / "config.yaml", run.output / "config.yaml")
    failed = [job.output / "failed.jsonl" for job in jobs if (job.output / "failed.jsonl").is_file()]
    if failed:
        (run.output / "failed.jsonl").write_text("".join(p.read_text(encoding="utf-8") for p in failed), "utf-8")


def sweep(
    config: SweepConfig, jobs: int = 1, shards: int | None = None, redo: bool = False
) -> tuple[list[dict], list[str]]:
    """Run (or resume) every run; -> (rows for the CSV, error messages of failed runs).

    Everything is checked first (``prepare``), and a run made under other settings stops the sweep
    (``redo``: it is deleted and run again). A run is scored as soon as its last job ends, and ``output/sweep.csv``
    is rewritten then, so a long sweep shows its finished runs while the others go on (and an interrupted one
    keeps them).
    """
    runs, n, settings = prepare(config)
    record_settings(settings, redo)
    ranges = shard_ranges(n, shards or config.shards)
    plan: dict[Run, list[Job]] = {}
    for run in runs:
        if len(ranges) == 1:
            plan[run] = [Job(run, 0, n, run.output)]
        else:
            plan[run] = [Job(run, a, b, run.output / "shards" / f"{a:06d}-{b:06d}") for a, b in ranges]
    todo = [
        job
        for run, run_jobs in plan.items()
        if not is_complete(run.output, 0, n)
        for job in run_jobs
        if not is_complete(job.output, job.start, job.end)
    ]
    errors: dict[Run, str] = {}
    scored: dict[Run, dict] = {}

    def finish(run: Run) -> None:
        """Score ``run`` if every job of it is done (merging shards) and rewrite the CSV."""
        if run in errors or run in scored:
            return
        run_jobs = plan[run]
        if not is_complete(run.output, 0, n):
            if len(run_jobs) == 1 or not all(is_complete(j.output, j.start, j.end) for j in run_jobs):
                return
            merge_shards(run, run_jobs)
        try:
            scores = score_output(run.output, **score_options(config))
        except ScoreError as e:
            errors[run] = str(e)
            return
        scored[run] = {"task": config.task, "head": run.head, "param": run.label, **scores, "output": str(run.output)}
        config.output.mkdir(parents=True, exist_ok=True)
        write_csv([scored[r] for r in plan if r in scored], config.output / "sweep.csv")

    for run in plan:  # finished before: scored now, so the CSV is complete from the start
        if not any(job.run == run for job in todo):
            finish(run)
    if todo:
        progress = tqdm(total=len(todo), desc=f"{config.task}: runs", unit="run")
        if jobs <= 1:
            for job in todo:
                progress.set_postfix_str(f"{job.run.head} {job.run.label}")
                error = run_job_inprocess(config, job, n)
                if error:
                    errors[job.run] = error
                finish(job.run)
                progress.update()
        else:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(run_job_subprocess, config, job, n, threads): job for job in todo}
                for future in as_completed(futures):
                    job = futures[future]
                    error = future.result()
                    if error:
                        errors[job.run] = error
                    finish(job.run)
                    progress.update()
        progress.close()
    for run in plan:  # a job that ended without error but left instances out must not vanish from the table
        if run not in scored and run not in errors:
            errors[run] = f"{run.output / 'instances.log'} does not hold every instance 0..{n - 1}; run it again"
    rows = [scored[run] for run in plan if run in scored]
    messages = [f"{run.head} {run.label}: {error}" for run, error in errors.items()]
    return rows, messages


def score_options(config: SweepConfig) -> dict:
    """The scorer's settings that SimulEval takes from ``agent_args`` (BLEU's tokenizer, chrF's word order)."""
    args = {option_name(k): v for k, v in config.agent_args.items()}
    return {"tokenize": str(args.get("sacrebleu_tokenizer") or "13a"),
            "chrf_word_order": int(args.get("chrf_word_order") or 0)}  # fmt: skip


def write_csv(rows: Sequence[dict], path: Path) -> None:
    path.write_text(csv_text(COLUMNS, rows), encoding="utf-8")


def csv_text(fields: Sequence[str], rows: Sequence[dict]) -> str:
    """``rows`` as CSV text: a header of ``fields``, then each row's values of them (a missing or None one empty)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(fields))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in fields})
    return buffer.getvalue()


def cell(value) -> str:
    """A table's cell: a float to two decimals (whole above 100, e.g. milliseconds), None as '-'."""
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return "-" if value is None else str(value)


def fill_len_ratio(eval_dir: Path) -> int:
    """Give the rows of ``eval_dir/sweep.csv`` scored before ``len_ratio`` was a column their value, from their
    ``instances.log`` where it is here (the other columns are left as they were scored); returns the rows filled."""
    from .archive import run_folder
    from .score import length_ratio, read_instances

    table = eval_dir / "sweep.csv"
    if not table.is_file():
        return 0
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    filled = 0
    for row in rows:
        folder = eval_dir / run_folder(eval_dir, Path(row.get("output") or "."))
        if row.get("len_ratio") in (None, "") and (folder / "instances.log").is_file():
            row["len_ratio"] = length_ratio(read_instances(folder))
            filled += 1
    if filled:
        write_csv(rows, table)
    return filled


def write_markdown(rows: Sequence[dict], path: Path) -> None:
    columns = ("head", "param", "BLEU", "chrF", "len_ratio", "AL", "LAAL", "DAL", "AL_CA", "LAAL_CA", "RCO", "AIL",
               "n_instances")  # fmt: skip
    if not rows:
        path.write_text("No run has finished.\n", encoding="utf-8")
        return
    lines = [f"Latency in {rows[0]['latency_unit']}; CA = computation-aware (speech only).", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]  # fmt: skip
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            cells.append("-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(rows: Sequence[dict], path: Path, title: str) -> None:
    """BLEU and chrF against LAAL, side by side: one curve per head, the offline model as a horizontal line.

    chrF is there because at the BLEU of a small model (a few points) one BLEU point is noise, and the
    comparisons (``simul_agents.compare``) are made on chrF too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(13, 4.8), sharex=True)
    for axes, metric in zip(panels, ("BLEU", "chrF"), strict=True):
        _plot_metric(axes, rows, metric)
    handles, labels = panels[0].get_legend_handles_labels()
    right = 1.0  # the panels' share of the figure's width: what the legend beside them leaves
    if handles:  # one legend for both panels, beside them: inside, it hides the points
        legend = figure.legend(handles, labels, loc="center right", fontsize=8)
        width = legend.get_window_extent(figure.canvas.get_renderer()).width  # pixels: long labels, wide legend
        right = 1.0 - width / (figure.get_figwidth() * figure.dpi) - 0.01
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, right, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_metric(axes, rows: Sequence[dict], metric: str) -> None:
    import matplotlib

    unit = rows[0]["latency_unit"] if rows else ""
    curve_of = [curve_name(row["head"], row["param"]) for row in rows]  # each row's curve, named once
    heads = list(dict.fromkeys(curve_of))
    curves = [head for head in heads if head != "offline"]
    colors = matplotlib.colormaps["tab10" if len(curves) <= 10 else "tab20"].colors  # no two curves alike
    for head in heads:
        points = sorted(
            (row["LAAL"], row[metric], row["param"])
            for row, curve in zip(rows, curve_of, strict=True)
            if curve == head and row["LAAL"] is not None and row.get(metric) is not None
        )
        if head == "offline":
            for _, value, _ in points:
                axes.axhline(value, color="0.4", linestyle="--", linewidth=1, label="offline (full source)")
            continue
        if not points:
            continue
        xs, ys, labels = zip(*points, strict=True)
        other_model = head.endswith(")")  # "entropy (no-spsd)": another model's curve, drawn dashed
        axes.plot(xs, ys, marker="s" if other_model else "o", linestyle="--" if other_model else "-",
                  color=colors[curves.index(head) % len(colors)], label=head)  # fmt: skip
        if not other_model:  # the settings of this model's curves: "0.75", "k=3" (other models' would crowd them)
            for x, y, label in [p for p in points if p[2] != "-"]:  # the oracle has no setting
                axes.annotate(short_label(label), (x, y), textcoords="offset points", xytext=(3, 3),
                              fontsize=6)  # fmt: skip
    axes.set_xlabel(f"LAAL ({unit})")
    axes.set_ylabel(metric)
    low, high = axes.get_ylim()
    span = MIN_SPAN[metric]
    if high - low < span:  # autoscale would blow differences of 0.001 up to the full height
        bottom = max(0.0, (low + high) / 2 - span / 2)
        axes.set_ylim(bottom, bottom + span)
    axes.grid(alpha=0.3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simul_agents.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a YAML file in eval_configs/")
    parser.add_argument("--jobs", type=int, default=1, help="parallel SimulEval processes (1: in this process)")
    parser.add_argument("--shards", type=int, default=None, help="split each run's test set in K (overrides YAML)")
    parser.add_argument("--batch", type=int, default=None,
                        help="instances at a time per process, batched (simul_agents.batch_eval; overrides YAML)")
    parser.add_argument("--output", default=None, help="override the YAML's output directory")
    parser.add_argument("--dry-run", action="store_true", help="check the sweep, list its runs and their state")
    parser.add_argument("--redo", action="store_true", help="delete and run again runs made under other settings")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        if args.jobs < 1:
            raise SweepError(f"--jobs {args.jobs}: at least 1 process")
        if args.shards is not None and args.shards < 1:
            raise SweepError(f"--shards {args.shards}: at least 1 shard per run")
        if args.output:
            config = SweepConfig(**{**config.__dict__, "output": Path(args.output)})
        if config.output.exists() and not config.output.is_dir():
            raise SweepError(f"output {config.output}: a file, not a folder; give a folder for the runs")
        if args.batch is not None:
            if args.batch < 1:
                raise SweepError(f"--batch {args.batch}: at least 1 instance at a time")
            config = SweepConfig(**{**config.__dict__, "batch": args.batch})
        if args.dry_run:
            runs, n, settings = prepare(config)
            changed = changed_runs(settings)
            for run in runs:
                state = "changed" if run in changed else "done" if is_complete(run.output, 0, n) else "to run"
                note = f" ({'; '.join(changed[run])}; --redo runs it again)" if run in changed else ""
                print(f"{run.head:16s} {run.label:24s} {state:7s} {run.output}{note}")
            return 0
        rows, errors = sweep(config, jobs=args.jobs, shards=args.shards, redo=args.redo)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config.output.mkdir(parents=True, exist_ok=True)
    write_csv(rows, config.output / "sweep.csv")
    write_markdown(rows, config.output / "sweep.md")
    written = "sweep.md"
    if rows:
        plot(rows, config.output / "sweep.png", config.task)
        written += ", sweep.png"
    print((config.output / "sweep.md").read_text(encoding="utf-8"))
    print(f"wrote {config.output / 'sweep.csv'}, {written}")
    for error in errors:
        print(f"FAILED {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
