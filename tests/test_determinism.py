"""Determinism on CPU: the same seed and config give bit-identical training losses and identical SimulEval outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from simul_agents import evaluate_inprocess
from simul_agents.proactive_agent import ProactiveAgent
from streaming_llm.checkpoint import build_model, save_checkpoint
from streaming_llm.tiny import tiny_config, tiny_tokenizer
from training.config import load_config
from training.corpus.manifest import Row, write_manifest
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
FIELDS = ("loss", "full", "mslm", "spsd", "probe", "probe_acc", "agree", "grad_norm", "lr", "tokens")


def train_log(config: str, out: Path, **overrides) -> list[dict]:
    settings = {"out_dir": str(out), "max_steps": STEPS, "save_every": 1000, "eval_every": 1000, "dev_manifest": "",
                **overrides}  # fmt: skip
    train(load_config(ROOT / "training" / "configs" / config, settings))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", *FIELDS)} for r in rows]


def test_same_seed_same_config_gives_bit_identical_text_losses(tmp_path):
    manifest = str(ROOT / "tests" / "data" / "tiny_text.tsv")
    first = train_log("tiny_text.yaml", tmp_path / "a", train_manifest=manifest, batch_size=3)
    second = train_log("tiny_text.yaml", tmp_path / "b", train_manifest=manifest, batch_size=3)
    assert [r["step"] for r in first] == list(range(1, STEPS + 1))
    assert first == second  # every float equal, not close
    other = train_log("tiny_text.yaml", tmp_path / "c", train_manifest=manifest, batch_size=3, seed=1)
    assert [r["loss"] for r in other] != [r["loss"] for r in first]  # the seed matters: the test can fail


def test_same_seed_same_config_gives_bit_identical_speech_losses(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, (src, tgt) in enumerate([("Hello there.", "Hallo."), ("Good morning.", "Guten Morgen."),
                                    ("Thank you.", "Danke."), ("See you.", "Bis bald.")]):  # fmt: skip
        audio = (0.1 * rng.standard_normal(6000 + 2500 * i)).astype(np.float32)
        sf.write(tmp_path / f"u{i}.wav", audio, 16000)
        rows.append(Row(f"u{i}", str(tmp_path / f"u{i}.wav"), len(audio), src, tgt))
    write_manifest(tmp_path / "train.tsv", rows)
    common = {"train_manifest": str(tmp_path / "train.tsv"), "batch_size": 2}
    first = train_log("tiny_speech.yaml", tmp_path / "a", **common)
    second = train_log("tiny_speech.yaml", tmp_path / "b", encoder_cache="none", **common)  # cache or not: same
    assert first == second


# ---- SimulEval -------------------------------------------------------------------------------------------


def untied_tiny(modality: str):
    config = tiny_config(modality)
    config = config.replace(llm_config={**config.llm_config, "tie_word_embeddings": False})
    torch.manual_seed(0)
    return build_model(config, tiny_tokenizer()).eval()


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("determinism")
    save_checkpoint(untied_tiny("text"), root / "text-ckpt")
    save_checkpoint(untied_tiny("speech"), root / "speech-ckpt")
    (root / "text.txt").write_text("I would like a cup of coffee .\nWhere is the train station ?\n", encoding="utf-8")
    (root / "target.txt").write_text("Ich möchte eine Tasse Kaffee .\nWo ist der Bahnhof ?\n", encoding="utf-8")
    rng = np.random.default_rng(1)
    paths = []
    for i, (seconds, rate) in enumerate([(1.4, 16000), (1.1, 44100)]):
        sf.write(root / f"s{i}.wav", (0.1 * rng.standard_normal(round(seconds * rate))).astype(np.float32), rate)
        paths.append(str(root / f"s{i}.wav"))
    (root / "speech.txt").write_text("\n".join(paths) + "\n", encoding="utf-8")
    return root


def outputs(output: Path) -> list[dict]:
    """instances.log without the wall-clock fields (elapsed is computation-aware timing, not an output)."""
    rows = [json.loads(line) for line in (output / "instances.log").read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]


def argv(data: Path, modality: str, output: Path, head: list[str]) -> list[str]:
    source = data / ("speech.txt" if modality == "speech" else "text.txt")
    extra = ["--source-segment-size", "320"] if modality == "speech" else []
    return ["--checkpoint", str(data / f"{modality}-ckpt"), "--source", str(source), "--target",
            str(data / "target.txt"), "--output", str(output), "--max-target-tokens", "24", "--no-progress-bar",
            *extra, *head]  # fmt: skip


HEADS = [["--head", "entropy", "--threshold", "6"], ["--head", "local-agreement", "--k", "2"],
         ["--head", "attention"]]  # fmt: skip


@pytest.mark.parametrize("modality", ["text", "speech"])
@pytest.mark.parametrize("head", HEADS, ids=lambda h: h[1])
def test_two_simuleval_runs_give_identical_outputs(eval_data, tmp_path, modality, head):
    evaluate_inprocess(ProactiveAgent, argv(eval_data, modality, tmp_path / "one", head))
    evaluate_inprocess(ProactiveAgent, argv(eval_data, modality, tmp_path / "two", head))
    first, second = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert len(first) == 2 and all(r["prediction"].strip() for r in first)
    assert first == second


@pytest.mark.slow
def test_a_fresh_process_with_another_hash_seed_gives_the_same_simuleval_outputs(eval_data, tmp_path):
    head = HEADS[0]
    evaluate_inprocess(ProactiveAgent, argv(eval_data, "speech", tmp_path / "here", head))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "simuleval.cli", "--agent", str(ROOT / "simul_agents" / "proactive_agent.py"),
           *argv(eval_data, "speech", tmp_path / "there", head)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert outputs(tmp_path / "here") == outputs(tmp_path / "there")
