"""`make bench` machinery: stages resume and fail by name, the paired bootstrap, the summary from real files."""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from simul_agents import bench as B
from simul_agents.compare import (
    compare_task,
    format_comparison,
    hypotheses,
    keep_offline,
    matched,
    mixed_vs_waitk,
    nearest,
    paired_bootstrap,
    seed_mean_bootstrap,
    t_two_sided_p,
    waitk_mixtures,
    welch_test,
)

WORDS = "der die das ein eine ist war hat Haus Hund Katze Stadt heute morgen gut schnell".split()


def _write_run(folder, predictions, references, delays_per_word: float, source_length: float = 10.0):
    """A SimulEval text output directory with one instance per sentence."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "instances.log", "w", encoding="utf-8") as f:
        for i, (hyp, ref) in enumerate(zip(predictions, references, strict=True)):
            n = max(1, len(hyp.split()))
            delays = [min(int(source_length), round(delays_per_word * (j + 1))) for j in range(n)]
            record = {"index": i, "prediction": hyp, "delays": delays, "elapsed": delays, "reference": ref,
                      "prediction_length": n, "source": ["w"] * int(source_length), "source_length": source_length}
            f.write(json.dumps(record) + "\n")
    (folder / "config.yaml").write_text("source_type: text\ntarget_type: text\n", encoding="utf-8")


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(n)]


def _corrupt(sentences: list[str], share: float, seed: int) -> list[str]:
    """Replace ``share`` of each sentence's words: a worse system on the same references."""
    rng = random.Random(seed)
    return [" ".join(w if rng.random() > share else rng.choice(WORDS) for w in s.split()) for s in sentences]


@pytest.fixture()
def task_dir(tmp_path):
    refs = _sentences(120, 0)
    root = tmp_path / "text"
    main = root / "eval-main"
    _write_run(main / "offline" / "-", refs, refs, delays_per_word=10.0)
    for t, share, lag in ((0.5, 0.1, 1.0), (2.0, 0.2, 2.0)):
        _write_run(main / "entropy" / f"threshold={t}", _corrupt(refs, share, 1), refs, delays_per_word=lag)
    for k, share in ((1, 0.6), (2, 0.5)):
        _write_run(main / "wait-k" / f"k={k}", _corrupt(refs, share, 2), refs, delays_per_word=float(k))
    _write_run(main / "oracle" / "-", refs[:100] + _corrupt(refs[100:], 1.0, 4), refs, delays_per_word=0.5)
    _write_run(root / "eval-no-mslm" / "offline" / "-", _corrupt(refs, 0.3, 3), refs, delays_per_word=10.0)
    _write_run(root / "eval-no-spsd" / "offline" / "-", _corrupt(refs, 0.6, 5), refs, delays_per_word=10.0)
    return root


def test_paired_bootstrap_finds_a_clearly_better_system(task_dir):
    main = task_dir / "eval-main"
    clear = paired_bootstrap(main / "wait-k" / "k=1", main / "entropy" / "threshold=0.5")
    assert clear["chrF"]["delta"] > 10 and clear["chrF"]["p"] < 0.05
    worse = paired_bootstrap(main / "entropy" / "threshold=0.5", main / "wait-k" / "k=1")
    assert worse["chrF"]["delta"] == -clear["chrF"]["delta"]


def test_the_same_outputs_a_side_are_not_significantly_different(task_dir):
    """sacrebleu's formula gives its smallest p, 1 / (samples + 1), when no resample differs: reported as 1."""
    run = task_dir / "eval-main" / "wait-k" / "k=1"
    same = paired_bootstrap(run, run)
    assert all(same[m]["delta"] == 0 and same[m]["p"] == 1.0 for m in ("BLEU", "chrF"))


def _sacrebleu_paired_test(baseline, system, samples: int = 1000) -> dict:
    """sacrebleu's own ``PairedTest`` (paired bootstrap, ``samples`` resamples), in ``paired_bootstrap``'s form."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    (base, refs), (hyps, _) = hypotheses(baseline), hypotheses(system)
    _, scores = PairedTest([("baseline", base), ("system", hyps)], {"BLEU": BLEU(), "chrF": CHRF()},
                           references=[refs], test_type="bs", n_samples=samples)()  # fmt: skip
    out = {}
    for metric, key in (("BLEU", "BLEU"), ("chrF", "chrF2")):
        b, t = scores[key]
        out[metric] = {"baseline": round(b.score, 2), "system": round(t.score, 2),
                       "delta": round(t.score - b.score, 2), "p": round(float(t.p_value), 4),
                       "ci95": round(float(t.ci), 2)}  # fmt: skip
    return out


def test_the_seed_mean_bootstrap_is_sacrebleu_s_with_one_run_a_side_and_averages_several(task_dir):
    main = task_dir / "eval-main"
    k1, k2, e05 = main / "wait-k" / "k=1", main / "wait-k" / "k=2", main / "entropy" / "threshold=0.5"
    assert seed_mean_bootstrap([k1], [e05]) == _sacrebleu_paired_test(k1, e05)  # its resamples, its p
    two = seed_mean_bootstrap([k1, k2], [e05, main / "offline" / "-"])
    for metric in ("BLEU", "chrF"):
        side = [[paired_bootstrap(k1, run)[metric]["system"] for run in pair]
                for pair in ((k1, k2), (e05, main / "offline" / "-"))]
        assert two[metric]["baseline"] == pytest.approx(sum(side[0]) / 2, abs=0.011)
        assert two[metric]["system"] == pytest.approx(sum(side[1]) / 2, abs=0.011)
    assert two["chrF"]["delta"] > 10 and two["chrF"]["p"] < 0.05
    elsewhere = task_dir / "eval-elsewhere"
    _write_run(elsewhere, _sentences(120, 7), _sentences(120, 8), delays_per_word=1.0)
    with pytest.raises(ValueError, match="other references"):
        seed_mean_bootstrap([k1], [elsewhere])


def test_the_bootstrap_p_of_two_close_systems_is_sacrebleu_s_two_sided_one_either_way(tmp_path):
    """Resamples on which the difference changes sign count by its size (sacrebleu's absolute differences): the
    same p whichever run is the baseline, and a difference that is not significant is neither better nor worse."""
    from simul_agents.compare import verdict

    refs = _sentences(120, 0)
    a, b = tmp_path / "a", tmp_path / "b"
    _write_run(a, _corrupt(refs, 0.3, 1), refs, delays_per_word=1.0)
    _write_run(b, _corrupt(refs, 0.3, 2), refs, delays_per_word=1.0)
    forward, backward = seed_mean_bootstrap([a], [b]), seed_mean_bootstrap([b], [a])
    assert forward == _sacrebleu_paired_test(a, b) and backward == _sacrebleu_paired_test(b, a)
    for metric in ("BLEU", "chrF"):
        assert forward[metric]["p"] == backward[metric]["p"] > 0.05, metric
    assert forward["chrF"]["delta"] != 0 and verdict(forward) == verdict(backward) == {"better": False, "worse": False}


def test_a_compare_json_written_before_the_recipe_against_plain_lines_still_formats():
    earlier = {"seeds": {"main_vs_plain": {"chrF": -0.43, "BLEU": -0.32}}}  # what compare.json kept until 2026-12-01
    assert not [line for line in format_comparison(earlier) if "seed" in line]


def test_points_are_matched_only_within_ten_percent_of_laal():
    assert nearest({"LAAL": 2.0}, [{"LAAL": 2.15}, {"LAAL": 3.0}]) == {"LAAL": 2.15}
    assert nearest({"LAAL": 2.0}, [{"LAAL": 2.5}]) is None


def test_ten_percent_is_of_the_larger_laal_so_a_match_is_the_same_from_either_side():
    assert nearest({"LAAL": 2.0}, [{"LAAL": 2.22}]) == {"LAAL": 2.22}  # 0.22 <= 10% of 2.22, though > 10% of 2.0
    assert nearest({"LAAL": 2.22}, [{"LAAL": 2.0}]) == {"LAAL": 2.0}
    assert nearest({"LAAL": 2.0}, [{"LAAL": 2.23}]) is None and nearest({"LAAL": 2.23}, [{"LAAL": 2.0}]) is None


def test_compare_task_reports_entropy_against_waitk_and_the_offline_ablation(task_dir):
    result = compare_task(task_dir, ["main", "no-mslm"], "text")
    points = {p["param"]: p for p in result["entropy_vs_waitk"]}
    assert points["threshold=0.5"]["matched"] == "wait-k k=1" and points["threshold=0.5"]["better"]
    assert result["offline"]["no-mslm"]["chrF"]["delta"] > 0  # main's offline decode is the clean one
    assert result["keep_offline"]["best"]["param"] == "threshold=0.5"  # LAAL 1 <= 35% of 10 words
    assert (result["oracle"]["same_as_offline"], result["oracle"]["instances"]) == (100, 120)
    text = "\n".join(format_comparison(result))
    assert "significantly better on 2" in text and "main vs no-mslm" in text
    assert "offline_vs_plain" in result and not result["offline_vs_plain"]  # main is already against no-mslm
    assert "equals the offline decode on 100 of 120 instances" in text


def test_a_proactive_point_at_exactly_35_percent_of_the_mean_source_counts_as_low_latency():
    """The limit is inclusive: LAAL 3.5 at a mean source of 10 words is kept; LAAL 3.6 is past it."""
    runs = [{"head": "entropy", "param": "threshold=1.0", "LAAL": 3.5, "chrF": 40.0, "BLEU": 10.0},
            {"head": "entropy", "param": "threshold=3.0", "LAAL": 3.6, "chrF": 50.0, "BLEU": 12.0}]  # fmt: skip
    keep = keep_offline(runs, {"chrF": 50.0}, mean_source=10.0)
    assert keep["laal_limit"] == 3.5 and keep["best"]["param"] == "threshold=1.0" and keep["share"] == 0.8


def test_the_entropy_head_between_lag_bounds_is_its_own_curve_against_wait_k(task_dir):
    refs = [json.loads(line)["reference"] for line in (task_dir / "eval-main" / "offline" / "-" / "instances.log")
            .read_text(encoding="utf-8").splitlines()]  # fmt: skip
    bounded = task_dir / "eval-main" / "entropy" / "threshold=3.0,min_lag=2,max_lag=4"
    _write_run(bounded, _corrupt(refs, 0.1, 6), refs, delays_per_word=2.0)
    result = compare_task(task_dir, ["main"], "text")
    assert [p["param"] for p in result["entropy_vs_waitk"]] == ["threshold=0.5", "threshold=2.0"]  # not mixed in
    (point,) = result["bounded_vs_waitk"]
    assert point["head"] == "entropy, lag-bounded" and point["matched"] == "wait-k k=2" and point["better"]
    assert "**entropy between lag bounds vs wait-k** at equal LAAL (within 10%): 1 matched of 1 points" in "\n".join(
        format_comparison(result))


def test_wait_k_time_shared_reaches_an_laal_between_two_of_its_points_with_whole_sentences(tmp_path):
    from simul_agents.score import score_output

    refs = _sentences(120, 0)
    k1, k4 = tmp_path / "wait-k" / "k=1", tmp_path / "wait-k" / "k=4"
    _write_run(k1, _corrupt(refs, 0.6, 1), refs, delays_per_word=1.0)
    _write_run(k4, _corrupt(refs, 0.2, 2), refs, delays_per_word=4.0)
    low, high = (score_output(run, write=False)["LAAL"] for run in (k1, k4))
    target = low + 0.4 * (high - low)
    (mix,) = waitk_mixtures(target, {"output": str(k1)}, {"output": str(k4)}, draws=1)
    assert mix["LAAL"] == pytest.approx(target, abs=(high - low) / 240)  # each sentence moves it 1/120: the nearest
    assert 0.3 < mix["share_upper"] < 0.5
    lines = {run: (run / "instances.log").read_text(encoding="utf-8").splitlines() for run in (k1, k4)}
    for i, ins in enumerate(mix["instances"]):  # each sentence one run's, untouched
        assert ins in (json.loads(lines[k1][i]), json.loads(lines[k4][i]))
    assert waitk_mixtures(target, {"output": str(k1)}, {"output": str(k4)}, draws=1) == [mix]  # seeded: the same


def test_wait_k_time_shared_counts_sentences_that_wrote_nothing_out_of_the_mean_and_keeps_them(tmp_path):
    """A sentence a run wrote nothing for has no LAAL (SimulEval leaves it out of the mean): switching it to the
    other run adds a sentence to the mean, not only a value, so the mixture still lands on the target LAAL; and
    every sentence stays in the mixture, empty ones too."""
    from simul_agents.score import score_output

    refs = _sentences(100, 0)
    k1, k4 = tmp_path / "wait-k" / "k=1", tmp_path / "wait-k" / "k=4"
    _write_run(k1, _corrupt(refs, 0.6, 1), refs, delays_per_word=1.0)
    _write_run(k4, _corrupt(refs, 0.2, 2), refs, delays_per_word=4.0)
    log = k1 / "instances.log"
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    for record in records[1::2]:  # k=1 wrote nothing for every other sentence
        record.update(prediction="", delays=[], elapsed=[], prediction_length=0)
    log.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    low, high = (score_output(run, write=False)["LAAL"] for run in (k1, k4))
    target = (low + high) / 2
    (mix,) = waitk_mixtures(target, {"output": str(k1)}, {"output": str(k4)}, draws=1)
    assert mix["LAAL"] == pytest.approx(target, abs=(high - low) / 20)  # one sentence moves the mean ~1/50
    assert [ins["index"] for ins in mix["instances"]] == list(range(100))
    assert any(ins["prediction"] == "" for ins in mix["instances"])


def _wait_k_1_and_2(eval_dir: Path, refs: list[str]) -> None:
    """Wait-k k=1 (1 unit a word, 60% of words corrupted) and k=2 (4 units a word, 50%) in ``eval_dir``."""
    _write_run(eval_dir / "wait-k" / "k=1", _corrupt(refs, 0.6, 1), refs, delays_per_word=1.0)
    _write_run(eval_dir / "wait-k" / "k=2", _corrupt(refs, 0.5, 2), refs, delays_per_word=4.0)

def test_an_entropy_point_far_from_every_wait_k_point_is_tested_against_wait_k_time_shared_to_its_laal(tmp_path):
    from simul_agents.compare import load_runs

    refs = _sentences(120, 0)
    main = tmp_path / "eval-main"
    _wait_k_1_and_2(main, refs)
    _write_run(main / "entropy" / "threshold=2.0", _corrupt(refs, 0.1, 3), refs, delays_per_word=2.5)
    _write_run(main / "entropy" / "threshold=0.5", refs, refs, delays_per_word=4.1)  # matched with k=2 instead
    (point,) = mixed_vs_waitk(load_runs(tmp_path, "main"), "entropy")
    assert point["param"] == "threshold=2.0" and point["matched"].startswith("wait-k k=1+k=2 (")
    assert point["matched_LAAL"] == pytest.approx(point["LAAL"], rel=0.02) and point["better"]
    result = compare_task(tmp_path, ["main"], "text")
    assert result["vs_waitk_mixed"]["main"] == [point]
    assert ("main, entropy points between wait-k points vs wait-k time-shared to their LAAL: 1 matched of 1 points, "
            "significantly better on 1") in "\n".join(format_comparison(result))
    # an ablation's grid (k=1, 3, 5): between k=1 and k=3 the unswept k=2 may beat any mixture of the two
    (main / "wait-k" / "k=2").rename(main / "wait-k" / "k=3")
    assert mixed_vs_waitk(load_runs(tmp_path, "main"), "entropy") == []


def test_the_oracle_is_placed_against_each_head_s_latency_for_its_quality(task_dir):
    """Entropy at 0.5 (a tenth of the words wrong) beats the oracle's chrF (a sixth of the sentences wrong) at a
    lag of one word; no wait-k point gets there; the oracle's lag of half a word has no wait-k point near it."""
    result = compare_task(task_dir, ["main"], "text")
    oracle = result["oracle"]
    assert oracle["reach"]["entropy"]["param"] == "threshold=0.5"
    assert oracle["reach"]["wait-k"] is None and "probe" not in oracle["reach"]  # no probe run: not listed
    assert oracle["vs_waitk"]["matched"] is None
    text = "\n".join(format_comparison(result))
    assert "scores the oracle's chrF or more: entropy threshold=0.5" in text and "never: wait-k" in text
    assert "No wait-k point lies at equal LAAL (within 10%)" in text


def test_every_other_streaming_variant_is_compared_offline_with_the_plain_fine_tune(task_dir):
    refs = _sentences(120, 0)
    _write_run(task_dir / "eval-no-mslm-x4" / "offline" / "-", _corrupt(refs, 0.1, 8), refs, delays_per_word=10.0)
    result = compare_task(task_dir, ["main", "no-mslm", "no-spsd", "no-mslm-x4"], "text")
    assert set(result["offline"]) == {"no-mslm", "no-spsd"}  # main against its own budget's ablations only
    assert set(result["offline_vs_plain"]) == {"no-spsd"}
    test = result["offline_vs_plain"]["no-spsd"]["chrF"]  # no-spsd (60% noise) as the system, no-mslm (30%)
    assert test["delta"] < 0 and test["p"] < 0.05
    assert "Offline decode, no-spsd vs no-mslm (the plain fine-tune)" in "\n".join(format_comparison(result))


def test_a_second_training_seed_is_set_beside_its_recipe_not_compared_as_an_ablation(task_dir):
    refs = _sentences(120, 0)
    _write_run(task_dir / "eval-main-seed1" / "offline" / "-", _corrupt(refs, 0.2, 8), refs, delays_per_word=10.0)
    _write_run(task_dir / "eval-no-mslm-seed1" / "offline" / "-", _corrupt(refs, 0.3, 9), refs, 10.0)
    result = compare_task(task_dir, ["main", "no-mslm", "no-mslm-seed1", "main-seed1"], "text")
    assert set(result["offline"]) == {"no-mslm"} and not result["offline_vs_plain"]
    seeds = result["seeds"]
    assert set(seeds) == {"main", "no-mslm", "vs_plain"} and set(seeds["vs_plain"]) == {"main"}
    main, plain = seeds["main"], seeds["no-mslm"]
    assert main["chrF"]["0"] == 100.0 and main["vs_seed0"]["1"]["chrF"]["delta"] < 0  # seed 1 is the noisy one
    assert main["mean_chrF"] == round((main["chrF"]["0"] + main["chrF"]["1"]) / 2, 2)
    versus = seeds["vs_plain"]["main"]
    assert versus["chrF"] == round(main["mean_chrF"] - plain["mean_chrF"], 2) > 0
    assert versus["pairings_chrF"]["1-0"] == round(main["chrF"]["1"] - plain["chrF"]["0"], 2)
    assert len(versus["pairings_chrF"]) == 4
    assert versus["test"]["chrF"]["delta"] == pytest.approx(versus["chrF"], abs=0.011)
    assert versus["seeds_test"]["chrF"] == welch_test(list(plain["chrF"].values()), list(main["chrF"].values()))
    assert main["sd_chrF"] == round(abs(main["chrF"]["0"] - main["chrF"]["1"]) / math.sqrt(2), 2)
    text = "\n".join(format_comparison(result))
    assert "main minus no-mslm, the seeds as the samples (Welch's t-test of 2 against 2 seeds): chrF p" in text
    assert "Training seeds, offline decode, no-mslm: chrF" in text and "seed 1 vs seed 0: chrF" in text
    assert "main minus no-mslm, over the seed means: chrF +" in text and "each seed against each seed, chrF" in text


def test_student_t_p_values_equal_the_closed_forms_and_welch_s_test_a_hand_computed_case():
    for t in (0.3, 1.0, 3.674, 12.0):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-9)  # Cauchy
        assert t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)
        assert t_two_sided_p(t, 1e5) == pytest.approx(math.erfc(t / math.sqrt(2)), abs=1e-5)  # the normal's
    for t in (2e3, 2e4, 1e8):  # the far tail, where a quadrature from 0 to |t| had lost it (p 0.02 at 2e4, 2 df)
        root = math.sqrt(2 + t * t)
        assert t_two_sided_p(t, 2) == pytest.approx(2 / (root * (root + t)), rel=1e-6)  # 1 - t / root, stably
        assert t_two_sided_p(t, 1) == pytest.approx(2 / math.pi * math.atan(1 / t), rel=1e-6)
    assert t_two_sided_p(0.0, 3.7) == 1.0
    # means 2 and 5, variances 1: the mean's variance 1/3 a side, t = 3 / sqrt(2/3), df = (2/3)^2 / (2 (1/3)^2 / 2) = 4
    test = welch_test([1, 2, 3], [4, 5, 6])
    assert (test["delta"], test["t"], test["df"]) == (3.0, 3.67, 4.0)
    x = 3 / math.sqrt(2 / 3)  # Student's t with 4 df in closed form
    cdf = 0.5 + 3 / 8 * x / math.sqrt(1 + x * x / 4) * (1 - x * x / (12 * (1 + x * x / 4)))
    assert test["p"] == round(2 * (1 - cdf), 4)
    with pytest.raises(ValueError, match="two seeds a side"):
        welch_test([21.0], [22.0, 23.0])


def test_a_third_seed_is_swept_on_the_offline_decode_alone():
    text = B.TASKS["text"]
    assert text.heads("stream-0.3-seed2") == text.heads("no-mslm-seed2") == {"offline": {}}
    assert B.planned_runs("text", "stream-0.3-seed2") == 1
    assert B.VARIANTS["stream-0.3-seed2"] == {**B.VARIANTS["stream-0.3"], "seed": 2}


def test_a_seed_replica_is_swept_as_the_ablations_are():
    text = B.TASKS["text"]
    assert text.heads("main-seed1") == text.heads("no-spsd")  # entropy and every other k of wait-k
    assert B.planned_runs("text", "no-mslm-seed1") == B.planned_runs("text", "no-mslm") == 10
    assert B.VARIANTS["no-mslm-seed1"] == {**B.VARIANTS["no-mslm"], "seed": 1}


def _swept_config(tmp_path, monkeypatch, variant: str):
    """The SweepConfig the bench's sweep stage builds for a text variant (the sweep itself not run)."""
    import simul_agents.sweep

    seen = {}

    def fake_sweep(config, jobs):
        seen["config"] = config
        return [], []

    monkeypatch.setattr(simul_agents.sweep, "sweep", fake_sweep)
    monkeypatch.setattr(B, "test_files", lambda task, bench: SimpleNamespace(source="s.txt", target="t.txt"))
    B.stage_sweep(B.Bench(runs=tmp_path / "runs", results=tmp_path / "results"), B.TASKS["text"], variant)
    return seen["config"]


def test_a_decoding_of_main_is_swept_on_main_s_checkpoint_with_its_flags_and_compared_last(tmp_path, monkeypatch):
    text = B.TASKS["text"]
    assert "main-reencode" in text.decodings and B.DECODINGS["main-reencode"] == {"reencode": "read"}
    assert text.compared()[-4:] == ["main-reencode", "stream-0.3-x4-reencode", "main-hold", "main-reencode-hold"]
    assert B.compared_with("main-reencode-hold") == "main-reencode" and B.compared_with("main-hold") == "main"
    # wait-k 1-5, entropy 3-5 (alone, between lags 1 and 2, between 1 and 3), the oracle, probe 0.7-0.8
    assert B.planned_runs("text", "main-reencode") == 18
    names = [name for name, _ in B.stages(B.Bench(), ["text"])]
    assert names.index("text-compare-main") < names.index("text-sweep-main-reencode") < names.index("text-compare")
    assert "text-train-main-reencode" not in names  # nothing to train
    config = _swept_config(tmp_path, monkeypatch, "main-reencode")
    assert config.checkpoint == str(tmp_path / "runs" / "text" / "main" / "final")
    assert config.output == tmp_path / "runs" / "text" / "eval-main-reencode"
    assert config.agent_args == {**text.agent_args, "reencode": "read"} and config.heads == text.heads("main-reencode")
    # the sentence end held: wait-k k=1-5 and entropy 3.0-5.0, a flag the sweep hands SimulEval as --hold-sentence-end
    assert B.planned_runs("text", "main-hold") == 8
    config = _swept_config(tmp_path, monkeypatch, "main-hold")
    assert config.checkpoint == str(tmp_path / "runs" / "text" / "main" / "final")
    assert config.agent_args == {**text.agent_args, "hold_sentence_end": True}


def test_a_decoding_of_another_model_is_swept_on_that_checkpoint_after_that_model_s_own_sweep(tmp_path, monkeypatch):
    assert B.decoded_model("stream-0.3-x4-reencode") == "stream-0.3-x4" and B.decoded_model("main-reencode") == "main"
    assert B.decoded_model("no-spsd") == "no-spsd"
    # wait-k 1-3 and main's six bounded entropy settings, unchanged
    assert B.planned_runs("text", "stream-0.3-x4-reencode") == 9
    names = [name for name, _ in B.stages(B.Bench(), ["text"])]
    assert names.index("text-sweep-stream-0.3-x4") < names.index("text-sweep-stream-0.3-x4-reencode") \
        < names.index("text-compare")  # fmt: skip
    config = _swept_config(tmp_path, monkeypatch, "stream-0.3-x4-reencode")
    assert config.checkpoint == str(tmp_path / "runs" / "text" / "stream-0.3-x4" / "final")
    assert config.agent_args["reencode"] == "read"


def test_a_decoding_of_another_model_is_compared_with_that_model_and_uses_its_offline_decode(task_dir):
    refs = [json.loads(line)["reference"] for line in (task_dir / "eval-main/offline/-/instances.log").open()]
    model = task_dir / "eval-stream-0.3-x4"
    _write_run(model / "offline" / "-", refs, refs, delays_per_word=10.0)
    _write_run(model / "wait-k" / "k=1", _corrupt(refs, 0.5, 7), refs, delays_per_word=1.0)
    decoded = task_dir / "eval-stream-0.3-x4-reencode"
    _write_run(decoded / "wait-k" / "k=1", _corrupt(refs, 0.05, 8), refs, delays_per_word=1.0)
    # the model decoded is not among the variants compared: its runs are read all the same
    result = compare_task(task_dir, ["main", "stream-0.3-x4-reencode"], "text",
                          decodings={"stream-0.3-x4-reencode": "stream-0.3-x4"})  # fmt: skip
    versus = result["decoding_vs_model"]["stream-0.3-x4-reencode"]
    assert versus["model"] == "stream-0.3-x4"
    (point,) = versus["runs"]
    assert point["param"] == "k=1" and point["chrF"]["delta"] > 0 and point["chrF"]["p"] < 0.05
    keep = result["variant_keep_offline"]
    assert "stream-0.3-x4-reencode" not in keep  # no adaptive head: nothing to keep
    assert "stream-0.3-x4-reencode" not in result["offline"]  # not a trained model
    text = "\n".join(format_comparison(result))
    assert "**stream-0.3-x4-reencode vs stream-0.3-x4**, run by run" in text and "stream-0.3-x4's LAAL" in text


def test_a_decoding_on_top_of_another_is_compared_with_it_and_finds_the_model_s_offline_decode(task_dir):
    """from-x4-reencode-hold against from-x4-reencode, setting by setting; its oracle study reads from-x4's
    offline decode, two steps away."""
    assert B.compared_with("from-x4-reencode-hold") == "from-x4-reencode-rebuilt"  # the same audio, no hold
    assert B.compared_with("from-x4-reencode") == B.decoded_model("from-x4-reencode-hold") == "from-x4"
    baseline = B.DECODINGS["from-x4-reencode-rebuilt"]
    assert B.DECODINGS["from-x4-reencode-hold"] == {**baseline, "hold_sentence_end": True}
    speech = B.TASKS["speech"]
    assert speech.decodings["from-x4-reencode-hold"] == speech.decodings["from-x4-reencode-rebuilt"]
    refs = [json.loads(line)["reference"] for line in (task_dir / "eval-main/offline/-/instances.log").open()]
    _write_run(task_dir / "eval-m" / "offline" / "-", refs, refs, delays_per_word=10.0)
    _write_run(task_dir / "eval-m-re" / "wait-k" / "k=2", _corrupt(refs, 0.5, 3), refs, delays_per_word=2.0)
    held = task_dir / "eval-m-re-hold"
    _write_run(held / "wait-k" / "k=2", _corrupt(refs, 0.1, 4), refs, delays_per_word=2.0)
    _write_run(held / "oracle" / "-", refs, refs, delays_per_word=2.0)
    result = compare_task(task_dir, ["main", "m-re", "m-re-hold"], "text",
                          decodings={"m-re": "m", "m-re-hold": "m-re"})  # fmt: skip
    versus = result["decoding_vs_model"]["m-re-hold"]
    assert versus["model"] == "m-re" and [p["param"] for p in versus["runs"]] == ["k=2"]
    assert versus["runs"][0]["chrF"]["delta"] > 0 and versus["runs"][0]["chrF"]["p"] < 0.05
    assert result["variant_oracle"]["m-re-hold"]["same_as_offline"] == 120  # m's offline decode stands in


def test_a_decoding_of_main_is_compared_run_by_run_with_main_and_has_its_own_oracle(task_dir):
    """main's model decoded another way: its runs against main's of the same setting, its oracle against its own
    wait-k, main's offline decode as its own; no offline or seed comparison of a model with itself."""
    refs = [json.loads(line)["reference"] for line in (task_dir / "eval-main/offline/-/instances.log").open()]
    other = task_dir / "eval-main-reencode"
    _write_run(other / "wait-k" / "k=2", _corrupt(refs, 0.1, 2), refs, delays_per_word=2.0)  # main's: 0.5 wrong
    _write_run(other / "oracle" / "-", refs, refs, delays_per_word=2.0)
    result = compare_task(task_dir, ["main", "no-mslm", "main-reencode"], "text", decodings={"main-reencode": "main"})
    assert result["decoding_vs_model"]["main-reencode"]["model"] == "main"
    points = {(p["head"], p["param"]): p for p in result["decoding_vs_model"]["main-reencode"]["runs"]}
    assert set(points) == {("wait-k", "k=2"), ("oracle", "-")}  # its offline decode is main's: not compared
    assert all(p["chrF"]["delta"] > 0 and p["chrF"]["p"] < 0.05 for p in points.values())
    oracle = result["variant_oracle"]["main-reencode"]
    assert oracle["same_as_offline"] == oracle["instances"] == 120  # main's offline decode stands in
    assert oracle["vs_waitk"]["matched"] == "wait-k k=2"
    assert "main-reencode" not in result["offline"] and "main-reencode" not in result.get("offline_vs_plain", {})
    text = "\n".join(format_comparison(result))
    assert "**main-reencode vs main**, run by run" in text and "significantly higher on 2 of 2 runs" in text
    assert "main-reencode, oracle head" in text and "equals the offline decode on 120 of 120 instances." in text


def test_each_variant_s_entropy_head_is_matched_with_its_own_wait_k(task_dir):
    refs = _sentences(120, 0)
    variant = task_dir / "eval-stream-0.3"
    _write_run(variant / "offline" / "-", refs, refs, delays_per_word=10.0)
    _write_run(variant / "entropy" / "threshold=1.0", _corrupt(refs, 0.5, 6), refs, delays_per_word=2.0)
    _write_run(variant / "wait-k" / "k=2", _corrupt(refs, 0.1, 7), refs, delays_per_word=2.0)
    result = compare_task(task_dir, ["main", "no-mslm", "stream-0.3"], "text")
    assert set(result["variant_entropy_vs_waitk"]) == {"stream-0.3"}  # no-mslm swept no entropy head
    (point,) = result["variant_entropy_vs_waitk"]["stream-0.3"]
    assert point["matched"] == "wait-k k=2" and point["worse"]
    text = "\n".join(format_comparison(result))
    assert "stream-0.3, entropy vs its own wait-k: 1 matched of 1 points, significantly better on 0, worse on 1" in text


def test_an_entropy_point_below_wait_k_s_range_is_matched_with_a_faster_fixed_chunk_schedule(task_dir):
    """Below wait-k k=1's LAAL only a schedule of several words per source unit reaches: fixed-chunk."""
    refs = [json.loads(line)["reference"] for line in (task_dir / "eval-main/offline/-/instances.log").open()]
    other = task_dir / "eval-main-reencode"
    _write_run(other / "wait-k" / "k=1", refs, refs, delays_per_word=2.0)
    _write_run(other / "entropy" / "threshold=6.0", _corrupt(refs, 0.1, 14), refs, delays_per_word=1.0)
    _write_run(other / "fixed-chunk" / "words=2", _corrupt(refs, 0.5, 15), refs, delays_per_word=1.05)
    result = compare_task(task_dir, ["main", "main-reencode"], "text", decodings={"main-reencode": "main"})
    assert "main" not in result["entropy_vs_fixed_chunk"]  # main swept no fixed-chunk schedule
    (point,) = result["entropy_vs_fixed_chunk"]["main-reencode"]
    assert point["matched"] == "fixed-chunk words=2" and point["better"]
    text = "\n".join(format_comparison(result))
    assert ("main-reencode, entropy vs its own fixed-chunk schedule: 1 matched of 1 points, significantly better "
            "on 1, worse on 0") in text


def test_a_decoding_s_entropy_between_lag_bounds_is_matched_with_its_own_wait_k(task_dir):
    """main-reencode's bounded entropy runs are their own curve against main-reencode's wait-k, not main's."""
    refs = [json.loads(line)["reference"] for line in (task_dir / "eval-main/offline/-/instances.log").open()]
    other = task_dir / "eval-main-reencode"
    _write_run(other / "wait-k" / "k=2", _corrupt(refs, 0.5, 12), refs, delays_per_word=2.0)
    _write_run(other / "entropy" / "threshold=4.0,min_lag=1,max_lag=3", _corrupt(refs, 0.1, 13), refs,
               delays_per_word=2.1)
    _write_run(other / "entropy" / "threshold=5.0,min_lag=1,max_lag=2", refs, refs, delays_per_word=1.5)
    result = compare_task(task_dir, ["main", "main-reencode"], "text", decodings={"main-reencode": "main"})
    assert "main-reencode" not in result["variant_entropy_vs_waitk"]  # no plain entropy run of its own
    points = {p["param"]: p for p in result["variant_bounded_vs_waitk"]["main-reencode"]}
    assert points["threshold=4.0,min_lag=1,max_lag=3"]["matched"] == "wait-k k=2"
    assert points["threshold=4.0,min_lag=1,max_lag=3"]["better"]
    assert points["threshold=5.0,min_lag=1,max_lag=2"]["matched"] is None  # LAAL 1.5 against 2: not within 10%
    text = "\n".join(format_comparison(result))
    assert ("main-reencode, entropy between lag bounds vs its own wait-k: 1 matched of 2 points, significantly "
            "better on 1, worse on 0") in text


def test_a_variant_s_probe_is_matched_with_its_own_entropy_and_its_low_latency_share_is_its_own(task_dir):
    refs = _sentences(120, 0)
    variant = task_dir / "eval-stream-0.3-x4"
    _write_run(variant / "offline" / "-", _corrupt(refs, 0.2, 8), refs, delays_per_word=10.0)
    _write_run(variant / "entropy" / "threshold=3.0", _corrupt(refs, 0.6, 9), refs, delays_per_word=2.0)
    _write_run(variant / "probe" / "threshold=0.8", _corrupt(refs, 0.2, 10), refs, delays_per_word=2.0)
    _write_run(variant / "wait-k" / "k=5", _corrupt(refs, 0.2, 11), refs, delays_per_word=5.0)
    result = compare_task(task_dir, ["main", "no-mslm", "stream-0.3-x4"], "text")
    (point,) = result["variant_probe_vs_entropy"]["stream-0.3-x4"]
    assert point["matched"] == "entropy threshold=3.0" and point["better"]
    assert set(result["variant_keep_offline"]) == {"stream-0.3-x4"}  # no-mslm swept only its offline decode
    keep = result["variant_keep_offline"]["stream-0.3-x4"]
    assert keep["best"]["param"] == "threshold=0.8" and keep["share"] > 0.9  # against its own offline decode
    text = "\n".join(format_comparison(result))
    assert "stream-0.3-x4, probe vs its own entropy: 1 matched of 1 points, significantly better on 1" in text
    best = "stream-0.3-x4, best proactive head at LAAL <= 3.5 words (35% of the mean source): probe threshold=0.8"
    assert best in text and "of its offline chrF" in text


def test_compare_cli_names_a_folder_without_the_main_runs(tmp_path, capsys):
    from simul_agents.compare import main

    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
    assert "no eval-main/ folder of runs (found: none)" in capsys.readouterr().err


def test_compare_cli_takes_a_decoding_of_main_and_refuses_one_not_among_the_variants(task_dir, capsys):
    from simul_agents.compare import main

    refs = [json.loads(line)["reference"] for line in (task_dir / "eval-main/offline/-/instances.log").open()]
    _write_run(task_dir / "eval-main-reencode" / "wait-k" / "k=2", _corrupt(refs, 0.1, 2), refs, delays_per_word=2.0)
    assert main([str(task_dir), "--variants", "main", "main-reencode", "--decodings", "main-reencode"]) == 0
    out = capsys.readouterr().out
    assert "**main-reencode vs main**, run by run" in out and "Offline decode, main vs main-reencode" not in out
    _write_run(task_dir / "eval-no-spsd-reencode" / "offline" / "-", refs, refs, delays_per_word=10.0)
    assert main([str(task_dir), "--variants", "main", "no-spsd-reencode", "--decodings",
                 "no-spsd-reencode=no-spsd"]) == 0  # fmt: skip
    assert "**no-spsd-reencode vs no-spsd**" not in capsys.readouterr().out  # offline runs are not compared
    with pytest.raises(SystemExit):
        main([str(task_dir), "--variants", "main", "main-reencode", "--decodings", "main-reencode=stream-9"])
    assert "no eval-stream-9/ folder of runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(task_dir), "--variants", "main", "--decodings", "main-reencode"])
    assert "--decodings main-reencode: not among --variants" in capsys.readouterr().err


def test_a_longer_variant_is_compared_with_the_plain_fine_tune_of_the_same_budget():
    from simul_agents.compare import plain_of

    assert [plain_of(v) for v in ("no-spsd", "stream-0.3", "stream-0.3-x4", "main-x", "no-mslm-x4")] == [
        "no-mslm", "no-mslm", "no-mslm-x4", "no-mslm", "no-mslm-x4"]  # fmt: skip
    steps = [B.VARIANTS[v]["max_steps"] for v in ("stream-0.3-x4", "no-mslm-x4")]
    assert steps == [4 * B.TASKS["text"].steps] * 2


def test_matched_without_a_baseline_head_marks_points_unmatched(task_dir):
    runs = [{"head": "entropy", "param": "t=1", "LAAL": 1.0, "output": ""}]
    assert matched(runs, "entropy", "wait-k") == [{"head": "entropy", "param": "t=1", "LAAL": 1.0, "matched": None}]


def test_a_finished_stage_is_not_run_again(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    calls = []
    B.run_stage(bench, "one", lambda: calls.append(1) or {"n": 1})
    record = B.run_stage(bench, "one", lambda: calls.append(2) or {"n": 2})
    assert calls == [1] and record["n"] == 1 and record["seconds"] >= 0


def test_a_failing_stage_names_itself_and_its_log_and_is_not_marked_done(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")

    def broken():
        raise OSError("disk on fire")

    expected = r"stage text-train-main failed: OSError: disk on fire; see .*text-train-main.log"
    with pytest.raises(B.StageFailed, match=expected):
        B.run_stage(bench, "text-train-main", broken)
    assert "disk on fire" in (bench.runs / "logs" / "text-train-main.log").read_text()
    assert not (bench.done_dir / "text-train-main.json").exists()


def test_a_stage_killed_while_it_marks_itself_done_runs_again_rather_than_block_every_start(tmp_path, monkeypatch):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    write_text = Path.write_text

    def killed_halfway(self, data, *args, **kwargs):  # Ctrl-C (or a full disk) in the middle of the write
        if self.parent == bench.done_dir:
            write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return write_text(self, data, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(Path, "write_text", killed_halfway)
        with pytest.raises(KeyboardInterrupt):
            B.run_stage(bench, "one", lambda: {"runs": 1})
    calls = []
    assert B.run_stage(bench, "one", lambda: calls.append(1) or {"runs": 2})["runs"] == 2 and calls == [1]
    assert json.loads((bench.done_dir / "one.json").read_text(encoding="utf-8"))["runs"] == 2


def test_a_stage_resumed_after_a_kill_reports_the_time_of_every_attempt(tmp_path):
    bench = B.Bench(runs=tmp_path, results=tmp_path / "results")
    clock = tmp_path / "time" / "one.json"
    clock.parent.mkdir()
    clock.write_text(json.dumps({"seconds": 600.0, "attempts": 1}))  # what a killed attempt's heartbeat left
    record = B.run_stage(bench, "one", lambda: {})
    assert 600.0 <= record["seconds"] < 660.0 and record["attempts"] == 2
    assert json.loads(clock.read_text())["attempts"] == 2


def test_a_stage_whose_plan_grew_on_a_new_machine_adds_to_the_time_its_record_kept(tmp_path):
    """A sweep finished elsewhere (its marker restored from results/, no clock here) is unmarked because its
    plan grew: its time goes on from the record. A stage merely run here (a corpus rebuilt) starts at zero."""
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    bench.done_dir.mkdir(parents=True)
    (bench.done_dir / "one.json").write_text(json.dumps({"stage": "one", "seconds": 8650.5, "attempts": 7}))
    B.unmark(bench, ["one"], "the plan has more runs")
    record = B.run_stage(bench, "one", lambda: {})
    assert 8650.5 <= record["seconds"] < 8700.0 and record["attempts"] == 8
    bench.records.mkdir(parents=True, exist_ok=True)
    (bench.records / "corpus.json").write_text(json.dumps({"stage": "corpus", "seconds": 600.0, "attempts": 1}))
    assert B.run_stage(bench, "corpus", lambda: {})["seconds"] < 60.0


def test_training_summary_counts_a_step_redone_after_a_resume_once(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"step": 0, "align_seconds": 60.0}]
    records += [{"step": s, "s_per_step": 6.0, "loss": 1.0, "full": 1.0, "mslm": 1.0, "spsd": 0.0, "probe_acc": 1.0}
                for s in (1, 2, 3, 2, 3, 4)]  # killed after step 3, resumed from the step-1 checkpoint
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = B.training_summary(log)
    assert summary["steps"] == 4 and summary["train_minutes"] == round((60 + 4 * 6) / 60, 1)


def test_training_summary_takes_the_latest_steps_dev_evaluation_whatever_its_place_in_the_log(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"step": 4, "dev_full": 2.0, "dev_chrf": 24.0}, {"step": 2, "dev_full": 2.5, "dev_chrf": 20.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))  # step 2's evaluation made up after a resume
    summary = B.training_summary(log)
    assert summary["dev_full"] == 2.0 and summary["dev_chrf"] == 24.0
    assert list(summary["dev_full_by_step"]) == ["2", "4"]


def test_summary_is_written_from_sweep_files_and_stage_records(tmp_path, task_dir):
    from simul_agents.score import score_output
    from simul_agents.sweep import write_csv

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n{B.README_START}\nstale numbers\n{B.README_END}\n\n## After\n")
    bench = B.Bench(runs=tmp_path, results=tmp_path / "results", readme=readme)  # task_dir is tmp_path / "text"
    rows = []
    for log in sorted((task_dir / "eval-main").glob("*/*/instances.log")):
        out = log.parent
        rows.append({"task": "t", "head": out.parent.name, "param": out.name, **score_output(out), "output": str(out)})
    write_csv(rows, task_dir / "eval-main" / "sweep.csv")
    longer = task_dir / "eval-no-mslm" / "offline" / "-"  # as if trained 4x as long: a plot of its own
    (task_dir / "eval-no-mslm-x4").mkdir()
    write_csv([{"task": "t", "head": "offline", "param": "-", **score_output(longer), "output": str(longer)}],
              task_dir / "eval-no-mslm-x4" / "sweep.csv")  # fmt: skip
    (task_dir / "eval-main-reencode").mkdir()  # main's model decoded another way: a plot beside main's runs
    write_csv([r for r in rows if r["head"] == "wait-k"], task_dir / "eval-main-reencode" / "sweep.csv")
    B.run_stage(bench, "text-train-main", lambda: {"s_per_step": 9.5})
    path = B.write_summary(bench, ["text"])
    summary = path.read_text()
    assert "| text-train-main |" in summary and "s_per_step=9.5" in summary
    assert f"| {B.machine()} |" in summary  # each stage names the machine it ran on
    assert "| main | entropy | threshold=0.5 |" in summary
    assert (bench.results / "text" / "runs.csv").is_file() and (bench.results / "text" / "curve.png").is_file()
    embedded = readme.read_text()
    assert "stale numbers" not in embedded and "## After" in embedded
    assert "| main | entropy | threshold=0.5 |" in embedded
    assert "](results/text/curve.png)" in embedded and "### text-to-text En-De" in embedded
    steps = B.VARIANTS["no-mslm-x4"]["max_steps"]
    assert (bench.results / "text" / f"curve-{steps}-steps.png").is_file()
    assert f"](results/text/curve-{steps}-steps.png)" in embedded
    assert (bench.results / "text" / "curve-main-reencode.png").is_file()
    assert "](results/text/curve-main-reencode.png)" in embedded and "| main-reencode | wait-k | k=1 |" in embedded
    assert "main's model decoded as `main-reencode`" in embedded


def test_the_main_plot_draws_main_and_same_budget_ablations_not_replicas_or_longer_started_models():
    variants = ("main", "no-spsd", "main-seed1", "no-mslm-x4", "from-x4", "main-reencode")
    rows = [{"variant": v, "head": h, "param": "-"} for v in variants for h in ("offline", "wait-k")]
    curves = {(r["variant"], r["head"]) for r in B.main_curves(rows)}
    assert curves == {("main", "offline"), ("main", "wait-k"), ("no-spsd", "offline (no-spsd)")}


def test_a_decoding_of_another_model_gets_its_own_plot_beside_that_model(tmp_path, task_dir):
    from simul_agents.score import score_output
    from simul_agents.sweep import write_csv

    bench = B.Bench(runs=tmp_path, results=tmp_path / "results", readme=None)
    for variant, head in (("main", "offline"), ("stream-0.3-x4", "offline"), ("stream-0.3-x4-reencode", "wait-k")):
        out = next((task_dir / "eval-main" / head).glob("*"))
        (task_dir / f"eval-{variant}").mkdir(exist_ok=True)
        write_csv([{"task": "t", "head": head, "param": out.name, **score_output(out), "output": str(out)}],
                  task_dir / f"eval-{variant}" / "sweep.csv")  # fmt: skip
    summary = B.write_summary(bench, ["text"]).read_text()
    assert "stream-0.3-x4's model decoded as `stream-0.3-x4-reencode`" in summary
    assert (bench.results / "text" / "curve-stream-0.3-x4-reencode.png").is_file()


def test_summary_gives_each_computation_aware_run_its_ratio_to_plain_laal(tmp_path):
    from simul_agents.sweep import write_csv

    bench = B.Bench(runs=tmp_path, results=tmp_path / "results", readme=None)
    base = {"task": "t", "BLEU": 1.0, "chrF": 17.0, "n_instances": 100, "mean_source_length": 2300.0}
    for variant in ("main", "main-ca-int8"):
        (tmp_path / "speech" / f"eval-{variant}").mkdir(parents=True)
    write_csv([{**base, "head": "offline", "param": "-", "LAAL": 2300.0, "AL": 2300.0}],
              tmp_path / "speech" / "eval-main" / "sweep.csv")  # fmt: skip
    write_csv([{**base, "head": "entropy", "param": "threshold=3.0", "LAAL": 1600.0, "LAAL_CA": 2400.0},
               {**base, "head": "offline", "param": "-", "LAAL": 2300.0, "LAAL_CA": 2875.0}],
              tmp_path / "speech" / "eval-main-ca-int8" / "sweep.csv")  # fmt: skip
    summary = B.write_summary(bench, ["speech"]).read_text()
    assert "| main-ca-int8 | entropy | threshold=3.0 | 1600 | 2400 | 1.50 | 1.00 | 17.00 |" in summary
    assert "| main-ca-int8 | offline | - | 2300 | 2875 | 1.25 |" in summary
    assert "n = 100" in summary and "at most 1.25x LAAL" in summary
    assert "| main | offline | - |" in summary and "| main | offline | - | 2300 | 2300 |" not in summary


def test_a_bench_run_of_one_task_keeps_the_other_task_s_results_in_the_summary(tmp_path):
    bench = B.Bench(runs=tmp_path, results=tmp_path / "results", readme=None)
    assert B.summary_tasks(bench, ["text"]) == ["text"]
    (tmp_path / "results" / "speech").mkdir(parents=True)
    (tmp_path / "results" / "speech" / "runs.csv").write_text("task,variant\n")
    assert B.summary_tasks(bench, ["text"]) == ["text", "speech"]  # written before: shown, not dropped
    assert B.summary_tasks(bench, ["speech"]) == ["speech"]  # no text results here


def test_a_one_task_bench_on_a_fresh_machine_keeps_the_other_task_s_results_in_the_summary(tmp_path, monkeypatch):
    @dataclass(frozen=True)
    class NoReadme(B.Bench):  # main's Bench, this repository's README left alone
        readme: Path | None = None

    old = B.Bench(runs=tmp_path / "old", results=tmp_path / "results", readme=None)
    shutil.copytree(_speech_runs(tmp_path), old.runs / "speech" / "eval-main")
    _score_into_table(old.runs / "speech" / "eval-main")
    B.write_summary(old, ["speech"])  # archives the speech runs, writes results/speech/runs.csv
    monkeypatch.chdir(tmp_path)  # a fresh machine: runs/bench is new, results/ came with the clone
    monkeypatch.setattr(B, "Bench", NoReadme)
    assert B.main(["--tasks", "text", "--summary-only"]) == 0
    speech = (tmp_path / "results" / "SUMMARY.md").read_text(encoding="utf-8").split("## speech-to-text En-De")[1]
    assert "No sweep has finished yet" not in speech and "| main | entropy | threshold=0.5 |" in speech


def _speech_runs(tmp_path: Path) -> Path:
    refs = _sentences(40, 0)
    runs = tmp_path / "speech-runs"
    _write_run(runs / "offline" / "-", refs, refs, delays_per_word=10.0)
    _write_run(runs / "entropy" / "threshold=0.5", _corrupt(refs, 0.1, 1), refs, delays_per_word=2.0)
    _write_run(runs / "wait-k" / "k=1", _corrupt(refs, 0.5, 2), refs, delays_per_word=1.0)
    return runs


def test_speech_sweeps_wait_k_only_up_to_its_utterance_lengths_and_ablations_every_other_k():
    text, speech = B.TASKS["text"], B.TASKS["speech"]
    assert text.heads("main")["wait-k"] == {"k": list(range(1, 10))}
    assert speech.heads("main")["wait-k"] == {"k": [1, 2, 3, 4, 5, 6]}
    assert text.heads("no-mslm")["wait-k"] == {"k": [1, 3, 5, 7, 9]}
    assert speech.heads("no-spsd")["wait-k"] == {"k": [1, 3, 5]}
    assert list(text.heads("main"))[:3] == ["offline", "entropy", "wait-k"]  # the targets' numbers first
    assert text.heads("main")["attention"]["threshold"] == [0.03, 0.05, 0.08]
    assert speech.heads("main")["attention"] == {"threshold": [0.04, 0.08, 0.13], "frontier": 1, "layers": "upper",
                                                 "normalise": "all"}  # fmt: skip
    assert "attention" not in speech.heads("no-spsd")
    assert text.heads("main")["entropy"][0] == {"threshold": [0.5, 1.0, 2.0, 3.0, 4.0, 5.0]}  # then lag-bounded
    assert speech.heads("main")["entropy"][0]["threshold"][-1] == 6.0  # down to LAAL 35% of the source
    assert speech.heads("no-spsd")["entropy"] == {"threshold": [1.0, 2.0, 3.0, 4.0]}


def test_an_ablation_named_in_probe_variants_sweeps_its_probe_after_entropy_and_wait_k():
    text = B.TASKS["text"]
    assert list(text.heads("stream-0.3-x4")) == ["offline", "entropy", "wait-k", "probe"]
    assert text.heads("stream-0.3-x4")["probe"] == {"threshold": list(text.probe)}
    assert "probe" not in text.heads("no-mslm-x4")  # trained without a probe
    for task in B.TASKS.values():  # only a variant that trains a probe can sweep one
        assert all(v in task.variants and B.VARIANTS[v].get("probe", True) for v in task.probe_variants)
    assert B.planned_runs("text", "stream-0.3-x4") == B.planned_runs("text", "stream-0.3") + len(text.probe)


def test_the_main_text_sweep_runs_the_lag_bounded_entropy_head_as_its_own_runs():
    from simul_agents.sweep import SweepConfig, curve_name, expand_runs

    text = B.TASKS["text"]
    config = SweepConfig("t", "ckpt", "src", "tgt", Path("out"), text.heads("main"))
    labels = [run.label for run in expand_runs(config) if run.head == "entropy"]
    assert labels[:6] == [f"threshold={t}" for t in text.entropy]  # the plain curve keeps its runs
    assert "threshold=3.0,min_lag=2,max_lag=4" in labels and "threshold=4.0,min_lag=2" in labels  # 0: not named
    assert len(labels) == len(text.entropy) + len(text.lag_bounded) == len(set(labels))
    assert B.planned_runs("text", "main") == len(expand_runs(config))
    assert [curve_name("entropy", label) for label in labels].count("entropy, lag-bounded") == len(text.lag_bounded)
    speech = B.TASKS["speech"]  # the probe between bounds too, after its own thresholds
    probe = [run.label for run in expand_runs(SweepConfig("t", "c", "s", "t", Path("o"), speech.heads("main")))
             if run.head == "probe"]  # fmt: skip
    assert probe[:len(speech.probe)] == [f"threshold={t}" for t in speech.probe] and len(probe) > len(speech.probe)
    params = ("threshold=3.0,min_lag=1,max_lag=3", "threshold=4.0", "threshold=2.0,min_lag=1,max_lag=3",
              "threshold=1.0")
    rows = [{"head": "entropy", "param": p} for p in params]
    assert [r["param"] for r in sorted(rows, key=B._run_order)] == [
        "threshold=1.0", "threshold=4.0", "threshold=2.0,min_lag=1,max_lag=3", "threshold=3.0,min_lag=1,max_lag=3"]


def test_stage_plan_puts_the_main_models_then_their_sweeps_before_the_ablations():
    names = [name for name, _ in B.stages(B.Bench(), ["text"])]
    assert names.index("text-sweep-main") < names.index("text-compare-main") < names.index("text-train-no-mslm")
    assert names.index("text-train-no-mslm") < names.index("text-compare")
    assert names[0] == "assets" and names[-1] == "training-cost"
    both = [name for name, _ in B.stages(B.Bench(), ["text", "speech"])]
    assert both.index("speech-computation-aware") < both.index("text-train-no-mslm")
    assert both.index("speech-train-main") < both.index("text-sweep-main")  # both models before any sweep
    # the encoder ablation needs only the main models: it runs first (it answers whether fine-tuning pays)
    assert both.index("speech-computation-aware") < both.index("speech-train-encoder-lora")
    assert both.index("speech-sweep-encoder-lora") < both.index("text-train-no-mslm")
    assert both.index("text-sweep-no-spsd") < both.index("text-compare") < both.index("speech-train-no-mslm")
    assert both.index("text-sweep-stream-0.3") < both.index("text-compare")  # every text variant is compared
    assert both.index("speech-sweep-no-spsd") < both.index("speech-compare")
    assert len(both) == len(set(both))
    assert "text-train-encoder-lora" not in both  # a text model has no encoder


def test_speech_variants_start_from_their_text_model_and_share_a_frozen_encoders_cache(tmp_path, monkeypatch):
    import training.train

    seen = {}

    def fake_train(cfg, resume):
        seen[cfg.out_dir] = cfg
        final = Path(cfg.out_dir) / "final"
        final.mkdir(parents=True)
        (final / "checkpoint.json").write_text("{}")
        return final

    monkeypatch.setattr(training.train, "train", fake_train)
    monkeypatch.setattr(B, "training_summary", lambda path: {})
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    with pytest.raises(RuntimeError, match="text-train-no-spsd"):  # a speech LLM starts from the text model
        B.stage_train(bench, B.TASKS["speech"], "no-spsd")
    for variant in ("main", "no-spsd", "stream-0.3-x4"):
        (tmp_path / "runs" / "text" / variant / "final").mkdir(parents=True)
        (tmp_path / "runs" / "text" / variant / "final" / "checkpoint.json").write_text("{}")
    trained = ("no-spsd", "encoder-lora", "from-x4")
    for variant in trained:
        B.stage_train(bench, B.TASKS["speech"], variant)
    frozen, tuned, longer = (seen[str(tmp_path / "runs" / "speech" / v)] for v in trained)
    assert frozen.train_encoder == "frozen" and frozen.encoder_cache.endswith("speech/main/encoder_cache")
    assert tuned.train_encoder == "lora" and "main" not in tuned.encoder_cache
    assert frozen.init_llm.endswith("text/no-spsd/final") and tuned.init_llm.endswith("text/main/final")
    # the stronger speech model: the longest-trained text model's LLM, the speech plan's steps, the lighter recipe
    assert longer.init_llm.endswith("text/stream-0.3-x4/final") and longer.max_steps == B.TASKS["speech"].steps
    assert longer.w_mslm == longer.spsd_lambda == 0.3
    for variant in trained:  # every variant's final model is kept with the results
        assert (tmp_path / "results" / "speech" / "models" / variant / "checkpoint.json").is_file()


def _score_into_table(eval_dir):
    from simul_agents.score import score_output
    from simul_agents.sweep import write_csv

    rows = []
    for log in sorted(eval_dir.glob("*/*/instances.log")):
        out = log.parent
        rows.append({"task": "t", "head": out.parent.name, "param": out.name, **score_output(out), "output": str(out)})
    write_csv(rows, eval_dir / "sweep.csv")


def test_a_fresh_machine_gets_finished_stages_back_from_results(tmp_path, task_dir):
    import shutil

    old = B.Bench(runs=tmp_path, results=tmp_path / "results", readme=None)  # task_dir is tmp_path / "text"
    _score_into_table(task_dir / "eval-main")
    model = old.model_dir("text", "main")

    def train():
        model.mkdir(parents=True)
        (model / "checkpoint.json").write_text("{}")
        return {"steps": 5}

    B.run_stage(old, "text-train-main", train)
    B.run_stage(old, "text-sweep-main", lambda: {"runs": 6})
    B.run_stage(old, "text-train-no-spsd", lambda: {"steps": 5})  # its model never reached results/
    B.write_summary(old, ["text"])  # archives every scored run
    archive = old.archive_dir("text", "main")
    assert len(list(archive.glob("*/*/instances.log.gz"))) == 6
    assert B.pack(task_dir / "eval-main", archive) == 0  # unchanged runs are not written again

    new = B.Bench(runs=tmp_path / "elsewhere", results=old.results, readme=None)
    names = ["text-train-main", "text-sweep-main", "text-train-no-spsd", "text-sweep-no-spsd"]
    assert B.restore(new, ["text"], names) == ["text-train-main", "text-sweep-main"]
    assert (new.runs / "text" / "main" / "final" / "checkpoint.json").is_file()
    back = new.runs / "text" / "eval-main"
    for log in task_dir.glob("eval-main/*/*/instances.log"):
        assert (back / log.relative_to(task_dir / "eval-main")).read_bytes() == log.read_bytes()
    shutil.rmtree(task_dir)  # the old machine is gone: its comparison now runs on what came back
    new = B.Bench(runs=new.runs, results=old.results, readme=None)
    assert B.stage_compare(new, B.TASKS["text"], ["main"])["output"].endswith("compare.json")


def test_runs_measured_before_the_archive_keep_their_numbers_but_cannot_be_compared(tmp_path):
    results = tmp_path / "results"
    (results / "text").mkdir(parents=True)
    (results / "text" / "runs.csv").write_text(
        "variant,task,head,param,BLEU,chrF,LAAL,n_instances,mean_source_length,latency_unit\n"
        "main,t,offline,-,2.0,21.7,7.9,1000,7.9,words\nmain,t,wait-k,k=3,1.7,21.5,3.1,1000,7.9,words\n"
    )
    bench = B.Bench(runs=tmp_path / "runs", results=results, readme=None)
    assert B.restore(bench, ["text"], ["text-sweep-main"]) == []
    summary = B.write_summary(bench, ["text"]).read_text()
    assert "| main | wait-k | k=3 † | 1.70 | 21.50 |" in summary and "**Partial:** `text-sweep-main`" in summary
    assert "**Being rerun:** 2 run(s) of `main`" in summary
    with pytest.raises(RuntimeError, match="2 run.*no instances.log.*--only text-sweep-main"):
        B.stage_compare(bench, B.TASKS["text"], ["main"])


def test_a_redone_sweep_is_forgotten_here_and_in_results_but_its_model_stays(tmp_path, task_dir):
    bench = B.Bench(runs=tmp_path, results=tmp_path / "results", readme=None)  # task_dir is tmp_path / "text"
    _score_into_table(task_dir / "eval-main")
    _score_into_table(task_dir / "eval-no-mslm")
    model = bench.model_dir("text", "main")
    model.mkdir(parents=True)
    (model / "checkpoint.json").write_text("{}")
    B.run_stage(bench, "text-train-main", lambda: {"steps": 5})
    B.run_stage(bench, "text-sweep-main", lambda: {"runs": 6})
    B.write_summary(bench, ["text"])  # archives the runs, writes results/text/runs.csv
    removed = B.forget(bench, "text-sweep-main")
    assert task_dir / "eval-main" in removed and bench.archive_dir("text", "main") in removed
    assert "main," not in (bench.results / "text" / "runs.csv").read_text()  # or restore would seed them back
    assert "no-mslm," in (bench.results / "text" / "runs.csv").read_text()
    assert not (bench.done_dir / "text-sweep-main.json").exists()
    assert not (bench.records / "text-sweep-main.json").exists()
    assert B.restore(bench, ["text"], ["text-train-main", "text-sweep-main"]) == []  # nothing brings it back
    assert not (task_dir / "eval-main" / "earlier.csv").exists()
    assert (bench.done_dir / "text-train-main.json").is_file() and (model / "checkpoint.json").is_file()
    with pytest.raises(ValueError, match="only evaluation stages"):
        B.forget(bench, "text-train-main")


def test_a_rerun_takes_the_place_of_its_earlier_row_and_the_rest_stay_in_run_order(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results", readme=None)
    eval_dir = bench.runs / "text" / "eval-main"
    eval_dir.mkdir(parents=True)
    header = "task,head,param,BLEU,chrF,LAAL,output\n"
    (eval_dir / "earlier.csv").write_text(
        header + "t,wait-k,k=3,1.7,21.5,3.1,x\nt,offline,-,2.0,21.7,7.9,x\nt,entropy,threshold=2.0,1.8,21.2,5.2,x\n"
    )
    (eval_dir / "sweep.csv").write_text(header + "t,offline,-,2.0,21.7,7.9,x\n")
    rows = B.collect_rows(bench, "text")
    assert [(r["head"], r["earlier"]) for r in rows] == [("offline", False), ("entropy", True), ("wait-k", True)]


def test_a_sweep_marked_done_before_its_runs_were_archived_runs_again_for_their_logs(tmp_path, task_dir):
    bench = B.Bench(runs=tmp_path, results=tmp_path / "results", readme=None)  # task_dir is tmp_path / "text"
    _score_into_table(task_dir / "eval-main")
    calls = []
    B.run_stage(bench, "text-sweep-main", lambda: calls.append(1) or {"runs": 6})
    B.run_stage(bench, "text-sweep-main", lambda: calls.append(2) or {"runs": 6})
    assert calls == [1]  # every run has its log: skipped
    shutil.rmtree(task_dir / "eval-main" / "wait-k" / "k=1")  # a run known only from a table
    record = B.run_stage(bench, "text-sweep-main", lambda: calls.append(3) or {"runs": 6})
    assert calls == [1, 3] and record["attempts"] == 2
    B.run_stage(bench, "text-compare-main", lambda: calls.append(4) or {})
    B.run_stage(bench, "text-compare-main", lambda: calls.append(5) or {})
    assert calls == [1, 3, 4]  # only evaluation stages look for their logs


def test_a_stage_clock_does_not_count_the_time_its_process_was_stopped(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(B.time, "time", lambda: now[0])
    clock = B._StageClock(tmp_path / "one.json")
    for _ in range(4):  # running: heartbeats every 30 s
        now[0] += B.HEARTBEAT_SECONDS
        clock.seconds()
    now[0] += 3600  # kill -STOP for an hour, then -CONT
    clock.seconds()
    now[0] += 10
    assert clock.seconds() == 4 * B.HEARTBEAT_SECONDS + B.MAX_GAP_SECONDS + 10


def _mark_done(bench, name: str, finished: str = "2026-11-30 10:00", **record) -> None:
    bench.done_dir.mkdir(parents=True, exist_ok=True)
    (bench.done_dir / f"{name}.json").write_text(json.dumps({"seconds": 1, "finished": finished, **record}),
                                                 encoding="utf-8")  # fmt: skip


def test_a_comparison_made_before_a_variant_was_added_runs_again_but_keeps_its_output(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    now = B.TASKS["text"].compared()
    for task in ("text", "speech"):
        for variant in B.TASKS[task].compared():
            _mark_done(bench, f"{task}-sweep-{variant}", finished="2026-11-30 09:00")
    B.run_stage(bench, "text-compare", lambda: {"variants": now[:-1]})  # an earlier plan, one variant short
    B.run_stage(bench, "speech-compare", lambda: {"variants": B.TASKS["speech"].compared()})
    assert B.outgrown_compares(bench, ["text", "speech"]) == ["text-compare"]
    (bench.done_dir / "text-compare.json").write_text(json.dumps({"seconds": 1}), encoding="utf-8")  # no record
    assert B.outgrown_compares(bench, ["text"]) == ["text-compare"]
    B.run_stage(bench, "text-compare", lambda: {})  # still marked done: run_stage leaves it
    assert B.outgrown_compares(bench, ["speech"]) == []


def test_a_sweep_finished_before_a_threshold_was_added_runs_again_and_so_do_the_comparisons_that_read_it(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    planned = B.planned_runs("text", "main")
    _mark_done(bench, "text-sweep-main", runs=planned - 1)  # an earlier plan: one probe threshold fewer
    _mark_done(bench, "text-sweep-no-mslm", runs=B.planned_runs("text", "no-mslm"))
    _mark_done(bench, "text-compare-main", finished="2026-11-30 10:05", variants=["main", "no-mslm"])
    assert B.outgrown_sweeps(bench, ["text"]) == ["text-sweep-main"]
    assert B.outgrown_compares(bench, ["text"]) == []  # its sweeps are done and older: unmarking them decides
    (bench.done_dir / "text-sweep-main.json").unlink()
    assert B.outgrown_compares(bench, ["text"]) == ["text-compare-main"]

    _mark_done(bench, "text-sweep-main", finished="2026-11-30 11:00", runs=planned)  # the new run, done
    assert B.outgrown_sweeps(bench, ["text"]) == []
    assert B.outgrown_compares(bench, ["text"]) == ["text-compare-main"]  # after a kill, restored from its record
    _mark_done(bench, "text-compare-main", finished="2026-11-30 11:01", variants=["main", "no-mslm"])
    assert B.outgrown_compares(bench, ["text"]) == []


def test_the_main_comparison_takes_every_ablation_already_swept_with_its_logs(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    task = B.TASKS["text"]
    assert B.swept(bench, task) == []
    _mark_done(bench, "text-sweep-no-spsd")
    _mark_done(bench, "text-sweep-no-mslm")
    assert B.swept(bench, task) == ["no-mslm", "no-spsd"]  # in the plan's order
    eval_dir = bench.runs / "text" / "eval-no-mslm"
    eval_dir.mkdir(parents=True)
    (eval_dir / "sweep.csv").write_text(f"task,head,param,output\nt,offline,-,{eval_dir}/offline/default\n",
                                        encoding="utf-8")  # fmt: skip
    assert B.swept(bench, task) == ["no-spsd"]  # its table came back without its logs: not comparable


def test_the_main_sweep_plans_the_probe_thresholds_of_its_task():
    text, speech = B.TASKS["text"].heads("main"), B.TASKS["speech"].heads("main")
    assert 0.75 in text["probe"]["threshold"] and 0.75 not in speech["probe"][0]["threshold"]  # then lag-bounded
    assert "probe" not in B.TASKS["text"].heads("no-mslm")


def test_a_stage_another_bench_process_is_running_is_waited_for_then_skipped(tmp_path, capsys):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    lock = bench.runs / "locks" / "text-train-no-mslm-x4.lock"
    lock.parent.mkdir(parents=True)
    calls, result = [], {}
    with open(lock, "w", encoding="utf-8") as other:  # another process: an open file description of its own
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242")
        other.flush()
        waiter = threading.Thread(target=lambda: result.update(B.run_stage(bench, "text-train-no-mslm-x4",
                                                                           lambda: calls.append(1) or {})))  # fmt: skip
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not calls  # waiting, not training the same run twice
        assert B.running(bench, "text-train-no-mslm-x4") == "4242"  # what --list shows
        _mark_done(bench, "text-train-no-mslm-x4", steps=2000)  # the other process finishes it
        fcntl.flock(other, fcntl.LOCK_UN)
    waiter.join(10)
    assert not waiter.is_alive() and not calls and result["steps"] == 2000
    assert B.running(bench, "text-train-no-mslm-x4") is None and B.running(bench, "text-sweep-main") is None
    assert "running in another bench process (pid 4242)" in capsys.readouterr().out
    B.run_stage(bench, "text-train-no-mslm-x4", lambda: calls.append(2) or {})  # free, and done: skipped at once
    assert not calls


def test_a_redo_or_only_with_a_bad_stage_forgets_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # main's Bench: runs/bench and results/ under here
    bench = B.Bench()
    _mark_done(bench, "text-sweep-main", runs=35)
    finished = bench.runs / "text" / "eval-main" / "offline" / "-" / "instances.log"
    finished.parent.mkdir(parents=True)
    finished.write_text("{}\n", encoding="utf-8")
    cases = [(["text-train-main"], "only evaluation stages"),
             (["text-sweep-mian"], "--redo text-sweep-mian: no such stage"),
             (["--only", "text-sweep-mian"], "unknown stage(s)")]  # fmt: skip
    for argv, problem in cases:
        assert B.main(["--redo", "text-sweep-main", *argv, "--list"]) == 2
        assert problem in capsys.readouterr().err
        assert finished.is_file() and (bench.done_dir / "text-sweep-main.json").is_file()  # nothing forgotten


def test_a_redo_of_a_stage_another_bench_process_is_running_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bench = B.Bench()
    finished = bench.runs / "text" / "eval-main" / "entropy" / "threshold=1.0" / "instances.log"
    finished.parent.mkdir(parents=True)
    finished.write_text("{}\n", encoding="utf-8")
    lock = bench.lock("text-sweep-main")
    lock.parent.mkdir(parents=True)
    with open(lock, "w", encoding="utf-8") as other:  # the other process, sweeping
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242")
        other.flush()
        assert B.main(["--redo", "text-sweep-main", "--list"]) == 2
        fcntl.flock(other, fcntl.LOCK_UN)
    assert "--redo text-sweep-main: running in another bench process (pid 4242)" in capsys.readouterr().err
    assert finished.is_file()  # the runs it had finished are still there


def test_the_summary_shows_each_variants_dev_loss_by_step_from_its_log_or_its_record(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    log = bench.runs / "text" / "no-mslm" / "log.jsonl"  # trained here, finished
    log.parent.mkdir(parents=True)
    lines = [{"step": 1, "loss": 3.0, "full": 3.0, "mslm": 0.0, "spsd": 0.0, "probe_acc": 0.0, "s_per_step": 2.0},
             {"step": 200, "dev_full": 2.6521, "dev_bleu": 1.0},
             {"step": 400, "dev_full": 2.5}]  # fmt: skip
    log.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    _mark_done(bench, "text-train-no-mslm", **B.training_summary(log))
    assert B.training_summary(log)["dev_full_by_step"] == {"200": 2.6521, "400": 2.5}
    bench.records.mkdir(parents=True)  # trained on another machine: only its record came with results/
    (bench.records / "text-train-main.json").write_text(json.dumps({"steps": 500, "dev_full": 2.489}), encoding="utf-8")
    running = bench.runs / "text" / "stream-0.3-x4" / "log.jsonl"  # under way: no record yet
    running.parent.mkdir(parents=True)
    running.write_text(json.dumps({"step": 200, "dev_full": 2.684}) + "\n", encoding="utf-8")

    table = B.dev_curve_table(bench, "text")
    assert "| variant | 200 | 400 | 500 |" in table
    assert "| main | - | - | 2.489 |" in table
    assert "| no-mslm | 2.652 | 2.500 | - |" in table
    assert "| stream-0.3-x4 (training) | 2.684 | - | - |" in table
    assert B.dev_curve_table(bench, "speech") == []


def test_two_bench_processes_started_together_tidy_the_done_markers_one_at_a_time(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # main's Bench: runs/bench and results/ under here
    bench = B.Bench()
    lock = bench.lock(B.STARTUP)
    lock.parent.mkdir(parents=True)
    result = {}
    with open(lock, "w", encoding="utf-8") as other:  # the other process, restoring and unmarking
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242")
        other.flush()
        starting = threading.Thread(target=lambda: result.update(code=B.main(["--list"])))
        starting.start()
        starting.join(0.5)
        assert starting.is_alive() and "code" not in result  # waits: it would unmark what the other just unmarked
        fcntl.flock(other, fcntl.LOCK_UN)
    starting.join(30)
    assert result == {"code": 0}
    out = capsys.readouterr().out
    assert "startup: running in another bench process (pid 4242)" in out and "text-train-main" in out


def test_main_s_probe_trained_again_is_a_variant_swept_on_the_probe_alone_after_its_own_stage(tmp_path, monkeypatch):
    text = B.TASKS["text"]
    assert text.heads("probe-word-start") == {"probe": {"threshold": list(text.probe)}}
    assert B.planned_runs("text", "probe-all-rows") == 3 and B.planned_runs("text", "probe-word-start") == 7
    names = [name for name, _ in B.stages(B.Bench(), ["text"])]
    for variant in B.PROBES:
        assert names.index(f"text-train-{variant}") < names.index(f"text-sweep-{variant}") < names.index("text-compare")
    config = _swept_config(tmp_path, monkeypatch, "probe-word-start")
    assert config.checkpoint == str(tmp_path / "runs" / "text" / "probe-word-start" / "final")
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    with pytest.raises(RuntimeError, match="run `text-train-main` first"):
        B.stage_probe(bench, text, "probe-word-start")
    import training.probe

    main = tmp_path / "runs" / "text" / "main" / "final"
    main.mkdir(parents=True)
    (main / "checkpoint.json").write_text("{}")
    seen = {}

    def fake_run(checkpoint, out, config, states):
        seen.update(checkpoint=checkpoint, out=out, rows=config.rows, states=states)
        (out / "final").mkdir(parents=True)
        (out / "final" / "checkpoint.json").write_text("{}")
        dev = {p: {"word_start": {"auc": auc, "accuracy": 0.7}} for p, auc in (("old", 0.6), ("new", 0.65))}
        return {"final": str(out / "final"), "train_rows": 123, "dev": dev}

    monkeypatch.setattr(training.probe, "run", fake_run)
    info = B.stage_train(bench, text, "probe-word-start")
    text_runs = tmp_path / "runs" / "text"
    assert seen == {"checkpoint": main, "out": text_runs / "probe-word-start", "rows": "word_start",
                    "states": text_runs / "probe-states"}  # fmt: skip
    assert info["dev_auc_old"] == 0.6 and info["dev_auc_new"] == 0.65 and info["train_rows"] == 123
    assert (tmp_path / "results" / "text" / "models" / "probe-word-start" / "checkpoint.json").is_file()


def test_a_probe_trained_again_is_matched_with_main_s_heads_and_keeps_main_s_offline_decode(task_dir):
    refs = _sentences(120, 0)
    _write_run(task_dir / "eval-probe-word-start" / "probe" / "threshold=0.8", _corrupt(refs, 0.05, 12), refs,
               delays_per_word=2.0)  # fmt: skip
    result = compare_task(task_dir, ["main", "probe-word-start"], "text", decodings={"probe-word-start": "main"})
    by_head = result["probe_vs_main"]["probe-word-start"]
    assert by_head["entropy"][0]["matched"] == "entropy threshold=2.0" and by_head["entropy"][0]["better"]
    assert by_head["wait-k"][0]["matched"] == "wait-k k=2" and by_head["probe"][0]["matched"] is None
    assert "probe-word-start" not in result["variant_probe_vs_entropy"]  # it has no entropy runs of its own
    assert result["variant_keep_offline"]["probe-word-start"]["offline_chrF"] == result["keep_offline"]["offline_chrF"]
    text = "\n".join(format_comparison(result))
    assert "probe-word-start, probe vs main's entropy: 1 matched of 1 points, significantly better on 1" in text


def test_a_probe_variant_s_runs_are_in_runs_csv_and_the_summary_table(tmp_path, task_dir):
    # main's model with its probe trained again (PROBES) is swept and compared like a variant: its runs belong in
    # runs.csv ("every run of every variant") and in the summary's run table, like a decoding's
    bench = B.Bench(runs=tmp_path, results=tmp_path / "results", readme=None)  # task_dir is tmp_path / "text"
    refs = _sentences(120, 0)
    _write_run(task_dir / "eval-probe-word-start" / "probe" / "threshold=0.8", _corrupt(refs, 0.05, 12), refs,
               delays_per_word=2.0)  # fmt: skip
    _score_into_table(task_dir / "eval-main")
    _score_into_table(task_dir / "eval-probe-word-start")
    rows = B.collect_rows(bench, "text")
    assert [(r["variant"], r["head"], r["param"]) for r in rows if r["variant"] in B.PROBES] == [
        ("probe-word-start", "probe", "threshold=0.8")]
    summary = B.write_summary(bench, ["text"]).read_text()
    assert "| probe-word-start | probe | threshold=0.8 |" in summary
    assert "probe-word-start," in (bench.results / "text" / "runs.csv").read_text()


def _model_folder(folder: Path, checkpoint: str, weights: str) -> Path:
    """A stand-in checkpoint folder: its checkpoint.json and weights file hold the given words."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text(weights, encoding="utf-8")
    (folder / "checkpoint.json").write_text(checkpoint, encoding="utf-8")
    return folder


def _copytree_killed_after_checkpoint_json(src, dst, **kwargs):
    Path(dst).mkdir(parents=True)
    shutil.copyfile(Path(src) / "checkpoint.json", Path(dst) / "checkpoint.json")
    raise KeyboardInterrupt  # before the weights


def test_a_model_copy_killed_half_way_leaves_the_kept_model_whole(tmp_path, monkeypatch):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    kept = _model_folder(bench.model_dir("text", "main"), "old", "old weights")
    final = _model_folder(tmp_path / "final", "new", "new weights")
    monkeypatch.setattr(B.shutil, "copytree", _copytree_killed_after_checkpoint_json)
    with pytest.raises(KeyboardInterrupt):
        B.keep_model(bench, B.TASKS["text"], "main", final)
    assert (kept / "checkpoint.json").read_text(encoding="utf-8") == "old"
    assert (kept / "model.safetensors").read_text(encoding="utf-8") == "old weights"
    monkeypatch.undo()
    assert B.keep_model(bench, B.TASKS["text"], "main", final) == str(kept)  # the next run copies it whole
    assert (kept / "model.safetensors").read_text(encoding="utf-8") == "new weights"
    assert not kept.with_name("model.tmp").exists()


def test_a_kill_while_the_old_model_is_deleted_never_leaves_its_checkpoint_json_without_weights(tmp_path, monkeypatch):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    kept = _model_folder(bench.model_dir("text", "main"), "old", "old weights")
    final = _model_folder(tmp_path / "final", "new", "new weights")
    real_rmtree = shutil.rmtree

    def killed_deleting(path, *args, **kwargs):
        weights = Path(path) / "model.safetensors"
        if weights.is_file() and weights.read_text(encoding="utf-8") == "old weights":  # killed as it deletes
            weights.unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_deleting)
    with pytest.raises(KeyboardInterrupt):
        B.keep_model(bench, B.TASKS["text"], "main", final)
    assert (kept / "checkpoint.json").read_text(encoding="utf-8") == "new"  # what make demo reads is whole
    assert (kept / "model.safetensors").read_text(encoding="utf-8") == "new weights"


def test_a_model_restored_from_results_and_killed_half_way_is_copied_again_whole(tmp_path, monkeypatch):
    old = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    _model_folder(old.model_dir("text", "main"), "{}", "weights")
    B.run_stage(old, "text-train-main", lambda: {"steps": 5})
    bench = B.Bench(runs=tmp_path / "elsewhere", results=old.results)  # a fresh machine: the model comes back
    real_copytree = shutil.copytree
    monkeypatch.setattr(shutil, "copytree", _copytree_killed_after_checkpoint_json)
    with pytest.raises(KeyboardInterrupt):
        B.restore(bench, ["text"], ["text-train-main"])
    monkeypatch.setattr(shutil, "copytree", real_copytree)
    B.restore(bench, ["text"], ["text-train-main"])
    final = bench.runs / "text" / "main" / "final"
    assert (final / "model.safetensors").read_text(encoding="utf-8") == "weights"


def test_a_kill_while_the_summary_goes_into_the_readme_leaves_the_readme_as_it_was(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    before = f"# x\n\n## Results\n{B.README_START}\nearlier numbers\n{B.README_END}\n\n## After\n"
    readme.write_text(before, encoding="utf-8")
    with monkeypatch.context() as patched:
        _killed_half_way_into(tmp_path, patched)
        with pytest.raises(KeyboardInterrupt):
            B.embed_in_readme(readme, ["## text-to-text En-De", "", "| new | table |"], tmp_path / "results")
    assert readme.read_text(encoding="utf-8") == before


@dataclass(frozen=True)
class _NoReadme(B.Bench):  # main's Bench, this repository's README left alone
    readme: Path | None = None


def _main_with_plan(tmp_path: Path, monkeypatch, plan: dict) -> list[B.Bench]:
    """``B.main`` under ``tmp_path`` with ``plan`` (stage name -> function) for its stages; -> the Bench it made."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(B, "Bench", _NoReadme)
    made: list[B.Bench] = []
    monkeypatch.setattr(B, "stages", lambda bench, tasks: made.append(bench) or list(plan.items()))
    return made


def test_only_runs_the_stages_it_names_then_writes_the_summary(tmp_path, monkeypatch):
    calls: list[str] = []
    _main_with_plan(tmp_path, monkeypatch, {"text-one": lambda: calls.append("one"),
                                            "text-two": lambda: calls.append("two")})  # fmt: skip
    assert B.main(["--tasks", "text", "--only", "text-two"]) == 0
    assert calls == ["two"] and (tmp_path / "results" / "SUMMARY.md").is_file()


def test_the_bench_hands_jobs_and_batch_to_its_stages(tmp_path, monkeypatch):
    made = _main_with_plan(tmp_path, monkeypatch, {})
    assert B.main(["--tasks", "text", "--jobs", "3", "--batch", "0", "--list"]) == 0
    assert (made[0].jobs, made[0].batch) == (3, 1)  # a batch under 1 is SimulEval's own loop


def test_a_failed_stage_stops_the_bench_with_exit_1_and_still_writes_the_summary(tmp_path, monkeypatch, capsys):
    def broken():
        raise OSError("disk on fire")

    calls: list[int] = []
    _main_with_plan(tmp_path, monkeypatch, {"text-one": broken, "text-two": lambda: calls.append(2)})
    assert B.main(["--tasks", "text"]) == 1
    assert calls == [] and "error: stage text-one failed: OSError: disk on fire" in capsys.readouterr().err
    assert (tmp_path / "results" / "SUMMARY.md").is_file()


def test_list_shows_each_stage_done_or_to_run(tmp_path, monkeypatch, capsys):
    _main_with_plan(tmp_path, monkeypatch, {"text-one": lambda: None, "text-two": lambda: None})
    _mark_done(B.Bench(), "text-one")
    assert B.main(["--tasks", "text", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "text-one                 done" in lines and "text-two                 to run" in lines


def test_a_redone_stage_starts_its_clock_again(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    bench.clock("text-sweep-main").parent.mkdir(parents=True)
    bench.clock("text-sweep-main").write_text(json.dumps({"seconds": 6000.0, "attempts": 3}))
    _mark_done(bench, "text-sweep-main", seconds=6000.0, attempts=3)
    B.forget(bench, "text-sweep-main")
    record = B.run_stage(bench, "text-sweep-main", lambda: {})
    assert record["seconds"] < 60.0 and record["attempts"] == 1


def test_a_failed_attempt_s_time_counts_in_the_next_one_even_under_a_heartbeat(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(B.time, "time", lambda: now[0])
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")

    def slow_then_broken():
        now[0] += 20.0  # less than one heartbeat
        raise OSError("disk on fire")

    with pytest.raises(B.StageFailed):
        B.run_stage(bench, "one", slow_then_broken)
    record = B.run_stage(bench, "one", lambda: {})
    assert (record["seconds"], record["attempts"]) == (20.0, 2)


def test_a_variant_trained_longer_gets_its_own_steps_the_others_the_plan_s(tmp_path, monkeypatch):
    import training.train

    seen = {}

    def fake_train(cfg, resume):
        seen[Path(cfg.out_dir).name] = cfg
        (Path(cfg.out_dir) / "final").mkdir(parents=True)
        return Path(cfg.out_dir) / "final"

    monkeypatch.setattr(training.train, "train", fake_train)
    monkeypatch.setattr(B, "training_summary", lambda path: {})
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    for variant in ("main", "stream-0.3-x4"):
        B.stage_train(bench, B.TASKS["text"], variant)
    assert seen["main"].max_steps == B.TASKS["text"].steps and seen["stream-0.3-x4"].max_steps == 2000


def test_a_sweep_with_failed_runs_fails_its_stage_and_a_sweep_refused_names_the_redo(tmp_path, monkeypatch):
    import simul_agents.sweep

    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    monkeypatch.setattr(B, "test_files", lambda task, bench: SimpleNamespace(source="s.txt", target="t.txt"))
    monkeypatch.setattr(simul_agents.sweep, "sweep", lambda config, jobs: ([{"head": "offline"}], ["k=3: killed"]))
    with pytest.raises(B.StageFailed, match="failed runs: k=3: killed"):
        B.run_stage(bench, "text-sweep-main", lambda: B.stage_sweep(bench, B.TASKS["text"], "main"))
    assert not (bench.done_dir / "text-sweep-main.json").exists()

    def refused(config, jobs):
        raise simul_agents.sweep.SweepError("made with another checkpoint")

    monkeypatch.setattr(simul_agents.sweep, "sweep", refused)
    with pytest.raises(simul_agents.sweep.SweepError, match="another checkpoint.*--redo text-sweep-main"):
        B.stage_sweep(bench, B.TASKS["text"], "main")


def test_a_probe_trained_again_is_compared_against_main_s_runs(tmp_path, monkeypatch):
    import simul_agents.compare

    seen = {}
    monkeypatch.setattr(simul_agents.compare, "compare_task",
                        lambda root, variants, task, decodings: seen.update(decodings) or {})  # fmt: skip
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    B.stage_compare(bench, B.TASKS["text"], ["main", "probe-word-start", "main-reencode", "no-mslm"])
    assert seen == {"probe-word-start": "main", "main-reencode": "main"}


def test_a_cost_benchmark_keeps_its_last_line_and_a_failed_one_fails_its_stage(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    script = tmp_path / "streaming_cost.py"
    script.write_text("print('warming up')\nprint('{\"rtf\": 0.5}')\n")
    B.run_stage(bench, "streaming-cost", lambda: B.stage_benchmark(bench, str(script), []))
    assert json.loads((bench.results / "bench" / "streaming_cost.json").read_text()) == {"rtf": 0.5}
    script.write_text("print('{\"rtf\": 9.9}')\nraise SystemExit(3)\n")
    with pytest.raises(B.StageFailed, match="exited with 3"):
        B.run_stage(bench, "training-cost", lambda: B.stage_benchmark(bench, str(script), []))


def test_the_computation_aware_stage_comes_back_only_with_every_precision_s_runs(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    bench.records.mkdir(parents=True)
    (bench.records / "speech-computation-aware.json").write_text(json.dumps({"seconds": 1, "runs": 20}))
    for variant in B.CA_VARIANTS[:-1]:  # the compiled int4 runs' archive is missing
        bench.archive_dir("speech", variant).mkdir(parents=True)
        (bench.archive_dir("speech", variant) / "sweep.csv").write_text("task,head,param,output\n")
    assert B.restore(bench, ["speech"], ["speech-computation-aware"]) == []
    bench.archive_dir("speech", B.CA_VARIANTS[-1]).mkdir(parents=True)
    (bench.archive_dir("speech", B.CA_VARIANTS[-1]) / "sweep.csv").write_text("task,head,param,output\n")
    assert B.restore(bench, ["speech"], ["speech-computation-aware"]) == ["speech-computation-aware"]


def _one_run_table(bench: B.Bench, task: str, variant: str) -> None:
    from simul_agents.sweep import write_csv

    eval_dir = bench.runs / task / f"eval-{variant}"
    eval_dir.mkdir(parents=True)
    row = {"task": "t", "head": "offline", "param": "-", "BLEU": 2.0, "chrF": 21.0, "LAAL": 7.9, "n_instances": 10,
           "mean_source_length": 7.9, "latency_unit": "words"}  # fmt: skip
    write_csv([row], eval_dir / "sweep.csv")


def test_the_summary_lists_the_stages_in_the_order_they_finished_with_their_minutes(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results", readme=None)
    _mark_done(bench, "text-train-main", finished="2026-11-30 10:00", seconds=90)
    _mark_done(bench, "assets", finished="2026-11-30 11:00", seconds=30)
    lines = B.write_summary(bench, ["text"]).read_text().splitlines()
    train = lines.index("| text-train-main | 1.5 | 2026-11-30 10:00 | ? |  |")
    assert lines.index("| assets | 0.5 | 2026-11-30 11:00 | ? |  |") > train


def test_a_finished_sweep_is_not_called_partial(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results", readme=None)
    assert B.planned_runs("text", "no-mslm-seed2") == 1  # the offline decode alone
    _one_run_table(bench, "text", "no-mslm-seed2")
    summary = B.write_summary(bench, ["text"]).read_text()
    assert "| no-mslm-seed2 | offline | - |" in summary and "**Partial:**" not in summary


def test_the_summary_carries_the_comparisons_and_the_cost_benchmarks(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results", readme=None)
    _one_run_table(bench, "text", "main")
    (bench.results / "text").mkdir(parents=True)
    (bench.results / "text" / "compare.json").write_text("{}")
    (bench.results / "bench").mkdir(parents=True)
    (bench.results / "bench" / "streaming_cost.json").write_text('{\n  "rtf": 0.5\n}\n')
    summary = B.write_summary(bench, ["text"]).read_text()
    assert "### Paired bootstrap" in summary
    assert '## streaming-cost benchmark\n\n```\n{\n  "rtf": 0.5\n}\n```' in summary


def test_the_readme_gets_the_summary_without_its_title_and_links_to_both_tasks_images(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n{B.README_START}\n{B.README_END}\n")
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results", readme=readme)
    B.write_summary(bench, ["text"])
    assert "`make bench` results" not in readme.read_text() and readme.read_text().count("\n# ") == 0
    B.embed_in_readme(readme, ["## speech-to-text En-De", "![quality-latency](speech/curve.png)"], bench.results)
    assert "### speech-to-text En-De\n![quality-latency](results/speech/curve.png)" in readme.read_text()


def test_a_readme_without_the_bench_markers_is_left_as_it_is(tmp_path, caplog):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n")
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results", readme=readme)
    assert B.write_summary(bench, ["text"]).is_file()
    assert readme.read_text() == "# Project\n" and "has no <!-- bench:start -->" in caplog.text


def test_a_comparison_finished_in_the_same_minute_as_its_sweep_is_not_run_again(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    _mark_done(bench, "text-sweep-main", finished="2026-11-30 10:00", runs=B.planned_runs("text", "main"))
    _mark_done(bench, "text-compare-main", finished="2026-11-30 10:00", variants=["main"])  # a quick one, after it
    assert B.outgrown_compares(bench, ["text"]) == []


def test_a_running_stage_is_seen_as_running_by_another_bench_process(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    seen: list[str | None] = []
    B.run_stage(bench, "one", lambda: seen.append(B.running(bench, "one")))  # what --list asks meanwhile
    assert seen == [str(os.getpid())] and B.running(bench, "one") is None


def test_the_computation_aware_stage_can_be_redone(tmp_path):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    for variant in B.CA_VARIANTS:
        (bench.runs / "speech" / f"eval-{variant}").mkdir(parents=True)
    _mark_done(bench, "speech-computation-aware", runs=20)
    removed = B.forget(bench, "speech-computation-aware")
    assert all(bench.runs / "speech" / f"eval-{v}" in removed for v in B.CA_VARIANTS)
    assert not (bench.done_dir / "speech-computation-aware.json").exists()


def test_a_stage_s_notes_in_the_summary_are_cut_at_a_whole_item():
    notes = B._compact({"steps": 500, "log": "x" * 200, "extra": "y" * 100})
    assert notes == "steps=500, log=" + "x" * 200 + ", …"


def _killed_half_way_into(folder: Path, patched: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or a full disk) half-way through any file written into ``folder``, by ``write_text`` or a copy."""
    write_text, copyfile = Path.write_text, shutil.copyfile

    def half_text(self, data, *args, **kwargs):
        if self.parent == folder:
            write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return write_text(self, data, *args, **kwargs)

    def half_copy(src, dst, *args, **kwargs):
        if Path(dst).parent == folder:
            data = Path(src).read_text(encoding="utf-8")
            write_text(Path(dst), data[: len(data) // 2], encoding="utf-8")
            raise KeyboardInterrupt
        return copyfile(src, dst, *args, **kwargs)

    patched.setattr(Path, "write_text", half_text)
    patched.setattr(shutil, "copyfile", half_copy)


def test_a_start_killed_while_it_restores_a_done_marker_restores_it_on_the_next_start(tmp_path, monkeypatch):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    bench.records.mkdir(parents=True)
    (bench.records / "streaming-cost.json").write_text(json.dumps({"stage": "streaming-cost", "seconds": 60.0}))
    (bench.results / "bench" / "streaming_cost.json").write_text("{}")
    with monkeypatch.context() as patched:
        _killed_half_way_into(bench.done_dir, patched)
        with pytest.raises(KeyboardInterrupt):
            B.restore(bench, [], ["streaming-cost"])
    assert B.restore(bench, [], ["streaming-cost"]) == ["streaming-cost"]
    assert B.run_stage(bench, "streaming-cost", lambda: {"output": "again"}) == {"stage": "streaming-cost",
                                                                                 "seconds": 60.0}  # fmt: skip


def test_a_start_killed_while_it_unmarks_a_stage_leaves_a_clock_the_stage_can_read(tmp_path, monkeypatch):
    bench = B.Bench(runs=tmp_path / "runs", results=tmp_path / "results")
    _mark_done(bench, "one", seconds=600.0, attempts=2)
    with monkeypatch.context() as patched:
        _killed_half_way_into(bench.clock("one").parent, patched)
        with pytest.raises(KeyboardInterrupt):
            B.unmark(bench, ["one"], "the plan has more runs")
    B.unmark(bench, ["one"], "the plan has more runs")  # the next start unmarks it again
    record = B.run_stage(bench, "one", lambda: {})
    assert 600.0 <= record["seconds"] < 660.0 and record["attempts"] == 3


def _silence(run: Path) -> None:
    """Make every instance of a run write nothing (no words, no delays: no LAAL, as SimulEval leaves it out)."""
    log = run / "instances.log"
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    for record in records:
        record.update(prediction="", delays=[], elapsed=[], prediction_length=0)
    log.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_the_verdict_is_chrf_s_even_where_bleu_says_otherwise():
    from simul_agents.compare import verdict

    up = {"chrF": {"delta": 1.5, "p": 0.01}, "BLEU": {"delta": -0.4, "p": 0.6}}
    down = {"chrF": {"delta": -1.5, "p": 0.01}, "BLEU": {"delta": 0.4, "p": 0.001}}
    assert verdict(up) == {"better": True, "worse": False} and verdict(down) == {"better": False, "worse": True}


def test_the_bootstrap_takes_its_resample_count_and_sacrebleu_s_seed_from_the_environment(tmp_path, monkeypatch):
    refs = _sentences(120, 0)
    a, b = tmp_path / "a", tmp_path / "b"
    _write_run(a, _corrupt(refs, 0.3, 1), refs, delays_per_word=1.0)
    _write_run(b, _corrupt(refs, 0.3, 2), refs, delays_per_word=1.0)
    assert paired_bootstrap(a, b, samples=200) == _sacrebleu_paired_test(a, b, samples=200)
    default = paired_bootstrap(a, b)
    monkeypatch.setenv("SACREBLEU_SEED", "7")
    seven = paired_bootstrap(a, b)
    assert seven == _sacrebleu_paired_test(a, b) and seven != default


def test_a_baseline_seed_scored_on_other_references_is_refused(task_dir):
    main = task_dir / "eval-main"
    elsewhere = task_dir / "eval-elsewhere"
    _write_run(elsewhere, _sentences(120, 7), _sentences(120, 8), delays_per_word=1.0)
    with pytest.raises(ValueError, match="other references"):
        seed_mean_bootstrap([main / "wait-k" / "k=1", elsewhere], [main / "entropy" / "threshold=0.5"])


def test_welch_s_test_of_seeds_with_no_spread_is_certain_of_a_difference_and_of_none():
    assert welch_test([21.73, 21.73], [22.1, 22.1]) == {"delta": 0.37, "t": None, "df": None, "p": 0.0}
    assert welch_test([21.73, 21.73], [21.73, 21.73])["p"] == 1.0


def test_welch_s_degrees_of_freedom_follow_the_unequal_spreads_not_the_seed_count():
    # variances 1 and 4 over three seeds: df = (5/3)^2 / ((1/3)^2 / 2 + (4/3)^2 / 2) = 50/17, not 3 + 3 - 2
    assert welch_test([1, 2, 3], [4, 6, 8])["df"] == 2.9


def test_matched_points_are_listed_by_laal_with_the_laal_of_the_point_they_met(task_dir):
    refs = [json.loads(line)["reference"] for line in (task_dir / "eval-main/offline/-/instances.log").open()]
    # LAAL 3.81 against k=2's 3.5: within 10%, and above threshold=2.0's 3.5, though named before it
    _write_run(task_dir / "eval-main" / "entropy" / "threshold=10.0", _corrupt(refs, 0.1, 6), refs,
               delays_per_word=2.2, source_length=9.0)  # fmt: skip
    from simul_agents.compare import load_runs

    runs = {r["param"]: r for r in load_runs(task_dir, "main")}
    points = matched(list(runs.values()), "entropy", "wait-k")
    assert [p["param"] for p in points] == ["threshold=0.5", "threshold=2.0", "threshold=10.0"]  # not by name
    point = points[-1]
    assert point["matched"] == "wait-k k=2" and point["matched_LAAL"] == runs["k=2"]["LAAL"] != point["LAAL"]
    result = compare_task(task_dir, ["main"], "text")
    row = (f"| entropy threshold=10.0 | {point['LAAL']:.2f} | wait-k k=2 | {runs['k=2']['LAAL']:.2f} | "
           f"{point['chrF']['system']:.1f} | {point['chrF']['delta']:+.2f} * |")
    text = "\n".join(format_comparison(result))
    assert row in text and "significantly better on 3, worse on 0." in text


def test_the_low_latency_share_takes_the_best_chrf_of_every_adaptive_curve_lag_bounded_too():
    runs = [{"head": "entropy", "param": "threshold=1.0", "LAAL": 3.0, "chrF": 40.0, "BLEU": 14.0},
            {"head": "entropy, lag-bounded", "param": "threshold=3.0,min_lag=1,max_lag=3", "LAAL": 3.2, "chrF": 45.0,
             "BLEU": 12.0},
            {"head": "wait-k", "param": "k=3", "LAAL": 3.0, "chrF": 48.0, "BLEU": 15.0}]  # fmt: skip
    keep = keep_offline(runs, {"chrF": 50.0}, mean_source=10.0)
    assert keep["best"]["head"] == "entropy, lag-bounded" and keep["share"] == 0.9  # wait-k is not proactive


def test_a_run_that_wrote_nothing_is_listed_without_a_laal_and_does_not_stop_the_comparison(task_dir, capsys):
    from simul_agents.compare import main

    refs = [json.loads(line)["reference"] for line in (task_dir / "eval-main/offline/-/instances.log").open()]
    silent = task_dir / "eval-main" / "entropy" / "threshold=9.0"
    _write_run(silent, refs, refs, delays_per_word=1.0)
    _silence(silent)
    assert main([str(task_dir)]) == 0
    assert "| entropy threshold=9.0 | - | none within 10% |" in capsys.readouterr().out
    test = {"delta": -30.0, "p": 0.001, "system": 0.0, "baseline": 30.0}
    decoded = {"head": "entropy", "param": "threshold=9.0", "LAAL": None, "baseline_LAAL": 2.0, "chrF": test,
               "BLEU": test}  # main-reencode's run of it wrote nothing, main's did  # fmt: skip
    lines = format_comparison({"decoding_vs_model": {"main-reencode": {"model": "main", "runs": [decoded]}}})
    assert "| entropy | threshold=9.0 | - | 2.00 | 0.0 | -30.00 * |" in "\n".join(lines)


def test_an_offline_decode_that_wrote_nothing_gives_no_share_and_says_so(task_dir, capsys):
    from simul_agents.compare import main

    _silence(task_dir / "eval-main" / "offline" / "-")
    assert main([str(task_dir)]) == 0
    out = capsys.readouterr().out
    assert "Best proactive head at LAAL <= 3.5 words (35% of the mean source): entropy threshold=0.5" in out
    assert "no share of the offline chrF 0.0" in out


def test_the_oracle_s_reach_counts_a_point_that_scores_its_chrf_exactly():
    from simul_agents.compare import reach

    runs = [{"head": "entropy", "param": "threshold=2.0", "LAAL": 2.0, "chrF": 40.0},
            {"head": "entropy", "param": "threshold=4.0", "LAAL": 4.0, "chrF": 41.0}]  # fmt: skip
    assert reach(runs, 40.0) == {"entropy": {"param": "threshold=2.0", "LAAL": 2.0, "chrF": 40.0}}


def test_an_entropy_point_matched_with_a_wait_k_point_is_not_tested_against_a_mixture_too(tmp_path):
    from simul_agents.compare import load_runs

    refs = _sentences(120, 0)
    main = tmp_path / "eval-main"
    _wait_k_1_and_2(main, refs)
    _write_run(main / "entropy" / "threshold=2.0", _corrupt(refs, 0.1, 3), refs, delays_per_word=3.6)
    runs = {r["param"]: r for r in load_runs(tmp_path, "main")}
    laal = {param: run["LAAL"] for param, run in runs.items()}
    assert laal["k=1"] < laal["threshold=2.0"] < laal["k=2"] <= 1.1 * laal["threshold=2.0"]
    assert mixed_vs_waitk(list(runs.values()), "entropy") == []  # between k=1 and k=2, but k=2 lies within 10%


def test_the_mixture_s_laal_and_share_are_the_mean_of_its_draws_each_its_own_draw(tmp_path):
    from simul_agents.compare import MIX_DRAWS, load_runs

    refs = [" ".join(s.split()[: 3 + i % 6]) for i, s in enumerate(_sentences(120, 0))]  # 3 to 8 words: each
    # sentence moves the mean by its own amount, so the draws switch different numbers of sentences
    main = tmp_path / "eval-main"
    _wait_k_1_and_2(main, refs)
    _write_run(main / "entropy" / "threshold=2.0", _corrupt(refs, 0.1, 3), refs, delays_per_word=2.5)
    runs = {r["param"]: r for r in load_runs(tmp_path, "main")}
    mixes = waitk_mixtures(runs["threshold=2.0"]["LAAL"], runs["k=1"], runs["k=2"])
    assert len(mixes) == MIX_DRAWS and len({tuple(ins["prediction"] for ins in m["instances"]) for m in mixes}) > 1
    (point,) = mixed_vs_waitk(list(runs.values()), "entropy")
    share = sum(m["share_upper"] for m in mixes) / MIX_DRAWS
    assert point["matched"] == f"wait-k k=1+k=2 ({100 * share:.0f}% k=2)"
    assert point["matched_LAAL"] == round(sum(m["LAAL"] for m in mixes) / MIX_DRAWS, 2)


def test_an_interrupted_run_with_a_broken_log_is_left_out_of_the_comparison(task_dir):
    broken = task_dir / "eval-main" / "entropy" / "threshold=5.0"
    broken.mkdir(parents=True)
    (broken / "instances.log").write_text('{"index": 0, "predic', encoding="utf-8")  # killed mid-line
    result = compare_task(task_dir, ["main"], "text")
    assert [p["param"] for p in result["entropy_vs_waitk"]] == ["threshold=0.5", "threshold=2.0"]


def test_seeds_of_a_recipe_without_its_seed_0_are_not_studied(task_dir):
    refs = _sentences(120, 0)
    for seed in (1, 2):
        _write_run(task_dir / f"eval-stream-0.3-seed{seed}" / "offline" / "-", _corrupt(refs, 0.2, seed), refs, 10.0)
    result = compare_task(task_dir, ["main", "stream-0.3-seed1", "stream-0.3-seed2"], "text")
    assert "stream-0.3" not in result.get("seeds", {})


def test_the_welch_line_counts_the_recipe_s_seeds_then_the_plain_fine_tune_s(task_dir):
    refs = _sentences(120, 0)
    for variant, share, seed in (("main-seed1", 0.2, 8), ("main-seed2", 0.1, 9), ("no-mslm-seed1", 0.3, 10)):
        _write_run(task_dir / f"eval-{variant}" / "offline" / "-", _corrupt(refs, share, seed), refs, 10.0)
    result = compare_task(task_dir, ["main", "no-mslm", "main-seed1", "main-seed2", "no-mslm-seed1"], "text")
    assert "main minus no-mslm, the seeds as the samples (Welch's t-test of 3 against 2 seeds)" in "\n".join(
        format_comparison(result))


def test_the_offline_line_gives_the_system_s_chrf_then_the_baseline_s(task_dir):
    result = compare_task(task_dir, ["main", "no-mslm"], "text")
    base = result["offline"]["no-mslm"]["chrF"]["baseline"]
    assert f"Offline decode, main vs no-mslm: chrF 100.0 vs {base:.1f} (Δ +" in "\n".join(format_comparison(result))


def test_compare_cli_writes_the_result_as_json(task_dir, tmp_path):
    from simul_agents.compare import main

    assert main([str(task_dir), "--variants", "main", "no-mslm", "--json", str(tmp_path / "compare.json")]) == 0
    written = json.loads((tmp_path / "compare.json").read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(compare_task(task_dir, ["main", "no-mslm"])))


def test_bench_started_outside_the_repository_runs_in_it(tmp_path, monkeypatch, capsys):
    import simul_agents.bench as B

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(B, "main", lambda argv=None: Path.cwd())  # where the stages would run
    assert B.run_from_root(["--list"]) == B.ROOT
    assert f"running in {B.ROOT}" in capsys.readouterr().out
    assert B.run_from_root(["--list"]) == B.ROOT and capsys.readouterr().out == ""  # already there: silent
