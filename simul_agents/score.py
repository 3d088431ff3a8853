"""Score a SimulEval output directory from its ``instances.log``: quality, latency, computation-aware latency.

    python -m simul_agents.score OUTPUT_DIR [--tokenize 13a] [--json FILE]

Writes ``OUTPUT_DIR/scores.json`` and prints a one-line table. Metrics:

- BLEU and chrF (sacrebleu, corpus level, over every instance; an empty prediction counts as empty);
- len_ratio: the predictions' length over the references' (BLEU's tokens, corpus level): above 1, the output runs
  long, which chrF (recall weighted twice) does not punish and BLEU's precision does;
- AL, LAAL, DAL, AP, ATD, StartOffset, EndOffset from ``delays``, equal to SimulEval 1.1.4's own numbers
  (mean over the instances that wrote something), except ATD for text input, which SimulEval computes with its
  speech constants when it rescores from ``--output``; here it is the text ATD;
- the same with ``_CA`` from ``elapsed`` (computation-aware: speech only; SimulEval 1.1.4 overwrites plain AL
  with the CA value under ``--computation-aware``, so both are recomputed here);
- RCO and AIL (``simul_agents.latency``); n_instances, n_empty (wrote nothing), n_failed (``failed.jsonl``),
  mean_source_length. Latencies and source lengths are in ms for speech, in words for text.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import mean

import yaml
from sacrebleu.metrics import BLEU, CHRF

from . import latency as L

LATENCY_METRICS = ("AL", "LAAL", "DAL", "AP", "ATD", "StartOffset", "EndOffset")
TOKENIZERS = tuple(BLEU.TOKENIZERS)  # what --tokenize takes (sacrebleu's names)
TABLE = ("BLEU", "chrF", "len_ratio", "AL", "LAAL", "DAL", "AP", "ATD", "AL_CA", "LAAL_CA", "RCO", "AIL", "n_instances")


class ScoreError(ValueError):
    """An output directory that cannot be scored; the message says why."""


def read_instances(output: str | Path) -> list[dict]:
    """The instances of ``instances.log``, sorted by index (a merged, sharded log may be out of order)."""
    path = Path(output) / "instances.log"
    if not path.is_file():
        raise ScoreError(f"{path}: no such file; run simuleval with --output {output} first")
    instances = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ScoreError(f"{path}: not UTF-8 ({e}); SimulEval writes UTF-8, so this is not its log") from None
    numbers = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            instance = json.loads(line)
        except json.JSONDecodeError as e:
            raise ScoreError(f"{path} line {number}: not JSON ({e}); was the run interrupted?") from None
        problem = _instance_problem(instance)
        if problem:
            raise ScoreError(f"{path} line {number}: {problem}; is this a SimulEval instances.log?")
        instances.append(instance)
        numbers.append(number)
    if not instances:
        raise ScoreError(f"{path}: no instances")
    if source_type(output, instances) == "text":
        for number, instance in zip(numbers, instances, strict=True):
            problem = _text_delays_problem(instance)
            if problem:
                raise ScoreError(f"{path} line {number}: {problem}")
    return sorted(instances, key=lambda ins: ins["index"])


REQUIRED = {"index": int, "prediction": str, "reference": str, "source_length": (int, float)}


def _instance_problem(instance) -> str | None:
    """What makes one parsed line unusable, or None."""
    if not isinstance(instance, dict):
        return f"a JSON {type(instance).__name__}, not an object"
    for key, kind in REQUIRED.items():
        if key not in instance:
            return f"no {key!r} field"
        if not isinstance(instance[key], kind) or isinstance(instance[key], bool):
            return f"{key!r} is {instance[key]!r}"
    if not math.isfinite(instance["source_length"]) or instance["source_length"] < 0:
        return f"'source_length' is {instance['source_length']!r}, not a length"
    for key in ("delays", "elapsed"):
        values = instance.get(key)
        if values is not None and (
            not isinstance(values, list)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        ):
            return f"{key!r} is not a list of numbers"
    delays, elapsed = instance.get("delays") or [], instance.get("elapsed") or []
    if (delays or elapsed) and instance["source_length"] == 0:
        return "'source_length' is 0 but the instance wrote words: no latency over an empty source"
    if elapsed and len(elapsed) != len(delays):
        return (
            f"'elapsed' has {len(elapsed)} values but 'delays' has {len(delays)}; SimulEval writes one of each per "
            "target word"
        )
    return None


def _text_delays_problem(instance: dict) -> str | None:
    """Why a text instance's delays are not word counts, or None.

    For text input SimulEval's delay is the number of source words read (``TextInputInstance.step_to_delay``
    returns the integer step), and its own ATD cannot take a fraction of a word (``step * [1]``). A fractional
    delay in a text log is therefore not SimulEval's (most often a speech log scored without its config.yaml),
    and rounding it would report made-up numbers, so it is refused; a whole number written as a float (3.0, as
    a JSON round trip may leave it) is the same count and is accepted.
    """
    fractional = [d for d in instance.get("delays") or [] if not float(d).is_integer()]
    if fractional:
        return (
            f"'delays' holds {fractional[0]!r}, but a text log's delays count source words read (whole numbers); "
            "if this is a speech run, put its config.yaml (source_type: speech) beside instances.log"
        )
    return None


def source_type(output: str | Path, instances: Sequence[dict]) -> str:
    """'speech' or 'text': from SimulEval's config.yaml, else from the log (speech logs list the audio info)."""
    config = Path(output) / "config.yaml"
    if config.is_file():
        try:
            loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError):
            loaded = None  # unreadable: fall back to the log
        kind = loaded.get("source_type") if isinstance(loaded, dict) else None
        if kind in ("speech", "text"):
            return kind
    return "speech" if isinstance(instances[0].get("source"), list) else "text"


def reference_length(instance: dict) -> int:
    return len(instance["reference"].split(" "))


def _mean_over(instances: Sequence[dict], key: str, metric: Callable[[dict, list], float]) -> float | None:
    """Mean of ``metric`` over the instances with a non-empty ``key`` list (SimulEval skips the others)."""
    values = [metric(ins, ins[key]) for ins in instances if ins.get(key)]
    return mean(values) if values else None


LATENCY_OF: dict[str, Callable[[dict, list], float]] = {  # one instance's latency from its delays (or elapsed)
    "AL": lambda ins, d: L.average_lagging(d, ins["source_length"], reference_length(ins)),
    "LAAL": lambda ins, d: L.length_adaptive_average_lagging(d, ins["source_length"], reference_length(ins)),
    "DAL": lambda ins, d: L.differentiable_average_lagging(d, ins["source_length"]),
    "AP": lambda ins, d: L.average_proportion(d, ins["source_length"], reference_length(ins)),
    "StartOffset": lambda ins, d: L.start_offset(d),
    "EndOffset": lambda ins, d: L.end_offset(d, ins["source_length"]),
}


def latency_scores(instances: Sequence[dict], speech: bool, key: str = "delays") -> dict[str, float | None]:
    """AL, LAAL, DAL, AP, ATD, StartOffset, EndOffset over ``key`` ('delays' or 'elapsed')."""
    scores = {name: _mean_over(instances, key, fn) for name, fn in LATENCY_OF.items()}
    if key == "delays":
        scores["ATD"] = _mean_over(instances, "delays", lambda ins, d: L.average_token_delay(d, speech))
    else:
        scores["ATD"] = _mean_over(
            [ins for ins in instances if ins.get("elapsed")],
            "delays",
            lambda ins, d: L.average_token_delay(d, speech, elapsed=ins["elapsed"]),
        )
    return {name: scores[name] for name in LATENCY_METRICS}


def _bleu(tokenize: str) -> BLEU:
    """sacrebleu's BLEU with this tokenizer; ``ScoreError`` for an unknown one or one it cannot set up (the
    MeCab ones need extra packages, the spm/flores ones download their model on first use)."""
    if tokenize not in TOKENIZERS:
        raise ScoreError(f"tokenizer {tokenize!r}: choose one of {', '.join(TOKENIZERS)}")
    try:
        return BLEU(tokenize=tokenize)
    except (RuntimeError, OSError) as e:  # RuntimeError: missing extras; OSError (URLError): no download
        raise ScoreError(f"tokenizer {tokenize!r}: sacrebleu cannot set it up: {' '.join(str(e).split())}") from None


def _len_ratio(bleu) -> float | None:
    """The predictions' length over the references' in BLEU's tokens (None for empty references)."""
    return bleu.sys_len / bleu.ref_len if bleu.ref_len else None


def length_ratio(instances: Sequence[dict], tokenize: str = "13a") -> float | None:
    """``len_ratio`` alone, for a run scored before it was a column."""
    predictions, references = [ins["prediction"] for ins in instances], [ins["reference"] for ins in instances]
    return _len_ratio(_bleu(tokenize).corpus_score(predictions, [references]))


def score_instances(instances: Sequence[dict], speech: bool, tokenize: str = "13a", chrf_word_order: int = 0) -> dict:
    """Every metric of the module docstring, as a flat dict (``chrf_word_order`` 2: chrF++, as SimulEval's CHRF
    scorer's ``--chrf-word-order``)."""
    predictions = [ins["prediction"] for ins in instances]
    references = [ins["reference"] for ins in instances]
    bleu = _bleu(tokenize).corpus_score(predictions, [references])
    scores: dict = {
        "BLEU": bleu.score,
        "chrF": CHRF(word_order=chrf_word_order).corpus_score(predictions, [references]).score,
        "len_ratio": _len_ratio(bleu),
    }
    scores.update(latency_scores(instances, speech))
    computation_aware = speech and any(ins.get("elapsed") for ins in instances)
    for name, value in latency_scores(instances, speech, key="elapsed").items():
        scores[f"{name}_CA"] = value if computation_aware else None
    scores["RCO"] = _mean_over(instances, "delays", lambda ins, d: L.read_content_overhead(d, ins["source_length"]))
    scores["AIL"] = _mean_over(instances, "delays", lambda ins, d: L.average_incremental_lag(d, ins["source_length"]))
    scores["n_instances"] = len(instances)
    scores["n_empty"] = sum(1 for ins in instances if not ins.get("delays"))
    scores["mean_source_length"] = mean(float(ins["source_length"]) for ins in instances)
    scores["latency_unit"] = "ms" if speech else "words"
    return scores


def score_output(output: str | Path, tokenize: str = "13a", write: bool = True, chrf_word_order: int = 0) -> dict:
    """Score ``output``/instances.log; writes ``output``/scores.json unless ``write`` is False."""
    output = Path(output)
    instances = read_instances(output)
    kind = source_type(output, instances)
    scores = {"source_type": kind, **score_instances(instances, kind == "speech", tokenize, chrf_word_order)}
    failed = output / "failed.jsonl"
    try:
        failed_lines = failed.read_text(encoding="utf-8").splitlines() if failed.is_file() else []
    except UnicodeDecodeError as e:
        raise ScoreError(
            f"{failed}: not UTF-8 ({e}); it should hold one JSON line per failed instance (--skip-failed writes it)"
        ) from None
    scores["n_failed"] = count_failed(failed_lines)
    if write:
        (output / "scores.json").write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    return scores


def count_failed(lines: Sequence[str]) -> int:
    """Failed instances in ``failed.jsonl``'s lines: distinct indices (a run killed between an instance's failure
    line and its log line fails it again on resume, writing a second line), plus any line without one."""
    indices, other = set(), 0
    for line in filter(str.strip, lines):
        try:
            indices.add(int(json.loads(line)["index"]))
        except (ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
            other += 1
    return len(indices) + other


def format_table(rows: Sequence[dict], columns: Sequence[str] = TABLE) -> str:
    """A header line and one line per row, fixed width."""

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simul_agents.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="a SimulEval --output directory (with instances.log)")
    parser.add_argument("--tokenize", default="13a", choices=TOKENIZERS,
                        help="sacrebleu BLEU tokenizer (SimulEval's default: 13a)")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the scores to this file (its folder is made)")
    args = parser.parse_args(argv)
    json_path = Path(args.json) if args.json else None
    if json_path is not None:
        if json_path.is_dir():
            parser.error(f"--json {json_path}: is a folder; give a file path (e.g. {json_path / 'scores.json'})")
        blocking = next((p for p in json_path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            parser.error(f"--json {json_path}: {blocking} is a file, not a folder; give another path")
    try:
        scores = score_output(args.output, args.tokenize)
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if json_path is not None:
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            print(f"error: --json {json_path}: cannot write it ({e.strerror or e}); give another path", file=sys.stderr)
            return 2
    print(format_table([scores]))
    problems = problem_counts(scores)
    if problems:
        print(problems)
    print(f"(latency in {scores['latency_unit']}; {Path(args.output) / 'scores.json'})")
    return 0


def problem_counts(scores: dict) -> str:
    """'n_failed 1 (failed.jsonl: logged by --skip-failed), n_empty 2 (wrote nothing)', or '' when both are 0."""
    notes = {"n_failed": "failed.jsonl: logged by --skip-failed", "n_empty": "wrote nothing"}
    return ", ".join(f"{key} {scores[key]} ({note})" for key, note in notes.items() if scores.get(key))


if __name__ == "__main__":
    sys.exit(main())
