"""`make demo`'s model step: reuse a trained checkpoint, else train, starting from the text model if present."""

from pathlib import Path
from types import SimpleNamespace

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


def _demo_with_fakes(tmp_path, monkeypatch, rows: list[dict], errors: list[str], dev: int = 2) -> dict:
    """``demo.main``'s steps faked (assets, corpus, model, SimulEval files, the sweep, the plot); -> what they saw."""
    import simul_agents.sweep
    import speech_frontend.assets
    import training.corpus

    seen: dict = {"plots": 0}
    counts = {"train": 10, "dev": dev, "test": 4}
    monkeypatch.setattr(speech_frontend.assets, "build_assets", lambda names: [])
    monkeypatch.setattr(training.corpus, "build_offline_corpus",
                        lambda data, max_utterances: SimpleNamespace(counts=counts, made=0, reused=16))  # fmt: skip
    monkeypatch.setattr(demo, "BENCH_CHECKPOINT", tmp_path / "no-bench-model")
    monkeypatch.setattr(demo, "train_or_reuse", lambda out, data, steps, with_dev: seen.update(with_dev=with_dev)
                        or tmp_path / "model")  # fmt: skip
    monkeypatch.setattr(training.corpus, "write_simuleval_files", lambda tsv, out, max_utterances, seed: seen.update(
        utterances=max_utterances) or SimpleNamespace(source="s.txt", target="t.txt"))  # fmt: skip
    monkeypatch.setattr(simul_agents.sweep, "sweep",
                        lambda config, jobs, redo: seen.update(redo=redo) or (rows, errors))  # fmt: skip
    monkeypatch.setattr(simul_agents.sweep, "plot", lambda rows, path, title: seen.update(plots=seen["plots"] + 1))
    clock = iter([0.0] + [150.0] * 100)  # the start, then 2.5 minutes later
    monkeypatch.setattr(demo, "time", SimpleNamespace(time=lambda: next(clock)))
    return seen


def _row(head: str, param: str, laal: float) -> dict:
    return {"task": "demo", "head": head, "param": param, "BLEU": 1.5, "chrF": 20.25, "LAAL": laal, "AL": laal,
            "n_instances": 4, "latency_unit": "ms"}  # fmt: skip


def test_demo_prints_its_table_by_head_in_whole_milliseconds_and_the_minutes_it_took(tmp_path, monkeypatch, capsys):
    rows = [_row("wait-k", "k=1", 1074.0), _row("entropy", "threshold=2.0", 1848.4)]
    seen = _demo_with_fakes(tmp_path, monkeypatch, rows, [])
    assert demo.main(["--out", str(tmp_path / "out"), "--data", str(tmp_path / "data"), "--test", "4"]) == 0
    out = capsys.readouterr().out
    table = out.split("5/5 results")[1]
    assert table.index("threshold=2.0") < table.index("k=1")  # sorted by head
    assert "     1848" in table and "1848.40" not in table and "    20.25" in table
    assert "took 2.5 min" in out
    assert seen["plots"] == 1 and (tmp_path / "out" / "eval" / "sweep.md").is_file()


def test_demo_evaluates_the_test_utterances_asked_and_redoes_runs_of_another_model(tmp_path, monkeypatch):
    seen = _demo_with_fakes(tmp_path, monkeypatch, [_row("offline", "-", 2300.0)], [], dev=0)
    assert demo.main(["--out", str(tmp_path / "out"), "--data", str(tmp_path / "data"), "--test", "4"]) == 0
    assert seen["utterances"] == 4 and seen["redo"] is True
    assert seen["with_dev"] is False  # a corpus without a dev split: no dev evaluation in training


def test_demo_with_failed_runs_and_none_finished_exits_1_names_them_and_draws_no_plot(tmp_path, monkeypatch, capsys):
    seen = _demo_with_fakes(tmp_path, monkeypatch, [], ["wait-k k=1: out of memory"])
    assert demo.main(["--out", str(tmp_path / "out"), "--data", str(tmp_path / "data")]) == 1
    captured = capsys.readouterr()
    assert "failed run: wait-k k=1: out of memory" in captured.err
    assert seen["plots"] == 0 and "plot:  none (no run finished)" in captured.out


def test_demo_prefers_the_bench_model_to_one_it_trained_before(tmp_path, monkeypatch):
    seen = _capture_training(monkeypatch, tmp_path)
    save_checkpoint(tiny_model("speech"), tmp_path / "bench-model")
    save_checkpoint(tiny_model("speech"), tmp_path / "out" / "train" / "final")
    monkeypatch.setattr(demo, "BENCH_CHECKPOINT", tmp_path / "bench-model")
    assert demo.train_or_reuse(tmp_path / "out", tmp_path / "data", steps=10) == tmp_path / "bench-model"
    assert seen == []


def test_demo_training_without_a_dev_split_has_no_dev_manifest(tmp_path, monkeypatch):
    seen = _capture_training(monkeypatch, tmp_path)
    monkeypatch.setattr(demo, "TEXT_CHECKPOINT", tmp_path / "missing")
    demo.train_or_reuse(tmp_path / "out", tmp_path / "data", steps=10, with_dev=False)
    demo.train_or_reuse(tmp_path / "out", tmp_path / "data", steps=10)
    assert [cfg.dev_manifest for cfg in seen] == ["", str(tmp_path / "data" / "dev.tsv")]


def test_demo_says_it_uses_the_bench_model_when_there_is_one(tmp_path, monkeypatch, capsys):
    import speech_frontend.assets

    monkeypatch.setattr(speech_frontend.assets, "build_assets", lambda names: ["stop here"])  # the plan only
    monkeypatch.setattr(demo, "BENCH_CHECKPOINT", tmp_path / "bench-model")
    assert demo.main([]) == 1
    assert "trains 100 steps" in capsys.readouterr().out
    save_checkpoint(tiny_model("speech"), tmp_path / "bench-model")
    assert demo.main([]) == 1
    out = capsys.readouterr().out
    assert f"uses the trained model of `make bench` ({tmp_path / 'bench-model'}" in out and "trains" not in out


def test_demo_finds_the_repositorys_bench_model_from_any_working_folder(tmp_path, monkeypatch):
    import training.train

    monkeypatch.setattr(training.train, "train", lambda cfg, resume: pytest.fail("the demo trained a model"))
    monkeypatch.chdir(tmp_path)  # `python -m simul_agents.demo` started outside the repository
    assert demo.train_or_reuse(Path("out"), Path("data"), steps=10) == demo.ROOT / "results" / "speech" / "model"
    monkeypatch.chdir(demo.ROOT)  # from the repository, the path a user there would type
    assert demo.train_or_reuse(Path("out"), Path("data"), steps=10) == Path("results/speech/model")
