"""The trainer's loop: gradient accumulation, checkpoint cadence, dev evaluation and what --resume may do."""

import json
from pathlib import Path

import pytest
import torch
from fixtures_training import MANIFEST, TINY_TEXT, tiny_cfg
from safetensors.torch import load_file

import training.train as trainer
from training.config import load_config
from training.data import Example, SourceUnits, load_examples
from training.train import build_training_model, evaluate, micro_batches, train

TERMS = ("loss", "full", "mslm", "spsd", "probe")


def four_rows(tmp_path: Path) -> Path:
    path = tmp_path / "four.tsv"
    path.write_text("".join(MANIFEST.read_text(encoding="utf-8").splitlines(keepends=True)[:5]), encoding="utf-8")
    return path


def step_records(out: Path) -> list[dict]:
    lines = (out / "log.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def dev_records(out: Path) -> list[dict]:
    lines = (out / "log.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "dev_full" in r]


# ---- gradient accumulation ---------------------------------------------------------------------


def test_two_accumulated_micro_batches_train_as_one_batch_of_both(tmp_path: Path) -> None:
    """grad_accum=2 over batches of 2 is the same optimizer step as one batch of the 4 examples: the gradients of
    both micro-batches add up (neither is dropped) and the losses are per token of the whole step."""
    four = str(four_rows(tmp_path))
    one = train(tiny_cfg(tmp_path / "one", train_manifest=four, batch_size=4, grad_accum=1, max_steps=1))
    two = train(tiny_cfg(tmp_path / "two", train_manifest=four, batch_size=2, grad_accum=2, max_steps=1))
    (a,), (b,) = step_records(tmp_path / "one" / "run"), step_records(tmp_path / "two" / "run")
    for k in TERMS:
        assert b[k] == pytest.approx(a[k], abs=1e-4), k
    assert b["tokens"] == a["tokens"] and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=1e-4)


def test_accumulated_accuracies_are_means_of_the_micro_batches_not_sums(tmp_path: Path) -> None:
    train(tiny_cfg(tmp_path, batch_size=1, grad_accum=4, max_steps=2))
    for record in step_records(tmp_path / "run"):
        assert 0.0 <= record["probe_acc"] <= 1.0 and 0.0 <= record["agree"] <= 1.0


@pytest.mark.parametrize("accum", [2, 3])
def test_with_grad_accum_each_example_is_trained_once_an_epoch(accum: int) -> None:
    examples = [Example(f"p{i}", " ".join(["w"] * (i + 1)), "t", i + 1) for i in range(12)]
    cfg = load_config(TINY_TEXT, {"out_dir": "unused", "batch_size": 2, "grad_accum": accum})
    cache: dict = {}
    per_epoch = 6 // accum  # 6 batches of 2
    for epoch in range(2):
        steps = [micro_batches(examples, cfg, epoch * per_epoch + s, 1, cache) for s in range(per_epoch)]
        assert all(len(step) == accum for step in steps)
        assert sorted(i for step in steps for batch in step for i in batch) == list(range(12))


def test_the_gradients_the_optimizer_steps_with_are_clipped_to_clip_norm(tmp_path: Path, monkeypatch) -> None:
    norms = []
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(tiny_cfg(tmp_path, max_steps=2, clip_norm=0.01))
    assert len(norms) == 2 and all(n <= 0.01 * 1.001 for n in norms)
    assert all(r["grad_norm"] > 0.01 for r in step_records(tmp_path / "run"))  # the norm before clipping is logged


def test_train_llm_none_trains_the_end_of_source_and_the_probe_and_leaves_the_llm_as_built(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, max_steps=2, train_llm="none")
    torch.manual_seed(cfg.seed)
    built = build_training_model(cfg).state_dict()
    trained = load_file(str(train(cfg) / "model.safetensors"))
    changed = {k for k in trained if not torch.equal(trained[k], built[k])}
    assert "end_of_source" in changed and any(k.startswith("probe.") for k in changed)
    assert not any(k.startswith("llm.") for k in changed)


# ---- checkpoints -----------------------------------------------------------------------------------


def test_stop_after_between_two_saves_leaves_a_checkpoint_of_that_step(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, max_steps=6, save_every=4)
    stopped = train(cfg, stop_after=3)
    assert stopped.name == "step-0000003"
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000003"]
    assert not (tmp_path / "run" / "final").exists()
    train(cfg, resume=True)
    assert [r["step"] for r in step_records(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_keep_last_keeps_exactly_that_many_newest_checkpoints(tmp_path: Path) -> None:
    train(tiny_cfg(tmp_path, max_steps=5, save_every=1, keep_last=2))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]


def test_keep_last_zero_keeps_every_checkpoint(tmp_path: Path) -> None:
    train(tiny_cfg(tmp_path, max_steps=3, save_every=1, keep_last=0))
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 3


def test_resume_at_max_steps_trains_nothing_and_writes_the_final_model_again(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=2)
    final = train(cfg)
    (final / "checkpoint.json").unlink()  # lost; the step checkpoint holds it
    assert train(cfg, resume=True) == final and (final / "checkpoint.json").exists()
    assert [r["step"] for r in step_records(tmp_path / "run")] == [1, 2]


# ---- dev evaluation ----------------------------------------------------------------------------------


def test_the_dev_set_is_evaluated_every_eval_every_steps_and_after_the_last(tmp_path: Path) -> None:
    train(tiny_cfg(tmp_path, max_steps=5, eval_every=2, dev_manifest=str(MANIFEST), dev_bleu_subset=0))
    assert [r["step"] for r in dev_records(tmp_path / "run")] == [2, 4, 5]


def dev_setup(tmp_path: Path, **overrides) -> tuple:
    cfg = tiny_cfg(tmp_path, **overrides)
    model = build_training_model(cfg)
    examples = load_examples(str(MANIFEST), "text", 30.0, 200, False)
    return model, examples, SourceUnits(model, None, encoder_trained=False), cfg


def test_dev_losses_do_not_depend_on_the_step_or_the_seed(tmp_path: Path) -> None:
    """Dev prefixes are fixed, so two evaluations of one model are the same numbers (comparable across steps)."""
    model, examples, units, cfg = dev_setup(tmp_path, dev_bleu_subset=0)
    first = evaluate(model, examples, units, cfg, 1)
    later = evaluate(model, examples, units, tiny_cfg(tmp_path, dev_bleu_subset=0, seed=7), 9)
    assert {k: v for k, v in first.items() if k != "step"} == {k: v for k, v in later.items() if k != "step"}
    assert model.training  # back to training mode


def test_dev_subset_and_dev_bleu_subset_bound_the_examples_scored_and_decoded(tmp_path: Path, monkeypatch) -> None:
    decoded = []
    monkeypatch.setattr(trainer, "translate_offline", lambda model, source, n: decoded.append(source) or "x")
    model, examples, units, cfg = dev_setup(tmp_path, dev_subset=2, dev_bleu_subset=3)
    record = evaluate(model, examples, units, cfg, 1)
    assert len(decoded) == 3
    only_two = evaluate(model, examples[:2], units, cfg, 1)
    assert record["dev_full"] == only_two["dev_full"] and record["dev_mslm"] == only_two["dev_mslm"]


def test_stop_after_past_max_steps_ends_at_max_steps_with_the_final_model(tmp_path: Path) -> None:
    final = train(tiny_cfg(tmp_path, max_steps=2, save_every=2), stop_after=5)
    assert final == tmp_path / "run" / "final"
    assert [r["step"] for r in step_records(tmp_path / "run")] == [1, 2]


def test_a_resume_does_not_evaluate_again_a_step_whose_dev_record_was_written(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, max_steps=4, save_every=2, eval_every=2, dev_manifest=str(MANIFEST), dev_bleu_subset=0)
    train(cfg, stop_after=2)
    train(cfg, resume=True)
    assert [r["step"] for r in dev_records(tmp_path / "run")] == [2, 4]


def test_weight_decay_spares_biases_and_norm_weights(tmp_path: Path, monkeypatch) -> None:
    groups = []
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        groups.extend((g["weight_decay"], {p.ndim for p in g["params"]}) for g in self.param_groups)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(tiny_cfg(tmp_path, max_steps=1, weight_decay=0.5))
    assert (0.5, {2}) in groups and (0.0, {1}) in groups
