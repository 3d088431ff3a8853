"""Training: phi sampling, the masks and losses, the trainer's loop, checkpoints and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from streaming_llm.engine import StreamingSession
from streaming_llm.tiny import tiny_model
from training.config import load_config
from training.losses import LossConfig, spsd_kl, streaming_losses
from training.phi import sample_phi, sample_token_phi
from training.train import TrainingError, build_training_model, latest_checkpoint, lr_factor, train

ROOT = Path(__file__).resolve().parents[1]
TINY_TEXT = ROOT / "training" / "configs" / "tiny_text.yaml"
WORDS = "I would like a cup of coffee .".split()
TARGET = "Ich möchte eine Tasse Kaffee."


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]


def tiny_cfg(tmp_path, **overrides):
    base = dict(out_dir=str(tmp_path / "run"), train_manifest=str(ROOT / "tests/data/tiny_text.tsv"), dev_manifest="")
    return load_config(TINY_TEXT, {**base, **overrides})


# ---- phi ---------------------------------------------------------------------------------------------


def test_phi_is_monotonic_ends_at_m_and_has_the_expected_mean():
    gen = torch.Generator().manual_seed(0)
    m, words = 12, 5
    draws = torch.stack([sample_phi(m, words, gen) for _ in range(4000)]).double()
    assert (draws[:, 1:] >= draws[:, :-1]).all()
    assert (draws[:, -1] == m).all() and (draws >= 0).all()
    expected = m * torch.arange(2, words + 2, dtype=torch.double) / (words + 1)  # E[phi(t)] = M (t+1) / (L+1)
    torch.testing.assert_close(draws.mean(0), expected, atol=0.15, rtol=0)


def test_phi_is_reproducible_and_skew_moves_latency():
    a = sample_phi(20, 6, torch.Generator().manual_seed(3))
    b = sample_phi(20, 6, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(0)
    low = torch.stack([sample_phi(20, 6, gen, skew=3.0) for _ in range(500)]).double().mean()
    high = torch.stack([sample_phi(20, 6, gen, skew=-3.0) for _ in range(500)]).double().mean()
    assert low < high  # positive skew: less source read per word


def test_token_phi_is_constant_within_a_word():
    model = tiny_model("text")
    ids = model.target_ids(TARGET)
    phi = sample_token_phi(8, ids, model.word_start, torch.Generator().manual_seed(1))
    assert phi.shape == (len(ids),) and phi[-1] == 8
    for i in range(1, len(ids)):
        if not model.word_start[ids[i]]:
            assert phi[i] == phi[i - 1]


# ---- masks and losses ----------------------------------------------------------------------------------


def test_stream_mask_equals_an_explicit_prefix_forward():
    """Under phi(t) = k for every token but the last, each row equals a plain causal forward over a sequence
    that holds only the first k units (and the end-of-source marker only when k = M). Schedules where phi
    varies per token are covered by the engine's invariant tests."""
    model = tiny_model("text", seed=4)
    units = model.text_units(WORDS)
    targets = model.target_ids(TARGET)
    embeds, positions, layouts = model.assemble([units], [targets])
    layout, m = layouts[0], len(WORDS)
    prompt = model.embed_ids(model.prompt_ids)
    for k in (0, 1, 3, m):
        phi = torch.full((len(targets),), k)
        phi[-1] = m
        with torch.no_grad():
            logits, _ = model(embeds, positions, layouts, [phi])
        seen = units[:k] + ([model.end_of_source[None]] if k == m else [])
        group = model.embed_ids(model.prefix_ids + targets[:-1])
        x = torch.cat([prompt, *seen, group])[None]
        n_src = sum(u.shape[0] for u in seen)
        pos = torch.cat(
            [torch.arange(len(model.prompt_ids) + n_src), model.target_offset + torch.arange(group.shape[0])]
        )
        with torch.no_grad():
            explicit = model.llm(inputs_embeds=x, position_ids=pos[None]).logits[0]
        rows = layout.predictor_rows()[:-1]
        torch.testing.assert_close(logits[0, rows], explicit[-len(rows) - 1 : -1], atol=1e-4, rtol=1e-4)


def test_spsd_is_zero_when_every_token_sees_the_whole_source():
    """Zero up to float rounding: the two views sit at different places of one sequence, so their attention
    sums run over differently masked key sets (measured: ~1e-9)."""
    model = tiny_model("text")
    units = [model.text_units(WORDS), model.text_units(WORDS[:4])]
    targets = [model.target_ids(TARGET), model.target_ids("Wo ist der Bahnhof?")]
    full = [torch.full((len(t),), len(u)) for u, t in zip(units, targets, strict=True)]
    out = streaming_losses(model, units, targets, full, LossConfig())
    assert abs(float(out["spsd"].detach())) < 1e-7
    assert abs(float(out["mslm"].detach()) - float(out["full"].detach())) < 1e-5
    assert float(out["agree"]) == 1.0
    sampled = [torch.tensor(sorted(np.random.default_rng(0).integers(0, len(u), len(t))) + [len(u)])[1:]
               for u, t in zip(units, targets, strict=True)]  # fmt: skip
    assert float(streaming_losses(model, units, targets, sampled, LossConfig())["spsd"].detach()) > 1e-4


def test_two_views_in_one_sequence_equal_two_separate_forwards():
    model = tiny_model("text", seed=2)
    units, targets = [model.text_units(WORDS)], [model.target_ids(TARGET)]
    phi = torch.tensor(sorted(np.random.default_rng(1).integers(0, len(WORDS) + 1, len(targets[0]))))
    phi[-1] = len(WORDS)
    embeds, positions, layouts = model.assemble(units, targets, views=2)
    with torch.no_grad():
        logits, _ = model(embeds, positions, layouts, [torch.stack([phi, layouts[0].full_phi()])])
        for view, p in enumerate([phi, layouts[0].full_phi()]):
            e1, p1, l1 = model.assemble(units, targets)
            single, _ = model(e1, p1, l1, [p])
            torch.testing.assert_close(
                logits[0, layouts[0].predictor_rows(view)], single[0, l1[0].predictor_rows()], atol=1e-4, rtol=1e-4
            )


def test_spsd_kl_is_positive_and_uses_the_teacher_top_k():
    teacher = torch.randn(5, 50)
    student = torch.randn(5, 50)
    kl = spsd_kl(teacher, student, topk=10, temperature=2.0)
    assert (kl > 0).all()
    assert torch.allclose(spsd_kl(teacher, teacher, 10, 1.0), torch.zeros(5), atol=1e-6)
    outside = torch.ones(50, dtype=torch.bool)
    outside[teacher.topk(10).indices[0]] = False
    shifted = student[:1].clone()
    shifted[:, outside] += 5.0  # logits outside the teacher's top-k do not matter
    torch.testing.assert_close(spsd_kl(teacher[:1], shifted, 10, 1.0), spsd_kl(teacher[:1], student[:1], 10, 1.0))


def test_both_views_come_from_one_forward():
    model = tiny_model("text")
    calls = []
    body = model.llm.get_decoder()
    handle = body.register_forward_hook(lambda m, a, kw: calls.append(1))
    units = [model.text_units(WORDS)]
    targets = [model.target_ids(TARGET)]
    streaming_losses(
        model,
        units,
        targets,
        [torch.full((len(targets[0]),), 3).index_fill(0, torch.tensor([len(targets[0]) - 1]), len(WORDS))],
        LossConfig(),
    )
    handle.remove()
    assert len(calls) == 1


def test_probe_features_in_training_match_the_engine():
    model = tiny_model("text")
    units, targets = model.text_units(WORDS[:3]), model.target_ids(TARGET)
    embeds, positions, layouts = model.assemble([units], [targets])
    phi = torch.full((len(targets),), 3)
    phi[0] = 2
    with torch.no_grad():
        _, hidden = model(embeds, positions, layouts, [phi])
    session = StreamingSession(model)
    session.push_words(WORDS[:2])
    torch.testing.assert_close(
        session.signals().hidden, hidden[0, layouts[0].predictor_rows()[0]], atol=1e-5, rtol=1e-5
    )


def test_the_probe_can_learn_only_where_the_heads_ask_it_before_each_word():
    from training.losses import probe_rows

    model = tiny_model("text")
    targets = [model.target_ids(TARGET), model.target_ids("Gute Nacht.")]
    labels = torch.tensor([y for ys in targets for y in ys])
    rows = probe_rows(model, targets, labels, "word_start")
    n_first = len(targets[0])
    assert rows[0] and rows[n_first]  # each sequence's first token starts its first word
    assert not rows[n_first - 1] and not rows[-1]  # the end of the sentence is not a word the heads decide on
    assert rows.tolist() == [(i in (0, n_first) or bool(model.word_start[y])) and y != model.eos_id
                             for i, y in enumerate(labels.tolist())]  # fmt: skip
    assert 0 < rows.sum() < len(labels) and probe_rows(model, targets, labels, "all").all()
    units = [model.text_units(WORDS), model.text_units("Good night .".split())]
    phis = [torch.full((len(ys),), 2).index_fill(0, torch.tensor([len(ys) - 1]), len(u))
            for ys, u in zip(targets, units, strict=True)]  # fmt: skip
    torch.manual_seed(0)
    every = streaming_losses(model, units, targets, phis, LossConfig())
    starts = streaming_losses(model, units, targets, phis, LossConfig(probe_rows="word_start"))
    assert starts["probe"] < every["probe"] and torch.isclose(starts["mslm"], every["mslm"])
    with pytest.raises(ValueError, match="probe_rows 'words'"):
        LossConfig(probe_rows="words")


def test_spsd_kl_is_the_teachers_kl_from_the_student_over_its_top_k_times_t_squared():
    """KL(P_full || P_stream), not the reverse (the student covers the teacher's modes), both renormalised over the
    teacher's top-k tempered logits, scaled by T^2 so that spsd_lambda weighs the same at any temperature."""
    gen = torch.Generator().manual_seed(0)
    teacher, student = 3 * torch.randn(4, 30, generator=gen), 3 * torch.randn(4, 30, generator=gen)
    k, t = 7, 2.0
    idx = teacher.topk(k).indices
    p = torch.softmax(teacher.gather(-1, idx) / t, -1)
    q = torch.softmax(student.gather(-1, idx) / t, -1)
    expected = (p * (p / q).log()).sum(-1) * t**2
    torch.testing.assert_close(spsd_kl(teacher, student, k, t), expected)
    reverse = (q * (q / p).log()).sum(-1) * t**2
    assert not torch.allclose(expected, reverse, rtol=0.05)  # this draw tells the two directions apart


def test_each_loss_term_is_its_views_token_nll_and_the_total_weighs_them_as_configured():
    """mslm: the NLL of each target token under its own prefix phi(t); full: under the whole source; spsd: the KL of
    the two views' logits; each summed over the batch's tokens and divided by ``n_tokens``; the total weighs them by
    w_full, w_mslm and spsd_lambda. Checked against one plain masked forward per sequence and view."""
    model = tiny_model("text", seed=3)
    units = [model.text_units(WORDS), model.text_units(WORDS[:4])]
    targets = [model.target_ids(TARGET), model.target_ids("Wo ist der Bahnhof?")]
    phis = [sample_token_phi(len(u), ys, model.word_start, torch.Generator().manual_seed(i))
            for i, (u, ys) in enumerate(zip(units, targets, strict=True))]  # fmt: skip
    assert any(bool((phi[:-1] < len(u)).any()) for phi, u in zip(phis, units, strict=True))  # a real stream view
    config = LossConfig(w_full=0.3, w_mslm=2.0, spsd_lambda=0.7, spsd_topk=5, probe=False)
    n_tokens = 40.0
    with torch.no_grad():
        out = streaming_losses(model, units, targets, phis, config, n_tokens=n_tokens)
        logits: dict[str, list[torch.Tensor]] = {"mslm": [], "full": []}
        for u, ys, phi in zip(units, targets, phis, strict=True):
            embeds, positions, layouts = model.assemble([u], [ys])
            for name, view_phi in (("mslm", phi), ("full", layouts[0].full_phi())):
                every, _ = model(embeds, positions, layouts, [view_phi])
                logits[name].append(every[0, layouts[0].predictor_rows()])
    labels = torch.tensor([y for ys in targets for y in ys])
    stream, full = torch.cat(logits["mslm"]), torch.cat(logits["full"])
    expected = {
        "mslm": torch.nn.functional.cross_entropy(stream, labels, reduction="sum") / n_tokens,
        "full": torch.nn.functional.cross_entropy(full, labels, reduction="sum") / n_tokens,
        "spsd": spsd_kl(full, stream, 5, 1.0).sum() / n_tokens,
    }
    assert abs(float(expected["mslm"] - expected["full"])) > 1e-3  # the two views differ here
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["loss"], 0.3 * out["full"] + 2.0 * out["mslm"] + 0.7 * out["spsd"])


@pytest.mark.parametrize("stop_grad", [True, False])
def test_spsd_sends_no_gradient_through_its_full_view_teacher_unless_asked(stop_grad):
    model = tiny_model("text")
    captured: list[torch.Tensor] = []
    lm_logits = model.lm_logits

    def keep(hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_logits(hidden)
        logits.retain_grad()
        captured.append(logits)
        return logits

    model.lm_logits = keep
    units, targets = [model.text_units(WORDS)], [model.target_ids(TARGET)]
    phi = torch.full((len(targets[0]),), 2).index_fill(0, torch.tensor([len(targets[0]) - 1]), len(WORDS))
    config = LossConfig(w_full=0.0, w_mslm=0.0, spsd_lambda=1.0, probe=False, spsd_stop_grad=stop_grad)
    streaming_losses(model, units, targets, [phi], config)["loss"].backward()
    stream, full = captured  # the views in order: stream (the student), then full (the teacher)
    assert stream.grad is not None and stream.grad.abs().sum() > 0
    assert (full.grad is not None and bool(full.grad.any())) == (not stop_grad)


def test_the_probe_loss_trains_the_probe_and_no_weight_of_the_model_it_reads():
    """The probe learns from detached states: its loss moves the probe MLP and nothing it reads."""
    model = tiny_model("text")
    units, targets = [model.text_units(WORDS)], [model.target_ids(TARGET)]
    phi = torch.full((len(targets[0]),), 2).index_fill(0, torch.tensor([len(targets[0]) - 1]), len(WORDS))
    config = LossConfig(w_full=0.0, w_mslm=0.0, spsd_lambda=0.0, probe=True)
    out = streaming_losses(model, units, targets, [phi], config)
    assert out["probe"] > 0
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.any() for p in model.probe.parameters())
    moved = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()]
    assert moved and all(n.startswith("probe.") for n in moved), moved


# ---- the trainer -------------------------------------------------------------------------------------


def test_tiny_model_overfits_eight_pairs_and_listens_to_its_source(tmp_path):
    dev = str(ROOT / "tests/data/tiny_text.tsv")
    cfg = tiny_cfg(tmp_path, max_steps=120, lr=1e-2, warmup_steps=5, batch_size=8, save_every=1000, eval_every=120,
                   dev_manifest=dev, dev_bleu_subset=1)  # fmt: skip
    train(cfg)
    log = read_log(tmp_path / "run")
    assert log[0]["full"] > 4.0
    assert log[-1]["full"] < 0.5, log[-1]  # 8 pairs memorised
    assert log[-1]["mslm"] < 1.5
    assert (tmp_path / "run" / "final" / "checkpoint.json").exists()
    (last,) = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if "dev_full" in x]
    # each memorised target is far less likely under another pair's source: the model uses its input
    assert last["dev_source_gain"] > 0.5 and last["dev_full_other_source"] > last["dev_full"] + 0.5, last


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    full = tiny_cfg(tmp_path / "a", max_steps=8, save_every=4, eval_every=1000, batch_size=3)
    train(full)
    reference = read_log(Path(full.out_dir))
    part = tiny_cfg(tmp_path / "b", max_steps=8, save_every=4, eval_every=1000, batch_size=3)
    train(part)
    out = Path(part.out_dir)
    for step in sorted(out.glob("checkpoints/step-*"))[1:]:  # as if killed right after step 4's checkpoint
        import shutil

        shutil.rmtree(step)
    train(part, resume=True)
    resumed = read_log(out)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(reference, resumed, strict=True):
        assert a["loss"] == b["loss"] and a["mslm"] == b["mslm"] and a["spsd"] == b["spsd"], (a, b)


def test_the_learning_rate_warms_up_linearly_from_the_first_step_then_decays_by_cosine_to_a_tenth():
    warmup, total = 4, 24
    factor = [lr_factor(step, warmup, total) for step in range(total + 1)]
    assert factor[:warmup] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # the first step already moves the weights
    assert factor[warmup] == pytest.approx(1.0)  # the peak, where the decay starts
    assert factor[(warmup + total) // 2] == pytest.approx(0.55)  # half-way through the decay: (1 + 0.1) / 2
    assert factor[total] == pytest.approx(0.1) and lr_factor(10 * total, warmup, total) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factor[warmup:], factor[warmup + 1 :], strict=False))


def test_a_resumed_run_gets_back_the_random_states_of_its_checkpoint(tmp_path, monkeypatch):
    """torch's, numpy's and Python's global generators (dropout, any library's draws) continue where they stood."""
    import random

    import training.train as trainer

    forward = trainer.TrainStep.forward

    def drawing(self, *args, **kwargs):  # each step draws from every global generator, as dropout would
        torch.rand(1), np.random.rand(), random.random()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(trainer.TrainStep, "forward", drawing)
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=2, eval_every=1000, batch_size=2)
    train(cfg)
    saved = torch.load(latest_checkpoint(tmp_path / "run" / "checkpoints") / "trainer.pt", weights_only=False)["rng"]
    train(cfg, resume=True)  # restores step 2, which is max_steps: nothing draws after it
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), saved["numpy"], strict=True))
    assert random.getstate() == saved["python"]


def test_a_run_killed_between_a_checkpoint_and_its_dev_evaluation_evaluates_that_step_on_resume(tmp_path):
    import shutil

    dev = str(ROOT / "tests/data/tiny_text.tsv")
    cfg = tiny_cfg(tmp_path, max_steps=4, save_every=2, eval_every=2, dev_manifest=dev, dev_bleu_subset=1)
    out = Path(cfg.out_dir)
    train(cfg)
    lines = (out / "log.jsonl").read_text().splitlines()
    reference = {r["step"]: r["dev_full"] for r in map(json.loads, lines) if "dev_full" in r}
    assert sorted(reference) == [2, 4]
    shutil.rmtree(out / "checkpoints" / "step-0000004")  # killed after step 2's checkpoint, before its evaluation
    kept = [x for x in lines if json.loads(x)["step"] <= 2 and "dev_full" not in x]
    (out / "log.jsonl").write_text("".join(x + "\n" for x in kept))
    train(cfg, resume=True)
    dev = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "dev_full" in r]
    assert [r["step"] for r in dev] == [2, 4]  # step 2's point is back, once, before step 3
    assert dev[0]["dev_full"] == pytest.approx(reference[2], abs=1e-4)


def test_killed_run_resumes_from_its_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    manifest = ROOT / "tests/data/tiny_text.tsv"
    cmd = [sys.executable, "-m", "training.train", "--config", str(TINY_TEXT), f"out_dir={out}",
           f"train_manifest={manifest}", "dev_manifest=", "max_steps=400", "save_every=2"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("checkpoints/step-*"))) < 2:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    found = latest_checkpoint(out / "checkpoints")
    assert found is not None
    from streaming_llm.checkpoint import load_checkpoint

    load_checkpoint(found / "model")  # never a checkpoint that fails to load
    step = int(found.name.split("-")[1])
    cfg = tiny_cfg(tmp_path, max_steps=step + 2, save_every=2, eval_every=1000)
    train(cfg, resume=True)
    assert [r["step"] for r in read_log(out)][-1] == step + 2


def test_nan_loss_stops_the_run_naming_step_batch_and_checkpoint(tmp_path, monkeypatch):
    import training.train as trainer

    real = trainer.streaming_losses

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(trainer, "streaming_losses", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step 0 \(batch ids \['pair"):
        train(tiny_cfg(tmp_path, max_steps=3))


def test_corrupt_checkpoint_is_refused_with_a_clear_message(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=2, eval_every=1000)
    train(cfg)
    ckpt = latest_checkpoint(Path(cfg.out_dir) / "checkpoints")
    (ckpt / "trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot resume"):
        train(tiny_cfg(tmp_path, max_steps=4, save_every=2, eval_every=1000), resume=True)


def speech_manifest(folder: Path) -> Path:
    """Three noise 'utterances' with transcripts and translations -> the manifest's path."""
    from training.corpus.manifest import Row, write_manifest

    rows = []
    rng = np.random.default_rng(0)
    for i, (src, tgt) in enumerate(
        [("Hello there.", "Hallo."), ("Good morning.", "Guten Morgen."), ("Thanks.", "Danke.")]
    ):
        audio = (0.1 * rng.standard_normal(8000 + 3000 * i)).astype(np.float32)
        sf.write(folder / f"u{i}.wav", audio, 16000)
        rows.append(Row(f"u{i}", str(folder / f"u{i}.wav"), len(audio), src, tgt))
    write_manifest(folder / "train.tsv", rows)
    return folder / "train.tsv"


def test_speech_training_runs_and_caches_the_frozen_encoder(tmp_path):
    speech_manifest(tmp_path)
    cfg = load_config(
        ROOT / "training/configs/tiny_speech.yaml",
        {"out_dir": str(tmp_path / "run"), "train_manifest": str(tmp_path / "train.tsv"),
         "dev_manifest": str(tmp_path / "train.tsv"), "max_steps": 3, "eval_every": 3, "dev_bleu_subset": 1},
    )  # fmt: skip
    train(cfg)
    assert len(list((tmp_path / "run" / "encoder_cache").glob("*.pt"))) == 3
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("dev_chrf" in r for r in log)


def test_missing_audio_row_is_an_error_or_a_counted_skip(tmp_path):
    from training.corpus.manifest import Row, write_manifest

    sf.write(tmp_path / "ok.wav", np.zeros(8000, dtype=np.float32), 16000)
    write_manifest(tmp_path / "m.tsv", [Row("ok", str(tmp_path / "ok.wav"), 8000, "a b", "c d"),
                                        Row("gone", str(tmp_path / "gone.wav"), 8000, "a b", "c d")])  # fmt: skip
    over = {
        "out_dir": str(tmp_path / "run"),
        "train_manifest": str(tmp_path / "m.tsv"),
        "dev_manifest": "",
        "max_steps": 1,
    }
    with pytest.raises(ValueError, match="gone.*missing"):
        train(load_config(ROOT / "training/configs/tiny_speech.yaml", over))
    train(load_config(ROOT / "training/configs/tiny_speech.yaml", {**over, "skip_bad": True, "batch_size": 1}))


TORCHRUN_SECONDS = 600  # a two-process run that hangs (a process group's teardown did once) fails, not blocks CI


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_whole_batch(tmp_path):
    common = [f"train_manifest={ROOT / 'tests/data/tiny_text.tsv'}", "dev_manifest=", "max_steps=4", "batch_size=4",
              "save_every=100", "eval_every=100"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train_cmd = ["-m", "training.train", "--config", str(TINY_TEXT)]
    one = subprocess.run([sys.executable, *train_cmd, f"out_dir={tmp_path / 'one'}", *common],
                         cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    two = subprocess.run([sys.executable, *launcher, *train_cmd, f"out_dir={tmp_path / 'two'}", *common],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=TORCHRUN_SECONDS)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    for a, b in zip(read_log(tmp_path / "one"), read_log(tmp_path / "two"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-5)


def test_a_two_process_run_resumes_in_one_process_with_the_same_losses(tmp_path):
    common = [f"train_manifest={ROOT / 'tests/data/tiny_text.tsv'}", "dev_manifest=", "batch_size=4",
              "save_every=2", "eval_every=100", "warmup_steps=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train_cmd = ["-m", "training.train", "--config", str(TINY_TEXT)]
    reference = subprocess.run([sys.executable, *train_cmd, f"out_dir={tmp_path / 'one'}", "max_steps=4", *common],
                               cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-2000:]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534"]
    # two processes train steps 1-2 of the same 4-step schedule and checkpoint; then one process resumes
    first = subprocess.run([sys.executable, *launcher, *train_cmd, f"out_dir={tmp_path / 'mixed'}", "max_steps=4",
                            *common, "--stop-after", "2"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=TORCHRUN_SECONDS)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    assert [r["step"] for r in read_log(tmp_path / "mixed")] == [1, 2]
    second = subprocess.run([sys.executable, *train_cmd, f"out_dir={tmp_path / 'mixed'}", "max_steps=4", *common,
                             "--resume"], cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert second.returncode == 0, second.stderr[-2000:]
    mixed = read_log(tmp_path / "mixed")
    assert [r["step"] for r in mixed] == [1, 2, 3, 4]
    for a, b in zip(read_log(tmp_path / "one"), mixed, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["mslm"] - b["mslm"]) < 1e-5, (a, b)


def test_a_speech_run_starts_from_a_text_checkpoints_llm(tmp_path):
    from safetensors.torch import load_file

    from training.train import build_training_model

    text = train(tiny_cfg(tmp_path, max_steps=2, save_every=2, eval_every=100))
    speech = {"out_dir": str(tmp_path / "speech"), "init_llm": str(text)}
    model = build_training_model(load_config(ROOT / "training/configs/tiny_speech.yaml", speech))
    trained = {k: v for k, v in load_file(str(text / "model.safetensors")).items() if k.startswith("llm.")}
    params = dict(model.named_parameters())
    assert trained and all(torch.equal(params[k], v) for k, v in trained.items())
    assert model.adapter is not None  # the speech side starts fresh


def test_a_transcribe_run_aligns_an_adapter_that_a_translate_run_starts_from(tmp_path):
    from safetensors.torch import load_file

    from training.data import load_examples
    from training.train import build_training_model

    manifest = speech_manifest(tmp_path)
    assert [ex.target for ex in load_examples(manifest, "speech", 30, 200, False, transcribe=True)][0] == "Hello there."
    over = {"train_manifest": str(manifest), "dev_manifest": "", "max_steps": 2, "save_every": 2}
    asr_run = {**over, "out_dir": str(tmp_path / "asr"), "task": "transcribe", "train_llm": "none"}
    asr = train(load_config(ROOT / "training/configs/tiny_speech.yaml", asr_run))
    assert json.loads((asr / "config.json").read_text())["target_prefix"] == "\nText:"
    st = {**over, "out_dir": str(tmp_path / "st"), "init_adapter": str(asr)}
    model = build_training_model(load_config(ROOT / "training/configs/tiny_speech.yaml", st))
    aligned = load_file(str(asr / "model.safetensors"))
    assert all(torch.equal(v, aligned["adapter." + k]) for k, v in model.adapter.state_dict().items())
    assert model.config.target_prefix == "\nGerman:"
    with pytest.raises(ValueError, match="needs modality=speech"):
        load_config(TINY_TEXT, {"task": "transcribe"})


def test_ctc_alignment_lowers_the_adapters_ctc_loss_and_runs_before_step_one(tmp_path):
    from training.align import align_adapter
    from training.data import SourceUnits, load_examples
    from training.train import build_training_model

    manifest = speech_manifest(tmp_path)
    over = {"train_manifest": str(manifest), "dev_manifest": str(manifest), "out_dir": str(tmp_path / "st")}
    cfg = load_config(ROOT / "training/configs/tiny_speech.yaml", over)
    examples = load_examples(manifest, "speech", 30, 200, False)
    assert examples[0].transcript == "Hello there." and examples[0].target == "Hallo."
    model = build_training_model(cfg)
    units = SourceUnits(model, None, encoder_trained=False)
    first = align_adapter(model, examples, examples, units, steps=1, batch_size=3, seed=0)
    more = align_adapter(model, examples, examples, units, steps=60, batch_size=3, seed=0)
    assert more["align_ctc"] < first["align_ctc"] and 0 <= more["align_dev_missed"] <= 1

    train(load_config(ROOT / "training/configs/tiny_speech.yaml", {**over, "max_steps": 1, "align_steps": 2}))
    log = [json.loads(x) for x in (tmp_path / "st" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[0]["align_steps"] == 2 and log[1]["step"] == 1


def test_init_llm_refuses_weights_the_run_would_not_keep(tmp_path):
    from training.train import build_training_model

    text = train(tiny_cfg(tmp_path, max_steps=2, save_every=2, eval_every=100))  # train_llm: full
    lora = {"out_dir": str(tmp_path / "speech"), "init_llm": str(text), "train_llm": "lora"}
    with pytest.raises(TrainingError, match="lacks"):
        build_training_model(load_config(ROOT / "training/configs/tiny_speech.yaml", lora))
    with pytest.raises(TrainingError, match="not a checkpoint"):
        build_training_model(load_config(TINY_TEXT, {"init_llm": str(tmp_path / "nothing")}))


@pytest.mark.parametrize("mode", ["lora", "full", "frozen"])
def test_a_fine_tuned_encoder_learns_and_its_checkpoint_keeps_what_it_learned(tmp_path, mode):
    from streaming_llm.checkpoint import load_checkpoint

    speech_manifest(tmp_path)
    over = {"out_dir": str(tmp_path / "run"), "train_manifest": str(tmp_path / "train.tsv"), "dev_manifest": "",
            "max_steps": 3, "lr": 1e-2}  # fmt: skip
    cfg = load_config(ROOT / "training/configs/tiny_speech.yaml", {**over, "train_encoder": mode})
    torch.manual_seed(cfg.seed)  # as train() does: the same random tiny model it starts from
    before = build_training_model(load_config(ROOT / "training/configs/tiny_speech.yaml", over))  # frozen encoder
    final = train(cfg)
    audio = sf.read(tmp_path / "u2.wav", dtype="float32")[0]
    with torch.no_grad():
        old = before.encode_speech(audio)
        kept = load_checkpoint(final).encode_speech(audio)
        merged = load_checkpoint(final, merge_lora=True).encode_speech(audio)
    moved = (kept - old).abs().max()
    if mode == "frozen":  # the control: outputs cached once, the encoder untouched
        assert moved == 0 and any((tmp_path / "run" / "encoder_cache").glob("*.pt"))
    else:  # it moved, the checkpoint holds what it learned, and its outputs are never cached
        assert moved > 1e-3 and not (tmp_path / "run" / "encoder_cache").exists()
    assert torch.allclose(kept, merged, atol=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("max_steps=ten", "max_steps='ten': expected a whole number"),
        ("batch_size=2.5", "batch_size=2.5: expected a whole number"),
        ("lr=fast", "lr='fast': expected a number"),
        ("probe=maybe", "probe='maybe': expected true or false"),
        ("save_every=0", "save_every=0: each of"),
        ("eval_every=0", "eval_every=0: each of"),
        ("spsd_lambda=-1", "spsd_lambda=-1.0: must not be negative"),
    ],
)
def test_a_setting_of_the_wrong_type_or_range_is_refused_by_name(override, message):
    from training.config import parse_overrides

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(TINY_TEXT, parse_overrides([override]))


def test_numbers_written_without_a_dot_are_numbers():
    from training.config import parse_overrides

    cfg = load_config(TINY_TEXT, parse_overrides(["lr=1e-4", "max_steps=2e3", "prompt=12"]))
    assert (cfg.lr, cfg.max_steps, cfg.prompt) == (1e-4, 2000, "12")


def test_the_trainer_cli_names_a_broken_yaml_and_a_bad_stop_after(tmp_path, capsys):
    from training.train import main

    broken = tmp_path / "broken.yaml"
    broken.write_text("a:\n  b: 1\n c: 2\n", encoding="utf-8")
    assert main(["--config", str(broken)]) == 1
    assert f"{broken}: not valid YAML" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(TINY_TEXT), "--stop-after", "-1"])
    assert "--stop-after -1: give the step" in capsys.readouterr().err


def test_a_step_checkpoint_of_a_run_without_the_probe_loads_without_one(tmp_path):
    from streaming_llm.checkpoint import load_checkpoint

    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=1, eval_every=1000, batch_size=2, probe=False)
    train(cfg)
    step = latest_checkpoint(Path(cfg.out_dir) / "checkpoints")
    assert load_checkpoint(step / "model").probe is None  # not the random probe it was built with
    assert load_checkpoint(Path(cfg.out_dir) / "final").probe is None


def test_a_resumed_run_does_not_need_its_init_llm_folder_any_more(tmp_path):
    import shutil

    text = train(tiny_cfg(tmp_path / "text", max_steps=2, save_every=2, eval_every=100))
    cfg = tiny_cfg(tmp_path, max_steps=4, save_every=2, eval_every=100, init_llm=str(text))
    reference = tiny_cfg(tmp_path / "ref", max_steps=4, save_every=2, eval_every=100, init_llm=str(text))
    train(reference)
    train(cfg, stop_after=2)
    shutil.rmtree(text)  # init_* act at step 0 only (config.RESUME_MAY_CHANGE): the checkpoint holds what they gave
    train(cfg, resume=True)
    resumed, whole = read_log(Path(cfg.out_dir)), read_log(Path(reference.out_dir))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]


def tiny_llm_folder(path: Path, seed: int) -> Path:
    """A tiny random Llama saved as a Hugging Face folder: llm=PATH runs write delta checkpoints over it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from streaming_llm.tiny import tiny_config, tiny_tokenizer

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig.from_dict(tiny_config("text").llm_config)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_init_llm_refuses_a_lora_of_another_alpha_and_warns_of_another_base(tmp_path, caplog):
    from training.train import build_training_model

    base, other = tiny_llm_folder(tmp_path / "base", 1), tiny_llm_folder(tmp_path / "other", 2)
    lora = {"train_llm": "lora", "lora_r": 4, "lora_alpha": 32}
    text = train(tiny_cfg(tmp_path / "text", max_steps=2, save_every=2, eval_every=100, llm=str(base), **lora))
    start = {**lora, "out_dir": str(tmp_path / "next"), "init_llm": str(text)}
    with pytest.raises(TrainingError, match="lora_alpha=32, this run has lora_alpha=8"):
        build_training_model(load_config(TINY_TEXT, {**start, "llm": str(base), "lora_alpha": 8}))
    caplog.clear()
    build_training_model(load_config(TINY_TEXT, {**start, "llm": str(base)}))
    assert "trained over the LLM at" not in caplog.text
    build_training_model(load_config(TINY_TEXT, {**start, "llm": str(other)}))  # same architecture, other weights
    assert "trained over the LLM at" in caplog.text and str(other) in caplog.text


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_process_count_trains_each_example_once_an_epoch_and_repeats_no_batch(world):
    """9 examples in batches of 4: the last batch (the longest example) has one example, fewer than 2 or 3
    processes. It used to be dropped under torchrun, and the epoch's third step trained its first batch again."""
    from training.data import Example
    from training.train import micro_batches

    examples = [Example(f"p{i}", " ".join(["w"] * (i + 1)), "t", i + 1) for i in range(9)]
    cfg = load_config(TINY_TEXT, {"out_dir": "unused", "batch_size": 4, "grad_accum": 1})
    cache: dict = {}
    steps = [micro_batches(examples, cfg, step, world, cache) for step in range(4)]
    per_epoch = 3 if world == 1 else 2  # the long example's batch joins the one before it
    epoch = [i for batches in steps[:per_epoch] for batch in batches for i in batch]
    assert sorted(epoch) == list(range(9))
    assert all(len(batch) >= world for step in steps for batch in step)


def test_a_progress_line_every_log_every_steps_and_a_warning_when_resume_stretches_the_schedule(tmp_path, capsys,
                                                                                                 caplog):
    cfg = tiny_cfg(tmp_path, max_steps=4, save_every=4, eval_every=1000, batch_size=2, log_every=2, warmup_steps=1)
    train(cfg)
    printed = capsys.readouterr().out
    assert "step 2/4: loss " in printed and "step 4/4: loss " in printed and "step 3/4" not in printed
    longer = tiny_cfg(tmp_path, max_steps=8, save_every=4, eval_every=1000, batch_size=2, log_every=2, warmup_steps=1)
    train(longer, resume=True)
    assert "max_steps 4 -> 8: the learning rate schedule is stretched" in caplog.text


def test_an_example_draws_a_new_prefix_schedule_every_epoch(tmp_path, monkeypatch):
    """MSLM sees each example under other prefixes as training goes on: the phi an example draws depends on the
    step, so one example's schedules differ between epochs (8 examples in one batch: one step is one epoch)."""
    import training.train as trainer

    drawn: dict[tuple, list[list[int]]] = {}
    real = trainer.sample_token_phi

    def recording(n_units, token_ids, word_start, generator, skew=0.0):
        phi = real(n_units, token_ids, word_start, generator, skew)
        drawn.setdefault((n_units, tuple(token_ids)), []).append(phi.tolist())
        return phi

    monkeypatch.setattr(trainer, "sample_token_phi", recording)
    train(tiny_cfg(tmp_path, max_steps=4, save_every=4, eval_every=1000, batch_size=8))
    assert len(drawn) == 8 and all(len(phis) == 4 for phis in drawn.values())  # each example once an epoch
    renewed = [key for key, phis in drawn.items() if len({tuple(p) for p in phis}) > 1]
    assert len(renewed) == 8, drawn  # none draws one schedule in every epoch


def test_each_epoch_trains_the_same_length_buckets_in_a_new_order():
    """bucket_batches: batches group examples of similar length (with distinct lengths, the same batches every
    epoch), and the order they are trained in is shuffled anew each epoch, reproducibly from (seed, epoch)."""
    from training.data import Example, bucket_batches

    examples = [Example(f"p{i}", " ".join(["w"] * (i + 1)), "t", i + 1) for i in range(12)]
    epochs = [bucket_batches(examples, 2, seed=0, epoch=e) for e in range(4)]
    buckets = sorted(sorted(b) for b in epochs[0])
    assert buckets == [[i, i + 1] for i in range(0, 12, 2)]
    assert all(sorted(sorted(b) for b in batches) == buckets for batches in epochs)
    assert all(epochs[e] != epochs[e + 1] for e in range(3)), epochs  # a new order each epoch
    assert bucket_batches(examples, 2, seed=0, epoch=2) == epochs[2]  # the same order for the same epoch


# ---- phi edge cases, and the examples a manifest gives ------------------------------------------------


def test_phi_refuses_a_source_without_units():
    with pytest.raises(ValueError, match="at least one source unit"):
        sample_phi(0, 3, torch.Generator().manual_seed(0))


def test_token_phi_draws_one_value_per_word_even_when_the_first_token_opens_no_word():
    from training.phi import word_index

    word_start = torch.tensor([True, False, True, False])  # tokens 0 and 2 open a word, 1 and 3 continue one
    ids = [1, 0, 2, 3, 2]  # the first token (a continuation, e.g. after a prefix) still opens word 0
    assert word_index(ids, word_start).tolist() == [0, 1, 2, 2, 3]
    phi = sample_token_phi(9, ids, word_start, torch.Generator().manual_seed(5))
    per_word = sample_phi(9, 4, torch.Generator().manual_seed(5))
    assert phi.tolist() == per_word[[0, 1, 2, 2, 3]].tolist()


def test_load_examples_keeps_rows_exactly_at_each_limit(tmp_path):
    from training.corpus.manifest import Row, write_manifest
    from training.data import load_examples

    sf.write(tmp_path / "one.wav", np.zeros(16000, dtype=np.float32), 16000)
    write_manifest(tmp_path / "s.tsv", [Row("s", str(tmp_path / "one.wav"), 16000, "a b", "c d")])
    assert [e.id for e in load_examples(tmp_path / "s.tsv", "speech", 1.0, 200, False)] == ["s"]  # 1 s of 1 s
    with pytest.raises(ValueError, match=r"1\.0 s of audio, more than max_source_seconds=0.99"):
        load_examples(tmp_path / "s.tsv", "speech", 0.99, 200, False)
    write_manifest(tmp_path / "t.tsv", [Row("t", "", 0, "one two three", "eins zwei drei")])
    capacity = (lambda words: len(words) + 3, 6)  # three words: six embeddings, as many as the group holds
    assert len(load_examples(tmp_path / "t.tsv", "text", 30, 3, False, text_capacity=capacity)) == 1
    write_manifest(tmp_path / "t4.tsv", [Row("t4", "", 0, "one two three four", "eins zwei drei vier")])
    with pytest.raises(ValueError, match="are 7 tokens, more than the model's source capacity of 6"):
        load_examples(tmp_path / "t4.tsv", "text", 30, 200, False, text_capacity=capacity)
    with pytest.raises(ValueError, match="3 source words, more than max_source_words=2"):
        load_examples(tmp_path / "t.tsv", "text", 30, 2, False)


def test_a_slice_that_starts_past_the_end_of_its_file_is_refused_at_load_naming_its_line(tmp_path):
    from training.corpus.manifest import Row, write_manifest
    from training.data import load_examples

    sf.write(tmp_path / "a.wav", np.zeros(8000, dtype=np.int16), 16000, subtype="PCM_16")
    write_manifest(tmp_path / "m.tsv", [Row("ok", str(tmp_path / "a.wav"), 8000, "a b", "c d"),
                                        Row("late", f"{tmp_path / 'a.wav'}:20000:100", 100, "a b", "c d")])  # fmt: skip
    with pytest.raises(ValueError, match=r"m\.tsv:3: example late"):
        load_examples(tmp_path / "m.tsv", "speech", 30, 200, False)


def test_bucket_batches_group_examples_of_similar_length_whatever_the_manifest_order():
    from training.data import Example, bucket_batches

    lengths = [5, 1, 6, 2, 4, 3]
    examples = [Example(f"p{i}", "w", "t", n) for i, n in enumerate(lengths)]
    batches = bucket_batches(examples, 2, seed=0, epoch=0)
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [[1, 2], [3, 4], [5, 6]]


def test_the_encoder_cache_is_not_reused_for_an_audio_file_replaced_since(tmp_path):
    from training.data import Example, SourceUnits

    model = tiny_model("speech")
    path = tmp_path / "a.wav"
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32), 16000)
    units = SourceUnits(model, tmp_path / "cache", encoder_trained=False)
    example = Example("a", str(path), "t", 8000)
    before = units.frames(example)
    sf.write(path, (0.1 * np.random.default_rng(1).standard_normal(12000)).astype(np.float32), 16000)  # rebuilt
    after = units.frames(example)
    assert after.shape != before.shape
    assert torch.equal(after, units.frames(example))  # the new entry is cached in its turn


def test_runs_with_another_block_size_sharing_an_encoder_cache_never_read_each_others_frames(tmp_path):
    """``encoder_cache`` may name one folder for several runs: the same weights at another block size give other
    frames (the block-causal mask differs), so their entries must not be shared."""
    from training.data import Example, SourceUnits

    path = tmp_path / "a.wav"
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(24000)).astype(np.float32), 16000)
    example = Example("a", str(path), "t", 24000)
    for block_ms in (320, 640):
        model = tiny_model("speech", block_ms=block_ms)
        cached = SourceUnits(model, tmp_path / "shared", encoder_trained=False).frames(example)
        assert torch.equal(cached, SourceUnits(model, None, encoder_trained=False).frames(example))
