"""Training settings: what load_config and parse_overrides accept, refuse and make of a value."""

from pathlib import Path

import pytest

from training.config import load_config, parse_overrides, resume_changes

ROOT = Path(__file__).resolve().parents[1]
TINY_TEXT = ROOT / "training" / "configs" / "tiny_text.yaml"


def tiny(**overrides):
    return load_config(TINY_TEXT, {"out_dir": "unused", **overrides})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"grad_accum": 0}, "grad_accum=0: each of"),
        ({"keep_last": -1}, "keep_last=-1: must not be negative"),
        ({"batch_size": 2.5}, r"batch_size=2.5: expected a whole number"),
        ({"bf16": "yes"}, r"bf16='yes': expected true or false"),
        ({"lr": float("inf")}, r"lr=inf: must be a finite number"),
    ],
)
def test_a_value_that_cannot_train_is_refused_naming_the_setting(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**override)


def test_an_override_value_may_hold_an_equals_sign_and_null_clears_a_path() -> None:
    parsed = parse_overrides(["prompt=x=y:", "init_llm=null", "lora_targets=q_proj,v_proj"])
    cfg = tiny(**parsed)
    assert cfg.prompt == "x=y:" and cfg.init_llm == ""
    assert cfg.lora_targets == ("q_proj", "v_proj")


def test_a_run_without_the_probe_needs_no_probe_width() -> None:
    assert tiny(probe=False, probe_hidden=0).probe_hidden == 0


def test_resume_compares_only_the_settings_an_older_run_saved() -> None:
    saved = tiny().to_dict()
    del saved["phi_skew"], saved["lr"]  # written before these settings existed
    saved["lora_targets"] = list(saved["lora_targets"])  # as JSON keeps a tuple
    assert resume_changes(saved, tiny(phi_skew=0.5, lr=0.1)) == []
    assert resume_changes(saved, tiny(seed=3, max_steps=99)) == ["seed 0 -> 3"]
