"""Paired significance for the quality-latency claims: sacrebleu's paired bootstrap over SimulEval outputs.

    python -m simul_agents.compare runs/bench/text --variants main no-spsd no-mslm

A run is a SimulEval output directory (``<task dir>/eval-<variant>/<head>/<param>``); its hypotheses come from
``instances.log`` (by index), the references from the same log. Comparisons:

- ``matched``: every entropy (and probe) point against the wait-k (resp. entropy) point of nearest LAAL, when
  the two LAALs are within 10% of each other: chrF and BLEU difference, bootstrap p-value and 95% interval;
  ``bounded_vs_waitk``: the same for the entropy head's runs between lag bounds (``entropy, lag-bounded``,
  another policy's curve), where the sweep ran any;
- ``keep_offline``: the best proactive head (entropy, attention, probe, and entropy or probe between lag bounds)
  at LAAL <= 35% of the mean source length, as a fraction of the offline decode's chrF;
- ``offline``: the main model's full-source decode against each ablation's of the same training length
  (streaming training must not cost offline quality);
- ``variant_entropy_vs_waitk``: the same matching on each other variant's own entropy and wait-k points;
  ``variant_bounded_vs_waitk`` on its entropy points between lag bounds, where it has any;
  ``variant_probe_vs_entropy`` on its probe and entropy points, where its probe was swept;
  ``variant_keep_offline``: ``keep_offline`` on its own runs, against its own offline decode;
- ``probe_vs_main``: a variant swept on the probe alone (main's model with its probe trained again:
  ``training.probe``), each of its points against main's probe, entropy and wait-k point of nearest LAAL;
- ``vs_waitk_mixed``: per variant, each entropy point (alone or between lag bounds) with no wait-k point at equal
  LAAL (``nearest``) but between two of them (k and k+1), against wait-k time-shared to its LAAL (each sentence
  decoded by one of the two k, drawn at random: ``waitk_mixtures``), the baseline that matching leaves out;
- ``entropy_vs_fixed_chunk``: per variant with fixed-chunk runs, its entropy points against them (a schedule of
  several words per source unit reaches below wait-k k=1's LAAL);
- ``seeds``: where a recipe was trained again with another seed (``main-seed1``), each seed's offline decode,
  the seeds against each other and each streaming recipe's seed-mean against the plain fine-tune's, over test
  sentences (bootstrap) and over seeds (Welch's t-test) (``seed_study``);
- ``oracle``: the oracle head's point, the floor of this model's latency; ``reach``: the lowest LAAL at which
  each head scores the oracle's chrF; ``vs_waitk``: the oracle against the wait-k point of equal LAAL;
  ``variant_oracle``: the same on another variant's runs, where it has an oracle run;
- ``decoding_vs_model``: for a variant that is a trained model decoded another way (``decodings``: e.g. main's
  with the written words re-read at every read, ``--reencode read``), each of its runs against that model's run of
  the same head and parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import fmean, stdev

from .score import LATENCY_OF, ScoreError, read_instances, score_output
from .sweep import bounded_curve, curve_name

PROACTIVE = ("entropy", "attention", "probe")
BOUNDED = bounded_curve("entropy")  # the entropy head between lag bounds
ADAPTIVE = (*PROACTIVE, BOUNDED, bounded_curve("probe"))  # the heads that read the model's state
MATCH_TOLERANCE = 0.10  # two points are "at equal LAAL" when they differ by at most 10% of the larger
LOW_LATENCY_SHARE = 0.35  # "low latency": LAAL at most 35% of the mean source length
BOOTSTRAP_SAMPLES = 1000
MIX_DRAWS = 5  # random draws of wait-k time-shared to a point's LAAL (``mixed_vs_waitk``), averaged
FIXED = "fixed-chunk"  # the other fixed schedule: words after each chunk of source units
PLAIN = "no-mslm"  # the plain full-sentence fine-tune: the offline-quality baseline of a streaming recipe


def plain_of(variant: str) -> str:
    """The plain fine-tune with the same budget: 'stream-0.3-x4' -> 'no-mslm-x4', 'no-spsd' -> 'no-mslm'."""
    head, sep, times = variant.rpartition("-x")
    return f"{PLAIN}-x{times}" if sep and head and times.isdigit() else PLAIN


def split_seed(variant: str) -> tuple[str, int]:
    """A variant's recipe and training seed: 'main-seed1' -> ('main', 1), 'no-mslm' -> ('no-mslm', 0)."""
    recipe, sep, seed = variant.rpartition("-seed")
    return (recipe, int(seed)) if sep and recipe and seed.isdigit() else (variant, 0)


def load_runs(task_dir: Path, variant: str) -> list[dict]:
    """Every finished run of a variant: {head, param, LAAL, chrF, BLEU, mean_source_length, output}; ``head`` is
    the run's curve (``entropy, lag-bounded`` for the entropy head between lag bounds)."""
    runs = []
    root = task_dir / f"eval-{variant}"
    for log in sorted(root.glob("*/*/instances.log")):
        output = log.parent
        try:
            scores = score_output(output, write=False)
        except ScoreError:
            continue
        runs.append({"head": curve_name(output.parent.name, output.name), "param": output.name, "output": str(output),
                     **scores})  # fmt: skip
    return runs


def hypotheses(output: str | Path) -> tuple[list[str], list[str]]:
    """(predictions, references) of one run, in index order."""
    return texts(read_instances(output))


def texts(instances: Sequence[dict]) -> tuple[list[str], list[str]]:
    """(predictions, references) of SimulEval instances, in their order."""
    return [ins.get("prediction", "") or "" for ins in instances], [ins.get("reference", "") or "" for ins in instances]


def verdict(test: dict) -> dict:
    """A paired test's chrF verdict: significantly better or worse (p < 0.05), or neither."""
    chrf = test["chrF"]
    return {"better": chrf["delta"] > 0 and chrf["p"] < 0.05, "worse": chrf["delta"] < 0 and chrf["p"] < 0.05}


def paired_bootstrap(baseline: str | Path, system: str | Path, samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """sacrebleu's paired bootstrap of ``system`` against ``baseline`` (same references, same order): its
    resamples, its p and its 95% interval (``seed_mean_bootstrap`` with one run a side)."""
    return seed_mean_bootstrap([baseline], [system], samples)


def seed_mean_bootstrap(baselines: Sequence[str | Path], systems: Sequence[str | Path],
                        samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """sacrebleu's paired bootstrap of a recipe's seed mean against another's: every run of ``systems`` (one per
    training seed) and of ``baselines`` scored on the same resamples of the test sentences, each side's scores
    averaged over its runs; sacrebleu's resamples, p and 95% interval (with one run a side, its ``PairedTest``'s
    numbers). It speaks for the test set only: two seeds a side cannot say where a third training would land."""
    runs = [[hypotheses(o) for o in side] for side in (baselines, systems)]
    refs = runs[0][0][1]
    for side, outputs in zip(runs, (baselines, systems), strict=True):
        for (_, other), output in zip(side, outputs, strict=True):
            if other != refs:
                raise ValueError(f"{output} was scored on other references than {baselines[0]}; compare runs of "
                                 "one test set")  # fmt: skip
    return bootstrap_hypotheses([[hyps for hyps, _ in side] for side in runs], refs, samples)


def bootstrap_hypotheses(sides: Sequence[Sequence[list[str]]], refs: list[str],
                         samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """``seed_mean_bootstrap`` on hypotheses in memory: ``sides`` = (baseline runs, system runs), each run one
    hypothesis per reference, in order."""
    import numpy as np
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import estimate_ci

    seed = os.environ.get("SACREBLEU_SEED", "12345")  # sacrebleu's own resamples
    rng = np.random.default_rng(None if seed.lower() == "none" else int(seed))
    idxs = rng.choice(len(refs), size=(samples, len(refs)), replace=True)
    out = {}
    for name, metric in (("BLEU", BLEU()), ("chrF", CHRF())):
        real, resampled = [], []  # per side: the mean score, the mean score of each resample
        for side in sides:
            stats = [np.array(metric._extract_corpus_statistics(hyps, [refs]), dtype="float32") for hyps in side]
            real.append(np.mean([metric._aggregate_and_compute(list(s)).score for s in stats]))
            resampled.append(np.mean([[metric._compute_score_from_stats(s[i].sum(0)).score for i in idxs]
                                      for s in stats], axis=0))  # fmt: skip
        diffs = np.abs(resampled[1] - resampled[0])
        centred = diffs - diffs.mean()
        p = (int(np.sum(centred > abs(real[1] - real[0]))) + 1) / (samples + 1)
        if not diffs.any():  # the same score on every resample (the same outputs): no difference to test, where
            p = 1.0  # sacrebleu's formula would give its smallest p, 1 / (samples + 1)
        out[name] = {"baseline": round(float(real[0]), 2), "system": round(float(real[1]), 2),
                     "delta": round(float(real[1] - real[0]), 2), "p": round(p, 4),
                     "ci95": round(float(estimate_ci(resampled[1])[1]), 2)}  # fmt: skip
    return out


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (``df`` need not be whole: Welch's): the
    regularized incomplete beta I_x(df/2, 1/2) at x = df / (df + t^2), accurate in the far tail too (a quadrature
    of the density from 0 to |t| gave p 0.02 at t = 20,000 with 2 df, where it is 2.5e-9)."""
    if df <= 0:
        raise ValueError(f"Student's t needs df > 0, not {df}")
    return min(1.0, max(0.0, _incomplete_beta(df / 2, 0.5, df / (df + t * t))))


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (evaluated with Lentz's
    method), on the side of x where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def nonzero(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / nonzero(1.0 - (a + b) * x / (a + 1))
    fraction = d
    for m in range(1, 1000):
        for step in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # the even term, then the odd one
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1.0 / nonzero(1.0 + step * d)
            c = nonzero(1.0 + step / c)
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return fraction


def welch_test(baseline: Sequence[float], system: Sequence[float]) -> dict:
    """Welch's t-test of two recipes' per-seed scores (one score a training seed, at least two a side): the
    difference of the means, t, Welch-Satterthwaite df and the two-sided p. Unlike the bootstrap over test
    sentences, it sees how far trainings of one recipe differ; with three seeds a side it has little power."""
    if len(baseline) < 2 or len(system) < 2:
        raise ValueError(f"Welch's test needs two seeds a side or more, not {len(baseline)} and {len(system)}")
    sides = (baseline, system)
    means = [fmean(v) for v in sides]
    var_of_mean = [stdev(v) ** 2 / len(v) for v in sides]
    delta, se2 = means[1] - means[0], sum(var_of_mean)
    if se2 == 0:  # identical seeds on both sides: no spread to test against
        return {"delta": round(delta, 2), "t": None, "df": None, "p": 1.0 if delta == 0 else 0.0}
    df = se2**2 / sum(w**2 / (len(v) - 1) for w, v in zip(var_of_mean, sides, strict=True))
    t = delta / math.sqrt(se2)
    return {"delta": round(delta, 2), "t": round(t, 2), "df": round(df, 1), "p": round(t_two_sided_p(t, df), 4)}


def nearest(point: dict, others: Sequence[dict]) -> dict | None:
    """The point of ``others`` whose LAAL is nearest, if the two differ by at most MATCH_TOLERANCE of the larger (a
    symmetric rule: a point is matched with the other exactly when the other is matched with it)."""
    candidates = [o for o in others if o["LAAL"] is not None and point["LAAL"] is not None]
    if not candidates:
        return None
    best = min(candidates, key=lambda o: abs(o["LAAL"] - point["LAAL"]))
    scale = max(abs(point["LAAL"]), abs(best["LAAL"]), 1e-9)
    return best if abs(best["LAAL"] - point["LAAL"]) <= MATCH_TOLERANCE * scale else None


def matched(runs: Sequence[dict], head: str, baseline_head: str, baseline_runs: Sequence[dict] | None = None
            ) -> list[dict]:  # fmt: skip
    """Each ``head`` point against the nearest-LAAL ``baseline_head`` point (of ``baseline_runs``, by default
    ``runs`` themselves), with a paired bootstrap."""
    base = [r for r in (runs if baseline_runs is None else baseline_runs) if r["head"] == baseline_head]
    out = []
    for point in sorted((r for r in runs if r["head"] == head), key=lambda r: r["LAAL"] or 0):
        other = nearest(point, base)
        record = {"head": head, "param": point["param"], "LAAL": point["LAAL"]}
        if other is None:
            out.append({**record, "matched": None})
            continue
        test = paired_bootstrap(other["output"], point["output"])
        record.update(matched=f"{baseline_head} {other['param']}", matched_LAAL=other["LAAL"], **test)
        record.update(verdict(test))
        out.append(record)
    return out


def _k(run: dict) -> int | None:
    """wait-k's k from its run's parameters ('k=3' -> 3)."""
    name, _, value = run["param"].partition("=")
    return int(value) if name == "k" and value.isdigit() else None


def waitk_mixtures(target_laal: float, lower: dict, upper: dict, draws: int = MIX_DRAWS) -> list[dict]:
    """wait-k time-shared to ``target_laal``: each test sentence decoded by the ``lower`` run (the smaller k) or
    the ``upper`` one, the upper's sentences drawn in a seeded random order (draw ``d``: seed ``d``) until the
    mean LAAL reaches the target. A schedule that picks k per sentence at random is itself a fixed schedule, so
    every LAAL between two wait-k points is wait-k's to reach: the fair baseline for an adaptive point with no
    wait-k point near it (the convex hull of wait-k's curve, not its points). Per draw: the mixture's instances,
    its LAAL and the share of sentences decoded by ``upper``."""
    import random

    runs = [read_instances(lower["output"]), read_instances(upper["output"])]
    if [ins["index"] for ins in runs[0]] != [ins["index"] for ins in runs[1]]:
        raise ValueError(f"{lower['output']} and {upper['output']} hold other test instances; mix runs of one test "
                         "set")  # fmt: skip
    laal = LATENCY_OF["LAAL"]  # None: wrote nothing (SimulEval leaves it out of the mean)
    values = [[laal(ins, ins["delays"]) if ins.get("delays") else None for ins in run] for run in runs]
    mixes = []
    for seed in range(draws):
        total = sum(v for v in values[0] if v is not None)  # the mixture's LAAL sum and count, all lower at first
        count = sum(v is not None for v in values[0])
        order = list(range(len(values[0])))
        random.Random(seed).shuffle(order)
        best = (abs(total / max(count, 1) - target_laal), 0)  # (gap to the target, sentences switched to upper)
        for n, i in enumerate(order, 1):  # switch sentences to the upper run until the mean passes the target
            low, high = values[0][i], values[1][i]
            total += (high or 0.0) - (low or 0.0)
            count += (high is not None) - (low is not None)
            best = min(best, (abs(total / max(count, 1) - target_laal), n))
            if total / max(count, 1) >= target_laal:
                break
        upper_ones = set(order[: best[1]])
        chosen = [1 if i in upper_ones else 0 for i in range(len(order))]  # which run decodes each sentence
        got = [values[c][i] for i, c in enumerate(chosen) if values[c][i] is not None]
        mixes.append({"instances": [runs[c][i] for i, c in enumerate(chosen)], "LAAL": sum(got) / max(len(got), 1),
                      "share_upper": round(sum(chosen) / len(chosen), 3)})  # fmt: skip
    return mixes


def mixed_vs_waitk(runs: Sequence[dict], head: str) -> list[dict]:
    """Each ``head`` point with no wait-k point at equal LAAL (``nearest``) but between two of them, k and k+1, against
    wait-k time-shared to its LAAL (``waitk_mixtures``), with a paired bootstrap. Which sentences a draw gives to
    which k moves its chrF by up to 0.2 here (text, 1,000 pairs), so the baseline is the mean of ``MIX_DRAWS``
    draws (``seed_mean_bootstrap``'s mean over runs): the time-shared schedule's expected score."""
    waitk = sorted((r for r in runs if r["head"] == "wait-k" and r["LAAL"] is not None), key=lambda r: r["LAAL"])
    out = []
    for point in sorted((r for r in runs if r["head"] == head and r["LAAL"] is not None), key=lambda r: r["LAAL"]):
        if nearest(point, waitk) is not None:
            continue  # ``matched`` compares it with that point
        around = [(a, b) for a, b in zip(waitk, waitk[1:], strict=False) if a["LAAL"] < point["LAAL"] < b["LAAL"]]
        if not around or _k(around[0][1]) != _k(around[0][0]) + 1:
            # outside wait-k's range, or between two k with one unswept between them (the ablations' grid): where
            # the curve bends, mixing k=1 and k=3 scores below k=2, a weaker baseline than wait-k itself
            continue
        lower, upper = around[0]
        mixes = waitk_mixtures(point["LAAL"], lower, upper)
        point_hyps, refs = hypotheses(point["output"])
        if texts(mixes[0]["instances"])[1] != refs:
            raise ValueError(f"{point['output']} was scored on other references than {lower['output']}; compare "
                             "runs of one test set")  # fmt: skip
        mix_hyps = [texts(mix["instances"])[0] for mix in mixes]
        test = bootstrap_hypotheses([mix_hyps, [point_hyps]], refs)  # the draws' mean: the schedule's expectation
        share = sum(mix["share_upper"] for mix in mixes) / MIX_DRAWS
        out.append({"head": head, "param": point["param"], "LAAL": point["LAAL"],
                    "matched": f"wait-k {lower['param']}+{upper['param']} ({100 * share:.0f}% {upper['param']})",
                    "matched_LAAL": round(sum(mix["LAAL"] for mix in mixes) / MIX_DRAWS, 2), **test,
                    **verdict(test)})  # fmt: skip
    return out


def _offline_of(variant: str, own_offline: Mapping[str, dict | None], decodings: Mapping[str, str]) -> dict | None:
    """A variant's offline run: its own, or else that of the variant it is a decoding of, and so on."""
    seen = set()
    while variant not in seen:
        seen.add(variant)
        if own_offline.get(variant):
            return own_offline[variant]
        if variant not in decodings:
            return None
        variant = decodings[variant]
    return None


def compare_task(task_dir: str | Path, variants: Sequence[str], task: str = "",
                 decodings: Mapping[str, str] | None = None) -> dict:
    """``decodings``: the variants of ``variants`` that are a trained model decoded another way (agent flags, e.g.
    ``--reencode read``), each with the variant whose model it decodes (``{"main-reencode": "main"}``), not
    trained models: no offline or seed comparison, but their own oracle study and ``decoding_vs_model``; one
    without an offline run of its own uses the one it is compared with, and so on back to its model's
    (``from-x4-reencode-hold`` -> ``from-x4-reencode-rebuilt`` -> ``from-x4``)."""
    task_dir = Path(task_dir)
    decodings = dict(decodings or {})
    runs = {v: load_runs(task_dir, v) for v in (*variants, *(m for m in decodings.values() if m not in variants))}
    main_runs = runs.get("main") or []
    result: dict = {"task": task or task_dir.name}
    if not main_runs:
        return result
    own_offline = {v: next((r for r in vruns if r["head"] == "offline"), None) for v, vruns in runs.items()}
    offline_of = {v: _offline_of(v, own_offline, decodings) for v in variants}
    offline = offline_of["main"]
    trained = {v: run for v, run in offline_of.items() if v not in decodings}  # models, not decodes of them
    mean_source = main_runs[0]["mean_source_length"]
    result["mean_source_length"] = mean_source
    result["latency_unit"] = main_runs[0]["latency_unit"]
    result["entropy_vs_waitk"] = matched(main_runs, "entropy", "wait-k")
    result["probe_vs_entropy"] = matched(main_runs, "probe", "entropy")
    if any(r["head"] == BOUNDED for r in main_runs):
        result["bounded_vs_waitk"] = matched(main_runs, BOUNDED, "wait-k")
    if offline:
        result["keep_offline"] = keep_offline(main_runs, offline, mean_source)
        # main as the system, each ablation of main's budget as the baseline (a seed replica is not an ablation:
        # ``seeds`` compares it with its recipe's other seeds)
        firsts = {v: run for v, run in trained.items() if run is not None and not split_seed(v)[1]}
        result["offline"] = {v: paired_bootstrap(other["output"], offline["output"])
                             for v, other in firsts.items() if v != "main" and plain_of(v) == PLAIN}  # fmt: skip
        # #7's offline target: each other streaming-trained variant against the plain full-sentence fine-tune
        # of the same budget
        result["offline_vs_plain"] = {}
        for variant, other in firsts.items():
            base = plain_of(variant)
            plain = firsts.get(base)
            if variant not in ("main", base) and plain is not None:
                result["offline_vs_plain"][variant] = {**paired_bootstrap(plain["output"], other["output"]),
                                                       "plain": base}  # fmt: skip
        study = seed_study(trained)
        if study:
            result["seeds"] = study
    # the other variants' entropy heads against their own wait-k (the ablations sweep a sparser grid), their
    # probes (where swept) against their own entropy, and how much of their own offline chrF they keep
    others = [v for v in variants if v != "main"]
    result["variant_entropy_vs_waitk"] = {v: matched(runs[v], "entropy", "wait-k") for v in others
                                          if any(r["head"] == "entropy" for r in runs[v])}  # fmt: skip
    result["variant_bounded_vs_waitk"] = {v: matched(runs[v], BOUNDED, "wait-k") for v in others
                                          if any(r["head"] == BOUNDED for r in runs[v])}  # fmt: skip
    # the entropy points (alone or between lag bounds) that no wait-k point lies near, against wait-k time-shared
    # to their LAAL, on every variant with entropy runs
    result["vs_waitk_mixed"] = {v: points for v in variants
                                if (points := [p for h in ("entropy", BOUNDED) for p in mixed_vs_waitk(runs[v], h)])}
    # and against the faster fixed schedule where one was swept (fixed-chunk: words after each chunk of source
    # units), the only schedule below wait-k k=1's LAAL
    result["entropy_vs_fixed_chunk"] = {v: points for v in variants if any(r["head"] == FIXED for r in runs[v])
                                        and (points := matched(runs[v], "entropy", FIXED))}  # fmt: skip
    result["variant_probe_vs_entropy"] = {v: matched(runs[v], "probe", "entropy") for v in others
                                          if {"probe", "entropy"} <= {r["head"] for r in runs[v]}}  # fmt: skip
    # a variant swept on the probe alone (main's model with its probe trained again: the bench's PROBES) against
    # main's own probe, entropy and wait-k at equal LAAL (the same model and test set: paired)
    result["probe_vs_main"] = {
        v: {b: matched(runs[v], "probe", b, main_runs) for b in ("probe", "entropy", "wait-k")}
        for v in others if runs[v] and all(r["head"] == "probe" for r in runs[v])
    }  # fmt: skip
    result["variant_keep_offline"] = {v: keep_offline(runs[v], offline_of[v], mean_source) for v in others
                                      if offline_of[v] and any(r["head"] in ADAPTIVE for r in runs[v])}  # fmt: skip
    study = oracle_study(main_runs, offline)
    if study:
        result["oracle"] = study
    result["variant_oracle"] = {v: s for v in others if (s := oracle_study(runs[v], offline_of[v]))}
    result["decoding_vs_model"] = {v: {"model": model, "runs": same_runs(runs[model], runs[v])}
                                   for v, model in decodings.items()}  # fmt: skip
    return result


def oracle_study(runs: Sequence[dict], offline: dict | None) -> dict | None:
    """The oracle head's point among ``runs`` (None without one): how often its output is the offline decode's,
    the lowest LAAL at which each head scores its chrF (``reach``), and the oracle against the wait-k point of
    equal LAAL (``vs_waitk``): how far the heads are from the floor, and whether the floor beats the schedule."""
    oracle = next((r for r in runs if r["head"] == "oracle"), None)
    if oracle is None:
        return None
    study = {k: oracle[k] for k in ("LAAL", "AL", "chrF", "BLEU")}
    if offline:  # the oracle writes only full-view words, but the words after them may see stale target states
        ours, theirs = (
            {ins["index"]: ins.get("prediction") or "" for ins in read_instances(run["output"])}
            for run in (oracle, offline)
        )
        study["same_as_offline"] = sum(ours[i] == theirs.get(i) for i in ours)
        study["instances"] = len(ours)
    study["reach"] = reach(runs, oracle["chrF"])
    study["vs_waitk"] = matched([oracle, *(r for r in runs if r["head"] == "wait-k")], "oracle", "wait-k")[0]
    return study


def same_runs(baseline: Sequence[dict], runs: Sequence[dict]) -> list[dict]:
    """Each run of ``runs`` against ``baseline``'s run of the same head and parameters (one model decoded two
    ways): both LAALs, and the paired bootstrap of the second against the first."""
    by_setting = {(r["head"], r["param"]): r for r in baseline}
    out = []
    for run in runs:
        base = by_setting.get((run["head"], run["param"]))
        if base is None or run["head"] == "offline":
            continue
        test = paired_bootstrap(base["output"], run["output"])
        out.append({"head": run["head"], "param": run["param"], "LAAL": run["LAAL"], "baseline_LAAL": base["LAAL"],
                    **test})  # fmt: skip
    return out


def seed_study(offline_of: dict[str, dict | None]) -> dict:
    """The offline decodes of recipes trained with more than one seed (``main-seed1``: main, seed 1).

    Per recipe: each seed's chrF and BLEU, their means and standard deviations, and each later seed against seed 0
    (paired bootstrap): how far trainings of one recipe lie apart, which the bootstrap over test sentences of one
    model cannot see. Then ``vs_plain``: per streaming recipe with seeds, its seed-mean chrF and BLEU minus its
    plain fine-tune's (``plain_of``), a paired bootstrap of the two means (``seed_mean_bootstrap``: test sentences
    resampled), Welch's t-test over the seeds' scores (``seeds_test``: the seeds' spread as the noise), and the
    chrF difference of every pairing of one of its seeds with one of the plain's.
    """
    recipes: dict[str, dict[int, dict]] = {}
    for variant, run in offline_of.items():
        if run is not None:
            recipe, seed = split_seed(variant)
            recipes.setdefault(recipe, {})[seed] = run
    out: dict = {}
    for recipe, by_seed in recipes.items():
        if len(by_seed) < 2 or 0 not in by_seed:
            continue
        seeds = sorted(by_seed)
        out[recipe] = {
            **{m: {str(s): round(by_seed[s][m], 2) for s in seeds} for m in ("chrF", "BLEU")},
            **{f"mean_{m}": round(sum(by_seed[s][m] for s in seeds) / len(seeds), 2) for m in ("chrF", "BLEU")},
            **{f"sd_{m}": round(stdev(by_seed[s][m] for s in seeds), 2) for m in ("chrF", "BLEU")},
            "vs_seed0": {str(s): paired_bootstrap(by_seed[0]["output"], by_seed[s]["output"]) for s in seeds[1:]},
        }
    vs_plain = {}
    for recipe, r in out.items():
        plain = out.get(plain_of(recipe))
        if plain is None or recipe == plain_of(recipe):
            continue
        vs_plain[recipe] = {
            **{m: round(r[f"mean_{m}"] - plain[f"mean_{m}"], 2) for m in ("chrF", "BLEU")},
            "pairings_chrF": {f"{s}-{t}": round(r["chrF"][s] - plain["chrF"][t], 2)
                              for s in r["chrF"] for t in plain["chrF"]},
            "test": seed_mean_bootstrap([run["output"] for run in recipes[plain_of(recipe)].values()],
                                        [run["output"] for run in recipes[recipe].values()]),
            "seeds_test": {m: welch_test(list(plain[m].values()), list(r[m].values())) for m in ("chrF", "BLEU")},
        }  # fmt: skip
    if vs_plain:
        out["vs_plain"] = vs_plain
    return out


def _seed_lines(study: dict) -> list[str]:
    """'Training seeds, offline decode: main chrF 21.73 (seed 0), 21.90 (seed 1), mean 21.82; ...'."""
    lines = []
    for recipe, r in study.items():
        if recipe == "vs_plain" or "vs_seed0" not in r:  # (a compare.json of before vs_plain: main_vs_plain)
            continue
        chrf = ", ".join(f"{v:.2f} (seed {s})" for s, v in r["chrF"].items())
        later = "; ".join(f"seed {s} vs seed 0: chrF {t['chrF']['delta']:+.2f} (p {t['chrF']['p']:.3f}), "
                          f"BLEU {t['BLEU']['delta']:+.2f} (p {t['BLEU']['p']:.3f})"
                          for s, t in r["vs_seed0"].items())  # fmt: skip
        spread = f", sd {r['sd_chrF']:.2f}" if "sd_chrF" in r else ""  # (a compare.json of before the sd)
        lines.append(f"Training seeds, offline decode, {recipe}: chrF {chrf}, mean {r['mean_chrF']:.2f}{spread} "
                     f"(BLEU mean {r['mean_BLEU']:.2f}); {later}.")  # fmt: skip
    for recipe, d in study.get("vs_plain", {}).items():
        pairs = d["pairings_chrF"].values()
        test = d["test"]
        lines.append(f"{recipe} minus {plain_of(recipe)}, over the seed means: chrF {d['chrF']:+.2f} (p "
                     f"{test['chrF']['p']:.3f}), BLEU {d['BLEU']:+.2f} (p {test['BLEU']['p']:.3f}) (paired bootstrap "
                     f"of the means, test sentences resampled; each seed against each seed, chrF {min(pairs):+.2f} "
                     f"to {max(pairs):+.2f}).")  # fmt: skip
        if "seeds_test" in d:
            welch = d["seeds_test"]
            lines.append(f"{recipe} minus {plain_of(recipe)}, the seeds as the samples (Welch's t-test of "
                         f"{len(study[recipe]['chrF'])} against "
                         f"{len(study[plain_of(recipe)]['chrF'])} seeds): chrF p {welch['chrF']['p']:.3f} (df "
                         f"{welch['chrF']['df']}), BLEU p {welch['BLEU']['p']:.3f}.")  # fmt: skip
    return lines


REACH_HEADS = ("wait-k", *ADAPTIVE)


def reach(runs: Sequence[dict], chrf: float) -> dict:
    """Per head, its lowest-LAAL point whose chrF is at least ``chrf`` (None where no point gets there)."""
    out = {}
    for head in REACH_HEADS:
        points = [r for r in runs if r["head"] == head and r["LAAL"] is not None]
        if points:
            good = [r for r in points if r["chrF"] >= chrf]
            best = min(good, key=lambda r: r["LAAL"], default=None)
            out[head] = None if best is None else {k: best[k] for k in ("param", "LAAL", "chrF")}
    return out


def keep_offline(runs: Sequence[dict], offline: dict, mean_source: float) -> dict:
    """The best proactive point at LAAL <= 35% of the mean source, and its share of ``offline``'s chrF."""
    limit = LOW_LATENCY_SHARE * mean_source
    low = [r for r in runs if r["head"] in ADAPTIVE and r["LAAL"] is not None and r["LAAL"] <= limit]
    best = max(low, key=lambda r: r["chrF"], default=None)
    return {
        "offline_chrF": offline["chrF"],
        "laal_limit": round(limit, 2),
        "best": None if best is None else {k: best[k] for k in ("head", "param", "LAAL", "chrF", "BLEU")},
        "share": None if best is None else round(best["chrF"] / offline["chrF"], 3) if offline["chrF"] else None,
    }


def _laal(value: float | None) -> str:
    """A LAAL in a line or table: two decimals, or '-' for a run that wrote nothing (SimulEval gives it no LAAL)."""
    return "-" if value is None else f"{value:.2f}"


def _keep_line(keep: dict, unit: str, variant: str = "") -> str:
    """'Best proactive head at LAAL <= 2.77 words (35% of the mean source): probe ..., = 95.5% of ...'; with a
    variant: 'stream-0.3-x4, best proactive head ... of its offline chrF ...'."""
    at = f"LAAL <= {keep['laal_limit']} {unit} (35% of the mean source)"
    if keep["best"] is None:
        return f"{variant}, no proactive point at {at}." if variant else f"No proactive point has {at}."
    best = keep["best"]
    offline = f"{'its' if variant else 'the'} offline chrF {keep['offline_chrF']:.1f}"
    share = f"no share of {offline}" if keep["share"] is None else f"= {100 * keep['share']:.1f}% of {offline}"
    return (f"{f'{variant}, best' if variant else 'Best'} proactive head at {at}: {best['head']} {best['param']}, "
            f"chrF {best['chrF']:.1f} at LAAL {best['LAAL']:.2f} {share}.")  # fmt: skip


def _variant_line(variant: str, title: str, points: list[dict]) -> str:
    """'no-mslm, entropy vs its own wait-k: 4 matched of 4 points, significantly better on 0, worse on 3 (...).'"""
    tested = [p for p in points if p.get("matched")]
    pairs = "; ".join(
        f"{p['param']} (LAAL {p['LAAL']:.2f}) vs {p['matched']}: {p['chrF']['delta']:+.2f}"
        f"{' *' if p['chrF']['p'] < 0.05 else ''} (p {p['chrF']['p']:.3f})"
        for p in tested
    )  # fmt: skip
    return (f"{variant}, {title}: {len(tested)} matched of {len(points)} points, significantly better on "
            f"{sum(p['better'] for p in tested)}, worse on {sum(p['worse'] for p in tested)}"
            + (f" (chrF: {pairs})." if pairs else "."))  # fmt: skip


def _offline_line(system: str, baseline: str, test: dict) -> str:
    """'Offline decode, main vs no-mslm: chrF 21.7 vs 22.4 (Δ -0.66, p 0.001); BLEU ...' from a paired test."""
    c, b = test["chrF"], test["BLEU"]
    return (f"Offline decode, {system} vs {baseline}: chrF {c['system']:.1f} vs {c['baseline']:.1f} "
            f"(Δ {c['delta']:+.2f}, p {c['p']:.3f}); BLEU {b['system']:.2f} vs {b['baseline']:.2f} "
            f"(Δ {b['delta']:+.2f}, p {b['p']:.3f}).")  # fmt: skip


def _oracle_line(o: dict, unit: str, variant: str = "") -> str:
    """The oracle's point, how often it is the offline decode, the heads' reach of its chrF, and it against
    wait-k at its LAAL."""
    line = (f"{f'{variant}, oracle' if variant else 'Oracle'} head (reads the whole source; analysis only): LAAL "
            f"{_laal(o['LAAL'])} {unit}, chrF {o['chrF']:.1f}, BLEU {o['BLEU']:.2f}.")  # fmt: skip
    if "same_as_offline" in o:
        line += f" Its output equals the offline decode on {o['same_as_offline']} of {o['instances']} instances"
        line += (  # another variant's decode (``--reencode``) may re-read them: it explains its own
            "." if o["same_as_offline"] == o["instances"] or variant else
            ": each word it writes is the full-source model's next word, but the target tokens already written "
            "were computed under a shorter source (as in training: token t sees phi(t) units), so the "
            "continuation after them can differ."
        )  # fmt: skip
    if o.get("reach"):
        got = sorted(((h, r) for h, r in o["reach"].items() if r), key=lambda hr: hr[1]["LAAL"])
        never = [h for h, r in o["reach"].items() if not r]
        line += (" The lowest LAAL at which each head scores the oracle's chrF or more: "
                 + "; ".join(f"{h} {r['param']} {r['LAAL']:.2f}" for h, r in got)
                 + (f"; never: {'; '.join(never)}" if never else "") + ".")  # fmt: skip
    test = o.get("vs_waitk") or {}
    if test.get("matched"):
        c, b = test["chrF"], test["BLEU"]
        line += (f" Against {test['matched']} at equal LAAL ({test['matched_LAAL']:.2f}): chrF "
                 f"{c['delta']:+.2f} (p {c['p']:.3f}), BLEU {b['delta']:+.2f} (p {b['p']:.3f}).")  # fmt: skip
    elif "vs_waitk" in o:
        line += " No wait-k point lies at equal LAAL (within 10%)."
    return line


def _decoding_table(variant: str, model: str, points: list[dict], unit: str) -> list[str]:
    """Each run of a decoding of ``model``'s model against ``model``'s run of the same head and parameters."""
    better = sum(verdict(p)["better"] for p in points)
    worse = sum(verdict(p)["worse"] for p in points)
    lines = [f"**{variant} vs {model}**, run by run (the same model, head and parameters): chrF significantly "
             f"higher on {better} of {len(points)} runs, lower on {worse}.", "",
             f"| head | param | LAAL ({unit}) | {model}'s LAAL | chrF | Δ chrF | p | BLEU Δ | p |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in points:
        c, b = p["chrF"], p["BLEU"]
        mark = " *" if c["p"] < 0.05 else ""
        lines.append(f"| {p['head']} | {p['param']} | {_laal(p['LAAL'])} | {_laal(p['baseline_LAAL'])} | "
                     f"{c['system']:.1f} | {c['delta']:+.2f}{mark} | {c['p']:.3f} | {b['delta']:+.2f} | "
                     f"{b['p']:.3f} |")  # fmt: skip
    return lines


def format_comparison(result: dict) -> list[str]:
    """Markdown lines for SUMMARY.md."""
    unit = result.get("latency_unit", "")
    lines = [f"### Paired bootstrap ({BOOTSTRAP_SAMPLES} resamples, sacrebleu; p < 0.05 marked)", ""]
    for key, title in (("entropy_vs_waitk", "entropy vs wait-k"), ("probe_vs_entropy", "probe vs entropy"),
                       ("bounded_vs_waitk", "entropy between lag bounds vs wait-k")):
        points = result.get(key) or []
        if not points:
            continue
        tested = [p for p in points if p.get("matched")]
        wins = sum(p["better"] for p in tested)
        losses = sum(p["worse"] for p in tested)
        lines += [f"**{title}** at equal LAAL (within 10%): {len(tested)} matched of {len(points)} points; "
                  f"significantly better on {wins}, worse on {losses}.", "",
                  f"| point | LAAL ({unit}) | matched | its LAAL | chrF | Δ chrF | p | BLEU Δ | p |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in points:
            if not p.get("matched"):
                lines.append(f"| {p['head']} {p['param']} | {_laal(p['LAAL'])} | none within 10% | | | | | | |")
                continue
            c, b = p["chrF"], p["BLEU"]
            mark = " *" if c["p"] < 0.05 else ""
            lines.append(
                f"| {p['head']} {p['param']} | {p['LAAL']:.2f} | {p['matched']} | {p['matched_LAAL']:.2f} | "
                f"{c['system']:.1f} | {c['delta']:+.2f}{mark} | {c['p']:.3f} | {b['delta']:+.2f} | {b['p']:.3f} |"
            )
        lines.append("")
    keep = result.get("keep_offline")
    if keep:
        lines += [_keep_line(keep, unit), ""]
    variant_lines = [_variant_line(v, "entropy vs its own wait-k", points)
                     for v, points in (result.get("variant_entropy_vs_waitk") or {}).items()]  # fmt: skip
    variant_lines += [_variant_line(v, "entropy between lag bounds vs its own wait-k", points)
                      for v, points in (result.get("variant_bounded_vs_waitk") or {}).items()]  # fmt: skip
    variant_lines += [_variant_line(v, "entropy points between wait-k points vs wait-k time-shared to their LAAL",
                                    points) for v, points in (result.get("vs_waitk_mixed") or {}).items()]
    variant_lines += [_variant_line(v, "entropy vs its own fixed-chunk schedule", points)
                      for v, points in (result.get("entropy_vs_fixed_chunk") or {}).items()]  # fmt: skip
    variant_lines += [_variant_line(v, "probe vs its own entropy", points)
                      for v, points in (result.get("variant_probe_vs_entropy") or {}).items()]  # fmt: skip
    variant_lines += [_variant_line(v, f"probe vs main's {b}", points)
                      for v, by_head in (result.get("probe_vs_main") or {}).items()
                      for b, points in by_head.items()]  # fmt: skip
    variant_lines += [_keep_line(keep, unit, v) for v, keep in (result.get("variant_keep_offline") or {}).items()]
    if variant_lines:
        lines += variant_lines + [""]
    for variant, test in (result.get("offline") or {}).items():
        lines.append(_offline_line("main", variant, test))
    for variant, test in (result.get("offline_vs_plain") or {}).items():
        lines.append(_offline_line(variant, f"{test.get('plain', PLAIN)} (the plain fine-tune)", test))
    lines += _seed_lines(result.get("seeds") or {})
    if result.get("oracle"):
        lines += ["", _oracle_line(result["oracle"], unit)]
    for variant, o in (result.get("variant_oracle") or {}).items():
        lines += ["", _oracle_line(o, unit, variant)]
    for variant, decoded in (result.get("decoding_vs_model") or {}).items():
        if decoded["runs"]:
            lines += ["", *_decoding_table(variant, decoded["model"], decoded["runs"], unit)]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simul_agents.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("task_dir", help="a folder holding eval-<variant>/<head>/<param>/instances.log")
    parser.add_argument("--variants", nargs="+", default=["main"])
    parser.add_argument("--decodings", nargs="+", default=[], metavar="VARIANT[=MODEL]",
                        help="variants of --variants that are a trained model decoded another way, with that "
                             "model's variant (default main): main-reencode stream-0.3-x4-reencode=stream-0.3-x4")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    found = sorted(p.name.removeprefix("eval-") for p in Path(args.task_dir).glob("eval-*") if p.is_dir())
    if "main" not in found:
        parser.error(f"{args.task_dir}: no eval-main/ folder of runs (found: {', '.join(found) or 'none'}); give "
                     "a task folder of the bench, e.g. runs/bench/text")  # fmt: skip
    decodings = {name: model or "main" for name, _, model in (d.partition("=") for d in args.decodings)}
    unknown = sorted(set(decodings) - set(args.variants))
    if unknown:
        parser.error(f"--decodings {' '.join(unknown)}: not among --variants; name each in both")
    missing = sorted(m for m in set(decodings.values()) if m not in found)
    if missing:
        parser.error(f"--decodings: no eval-{missing[0]}/ folder of runs in {args.task_dir} (the model decoded)")
    result = compare_task(args.task_dir, args.variants, decodings=decodings)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("\n".join(format_comparison(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
