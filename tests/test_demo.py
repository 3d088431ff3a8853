"""`make demo`'s model step: reuse a trained checkpoint, else train, starting from the text model if present."""

from pathlib import Path

import pytest

from simul_agents import demo
from streaming_llm.checkpoint import save_checkpoint
from streaming_llm.tiny import tiny_model


def _capture_training(monkeypatch, tmp_path):
    import training.train

    seen = []
    monkeypatch.setattr(training.train, "train", lambda cfg, resume: seen.append(cfg) or Path(cfg.out_dir) / "final")
    monkeypatch.setattr(demo, "BENCH_CHECKPOINT", tmp_path / "no-bench-model")
    return seen


def test_demo_training_starts_from_the_text_model_when_there_is_one(tmp_path, monkeypatch):
    seen = _capture_training(monkeypatch, tmp_path)
    save_checkpoint(tiny_model("text"), tmp_path / "text-model")
    monkeypatch.setattr(demo, "TEXT_CHECKPOINT", tmp_path / "text-model")
    demo.train_or_reuse(tmp_path / "out", tmp_path / "data", steps=10)
    assert seen[0].init_llm == str(tmp_path / "text-model") and seen[0].max_steps == 10


def test_demo_training_starts_from_the_base_llm_without_a_text_model(tmp_path, monkeypatch):
    seen = _capture_training(monkeypatch, tmp_path)
    monkeypatch.setattr(demo, "TEXT_CHECKPOINT", tmp_path / "missing")
    demo.train_or_reuse(tmp_path / "out", tmp_path / "data", steps=10)
    assert seen[0].init_llm == ""


def test_demo_reuses_a_bench_checkpoint_without_training(tmp_path, monkeypatch):
    seen = _capture_training(monkeypatch, tmp_path)
    save_checkpoint(tiny_model("speech"), tmp_path / "bench-model")
    monkeypatch.setattr(demo, "BENCH_CHECKPOINT", tmp_path / "bench-model")
    assert demo.train_or_reuse(tmp_path / "out", tmp_path / "data", steps=10) == tmp_path / "bench-model"
    assert seen == []


def test_demo_refuses_counts_under_one_and_a_file_as_a_folder(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("", encoding="utf-8")
    for argv, problem in [(["--test", "0"], "--test 0: each count must be at least 1"),
                          (["--out", str(a_file)], "a file, not a folder")]:  # fmt: skip
        with pytest.raises(SystemExit):
            demo.main(argv)
        assert problem in capsys.readouterr().err


def test_demo_states_the_evaluation_time_for_the_utterances_it_evaluates(monkeypatch, capsys):
    import speech_frontend.assets

    monkeypatch.setattr(speech_frontend.assets, "build_assets", lambda names: ["stop here"])  # the plan only
    for test, minutes in (("24", "(4 to 10 min on 2 cores)"), ("240", "(40 to 100 min on 2 cores)")):
        assert demo.main(["--test", test]) == 1
        assert f"7 SimulEval evaluations on {test} test utterances {minutes}" in capsys.readouterr().out
