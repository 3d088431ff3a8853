"""Sweeps: runs, resumption, shards, the CSV, the table and the plot, on a tiny text model."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from simul_agents.sweep import SweepConfig, SweepError, expand_runs, load_config, main, shard_ranges
from streaming_llm.checkpoint import build_model, save_checkpoint
from streaming_llm.tiny import tiny_config, tiny_tokenizer

SENTENCES = ["I would like a cup of coffee .", "Where is the train station ?", "Thank you .", "We are going home ."]
REFERENCES = ["Ich möchte eine Tasse Kaffee .", "Wo ist der Bahnhof ?", "Danke .", "Wir gehen nach Hause ."]
COLUMNS = ["task", "head", "param", "BLEU", "chrF", "AL", "LAAL", "DAL", "AP", "ATD", "AL_CA", "LAAL_CA", "RCO", "AIL",
           "n_instances", "mean_source_length"]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    config = tiny_config("text")
    config = config.replace(llm_config={**config.llm_config, "tie_word_embeddings": False})
    torch.manual_seed(0)
    save_checkpoint(build_model(config, tiny_tokenizer()).eval(), root / "ckpt")
    torch.manual_seed(1)
    save_checkpoint(build_model(config, tiny_tokenizer()).eval(), root / "other-ckpt")  # another training
    (root / "source.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    (root / "target.txt").write_text("\n".join(REFERENCES) + "\n", encoding="utf-8")
    return root


def write_config(root, path, **changes):
    config = {
        "task": "tiny-text", "checkpoint": str(root / "ckpt"), "source": str(root / "source.txt"),
        "target": str(root / "target.txt"), "output": str(path.parent / "runs"),
        "agent_args": {"max_len_a": 1, "max_len_b": 2, "max_target_tokens": 16, "threads": 1},
        "heads": {"wait-k": {"k": [2]}},
    }  # fmt: skip
    config.update(changes)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_csv_table_and_plot_and_resumes(setup, tmp_path, capsys):
    config = write_config(setup, tmp_path / "tiny.yaml")
    assert main([str(config)]) == 0
    runs = tmp_path / "runs"
    rows = read_csv(runs / "sweep.csv")
    assert [(r["head"], r["param"]) for r in rows] == [("wait-k", "k=2"), ("offline", "-")]  # offline added
    assert set(COLUMNS) <= set(rows[0])
    for row in rows:
        assert row["task"] == "tiny-text" and row["n_instances"] == "4" and row["AL_CA"] == ""
        assert float(row["mean_source_length"]) == pytest.approx(sum(len(s.split()) for s in SENTENCES) / 4)
    assert float(rows[0]["LAAL"]) < float(rows[1]["LAAL"])  # wait-2 lags less than the full-source decode
    png = runs / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "| wait-k | k=2 |" in (runs / "sweep.md").read_text()

    log = runs / "wait-k" / "k=2" / "instances.log"
    stamp = log.stat().st_mtime_ns
    assert main([str(config)]) == 0  # complete runs are not redone
    assert log.stat().st_mtime_ns == stamp
    assert read_csv(runs / "sweep.csv") == rows


def test_the_csv_grows_as_runs_finish(setup, tmp_path, monkeypatch):
    import simul_agents.sweep as sweep_module

    seen = []
    real = sweep_module.run_job_inprocess

    def spy(config, job, n):
        csv_path = tmp_path / "runs" / "sweep.csv"
        seen.append(len(read_csv(csv_path)) if csv_path.is_file() else 0)
        return real(config, job, n)

    monkeypatch.setattr(sweep_module, "run_job_inprocess", spy)
    config = write_config(setup, tmp_path / "tiny.yaml", heads={"wait-k": {"k": [1, 2]}, "offline": False})
    assert main([str(config)]) == 0
    assert seen == [0, 1]  # the first run was in the CSV before the second started


def test_shards_are_merged_by_index_and_equal_one_run(setup, tmp_path):
    heads = {"wait-k": {"k": [1]}, "offline": False}
    sharded = write_config(setup, tmp_path / "sharded.yaml", heads=heads, shards=3, output=str(tmp_path / "sharded"))
    assert main([str(sharded)]) == 0
    run = tmp_path / "sharded" / "wait-k" / "k=1"
    assert sorted(p.name for p in (run / "shards").iterdir()) == ["000000-000001", "000001-000003", "000003-000004"]
    merged = [json.loads(line) for line in (run / "instances.log").read_text().splitlines()]
    assert [ins["index"] for ins in merged] == [0, 1, 2, 3]
    single = write_config(setup, tmp_path / "single.yaml", heads=heads, output=str(tmp_path / "single"))
    assert main([str(single), "--shards", "1"]) == 0
    alone = [json.loads(line) for line in (tmp_path / "single" / "wait-k" / "k=1" / "instances.log").open()]
    assert [(i["prediction"], i["delays"]) for i in alone] == [(i["prediction"], i["delays"]) for i in merged]
    laal = [read_csv(tmp_path / name / "sweep.csv")[0]["LAAL"] for name in ("sharded", "single")]
    assert laal[0] == laal[1]


def test_merged_shards_keep_every_shard_s_instances_and_failures(tmp_path):
    """--skip-failed in a sharded run: each shard logs its own failures; the merged run counts them all."""
    from simul_agents.score import score_output
    from simul_agents.sweep import Job, Run, merge_shards

    run = Run("wait-k", (("k", 1),), "k=1", tmp_path / "wait-k" / "k=1")
    jobs = []
    for start, end in ((0, 2), (2, 4)):
        shard = run.output / "shards" / f"{start:06d}-{end:06d}"
        shard.mkdir(parents=True)
        rows = [{"index": i, "prediction": "", "delays": [], "reference": "r", "source_length": 3}
                for i in reversed(range(start, end))]  # fmt: skip
        (shard / "instances.log").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (shard / "config.yaml").write_text("source_type: text\ntarget_type: text\n", encoding="utf-8")
        (shard / "failed.jsonl").write_text(json.dumps({"index": start + 1, "error": "x"}) + "\n", encoding="utf-8")
        jobs.append(Job(run, start, end, shard))
    merge_shards(run, jobs)
    merged = [json.loads(line) for line in (run.output / "instances.log").read_text(encoding="utf-8").splitlines()]
    assert [ins["index"] for ins in merged] == [0, 1, 2, 3]
    assert score_output(run.output, write=False)["n_failed"] == 2


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_batched_sweep_gives_simulevals_runs(setup, tmp_path, jobs):
    """--batch 3: simul_agents.batch_eval in this process (--jobs 1) or as subprocesses; the same rows, no _CA."""
    heads = {"wait-k": {"k": [1]}, "entropy": {"threshold": [6.0]}, "offline": False}
    plain = write_config(setup, tmp_path / "plain.yaml", heads=heads, output=str(tmp_path / "plain"))
    batched = write_config(setup, tmp_path / "batched.yaml", heads=heads, output=str(tmp_path / "batched"), shards=2)
    assert main([str(plain)]) == 0
    assert main([str(batched), "--batch", "3", "--jobs", jobs]) == 0
    if jobs == "2":
        log = tmp_path / "batched" / "wait-k" / "k=1" / "shards" / "000000-000002" / "simuleval.log"
        assert "batched LM forwards" in log.read_text()
    want, got = read_csv(tmp_path / "plain" / "sweep.csv"), read_csv(tmp_path / "batched" / "sweep.csv")
    keys = ("head", "param", "BLEU", "chrF", "AL", "LAAL", "DAL", "AP", "n_instances")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]
    assert all(r["LAAL_CA"] == "" for r in got)


def test_a_killed_batched_shard_continues_with_the_instances_it_had_not_finished(setup, tmp_path):
    heads = {"wait-k": {"k": [1]}, "offline": False}
    config = write_config(setup, tmp_path / "batched.yaml", heads=heads, output=str(tmp_path / "out"), shards=2)
    assert main([str(config), "--batch", "3"]) == 0
    run = tmp_path / "out" / "wait-k" / "k=1"
    shard = run / "shards" / "000002-000004" / "instances.log"
    first = sorted((json.loads(line) for line in shard.read_text().splitlines()), key=lambda ins: ins["index"])
    shard.write_text(json.dumps({**first[0], "prediction": "KEPT"}) + "\n")  # killed after one instance
    (run / "instances.log").unlink()
    assert main([str(config), "--batch", "3"]) == 0
    merged = [json.loads(line) for line in (run / "instances.log").read_text().splitlines()]
    assert [ins["index"] for ins in merged] == [0, 1, 2, 3]
    assert merged[2]["prediction"] == "KEPT" and merged[3]["prediction"] == first[1]["prediction"]


@pytest.mark.slow
def test_parallel_jobs_run_simuleval_subprocesses(setup, tmp_path):
    """--jobs 2: SimulEval subprocesses through the real `--agent simul_agents/proactive_agent.py` path."""
    config = write_config(setup, tmp_path / "tiny.yaml", heads={"wait-k": {"k": [1]}, "offline": False}, shards=2)
    assert main([str(config), "--jobs", "2"]) == 0
    run = tmp_path / "runs" / "wait-k" / "k=1"
    assert (run / "shards" / "000000-000002" / "simuleval.log").is_file()
    merged = [json.loads(line) for line in (run / "instances.log").read_text().splitlines()]
    assert [ins["index"] for ins in merged] == [0, 1, 2, 3]
    assert read_csv(tmp_path / "runs" / "sweep.csv")[0]["n_instances"] == "4"


def test_config_errors_name_the_problem(setup, tmp_path):
    with pytest.raises(SweepError, match="unknown keys"):
        load_config(write_config(setup, tmp_path / "a.yaml", thresholds=[1]))
    with pytest.raises(SweepError, match="unknown head 'greedy'"):
        expand_runs(load_config(write_config(setup, tmp_path / "b.yaml", heads={"greedy": {}})))
    with pytest.raises(SweepError, match="heads.entropy: .*no parameter k"):
        expand_runs(load_config(write_config(setup, tmp_path / "c.yaml", heads={"entropy": {"k": [1]}})))
    (tmp_path / "d.yaml").write_text("task: x\n")
    with pytest.raises(SweepError, match="missing checkpoint, source, target, output, heads"):
        load_config(tmp_path / "d.yaml")
    bad_source = write_config(setup, tmp_path / "e.yaml", source=str(tmp_path / "none.txt"))
    assert main([str(bad_source)]) == 2


def test_a_badly_typed_config_an_empty_source_or_a_file_as_output_is_refused_before_any_run(setup, tmp_path, capsys):
    cases = {
        "heads must be a mapping": {"heads": ["entropy"]},
        "agent_args must be a mapping": {"agent_args": ["threads=1"]},
        "shards: 'two'; expected a whole number": {"shards": "two"},
        "batch: -4; expected a whole number": {"batch": -4},
        "threshold=None is not a valid float": {"heads": {"entropy": {"threshold": None}}},
    }
    for i, (message, change) in enumerate(cases.items()):
        with pytest.raises(SweepError, match=message.replace("(", r"\(")):
            expand_runs(load_config(write_config(setup, tmp_path / f"{i}.yaml", **change)))
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Grüße\n".encode("latin-1"))
    a_file = tmp_path / "a_file"
    a_file.write_text("", encoding="utf-8")
    for argv, message in [
        ([str(write_config(setup, tmp_path / "s.yaml", source=str(empty)))], "empty; a sweep needs at least one"),
        ([str(write_config(setup, tmp_path / "l.yaml", source=str(latin)))], "not UTF-8 text"),
        ([str(write_config(setup, tmp_path / "o.yaml")), "--output", str(a_file)], "a file, not a folder"),
        ([str(write_config(setup, tmp_path / "j.yaml")), "--jobs", "0"], "--jobs 0: at least 1"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_runs_and_shards():
    heads = {"attention": {"threshold": [0.5, 0.9], "frontier": 1}, "wait-k": {"k": 3}, "offline": {}}
    runs = expand_runs(SweepConfig("t", "ckpt", "s.txt", "t.txt", Path("out"), heads))
    assert [(r.head, r.label) for r in runs] == [("attention", "threshold=0.5"), ("attention", "threshold=0.9"),
                                                 ("wait-k", "-"), ("offline", "-")]  # fmt: skip
    assert dict(runs[0].params) == {"frontier": 1, "threshold": 0.5}
    assert runs[0].output == Path("out/attention/threshold=0.5")
    assert shard_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_ranges(2, 5) == [(0, 1), (1, 2)]
    assert shard_ranges(5, 1) == [(0, 5)]


def test_the_plot_gives_every_curve_its_own_colour_and_other_models_dashed_lines():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simul_agents.sweep import _plot_metric

    heads = ["offline", *(f"head{i}" for i in range(9)), "entropy (no-spsd)", "entropy (stream-0.3)"]
    rows = [{"head": h, "param": f"t={t}", "LAAL": float(t), "chrF": 20.0 + t, "latency_unit": "words"}
            for h in heads for t in (1, 2)]  # fmt: skip
    figure, axes = plt.subplots()
    _plot_metric(axes, rows, "chrF")
    curves = {line.get_label(): line for line in axes.get_lines() if not line.get_label().startswith("offline")}
    assert len(curves) == 11 and len({line.get_color() for line in curves.values()}) == 11
    assert curves["entropy (no-spsd)"].get_linestyle() == "--" and curves["head0"].get_linestyle() == "-"
    plt.close(figure)


def test_a_head_swept_in_blocks_gives_its_lag_bounded_runs_their_own_names_and_curve(setup, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simul_agents.sweep import _plot_metric, curve_name

    heads = {"entropy": [{"threshold": [1.0, 2.0]}, {"threshold": [2.0], "min_lag": 1, "max_lag": [3]},
                         {"threshold": 3.0, "min_lag": 2, "max_lag": 0}]}  # fmt: skip
    runs = expand_runs(load_config(write_config(setup, tmp_path / "blocks.yaml", heads=heads)))
    labels = [r.label for r in runs if r.head == "entropy"]
    assert labels == ["threshold=1.0", "threshold=2.0", "max_lag=3,min_lag=1,threshold=2.0", "min_lag=2"]  # key order
    assert [curve_name("entropy", label) for label in labels].count("entropy, lag-bounded") == 2
    with pytest.raises(SweepError, match="two settings give the same run entropy threshold=1.0"):
        expand_runs(load_config(write_config(setup, tmp_path / "twice.yaml",
                                             heads={"entropy": [{"threshold": [1.0]}, {"threshold": [1.0, 2.0]}]})))
    with pytest.raises(SweepError, match="heads.entropy must map parameter names"):
        load_config(write_config(setup, tmp_path / "bad.yaml", heads={"entropy": [{"threshold": [1.0]}, "k=3"]}))
    rows = [{"head": "entropy", "param": p, "LAAL": x, "chrF": 20.0 + x, "latency_unit": "words"}
            for p, x in (("threshold=1.0", 4.0), ("threshold=2.0", 3.0), ("threshold=3.0,min_lag=2,max_lag=4", 3.5))]
    figure, axes = plt.subplots()
    _plot_metric(axes, rows, "chrF")
    assert {line.get_label() for line in axes.get_lines()} == {"entropy", "entropy, lag-bounded"}
    assert "3.0 [2,4]" in {text.get_text() for text in axes.texts}
    plt.close(figure)


def test_rows_scored_before_len_ratio_existed_get_it_from_their_logs_and_keep_the_rest(tmp_path):
    from simul_agents.sweep import fill_len_ratio

    eval_dir = tmp_path / "eval-main"
    run = eval_dir / "wait-k" / "k=1"
    run.mkdir(parents=True)
    row = {"index": 0, "prediction": "a b c d", "reference": "a b", "source_length": 3, "delays": [1, 2, 3, 3]}
    (run / "instances.log").write_text(json.dumps(row) + "\n", encoding="utf-8")
    old = ["task,head,param,BLEU,chrF,LAAL,output", f"t,wait-k,k=1,12.5,40.0,1.5,{run}",
           f"t,wait-k,k=2,13.0,41.0,2.5,{eval_dir / 'wait-k' / 'k=2'}"]  # k=2: no log here, left as it is
    (eval_dir / "sweep.csv").write_text("\n".join(old) + "\n", encoding="utf-8")
    assert fill_len_ratio(eval_dir) == 1
    with open(eval_dir / "sweep.csv", newline="", encoding="utf-8") as f:
        first, second = csv.DictReader(f)
    assert float(first["len_ratio"]) == 2.0 and first["BLEU"] == "12.5" and first["LAAL"] == "1.5"
    assert second["len_ratio"] == "" and second["chrF"] == "41.0"
    assert fill_len_ratio(eval_dir) == 0  # filled once


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_a_run_made_under_other_settings_stops_the_sweep_before_any_run_until_redo(setup, tmp_path, capsys):
    heads = {"wait-k": {"k": [2]}, "attention": {"threshold": [0.5], "frontier": 1}, "offline": False}
    base = {"heads": heads, "output": str(tmp_path / "runs")}
    assert main([str(write_config(setup, tmp_path / "base.yaml", **base))]) == 0
    log = tmp_path / "runs" / "wait-k" / "k=2" / "instances.log"
    stamp = log.stat().st_mtime_ns
    other_source = tmp_path / "other-source.txt"
    other_source.write_text("\n".join(reversed(SENTENCES)) + "\n", encoding="utf-8")
    args = {"max_len_a": 1, "max_len_b": 2, "max_target_tokens": 16, "threads": 1}
    changes = {
        "checkpoint": ({"checkpoint": str(setup / "other-ckpt")}, "checkpoint {ckpt} -> {other}"),
        "agent flag": ({"agent_args": {**args, "hold_sentence_end": True}},
                       "agent_args.hold_sentence_end (unset) -> True"),
        "agent value": ({"agent_args": {**args, "max_target_tokens": 8}}, "agent_args.max_target_tokens 16 -> 8"),
        "source": ({"source": str(other_source)}, f"source {setup / 'source.txt'} -> {other_source}"),
        "fixed head parameter": ({"heads": {**heads, "attention": {"threshold": [0.5], "frontier": 2}}},
                                 "head_params.frontier 1 -> 2"),
    }  # fmt: skip
    for name, (change, want) in changes.items():
        config = str(write_config(setup, tmp_path / f"{name}.yaml", **{**base, **change}))
        capsys.readouterr()
        assert main([config]) == 2, name
        err = capsys.readouterr().err
        want = want.format(ckpt=setup / "ckpt", other=setup / "other-ckpt")
        assert len(error_lines(err)) == 1 and want in err and "--redo" in err, (name, err)
        assert main([config, "--dry-run"]) == 0
        assert "changed" in capsys.readouterr().out and log.stat().st_mtime_ns == stamp  # nothing ran
    threads = str(write_config(setup, tmp_path / "threads.yaml", **{**base, "agent_args": {**args, "threads": 2}}))
    assert main([threads]) == 0 and log.stat().st_mtime_ns == stamp  # threads: the speed, not the outputs
    other = str(write_config(setup, tmp_path / "checkpoint.yaml", **{**base, "checkpoint": str(setup / "other-ckpt")}))
    assert main([other, "--redo"]) == 0 and log.stat().st_mtime_ns != stamp
    stamp = log.stat().st_mtime_ns
    assert main([other]) == 0 and log.stat().st_mtime_ns == stamp  # redone under the new settings: done now


def test_a_run_from_before_the_records_counts_as_done_and_is_recorded_then(setup, tmp_path, capsys):
    """The bench's runs (and those it restores from results/) have an instances.log and no settings.json."""
    heads = {"wait-k": {"k": [2]}, "offline": False}
    first = write_config(setup, tmp_path / "first.yaml", heads=heads)
    assert main([str(first)]) == 0
    run = tmp_path / "runs" / "wait-k" / "k=2"
    (run / "settings.json").unlink()  # made before the records
    stamp = (run / "instances.log").stat().st_mtime_ns
    other = write_config(setup, tmp_path / "other.yaml", heads=heads, checkpoint=str(setup / "other-ckpt"))
    capsys.readouterr()
    assert main([str(other), "--dry-run"]) == 0 and " done " in capsys.readouterr().out
    assert not (run / "settings.json").exists()  # a dry run writes nothing
    assert main([str(other)]) == 0 and (run / "instances.log").stat().st_mtime_ns == stamp
    assert json.loads((run / "settings.json").read_text())["checkpoint"] == str(setup / "other-ckpt")
    assert main([str(first)]) == 2  # recorded now: a later change is caught
    assert f"checkpoint {setup / 'other-ckpt'} -> {setup / 'ckpt'}" in capsys.readouterr().err


def test_a_bad_checkpoint_target_or_agent_option_is_refused_in_one_line_before_any_run(setup, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("\n".join(REFERENCES[:3]) + "\n", encoding="utf-8")
    cases = {
        "checkpoint": ({"checkpoint": str(tmp_path / "nowhere")}, "nowhere: no such folder"),
        "not a checkpoint": ({"checkpoint": str(setup)}, "not a proactive-simulst checkpoint"),
        "target": ({"target": str(tmp_path / "none.txt")}, "none.txt: no such file"),
        "short target": ({"target": str(short)}, "3 lines, the source has 4; give one reference per source line"),
        "misspelt option": ({"agent_args": {"hold_sentence_ends": True}},
                            "agent_args.hold_sentence_ends: no such option of the agent or SimulEval; "
                            "did you mean hold_sentence_end?"),
        "bad value": ({"agent_args": {"max_len_a": "two"}}, "argument --max-len-a: invalid float value: 'two'"),
        "range": ({"agent_args": {"end_index": 2}}, "agent_args.end_index: the sweep sets this itself"),
        "head": ({"agent_args": {"head": "wait-k"}}, "agent_args.head: the sweep sets this itself"),
        "latency unit": ({"agent_args": {"eval_latency_unit": "char"}}, "agent_args.eval_latency_unit: char: the"),
    }  # fmt: skip
    for name, (change, message) in cases.items():
        output = tmp_path / name
        config = write_config(setup, tmp_path / f"{name}.yaml", output=str(output), **change)
        capsys.readouterr()
        assert main([str(config)]) == 2, name
        err = capsys.readouterr().err
        assert len(error_lines(err)) == 1 and message in error_lines(err)[0] and "usage:" not in err, (name, err)
        assert not output.exists(), name  # no run started
        assert main([str(config), "--dry-run"]) == 2, name


def test_the_sweep_scores_with_the_bleu_tokenizer_and_chrf_word_order_simuleval_was_given(setup, tmp_path):
    import pandas

    agent_args = {"max_len_a": 1, "max_len_b": 2, "max_target_tokens": 16, "threads": 1,
                  "sacrebleu_tokenizer": "char", "chrf_word_order": 2}  # fmt: skip
    config = write_config(setup, tmp_path / "tok.yaml", heads={"wait-k": {"k": [2]}, "offline": False},
                          agent_args=agent_args)  # fmt: skip
    assert main([str(config)]) == 0
    row = read_csv(tmp_path / "runs" / "sweep.csv")[0]
    theirs = pandas.read_csv(tmp_path / "runs" / "wait-k" / "k=2" / "scores.tsv", sep="\t").iloc[0]
    assert round(float(row["BLEU"]), 3) == pytest.approx(theirs["BLEU"]) and theirs["BLEU"] > 0
    assert round(float(row["chrF"]), 3) == pytest.approx(theirs["CHRF"])


def test_a_sweep_whose_every_run_failed_writes_no_plot_and_says_so(setup, tmp_path, capsys):
    args = {"max_target_tokens": 0, "threads": 1}  # parsed, then refused by the agent: each run fails
    config = write_config(setup, tmp_path / "failing.yaml", agent_args=args, heads={"wait-k": {"k": [2]}})
    assert main([str(config)]) == 1
    captured = capsys.readouterr()
    assert not (tmp_path / "runs" / "sweep.png").exists() and "sweep.png" not in captured.out
    assert "No run has finished." in captured.out and "Latency in ;" not in captured.out
    assert "FAILED wait-k k=2" in captured.err


def test_a_failed_subprocess_reports_its_log_without_known_noise(setup, tmp_path, monkeypatch):
    import simul_agents.sweep as sweep_module

    def fake_call(command, stdout, stderr, env):
        noise = "Couldn't find ffmpeg or avconv - defaulting to ffmpeg, but may not work"
        stdout.write(f"loading\nproactive_agent: error: --max-target-tokens must be >= 1\n"
                     f"/x/pydub/utils.py:170: RuntimeWarning: {noise}\n  warn(\"{noise}\", RuntimeWarning)\n\n")
        return 2

    monkeypatch.setattr(sweep_module.subprocess, "call", fake_call)
    config = load_config(write_config(setup, tmp_path / "tiny.yaml"))
    run = expand_runs(config)[0]
    error = sweep_module.run_job_subprocess(config, sweep_module.Job(run, 0, 4, tmp_path / "job"), 4, 1)
    assert error == "exit code 2: loading | proactive_agent: error: --max-target-tokens must be >= 1"


def test_a_lag_bound_written_as_zero_point_zero_is_off_and_a_spaced_value_is_refused(tmp_path):
    base = {"task": "t", "checkpoint": "c", "source": "s", "target": "t", "output": tmp_path / "o"}
    bounded = SweepConfig(**base, heads={"entropy": {"threshold": [1.0], "min_lag": 0.0}})
    assert [run.label for run in expand_runs(bounded)] == ["threshold=1.0"]
    spaced = SweepConfig(**base, heads={"attention": {"threshold": [0.5], "layers": "0, 1"}})
    with pytest.raises(SweepError, match="heads.attention.layers: '0, 1' holds a space"):
        expand_runs(spaced)


def test_an_empty_list_of_values_is_refused(setup, tmp_path):
    config = load_config(write_config(setup, tmp_path / "empty.yaml", heads={"entropy": {"threshold": []}}))
    with pytest.raises(SweepError, match=r"heads.entropy.threshold: an empty list; give at least one value"):
        expand_runs(config)


def _settings(**changes) -> dict:
    """A run's recorded settings (``sweep.run_settings``'s keys), with ``changes``."""
    return {"checkpoint": "ckpt", "checkpoint_sha256": "c", "source": "s.txt", "source_sha256": "s", "target": "t.txt",
            "target_sha256": "t", "source_segment_size": 320, "agent_args": {"max_len_a": "1"}, "head": "attention",
            "head_params": {"threshold": "0.5", "frontier": "1"}, **changes}  # fmt: skip


def test_a_changed_segment_size_or_a_head_parameter_left_out_counts_as_other_settings():
    from simul_agents.sweep import settings_changes

    assert settings_changes(_settings(), _settings(source_segment_size=160)) == ["source_segment_size 320 -> 160"]
    assert settings_changes(_settings(), _settings(head_params={"threshold": "0.5"})) == [
        "head_params.frontier 1 -> (unset)"]  # the head's default now


def test_a_sharded_run_killed_before_its_merge_has_results_and_an_empty_log_has_none(tmp_path):
    from simul_agents.sweep import SETTINGS, Run, changed_runs, has_results

    run = Run("attention", (("threshold", 0.5),), "threshold=0.5", tmp_path / "attention" / "threshold=0.5")
    shard = run.output / "shards" / "000000-000002"
    shard.mkdir(parents=True)
    (run.output / SETTINGS).write_text(json.dumps(_settings()), encoding="utf-8")
    (run.output / "instances.log").write_text("", encoding="utf-8")
    assert not has_results(run.output)
    (shard / "instances.log").write_text(json.dumps({"index": 0}) + "\n", encoding="utf-8")
    assert has_results(run.output)
    assert changed_runs({run: _settings(checkpoint_sha256="d")}) == {run: ["checkpoint ckpt: its content changed"]}


def test_a_count_of_zero_shards_is_refused(setup, tmp_path):
    with pytest.raises(SweepError, match="shards: 0; expected a whole number of at least 1"):
        load_config(write_config(setup, tmp_path / "zero.yaml", shards=0))


def test_a_target_with_more_lines_than_the_source_is_refused_before_any_run(setup, tmp_path, capsys):
    long = tmp_path / "long.txt"
    long.write_text("\n".join([*REFERENCES, "Noch eine ."]) + "\n", encoding="utf-8")
    config = write_config(setup, tmp_path / "long.yaml", target=str(long))
    assert main([str(config)]) == 2
    assert "5 lines, the source has 4" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_a_run_that_ended_without_error_but_left_instances_out_is_reported_failed(setup, tmp_path, monkeypatch, capsys):
    import simul_agents.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "run_job_inprocess", lambda config, job, n: None)  # wrote nothing, no error
    config = write_config(setup, tmp_path / "tiny.yaml", heads={"wait-k": {"k": [2]}, "offline": False})
    assert main([str(config)]) == 1
    err = capsys.readouterr().err
    assert "FAILED wait-k k=2: " in err and "does not hold every instance 0..3" in err


def test_a_failed_parallel_job_is_reported_with_its_log(setup, tmp_path, monkeypatch, capsys):
    import simul_agents.sweep as sweep_module

    def fake_call(command, stdout, stderr, env):
        stdout.write("proactive_agent: error: out of memory\n")
        return 3

    monkeypatch.setattr(sweep_module.subprocess, "call", fake_call)
    config = write_config(setup, tmp_path / "tiny.yaml", heads={"wait-k": {"k": [2]}, "offline": False})
    assert main([str(config), "--jobs", "2"]) == 1
    assert "FAILED wait-k k=2: exit code 3: proactive_agent: error: out of memory" in capsys.readouterr().err


def test_the_markdown_table_lists_every_run_and_marks_missing_values(tmp_path):
    from simul_agents.sweep import write_markdown

    rows = [{"head": "wait-k", "param": "k=2", "BLEU": 12.345, "LAAL": 1.5, "AL_CA": None, "latency_unit": "words"},
            {"head": "offline", "param": "-", "BLEU": 20.0, "LAAL": 7.25, "AL_CA": None, "latency_unit": "words"}]
    write_markdown(rows, tmp_path / "sweep.md")
    table = (tmp_path / "sweep.md").read_text(encoding="utf-8").splitlines()
    assert table[0].startswith("Latency in words;") and len(table) == 6
    assert table[4].startswith("| wait-k | k=2 | 12.35 | - |") and table[5].startswith("| offline | - | 20.00 |")


def test_shards_on_the_command_line_split_the_run_and_a_finished_run_is_not_split_again(setup, tmp_path):
    heads = {"wait-k": {"k": [1]}, "offline": False}
    config = str(write_config(setup, tmp_path / "tiny.yaml", heads=heads))
    assert main([config, "--shards", "2"]) == 0
    run = tmp_path / "runs" / "wait-k" / "k=1"
    assert sorted(p.name for p in (run / "shards").iterdir()) == ["000000-000002", "000002-000004"]
    shutil.rmtree(run / "shards")  # as the bench restores a run from results/: its log, no shards
    stamp = (run / "instances.log").stat().st_mtime_ns
    assert main([config, "--shards", "2"]) == 0
    assert (run / "instances.log").stat().st_mtime_ns == stamp and not (run / "shards").exists()


def test_redo_runs_every_shard_again_under_the_new_settings(setup, tmp_path):
    heads = {"wait-k": {"k": [1]}, "offline": False}
    first = write_config(setup, tmp_path / "first.yaml", heads=heads, shards=2)
    assert main([str(first)]) == 0
    shard = tmp_path / "runs" / "wait-k" / "k=1" / "shards" / "000000-000002" / "instances.log"
    stamp = shard.stat().st_mtime_ns
    other = write_config(setup, tmp_path / "other.yaml", heads=heads, shards=2, checkpoint=str(setup / "other-ckpt"))
    assert main([str(other), "--redo"]) == 0
    assert shard.stat().st_mtime_ns != stamp


def test_a_run_killed_before_its_first_instance_runs_under_the_new_settings_and_records_them(setup, tmp_path):
    heads = {"wait-k": {"k": [2]}, "offline": False}
    assert main([str(write_config(setup, tmp_path / "first.yaml", heads=heads))]) == 0
    run = tmp_path / "runs" / "wait-k" / "k=2"
    for name in ("instances.log", "scores.tsv", "config.yaml"):
        (run / name).unlink(missing_ok=True)  # its settings written, then killed before any instance
    other = str(write_config(setup, tmp_path / "other.yaml", heads=heads, checkpoint=str(setup / "other-ckpt")))
    assert main([other]) == 0
    assert json.loads((run / "settings.json").read_text())["checkpoint"] == str(setup / "other-ckpt")
    assert main([other]) == 0  # not refused as made under the first checkpoint


def test_a_source_file_rewritten_in_place_is_a_change_of_settings(setup, tmp_path, capsys):
    source = tmp_path / "source.txt"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    config = str(write_config(setup, tmp_path / "tiny.yaml", source=str(source),
                              heads={"wait-k": {"k": [2]}, "offline": False}))  # fmt: skip
    assert main([config]) == 0
    source.write_text("\n".join(reversed(SENTENCES)) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main([config]) == 2
    assert f"source {source}: its content changed" in capsys.readouterr().err
