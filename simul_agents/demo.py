"""`make demo`: the main job on the offline default, from nothing to a quality-latency plot.

    python -m simul_agents.demo [--utterances 600] [--steps 100] [--test 24] [--out runs/demo]

1. builds the offline assets if they are missing (Whisper tiny.en, SmolLM2-135M, the Piper voice, Ding);
2. builds a small offline corpus (Ding sentence pairs, English speech from Piper) in ``data/demo``;
3. trains the offline default (Whisper tiny.en frozen + SmolLM2-135M with LoRA, speech-to-text En-De, MSLM +
   SPSD; its speech adapter first aligned with CTC on the transcripts) for a bounded number of steps, its LLM
   starting from the bench's text model (``results/text/model``) when there is one, or reuses a trained
   checkpoint (``results/speech/model`` from ``make bench``, or this demo's own from an earlier run);
4. evaluates it with SimulEval on held-out test utterances: the entropy head at three thresholds, wait-k at
   three k, and the offline (full-source) decode;
5. prints the table (BLEU, chrF, len_ratio, LAAL, AL, LAAL_CA, RCO) and writes the quality-latency plot.

Every stage is resumable: a second run reuses assets, corpus, checkpoint and finished SimulEval runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: its results/ hold the bench's models, in git
BENCH_CHECKPOINT = ROOT / "results" / "speech" / "model"  # written by `make bench` (simul_agents/bench.py)
ALIGN_STEPS = 400  # CTC steps aligning the adapter first (training/align.py): ~0.4 s each here
WARMUP_STEPS = 20  # the learning rate's warmup (the same whatever --steps, so that a resumed demo continues)
TEXT_CHECKPOINT = ROOT / "results" / "text" / "model"  # the bench's text model (in git): the demo's LLM starts from it
TABLE_COLUMNS = ("head", "param", "BLEU", "chrF", "len_ratio", "LAAL", "AL", "LAAL_CA", "RCO")
# spread over the bench speech model's curve (its 500 test utterances): entropy LAAL 1848 / 1390 / 882 ms, wait-k
# (640 ms blocks) 1074 / 1510 / 2096 ms; entropy under ~1.0 waits for the whole source (LAAL 2142 at 1.0)
ENTROPY = (2.0, 4.0, 5.0)
WAIT_K = (1, 2, 4)
STEP_SECONDS = 6.3  # one training step of the demo's model, measured here on 2 cores
EVAL_MINUTES = (4, 10)  # the 7 SimulEval runs on 24 test utterances, 2 cores (README: 4.4 min); more take longer


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simul_agents.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--utterances", type=int, default=600, help="offline corpus size (all splits)")
    parser.add_argument("--steps", type=int, default=100, help="training steps when no checkpoint exists")
    parser.add_argument("--test", type=int, default=24, help="held-out test utterances to evaluate")
    parser.add_argument("--out", default="runs/demo", help="where the run, SimulEval outputs and plot go")
    parser.add_argument("--data", default="data/demo", help="where the demo corpus goes")
    args = parser.parse_args(argv)
    small = [f"--{k} {getattr(args, k)}" for k in ("utterances", "steps", "test") if getattr(args, k) < 1]
    if small:
        parser.error(f"{', '.join(small)}: each count must be at least 1")
    for option in ("out", "data"):
        path = Path(getattr(args, option))
        if path.exists() and not path.is_dir():
            parser.error(f"--{option} {path}: a file, not a folder; give a folder")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out, data = Path(args.out), Path(args.data)
    started = time.time()
    corpus_min = max(1, args.utterances // 300)
    train_min = max(1, round(args.steps * STEP_SECONDS / 60))
    eval_min = (max(1, round(args.test * EVAL_MINUTES[0] / 24)), max(2, round(args.test * EVAL_MINUTES[1] / 24)))
    if is_checkpoint(BENCH_CHECKPOINT):
        model_plan = f"uses the trained model of `make bench` ({shown(BENCH_CHECKPOINT)}, in git: no training)"
    else:
        model_plan = (
            f"aligns the speech adapter ({ALIGN_STEPS} CTC steps, ~2 min) and trains {args.steps} steps "
            f"(~{train_min} min on 2 cores, {STEP_SECONDS} s a step measured here) unless this demo trained one before"
        )
    print(
        "proactive-simulst demo: simultaneous English speech -> German text with Whisper tiny.en + SmolLM2-135M.\n"
        f"It builds the offline assets (first time: ~3 min here), a {args.utterances}-utterance corpus "
        f"(~{corpus_min} min), {model_plan}, then runs 7 SimulEval evaluations on {args.test} test utterances "
        f"({eval_min[0]} to {eval_min[1]} min on 2 cores). A second run reuses everything and takes minutes."
    )

    say("1/5 offline assets")
    from speech_frontend.assets import build_assets

    if build_assets(["whisper-tiny.en", "smollm2-135m-instruct", "piper-joe", "ding"]):
        print("error: some assets could not be built (see above)", file=sys.stderr)
        return 1

    say(f"2/5 offline corpus ({args.utterances} utterances) in {data}")
    from training.corpus import build_offline_corpus

    report = build_offline_corpus(data, max_utterances=args.utterances)
    print(f"   {report.counts} ({report.made} synthesised now, {report.reused} reused)")

    say("3/5 the trained model")
    checkpoint = train_or_reuse(out, data, args.steps, with_dev=report.counts.get("dev", 0) > 0)
    print(f"   checkpoint: {checkpoint}")

    say(f"4/5 SimulEval on {args.test} held-out test utterances (entropy x3, wait-k x3, offline)")
    from training.corpus import write_simuleval_files

    files = write_simuleval_files(data / "test.tsv", out / "simuleval-data", max_utterances=args.test, seed=0)
    from simul_agents.sweep import SweepConfig, plot, sweep, write_csv, write_markdown

    config = SweepConfig(
        task="demo-speech-en-de",
        checkpoint=str(checkpoint),
        source=str(files.source),
        target=str(files.target),
        output=out / "eval",
        source_segment_size=320,
        heads={"offline": {}, "entropy": {"threshold": list(ENTROPY)}, "wait-k": {"k": list(WAIT_K)}},
        agent_args={"max_len_a": 1, "max_len_b": 10, "max_target_tokens": 96, "skip_failed": True},
    )
    rows, errors = sweep(config, jobs=1, redo=True)  # a run made with another checkpoint is made again
    for error in errors:
        print(f"   failed run: {error}", file=sys.stderr)
    config.output.mkdir(parents=True, exist_ok=True)
    write_csv(rows, config.output / "sweep.csv")
    write_markdown(rows, config.output / "sweep.md")
    png = config.output / "sweep.png"
    if rows:
        plot(rows, png, "demo: speech-to-text En-De (Whisper tiny.en + SmolLM2-135M)")
    else:
        png = "none (no run finished)"

    say("5/5 results (latencies in ms; CA = computation-aware)")
    print(format_rows(rows))
    minutes = (time.time() - started) / 60
    print(f"\ntable: {config.output / 'sweep.md'}\nCSV:   {config.output / 'sweep.csv'}\nplot:  {png}")
    print(f"model: {checkpoint}\ntook {minutes:.1f} min")
    return 1 if errors else 0


def shown(path: Path) -> Path:
    """``path`` as a user here would type it: relative to the working folder when it lies under it."""
    try:
        return path.relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def is_checkpoint(path: Path) -> bool:
    """A readable checkpoint directory (its metadata checked, weights not loaded)."""
    from streaming_llm.checkpoint import CheckpointError, read_meta

    try:
        read_meta(path)
        return True
    except CheckpointError:
        return False


def train_or_reuse(out: Path, data: Path, steps: int, with_dev: bool = True) -> Path:
    """The bench checkpoint if there is one, else this demo's (trained now, resumable)."""
    for candidate in (BENCH_CHECKPOINT, out / "train" / "final"):
        if is_checkpoint(candidate):
            return shown(candidate)
    from training.config import load_config
    from training.train import train

    start = {}
    if is_checkpoint(TEXT_CHECKPOINT):
        text_model = shown(TEXT_CHECKPOINT)
        start = {"init_llm": str(text_model)}
        print(f"   the LLM starts from the text model {text_model} (it already translates; the adapter learns)")
    cfg = load_config(
        ROOT / "training" / "configs" / "offline_speech.yaml",
        {
            "train_manifest": str(data / "train.tsv"),
            "dev_manifest": str(data / "dev.tsv") if with_dev else "",
            "out_dir": str(out / "train"),
            "max_steps": steps,
            "align_steps": ALIGN_STEPS,
            "warmup_steps": WARMUP_STEPS,  # not from --steps: a resumed demo with other --steps keeps its schedule
            "save_every": 25,
            "eval_every": steps,
            "dev_subset": 16,
            "dev_bleu_subset": 8,
            **start,
        },
    )
    return train(cfg, resume=True)


def format_rows(rows: list[dict]) -> str:
    from simul_agents.sweep import cell

    lines = ["  ".join(f"{c:>9s}" for c in TABLE_COLUMNS)]
    for row in sorted(rows, key=lambda r: (r["head"], str(r["param"]))):
        lines.append("  ".join(f"{cell(row.get(c)):>9s}" for c in TABLE_COLUMNS))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
