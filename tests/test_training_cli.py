"""The trainer's boundary: a user's mistake stops the run before any work, with one line that says what was wrong
and what to do, and leaves no run folder behind; --resume continues the saved run or says why it cannot."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from fixtures_training import MANIFEST, ROOT, TINY_TEXT, tiny_cfg

import training.train as trainer
from training.config import load_config, parse_overrides
from training.corpus.manifest import MANIFEST_COLUMNS
from training.phi import sample_phi
from training.train import build_training_model, main, train

TINY_SPEECH = ROOT / "training" / "configs" / "tiny_speech.yaml"


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(("error:", "interrupted:"))]


def run_cli(tmp_path, *settings: str) -> int:
    return main(["--config", str(TINY_TEXT), f"out_dir={tmp_path / 'run'}", f"train_manifest={MANIFEST}",
                 "dev_manifest=", "eval_every=1000", *settings])  # fmt: skip


# ---- settings refused when the config is read ------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["w_full=0", "w_mslm=0", "spsd_lambda=0", "probe=false"], "nothing to train; give one of the loss weights"),
        (["lr=nan"], "lr=nan: must be a finite number"),
        (["lr=inf"], "lr=inf: must be a finite number"),
        (["phi_skew=-inf"], "phi_skew=-inf: must be a finite number"),
        (["lora_r=0", "train_llm=lora"], "lora_r=0 with train_llm=lora: a LoRA of rank 0 trains nothing"),
        (["probe_hidden=0"], "probe=true with probe_hidden=0: a model without a probe MLP cannot train one"),
        (["out_dir="], "out_dir is empty: give out_dir=PATH"),
        (["max_target_tokens=0"], "max_target_tokens=0: each of"),
    ],
)
def test_the_config_refuses_settings_that_cannot_train_by_name(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_config(TINY_TEXT, parse_overrides(overrides))


def test_a_lora_rank_of_zero_is_fine_when_nothing_uses_lora():
    assert load_config(TINY_TEXT, {"lora_r": 0, "train_llm": "full"}).lora_r == 0


def test_an_extreme_phi_skew_draws_a_valid_schedule_instead_of_crashing():
    late = sample_phi(10, 3, torch.Generator().manual_seed(0), skew=1e9)  # every unit read after the last word
    early = sample_phi(10, 3, torch.Generator().manual_seed(0), skew=-1e9)  # every unit read before the first
    assert late.tolist() == [0, 0, 10] and early.tolist() == [10, 10, 10]


# ---- refused before training starts, with no run folder left -------------------------------------------------


def test_a_run_without_train_manifest_refuses_and_leaves_no_out_dir(tmp_path, capsys, monkeypatch):
    assert main(["--config", str(TINY_SPEECH), f"out_dir={tmp_path / 'run'}"]) == 1
    assert error_lines(capsys) == [
        "error: train_manifest is not set: give train_manifest=PATH (a TSV from python -m training.corpus)"
    ]
    assert not (tmp_path / "run").exists()
    monkeypatch.chdir(tmp_path)  # no --config at all: the default out_dir, runs/default, is not made either
    assert main([]) == 1
    assert "train_manifest is not set" in error_lines(capsys)[0] and not (tmp_path / "runs").exists()


def test_torchrun_refuses_a_batch_size_or_a_manifest_under_its_world_size(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "init_distributed", lambda: (0, 2))  # what torchrun --nproc_per_node 2 gives
    with pytest.raises(ValueError, match=r"batch_size=1 is under the 2 processes of torchrun.*give batch_size >= 2"):
        train(tiny_cfg(tmp_path, batch_size=1))
    one_row = tmp_path / "one.tsv"
    one_row.write_text("".join(MANIFEST.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"one.tsv: 1 usable examples, under the 2 processes.*--nproc_per_node 1"):
        train(tiny_cfg(tmp_path, batch_size=2, train_manifest=str(one_row)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["empty-folder", "a-file", "not-a-causal-lm"])
def test_an_llm_that_is_not_a_causal_lm_checkpoint_is_one_line_saying_what_to_pass(tmp_path, capsys, kind):
    folder = tmp_path / "model"
    folder.mkdir()
    if kind == "a-file":  # llm=asset:whisper-base names whisper's model.pt
        folder = folder / "model.pt"
        folder.write_bytes(b"a whisper checkpoint")
    if kind == "not-a-causal-lm":
        (folder / "config.json").write_text(json.dumps({"model_type": "vit"}), encoding="utf-8")
        (folder / "model.safetensors").write_bytes(b"")
    assert run_cli(tmp_path, f"llm={folder}") == 1
    (line,) = error_lines(capsys)
    assert f"llm={folder}: {folder} is not a causal LM checkpoint" in line and "pass llm=tiny" in line, line
    assert not (tmp_path / "run").exists()


def test_llm_weights_that_do_not_load_are_one_line_naming_the_setting(tmp_path, capsys):
    from streaming_llm.tiny import tiny_model

    folder = tmp_path / "model"
    llm = tiny_model("text").llm
    llm.save_pretrained(folder)
    tiny_model("text").tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"cut off")
    assert run_cli(tmp_path, f"llm={folder}") == 1
    (line,) = error_lines(capsys)
    assert f"llm={folder}: the weights do not load (" in line, line


def test_lora_targets_that_name_no_layer_are_refused_listing_the_layers(tmp_path):
    cfg = tiny_cfg(tmp_path, train_llm="lora", lora_targets="q_proj,foo")
    with pytest.raises(ValueError, match=r"lora_targets: foo is not among this LLM's layers; its layers are .*v_proj"):
        build_training_model(cfg)
    model = build_training_model(tiny_cfg(tmp_path, train_llm="lora", lora_targets="self_attn.q_proj"))
    assert any("lora_" in name for name, _ in model.named_parameters())  # a dotted name is a layer too


# ---- out_dir and --resume ------------------------------------------------------------------------------------


def test_a_new_run_refuses_an_out_dir_that_holds_another_runs_checkpoints(tmp_path):
    train(tiny_cfg(tmp_path, max_steps=4, save_every=2, keep_last=1))
    out = tmp_path / "run"
    log = (out / "log.jsonl").read_text()
    with pytest.raises(ValueError, match=r"run already holds checkpoints up to step 4 \(another run\); pass --resume"):
        train(tiny_cfg(tmp_path, max_steps=2, save_every=1, keep_last=1))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000004"]  # nothing deleted or cut
    assert (out / "log.jsonl").read_text() == log
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(ValueError, match="run already holds a final model"):
        train(tiny_cfg(tmp_path, max_steps=2))


def test_resume_refuses_changed_settings_naming_each_with_its_old_and_new_value(tmp_path):
    train(tiny_cfg(tmp_path, max_steps=2, save_every=2))
    with pytest.raises(ValueError, match=r"other settings: lr 0.003 -> 0.1, batch_size 4 -> 2, seed 0 -> 5; "):
        train(tiny_cfg(tmp_path, max_steps=4, batch_size=2, seed=5, lr=0.1), resume=True)
    with pytest.raises(ValueError, match="other settings: probe_hidden 16 -> 32;"):
        train(tiny_cfg(tmp_path, max_steps=4, probe_hidden=32), resume=True)
    with pytest.raises(ValueError, match=r"max_steps=1 is under step 2, where .*step-0000002 stands"):
        train(tiny_cfg(tmp_path, max_steps=1), resume=True)
    # what may change: the length, when it saves and evaluates, how many checkpoints it keeps
    train(tiny_cfg(tmp_path, max_steps=4, save_every=1, keep_last=1, eval_every=3), resume=True)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000004"]


def test_resume_of_a_lora_run_refuses_another_train_llm_before_the_optimizer_sees_it(tmp_path, capsys):
    assert run_cli(tmp_path, "train_llm=lora", "max_steps=2", "save_every=2") == 0
    assert run_cli(tmp_path, "train_llm=none", "max_steps=4", "--resume") == 1
    (line,) = error_lines(capsys)
    assert "other settings: train_llm 'lora' -> 'none'" in line, line


# ---- audio --------------------------------------------------------------------------------------------------


ROWS = [("ok1", "ok.wav"), ("bad1", "corrupt.flac"), None, ("nan1", "nan.wav"), ("ok2", "ok.wav")]


def speech_rows(folder: Path, rows=ROWS) -> Path:
    """A manifest of (id, file) rows (None: a blank line): good audio, an undecodable file, a float file with a NaN."""
    rng = np.random.default_rng(0)
    sf.write(folder / "ok.wav", (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
    (folder / "corrupt.flac").write_bytes(b"fLaC" + b"\x00not audio" * 50)
    nan = np.zeros(8000, np.float32)
    nan[100] = np.nan
    sf.write(folder / "nan.wav", nan, 16000, subtype="FLOAT")
    lines = ["\t".join(MANIFEST_COLUMNS)]
    lines += ["" if r is None else f"{r[0]}\t{folder / r[1]}\t8000\tHello there .\tHallo .\t" for r in rows]
    (folder / "m.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "m.tsv"


def speech_cfg(tmp_path, manifest: Path, **overrides):
    over = {"out_dir": str(tmp_path / "run"), "train_manifest": str(manifest), "dev_manifest": "", "max_steps": 2,
            "encoder_cache": "none", **overrides}  # fmt: skip
    return load_config(TINY_SPEECH, over)


def test_undecodable_audio_is_refused_before_any_step_naming_the_manifest_line(tmp_path):
    manifest = speech_rows(tmp_path)
    with pytest.raises(ValueError, match=rf"{manifest}:3: example bad1: .*corrupt.flac: cannot be decoded as audio"):
        train(speech_cfg(tmp_path, manifest))
    assert not (tmp_path / "run").exists()  # stopped before any work
    manifest = speech_rows(tmp_path, [("ok1", "ok.wav"), ("nan1", "nan.wav")])
    with pytest.raises(ValueError, match=rf"{manifest}:3: example nan1: .*nan.wav: 1 NaN or Inf samples"):
        train(speech_cfg(tmp_path, manifest))


def test_skip_bad_skips_undecodable_and_nan_audio_at_load_time_and_counts_them(tmp_path, caplog):
    manifest = speech_rows(tmp_path)
    with caplog.at_level(logging.WARNING, logger="training"):
        train(speech_cfg(tmp_path, manifest, skip_bad=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{manifest}:3: example bad1" in w and "cannot be decoded" in w for w in warnings), warnings
    assert any(f"{manifest}:5: example nan1" in w and "NaN" in w for w in warnings), warnings
    assert f"{manifest}: skipped 2 bad rows of 4" in warnings


def test_audio_that_breaks_after_loading_names_its_manifest_line(tmp_path):
    from training.data import SourceUnits, load_examples

    manifest = speech_rows(tmp_path)
    examples = load_examples(manifest, "speech", 30, 200, skip_bad=True)
    (tmp_path / "ok.wav").write_bytes(b"")  # the file broke during the run
    model = build_training_model(speech_cfg(tmp_path, manifest))
    with pytest.raises(ValueError, match=rf"{manifest}:2: example ok1: .*ok.wav: empty file"):
        SourceUnits(model, None, encoder_trained=False)(examples[0])


# ---- Ctrl-C -------------------------------------------------------------------------------------------------


def test_ctrl_c_is_one_line_naming_the_last_checkpoint_and_resume(tmp_path, capsys, monkeypatch):
    real = trainer.save_training_checkpoint

    def save_then_interrupt(root, step, *args):
        path = real(root, step, *args)
        if step == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises, here right after step 2's checkpoint
        return path

    monkeypatch.setattr(trainer, "save_training_checkpoint", save_then_interrupt)
    try:
        code = run_cli(tmp_path, "max_steps=6", "save_every=1")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left main() as a KeyboardInterrupt traceback")
    assert code == 130
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    assert error_lines(capsys) == [
        f"interrupted: the last checkpoint is {checkpoint} (step 2); the same command with --resume continues it"
    ]
    monkeypatch.setattr(trainer, "train", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run_cli(tmp_path / "other", "max_steps=6") == 130
    assert "no checkpoint was written" in error_lines(capsys)[0]


def test_skip_bad_counts_the_lines_the_manifest_reader_left_out_in_the_total(tmp_path, caplog):
    from training.data import load_examples

    manifest = tmp_path / "text.tsv"
    lines = ["\t".join(MANIFEST_COLUMNS), "a\t\t0\tHello there .\tHallo .\t", "b\tonly three\tfields",
             "c\t\t0\tGood night .\tGute Nacht .\t", "d\t\t0\tNo target .\t \t"]  # fmt: skip
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="training"):
        examples = load_examples(manifest, "text", 30.0, 200, skip_bad=True)
    assert [e.id for e in examples] == ["a", "c"]
    assert f"{manifest}: skipped 2 bad rows of 4" in [r.getMessage() for r in caplog.records]


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "training/config.py" in out
    for setting in ("max_steps=1000", "spsd_topk=100", "probe=true", "lora_targets=q_proj,k_proj", "train_manifest="):
        assert setting in out


@pytest.mark.parametrize(
    ("override", "value"),
    [
        ("prompt=Translate to German. English:", "Translate to German. English:"),  # YAML: a mapping
        ("prompt=Translate #1", "Translate #1"),  # YAML: a comment
        ("out_dir=runs/0755", "runs/0755"),
        ("out_dir=0755", "0755"),  # YAML 1.1: the octal number 493
        ("target_prefix=yes", "yes"),  # YAML 1.1: True
        ('prompt="English:\\n"', "English:\n"),  # quoted: YAML's string, escapes and all
        ("init_llm=null", ""),
        ("dev_manifest=", ""),
    ],
)
def test_a_text_setting_takes_its_value_as_written(override, value):
    key = override.split("=", 1)[0]
    assert getattr(load_config(TINY_TEXT, parse_overrides([override])), key) == value


def test_a_text_row_of_more_tokens_than_the_source_group_holds_is_refused_at_load_naming_its_line(tmp_path):
    rows = (ROOT / "tests/data/tiny_text.tsv").read_text(encoding="utf-8").splitlines()
    long = " ".join("qx7zj9kv3wy" * 3 for _ in range(20))  # 20 words, ~600 tokens: under max_source_words=200
    rows.append(f"long\t\t0\t{long}\tLang.\t")
    (tmp_path / "m.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    over = {"out_dir": str(tmp_path / "run"), "train_manifest": str(tmp_path / "m.tsv"), "dev_manifest": "",
            "max_steps": 1}  # fmt: skip
    with pytest.raises(ValueError, match=r"m\.tsv:10 \(id long\): its 20 source words are \d+ tokens, more than"):
        trainer.train(load_config(TINY_TEXT, over))
    assert not (tmp_path / "run").exists()
    trainer.train(load_config(TINY_TEXT, {**over, "skip_bad": True}))  # skipped and counted, not a crash at its step


def test_the_probe_command_refuses_a_speech_row_longer_than_one_session_before_any_folder(tmp_path):
    import training.probe as P
    from streaming_llm.checkpoint import save_checkpoint
    from streaming_llm.tiny import tiny_model
    from training.corpus.manifest import Row, write_manifest

    audio = np.zeros(int(16000 * 29.8), dtype=np.float32)  # under max_source_seconds=30, over one session's 29.44 s
    sf.write(tmp_path / "long.wav", audio, 16000)
    write_manifest(tmp_path / "m.tsv", [Row("long", str(tmp_path / "long.wav"), len(audio), "Long.", "Lang.")])
    folder = save_checkpoint(tiny_model("speech", block_ms=640), tmp_path / "model",
                             extra={"train_config": {"max_source_seconds": 30.0}})  # fmt: skip
    with pytest.raises(ValueError, match=r"m\.tsv:2 \(id long\): 29\.8 s of audio, more than max_source_seconds=29\.4"):
        P.run(folder, tmp_path / "out", P.ProbeConfig(examples=1, dev_examples=0), manifest=str(tmp_path / "m.tsv"))
    assert not (tmp_path / "out").exists()
