"""training.probe: a finished model's probe trained again on its own states, where the heads ask it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.probe as P
from streaming_llm.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from streaming_llm.tiny import tiny_model
from training.data import SourceUnits, load_examples

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests/data/tiny_text.tsv")


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    return save_checkpoint(tiny_model("text"), tmp_path / "model")


def _states(model, store: Path, seed: int = 0, **drawn):
    examples = load_examples(TINY, "text", 30.0, 200, skip_bad=False)
    return P.collect(model, examples, SourceUnits(model, None, False), seed, 3, store, "test", **drawn)


def test_a_retrained_probe_fits_the_word_start_rows_and_leaves_every_other_weight_alone(checkpoint, tmp_path):
    # a random model's stream and full views agree on every argmax: the KL label, cut at its median, has both
    median = float(_states(load_checkpoint(checkpoint), tmp_path / "pilot.pt").kl.median())
    config = P.ProbeConfig(label="kl", kl_bound=median, examples=8, dev_examples=8, batch_size=4, epochs=300,
                           rows_per_step=64)  # fmt: skip
    report = P.run(checkpoint, tmp_path / "out", config, manifest=TINY, dev_manifest=TINY)
    old, new = load_file(str(checkpoint / WEIGHTS)), load_file(str(tmp_path / "out" / "final" / WEIGHTS))
    assert set(old) == set(new)
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith("probe."))
    assert not torch.equal(old["probe.0.weight"], new["probe.0.weight"])
    meta = json.loads((tmp_path / "out" / "final" / "checkpoint.json").read_text())
    assert meta["extra"]["probe_retrained"]["config"]["rows"] == "word_start"
    model = load_checkpoint(tmp_path / "out" / "final")  # loads as any checkpoint does, the new probe in it
    states = P.States.cat([P.States(**p) for p in torch.load(tmp_path / "out" / "states-train.pt")["parts"]])
    starts = states.rows("word_start")
    assert 0 < starts.sum() < len(starts) and report["train_rows"] == int(starts.sum())
    fit = P.measure(model.probe, states, config)["word_start"]
    y = states.labels(config)[starts]
    assert 0 < y.mean() < 1
    base_rate = float(torch.nn.functional.binary_cross_entropy(y.mean().expand_as(y), y))
    assert fit["bce"] < 0.5 * base_rate, (fit, base_rate)  # it learned its rows, beyond their base rate
    assert set(report["dev"]) == {"old", "new"} and report["dev"]["new"]["all"]["rows"] > fit["rows"]


def test_a_killed_collection_goes_on_where_it_stopped_with_the_states_of_an_unbroken_one(tmp_path, monkeypatch):
    model = tiny_model("text")
    whole = _states(model, tmp_path / "whole.pt")
    monkeypatch.setattr(P, "SAVE_EVERY", 1)
    calls = {"n": 0}
    real = P.view_outputs

    def dies_on_the_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "view_outputs", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _states(model, tmp_path / "killed.pt")
    assert len(torch.load(tmp_path / "killed.pt")["parts"]) == 1
    resumed = _states(model, tmp_path / "killed.pt")
    assert calls["n"] == 2 + 2  # the two batches left, not the first again (8 examples, 3 a batch)
    for field in ("hidden", "agree", "kl", "word_start"):
        torch.testing.assert_close(getattr(resumed, field), getattr(whole, field))


def test_states_kept_for_another_model_or_seed_are_refused(tmp_path):
    _states(tiny_model("text"), tmp_path / "s.pt")
    with pytest.raises(ValueError, match="states of another model"):
        _states(tiny_model("text", seed=1), tmp_path / "s.pt")
    with pytest.raises(ValueError, match="states of another model"):
        _states(tiny_model("text"), tmp_path / "s.pt", seed=1)
    with pytest.raises(ValueError, match="states of another model"):  # prefixes drawn with another skew
        _states(tiny_model("text"), tmp_path / "s.pt", skew=1.0)


def test_the_prefixes_and_the_kl_label_are_drawn_as_the_model_trained(tmp_path, monkeypatch):
    trained = {"phi_skew": 0.5, "spsd_topk": 20, "spsd_temperature": 2.0}
    folder = save_checkpoint(tiny_model("text"), tmp_path / "m", extra={"train_config": trained})
    seen = []
    real = P.collect

    def spy(*args, **kwargs):
        seen.append({"skew": kwargs["skew"], "kl": kwargs["kl"], "n": len(args[1])})
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "collect", spy)
    P.run(folder, tmp_path / "out", P.ProbeConfig(examples=4, dev_examples=4, epochs=1), TINY, TINY)
    assert seen == [{"skew": 0.5, "kl": (20, 2.0), "n": 4}] * 2  # the training states, then the dev states
    seen.clear()
    trained.update(batch_size=2, max_steps=3)  # by default it learns from as many examples as the training saw
    folder = save_checkpoint(tiny_model("text"), tmp_path / "m2", extra={"train_config": trained})
    report = P.run(folder, tmp_path / "out2", P.ProbeConfig(dev_examples=0, epochs=1), TINY)
    assert "dev" not in report and seen[0]["n"] == 2 * 3
    monkeypatch.undo()
    skewed = _states(tiny_model("text"), tmp_path / "a.pt", skew=4.0)
    assert not torch.equal(skewed.hidden, _states(tiny_model("text"), tmp_path / "b.pt").hidden)


def test_auc_is_the_share_of_positive_negative_pairs_ordered_right_ties_half():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    labels = (torch.rand(60, generator=g) < 0.4).float()
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert P.auc(scores, labels) == pytest.approx(float(pairs.mean()), abs=1e-12)


def test_the_probe_command_names_a_missing_checkpoint_and_refuses_unknown_rows(tmp_path, capsys):
    assert P.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        P.main([str(tmp_path), "--out", str(tmp_path / "o"), "--rows", "words"])
    assert "invalid choice: 'words'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="examples=-1"):
        P.ProbeConfig(examples=-1)


def test_a_checkpoint_without_its_training_manifest_asks_for_one(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="give --manifest"):
        P.run(checkpoint, tmp_path / "out", P.ProbeConfig())
    with pytest.raises(ValueError, match="no such manifest"):
        P.run(checkpoint, tmp_path / "out", P.ProbeConfig(), manifest=str(tmp_path / "none.tsv"))
    assert not (tmp_path / "out").exists()  # refused before any folder was made


def test_a_model_trained_without_its_probe_has_none_to_ask_until_one_is_trained_for_it(tmp_path):
    from streaming_llm.heads import make_head

    folder = save_checkpoint(tiny_model("text"), tmp_path / "plain", extra={"train_config": {"probe": False}})
    model = load_checkpoint(folder)  # its probe weights are the random ones it was built with
    assert model.probe is None
    with pytest.raises(ValueError, match="has no probe .* python -m training.probe CHECKPOINT"):
        make_head("probe").session_options(model)
    config = P.ProbeConfig(examples=8, dev_examples=8, batch_size=4, epochs=2)
    report = P.run(folder, tmp_path / "out", config, manifest=TINY, dev_manifest=TINY)
    assert set(report["dev"]) == {"new"}  # no old probe to measure
    given = load_checkpoint(tmp_path / "out" / "final")
    assert given.probe is not None
    saved = load_file(str(tmp_path / "out" / "final" / WEIGHTS))
    torch.testing.assert_close(given.probe[0].weight, saved["probe.0.weight"])


def test_the_label_rule_and_skipping_of_bad_rows_follow_the_model_s_training_unless_given(tmp_path):
    rows = Path(TINY).read_text(encoding="utf-8").splitlines()
    (tmp_path / "m.tsv").write_text("\n".join([*rows, "bad\t\t0\t\tno source.\t"]) + "\n", encoding="utf-8")
    trained = {"probe_label": "kl", "probe_kl_bound": 0.25, "skip_bad": True, "batch_size": 2, "grad_accum": 2,
               "max_steps": 2, "train_manifest": str(tmp_path / "m.tsv")}  # fmt: skip
    folder = save_checkpoint(tiny_model("text"), tmp_path / "model", extra={"train_config": trained})
    config = P.ProbeConfig(dev_examples=0, batch_size=4, epochs=1)
    report = P.run(folder, tmp_path / "out", config)  # the bad row is skipped, as its training skipped it
    assert (report["config"]["label"], report["config"]["kl_bound"]) == ("kl", 0.25)
    assert report["config"]["examples"] == 0 and report["train_rows"] > 0  # 2 x 2 x 2 = 8 examples drawn
    given = P.run(folder, tmp_path / "out2", P.ProbeConfig(label="top1", kl_bound=0.5, dev_examples=0, epochs=1))
    assert (given["config"]["label"], given["config"]["kl_bound"]) == ("top1", 0.5)
    del trained["skip_bad"]
    strict = save_checkpoint(tiny_model("text"), tmp_path / "strict", extra={"train_config": trained})
    with pytest.raises(ValueError, match=r"m\.tsv:\d+: empty src_text"):
        P.run(strict, tmp_path / "out3", config)
    assert P.run(strict, tmp_path / "out3", config, skip_bad=True)["train_rows"] > 0


def test_the_stored_kl_label_is_the_full_views_kl_from_the_stream_view_as_spsd_computes_it(tmp_path, monkeypatch):
    """The KL label (``--label kl``) is SPSD's KL(full || stream) over the full view's top-k at its temperature
    (training.losses.spsd_kl, teacher first), row for row, not the reverse KL(stream || full)."""
    from training.losses import spsd_kl

    views = []
    real = P.view_outputs

    def keeping(*args, **kwargs):
        out = real(*args, **kwargs)
        views.append((out["stream"][1].clone(), out["full"][1].clone()))
        return out

    monkeypatch.setattr(P, "view_outputs", keeping)
    states = _states(tiny_model("text"), tmp_path / "s.pt", kl=(20, 2.0))
    stream, full = (torch.cat(v) for v in zip(*views, strict=True))
    assert len(views) == 3 and len(states.kl) == len(full)  # 8 examples, 3 a batch
    torch.testing.assert_close(states.kl, spsd_kl(full, stream, 20, 2.0).cpu())
    assert not torch.allclose(states.kl, spsd_kl(stream, full, 20, 2.0).cpu())  # the direction tells apart


def test_rows_chooses_the_rows_the_probe_learns_from_word_starts_or_every_token(checkpoint, tmp_path):
    """``--rows word_start`` learns from a word's first tokens only, ``--rows all`` from every target token: the
    report counts those rows, and the word-start probe is the one trained on the word-start rows alone."""
    config = P.ProbeConfig(label="top1", examples=8, dev_examples=0, batch_size=4, epochs=3, rows_per_step=16)
    shared = tmp_path / "states"
    starts = P.run(checkpoint, tmp_path / "ws", config, manifest=TINY, states=shared)
    every = P.run(checkpoint, tmp_path / "all", replace(config, rows="all"), manifest=TINY, states=shared)
    states = P.States.cat([P.States(**p) for p in torch.load(shared / "states-train.pt")["parts"]])
    n_starts = int(states.word_start.sum())
    assert 0 < n_starts < len(states.word_start)
    assert (starts["train_rows"], every["train_rows"]) == (n_starts, len(states.word_start))
    # the word-start rows alone, as every row of a smaller set: the same rows, in the same order
    alone = P.States(*(getattr(states, f)[states.word_start] for f in ("hidden", "agree", "kl", "word_start")))
    hidden = load_checkpoint(checkpoint).config.probe_hidden
    expected = P.train_probe(alone, replace(config, rows="all", label="top1"), hidden).state_dict()
    ws, al = (load_file(str(tmp_path / run / "final" / WEIGHTS)) for run in ("ws", "all"))
    for name, weight in expected.items():
        torch.testing.assert_close(ws[f"probe.{name}"], weight.to(ws[f"probe.{name}"].dtype))
    assert not torch.equal(ws["probe.0.weight"], al["probe.0.weight"])


def test_by_default_the_probe_learns_from_as_many_examples_as_the_training_saw_with_grad_accum(tmp_path, monkeypatch):
    trained = {"batch_size": 1, "grad_accum": 3, "max_steps": 2, "train_manifest": TINY}
    folder = save_checkpoint(tiny_model("text"), tmp_path / "model", extra={"train_config": trained})
    seen = []
    real = P.collect
    monkeypatch.setattr(P, "collect", lambda *a, **k: seen.append(len(a[1])) or real(*a, **k))
    P.run(folder, tmp_path / "out", P.ProbeConfig(dev_examples=0, epochs=1))
    assert seen == [1 * 3 * 2]


def test_dev_examples_zero_does_not_read_the_training_s_dev_manifest(tmp_path):
    trained = {"train_manifest": TINY, "dev_manifest": str(tmp_path / "gone.tsv"), "batch_size": 2, "max_steps": 2}
    folder = save_checkpoint(tiny_model("text"), tmp_path / "model", extra={"train_config": trained})
    report = P.run(folder, tmp_path / "out", P.ProbeConfig(dev_examples=0, epochs=1))
    assert "dev" not in report and report["dev_manifest"] == ""


def test_examples_are_drawn_at_random_by_seed_not_the_manifest_s_first_rows(tmp_path, monkeypatch):
    folder = save_checkpoint(tiny_model("text"), tmp_path / "model", extra={"train_config": {"train_manifest": TINY}})
    drawn = []
    real = P.collect
    monkeypatch.setattr(P, "collect", lambda *a, **k: drawn.append(sorted(ex.id for ex in a[1])) or real(*a, **k))
    for seed in (0, 1):
        P.run(folder, tmp_path / f"out{seed}", P.ProbeConfig(examples=4, dev_examples=0, epochs=1, seed=seed))
    assert drawn[0] != drawn[1] and ["pair0", "pair1", "pair2", "pair3"] not in drawn
