"""Scores recomputed from instances.log: equal to SimulEval's own, plus CA, RCO and AIL."""

import json
from pathlib import Path

import numpy as np
import pandas
import pytest
import soundfile as sf
import torch

from simul_agents import evaluate_inprocess
from simul_agents import latency as L
from simul_agents import score as score_module
from simul_agents.proactive_agent import ProactiveAgent
from simul_agents.score import ScoreError, main, score_output
from streaming_llm.checkpoint import build_model, save_checkpoint
from streaming_llm.tiny import tiny_config, tiny_tokenizer

CHRF_MODULE = str(Path(__file__).resolve().parents[1] / "simul_agents" / "chrf_scorer")
METRICS = ["AL", "LAAL", "DAL", "AP", "ATD", "StartOffset", "EndOffset"]


def untied_tiny(modality, seed=0):
    config = tiny_config(modality)
    config = config.replace(llm_config={**config.llm_config, "tie_word_embeddings": False})
    torch.manual_seed(seed)
    return build_model(config, tiny_tokenizer()).eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SimulEval runs (speech and text, two heads each) with BLEU, CHRF and every latency metric."""
    root = tmp_path_factory.mktemp("score")
    save_checkpoint(untied_tiny("text"), root / "text-ckpt")
    save_checkpoint(untied_tiny("speech"), root / "speech-ckpt")
    sentences = ["I would like a cup of coffee .", "Where is the train station ?", "Thank you ."]
    (root / "text.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    (root / "target.txt").write_text("Ich möchte Kaffee .\nWo  ist der Bahnhof ?\nDanke .\n", encoding="utf-8")
    rng = np.random.default_rng(0)
    wavs = []
    for i, seconds in enumerate((1.3, 2.1, 0.7)):
        sf.write(root / f"{i}.wav", (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
        wavs.append(str(root / f"{i}.wav"))
    (root / "speech.txt").write_text("\n".join(wavs) + "\n", encoding="utf-8")
    outputs = {}
    common = ["--quality-metrics", "BLEU", "CHRF", "--user-dir", CHRF_MODULE, "--latency-metrics", *METRICS,
              "--max-target-tokens", "24", "--no-progress-bar", "--target", root / "target.txt"]  # fmt: skip
    for kind, head in [("text", "wait-k"), ("text", "entropy"), ("speech", "wait-k"), ("speech", "attention")]:
        out = root / f"{kind}-{head}"
        head_args = ["--head", head] + (
            ["--k", "2"] if head == "wait-k" else ["--threshold", "0.5" if head == "attention" else "6"]
        )
        source = ["--source", root / f"{kind}.txt", "--checkpoint", root / f"{kind}-ckpt"]
        segment = ["--source-segment-size", "320"] if kind == "speech" else []
        evaluate_inprocess(ProactiveAgent, [*common, *source, *segment, *head_args, "--output", out])
        outputs[(kind, head)] = out
    return outputs


@pytest.mark.parametrize("kind,head", [("text", "wait-k"), ("text", "entropy"), ("speech", "wait-k"),
                                       ("speech", "attention")])  # fmt: skip
def test_recomputed_scores_equal_simulevals(runs, kind, head):
    out = runs[(kind, head)]
    theirs = pandas.read_csv(out / "scores.tsv", sep="\t").iloc[0].to_dict()
    ours = score_output(out)
    assert ours["source_type"] == kind and ours["latency_unit"] == ("ms" if kind == "speech" else "words")
    names = ["BLEU", "CHRF", *METRICS]
    if kind == "text":
        names.remove("ATD")  # SimulEval rescoring from --output uses its speech constants for text: see score.py
    for name in names:
        assert round(ours["chrF" if name == "CHRF" else name], 3) == pytest.approx(theirs[name], abs=1e-9), name
    assert (out / "scores.json").is_file()


def test_computation_aware_scores_use_elapsed(runs):
    out = runs[("speech", "wait-k")]
    instances = [json.loads(line) for line in (out / "instances.log").read_text().splitlines()]
    ours = score_output(out, write=False)
    expected = np.mean([L.average_lagging(i["elapsed"], i["source_length"], len(i["reference"].split(" ")))
                        for i in instances if i["elapsed"]])  # fmt: skip
    assert ours["AL_CA"] == pytest.approx(expected)
    assert ours["AL_CA"] >= ours["AL"]  # computing takes time
    assert ours["LAAL_CA"] is not None and ours["ATD_CA"] >= ours["ATD"]
    assert score_output(runs[("text", "wait-k")], write=False)["AL_CA"] is None  # text has no clock


def test_computation_aware_scores_equal_simulevals_computation_aware_scorers(runs):
    """Every *_CA value is what SimulEval 1.1.4's own latency scorers give with ``computation_aware`` on the same log
    (its ATD takes the computation time between writes from ``elapsed`` minus ``delays``)."""
    from simuleval.evaluator.instance import LogInstance
    from simuleval.evaluator.scorers.latency_scorer import LATENCY_SCORERS_DICT

    out = runs[("speech", "wait-k")]
    logged = [LogInstance(line) for line in (out / "instances.log").read_text(encoding="utf-8").splitlines()]
    ours = score_output(out, write=False)
    for name in METRICS:
        theirs = LATENCY_SCORERS_DICT[name](computation_aware=True)({ins.index: ins for ins in logged})
        assert ours[f"{name}_CA"] == pytest.approx(theirs, rel=1e-9), name
    assert ours["ATD_CA"] != pytest.approx(ours["ATD"])  # the computation time is in it


def test_speech_source_lengths_are_in_milliseconds_like_the_latencies(runs):
    """mean_source_length shares the latencies' unit (compare.keep_offline sets LAAL against 35% of it)."""
    scores = score_output(runs[("speech", "wait-k")], write=False)
    assert scores["latency_unit"] == "ms"
    assert scores["mean_source_length"] == pytest.approx(1000 * (1.3 + 2.1 + 0.7) / 3, rel=0.01)  # the wavs' seconds


def test_metric_definitions_on_a_hand_made_instance():
    delays, source, reference = [2, 3, 4, 4], 4, 4  # wait-2 on 4 words: ideal lag 2 until the source ends
    assert L.average_lagging(delays, source, reference) == pytest.approx((2 + 2 + 2) / 3)
    assert L.length_adaptive_average_lagging(delays, source, 2) == pytest.approx(2.0)  # |Y| = max(4, 2)
    assert L.average_proportion(delays, source, reference) == pytest.approx(13 / 16)
    assert L.differentiable_average_lagging(delays, source) == pytest.approx((2 + 2 + 2 + 2) / 4)
    assert L.start_offset(delays) == 2 and L.end_offset(delays, source) == 0
    assert L.read_content_overhead(delays, source) == pytest.approx(13 / 16)
    assert L.average_incremental_lag(delays, source) == pytest.approx((2 + 2 + 2 + 1) / 4)
    assert L.average_lagging([5], 4, 1) == 5  # the first word after the whole source
    assert L.average_token_delay([1, 2, 3], speech=False) == pytest.approx(1.0)


def test_an_instance_that_failed_again_on_resume_counts_once():
    from simul_agents.score import count_failed

    lines = ['{"index": 4, "error": "x"}', '{"index": 4, "error": "x"}', "", '{"index": 7, "error": "y"}', "cut {"]
    assert count_failed(lines) == 3  # 4, 7 and a line cut by a kill


def test_score_cli_sorts_merged_logs_and_reports_errors(runs, tmp_path, capsys):
    lines = (runs[("text", "wait-k")] / "instances.log").read_text().splitlines()
    (tmp_path / "instances.log").write_text("\n".join(reversed(lines)) + "\n")  # shards merged out of order
    (tmp_path / "failed.jsonl").write_text('{"index": 1, "error": "x"}\n')
    assert main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "LAAL" in printed.splitlines()[0] and "latency in words" in printed
    scores = json.loads((tmp_path / "scores.json").read_text())
    reference = score_output(runs[("text", "wait-k")], write=False)
    assert scores["AL"] == pytest.approx(reference["AL"]) and scores["BLEU"] == pytest.approx(reference["BLEU"])
    assert scores["n_failed"] == 1 and scores["n_instances"] == 3
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def _output(folder: Path, *rows: dict, failed: bytes | None = None) -> Path:
    """An output folder whose instances.log holds these rows (a text run: no config.yaml, no audio info)."""
    folder.mkdir()
    (folder / "instances.log").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if failed is not None:
        (folder / "failed.jsonl").write_bytes(failed)
    return folder


GOOD_ROW = {"index": 0, "prediction": "a b", "reference": "x y", "source_length": 3, "delays": [1, 3]}


def test_instances_come_back_in_index_order_from_a_log_written_out_of_order(tmp_path):
    """batch_eval and merged shards write instances as they finish; pairing two runs sentence by sentence
    (simul_agents.compare) needs them by index."""
    from simul_agents.compare import hypotheses

    rows = [{**GOOD_ROW, "index": i, "prediction": f"p{i}", "reference": f"r{i}"} for i in (2, 0, 1)]
    out = _output(tmp_path / "out", *rows)
    assert [ins["index"] for ins in score_module.read_instances(out)] == [0, 1, 2]
    assert hypotheses(out) == (["p0", "p1", "p2"], ["r0", "r1", "r2"])


def test_score_cli_refuses_an_unknown_tokenizer_and_lists_the_valid_ones(tmp_path, capsys):
    out = _output(tmp_path / "out", GOOD_ROW)
    with pytest.raises(SystemExit) as caught:
        main([str(out), "--tokenize", "bogus"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and "'13a'" in err and "'intl'" in err
    with pytest.raises(ScoreError, match=r"tokenizer 'bogus': choose one of .*13a"):
        score_output(out, "bogus")


def test_a_tokenizer_sacrebleu_cannot_set_up_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def needs_extras(tokenize):
        raise RuntimeError("\nJapanese tokenization requires extra dependencies.\n\n    pip install sacrebleu[ja]\n")

    monkeypatch.setattr(score_module, "BLEU", needs_extras)
    assert main([str(_output(tmp_path / "out", GOOD_ROW)), "--tokenize", "ja-mecab"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: tokenizer 'ja-mecab': sacrebleu cannot set it up: Japanese tokenization requires extra "
                   "dependencies. pip install sacrebleu[ja]\n")  # fmt: skip


def test_score_cli_makes_the_folder_of_json_and_refuses_a_folder_or_file_in_its_way(tmp_path, capsys):
    out = _output(tmp_path / "out", GOOD_ROW)
    target = tmp_path / "new" / "deeper" / "s.json"
    assert main([str(out), "--json", str(target)]) == 0
    assert json.loads(target.read_text())["n_instances"] == 1
    with pytest.raises(SystemExit) as caught:
        main([str(out), "--json", str(tmp_path / "new")])
    assert caught.value.code == 2 and "--json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main([str(out), "--json", str(target / "x.json")])
    assert caught.value.code == 2 and f"{target} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("row,problem", [
    ({**GOOD_ROW, "source_length": 0, "delays": [0, 0]}, r"line 1: 'source_length' is 0 but the instance wrote"),
    ({**GOOD_ROW, "source_length": -3}, r"line 1: 'source_length' is -3, not a length"),
    ({**GOOD_ROW, "source_length": float("nan")}, r"line 1: 'source_length' is nan, not a length"),
    ({**GOOD_ROW, "delays": [1, float("inf")]}, r"line 1: 'delays' is not a list of numbers"),
    ({**GOOD_ROW, "source": [1], "delays": [320, 640], "elapsed": [400]},
     r"line 1: 'elapsed' has 1 values but 'delays' has 2"),
    ({**GOOD_ROW, "delays": [1.5, 3]}, r"line 1: 'delays' holds 1.5, but a text log's delays count source words"),
], ids=["zero-source", "negative-source", "nan-source", "inf-delay", "short-elapsed", "fraction-word"])  # fmt: skip
def test_scorer_refuses_numbers_that_break_the_latency_maths_in_one_line(tmp_path, capsys, row, problem):
    out = _output(tmp_path / "out", GOOD_ROW, {**row, "index": 1})
    with pytest.raises(ScoreError, match=problem.replace("line 1", "line 2")):
        score_output(out)
    assert main([str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (out / "scores.json").exists()


def test_fractional_delays_are_kept_for_speech_and_whole_floats_score_as_words_for_text(tmp_path):
    speech = _output(tmp_path / "speech", {**GOOD_ROW, "source_length": 1000.0, "delays": [320.5, 640.25]})
    (speech / "config.yaml").write_text("source_type: speech\n", encoding="utf-8")
    assert score_output(speech, write=False)["StartOffset"] == pytest.approx(320.5)
    as_ints = score_output(_output(tmp_path / "ints", GOOD_ROW), write=False)
    as_floats = score_output(_output(tmp_path / "floats", {**GOOD_ROW, "delays": [1.0, 3.0]}), write=False)
    assert {k: as_floats[k] for k in METRICS} == {k: as_ints[k] for k in METRICS}


def test_scorer_names_a_failed_jsonl_that_is_not_utf8(tmp_path, capsys):
    out = _output(tmp_path / "out", GOOD_ROW, failed=b"\xff\xfe\n")
    with pytest.raises(ScoreError, match=r"failed.jsonl: not UTF-8 .*--skip-failed"):
        score_output(out)
    assert main([str(out)]) == 2 and capsys.readouterr().err.count("\n") == 1


def test_len_ratio_is_the_outputs_length_over_the_references_and_shows_what_chrf_forgives(tmp_path):
    reference = "das ist ein kleines haus am see"
    exact = score_output(_output(tmp_path / "exact", {**GOOD_ROW, "prediction": reference, "reference": reference,
                                                      "delays": [1] * 7}), write=False)  # fmt: skip
    padded = reference + " und dann und dann und dann und"  # 7 extra words: twice the reference's length
    long = score_output(_output(tmp_path / "long", {**GOOD_ROW, "prediction": padded, "reference": reference,
                                                    "delays": [1] * 14}), write=False)  # fmt: skip
    assert exact["len_ratio"] == 1.0 and long["len_ratio"] == 2.0
    assert long["BLEU"] < 0.5 * exact["BLEU"] and long["chrF"] > 0.8 * exact["chrF"]  # BLEU halves, chrF keeps 82%


def test_score_cli_prints_failed_and_empty_counts_only_when_there_are_some(tmp_path, capsys):
    failed_row = {**GOOD_ROW, "index": 1, "prediction": "", "delays": []}  # what --skip-failed logs for it
    out = _output(tmp_path / "skipped", GOOD_ROW, failed_row, failed=b'{"index": 1, "error": "ValueError: x"}\n')
    assert main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "n_failed 1 (failed.jsonl: logged by --skip-failed), n_empty 1 (wrote nothing)" in printed, printed
    assert main([str(_output(tmp_path / "clean", GOOD_ROW))]) == 0
    printed = capsys.readouterr().out
    assert "n_failed" not in printed and "n_empty" not in printed, printed


def test_an_empty_log_is_a_one_line_error_naming_it(tmp_path, capsys):
    """A run killed before its first instance leaves an empty instances.log."""
    out = tmp_path / "empty"
    out.mkdir()
    (out / "instances.log").write_text("\n", encoding="utf-8")
    assert main([str(out)]) == 2
    assert f"{out / 'instances.log'}: no instances" in capsys.readouterr().err


def test_config_yaml_says_text_even_when_the_log_lists_its_source(tmp_path):
    """The log's look is only the fallback: a text run whose log lists its source words is still scored in words."""
    out = _output(tmp_path / "text", {**GOOD_ROW, "source": ["x", "y", "z"]})
    (out / "config.yaml").write_text("source_type: text\n", encoding="utf-8")
    scores = score_output(out, write=False)
    assert scores["source_type"] == "text" and scores["latency_unit"] == "words"


def test_the_table_shows_a_missing_or_nan_score_as_a_dash():
    from simul_agents.score import format_table

    table = format_table([{"BLEU": 12.3456, "AL_CA": None, "LAAL": float("nan"), "n_instances": 3}],
                         columns=["BLEU", "AL_CA", "LAAL", "n_instances"])  # fmt: skip
    assert table.splitlines()[1].split() == ["12.346", "-", "-", "3"]


def test_chrf_word_order_two_scores_chrf_plus_plus_here_and_in_simulevals_scorer():
    from sacrebleu.metrics import CHRF

    from simul_agents.chrf_scorer import CHRFScorer

    row = {**GOOD_ROW, "prediction": "das haus ist klein", "reference": "das kleine haus ist alt"}
    expected = CHRF(word_order=2).corpus_score([row["prediction"]], [[row["reference"]]]).score
    assert expected != CHRF().corpus_score([row["prediction"]], [[row["reference"]]]).score
    assert score_module.score_instances([row], speech=False, chrf_word_order=2)["chrF"] == pytest.approx(expected)

    class Args:
        chrf_word_order = 2

    instance = type("Instance", (), {"prediction": row["prediction"], "reference": row["reference"]})()
    assert CHRFScorer.from_args(Args())({0: instance}) == pytest.approx(expected)
