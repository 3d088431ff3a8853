"""The tiny text training run the trainer's tests start from: its YAML, its manifest, a config with overrides."""

from __future__ import annotations

from pathlib import Path

from training.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_TEXT = ROOT / "training" / "configs" / "tiny_text.yaml"
MANIFEST = ROOT / "tests" / "data" / "tiny_text.tsv"


def tiny_cfg(tmp_path: Path, **overrides) -> TrainConfig:
    """``tiny_text.yaml`` writing under ``tmp_path/run``, on the tiny manifest, without dev evaluation."""
    base = dict(out_dir=str(tmp_path / "run"), train_manifest=str(MANIFEST), dev_manifest="", eval_every=1000)
    return load_config(TINY_TEXT, {**base, **overrides})
