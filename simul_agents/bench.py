"""`make bench`: the full offline experiment, stage by stage, resumable, into ``results/``.

    python -m simul_agents.bench [--tasks text speech] [--only STAGE ...] [--jobs 2] [--batch 32] [--list]

Stages (each a function below; a finished stage leaves ``runs/bench/done/<stage>.json`` and is never redone),
every task's main model, then every main sweep, then the ablations (the speech encoder's first: it needs only
the main models):

- ``assets``; ``<task>-corpus``: the offline corpus at full size (text: every Ding pair; speech: Piper audio,
  the train split capped, the test split large enough for the bootstrap);
- ``<task>-train-<variant>``: MSLM + SPSD (``main``), without SPSD (``no-spsd``), without MSLM (``no-mslm``: a
  plain full-sentence fine-tune, the streaming-quality baseline), for text the streaming terms at 0.3 of the full
  view's weight (``stream-0.3``: whether a lighter streaming loss keeps offline quality; ``-x4``: it and the
  plain fine-tune for 4x the steps; ``main-seed1``, ``no-mslm-seed1``, ``stream-0.3-seed1``: trained again with
  another seed, whose sweeps show how far two trainings of one recipe differ; ``no-mslm-seed2``,
  ``stream-0.3-seed2``: a third seed, decoded offline only) and, for speech, ``main``
  with LoRA on the block-causal encoder (``encoder-lora``: whether fine-tuning the encoder pays) and ``main`` again
  with another seed (``main-seed1``, from the text ``main-seed1``); for text also main's model with its probe
  trained again on its final states (``probe-word-start``, ``probe-all-rows``; speech the first: ``PROBES``). A
  speech model's LLM starts from the text model of the same recipe (its LoRA; ``init_llm``), so the speech steps go
  to the adapter and to listening, not to learning German again; its fresh adapter is first aligned with CTC on the
  English transcripts (``align_steps`` in ``offline_speech.yaml``; ``training/align.py``). Training resumes
  inside a stage from its newest step checkpoint. ``main`` trains the probe head jointly (detached features);
- ``<task>-sweep-<variant>``: SimulEval over the test split: every head on ``main``, the offline decode plus
  entropy and wait-k on the ablations and the seed replicas (the offline decode alone on those in
  ``offline_only``), and the probe on those in ``probe_variants`` (``simul_agents.sweep``;
  finished runs, shards of 250 instances and a killed shard's finished instances are kept). ``--jobs``
  processes, each evaluating ``--batch`` instances at a time (``simul_agents.batch_eval``: SimulEval's loop with
  batched LM forwards; same predictions and delays, 4x (text) and 2.8x (speech) faster here, no ``elapsed``);
- ``speech-computation-aware``: SimulEval itself, one instance at a time, on 100 test utterances (entropy and
  offline on ``main``, the LLM in float32, float16 and int8): the computation-aware latency of one stream here;
- ``<task>-compare-main`` (right after the main sweep: the heads against each other, and main against any
  ablation swept by then) and ``<task>-compare`` (after the ablations, everything): sacrebleu paired bootstrap
  for every comparison the README makes;
- ``streaming-cost``, ``training-cost``: the two cost benchmarks (``benchmarks/``);
- ``summary``: ``results/SUMMARY.md`` from everything above (always rewritten).

Outputs: ``results/<task>/runs.csv`` (every run of every variant), ``results/<task>/curve.png``,
``results/<task>/compare.json``, ``results/<task>/model`` (the main model's trained delta, which ``make demo``
reuses), ``results/bench/*.json`` and ``results/SUMMARY.md``. Work files stay in ``runs/bench``.

What a later stage or a fresh machine needs is kept under ``results/`` too, so that a run spread over sessions
survives landing on a machine without ``runs/``: every stage's record (``results/bench/stages``), every trained
variant's final checkpoint (``results/<task>/model``, ``results/<task>/models/<variant>``) and every finished
sweep run's ``instances.log`` (``results/<task>/logs``; ``simul_agents.archive``). On start the bench puts them
back (``restore``) and skips each stage whose outputs all came back; assets and corpora are rebuilt (Piper
draws prosody at random: a rebuilt speech corpus has the same sentences and splits, not the same waveforms).

A plan that grows is followed: a sweep finished with fewer runs than the plan now lists (a threshold added) runs
again for the new runs only, and a comparison runs again when a sweep it read runs again, or when the final one
lacks a variant the plan now trains.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from simul_agents.archive import EARLIER, missing_logs, pack, unpack

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> training overrides
    "main": {},
    "no-spsd": {"spsd_lambda": 0.0},
    "no-mslm": {"w_mslm": 0.0, "spsd_lambda": 0.0, "probe": False},
    # the streaming terms at 0.3 of the full view's weight: does a lighter streaming loss keep offline quality
    # (main loses 0.66 chrF to no-mslm on text) and the entropy head's curve?
    "stream-0.3": {"w_mslm": 0.3, "spsd_lambda": 0.3},
    # 4x the steps (2 epochs of text), the light recipe and its plain baseline: does training longer let the
    # streaming model keep the plain fine-tune's offline quality, and the entropy head pass wait-k?
    "stream-0.3-x4": {"w_mslm": 0.3, "spsd_lambda": 0.3, "max_steps": 2000},
    "no-mslm-x4": {"w_mslm": 0.0, "spsd_lambda": 0.0, "probe": False, "max_steps": 2000},
    "encoder-lora": {"train_encoder": "lora"},  # speech: does fine-tuning the block-causal encoder pay?
    # a second training seed (LoRA and probe init, batch order, prefixes) of main and of its plain baseline: is
    # main's offline gap to the plain fine-tune larger than two seeds of one recipe differ, and does each seed's
    # entropy head fall behind its own wait-k where seed 0's does? (swept as the ablations are)
    "main-seed1": {"seed": 1},
    "no-mslm-seed1": {"w_mslm": 0.0, "spsd_lambda": 0.0, "probe": False, "seed": 1},
    # the lighter recipe again with seed 1: is stream-0.3's offline gap to the plain fine-tune (-0.37 chrF, one
    # seed each) still there over two seeds of both, when two seeds of the plain recipe differ by 0.59?
    "stream-0.3-seed1": {"w_mslm": 0.3, "spsd_lambda": 0.3, "seed": 1},
    # a third seed of the lighter recipe and of its plain baseline: with three trainings a side, the seeds' own
    # spread can be measured (two seeds a side left stream-0.3's -0.19 chrF with pairings from -0.60 to +0.23)
    "no-mslm-seed2": {"w_mslm": 0.0, "spsd_lambda": 0.0, "probe": False, "seed": 2},
    "stream-0.3-seed2": {"w_mslm": 0.3, "spsd_lambda": 0.3, "seed": 2},
    # speech: the lighter recipe for the speech plan's steps, its LLM from the text stream-0.3-x4 model (chrF 28.3
    # against main's 21.7): a speech model whose wait-k k=1 has room below its offline decode (main's: 98.8%)
    "from-x4": {"w_mslm": 0.3, "spsd_lambda": 0.3},
}
# main's model with its probe trained again on main's final states (``training.probe``): only where the heads
# ask it, a word's first token (``word-start``), and on every target token as main's joint probe learned
# (``all-rows``: the control that tells the rows from the retraining); swept on the probe alone
PROBES = {"probe-word-start": {"rows": "word_start"}, "probe-all-rows": {"rows": "all"}}
# the control is swept where #7's keep-95% limit falls (LAAL 2.77 words: main's probe at 0.7-0.8), the rest at all
# of the task's probe thresholds
PROBE_THRESHOLDS = {"probe-all-rows": (0.7, 0.75, 0.8)}
# a trained model decoded another way (agent flags), swept on the whole test set like a variant: the words
# written so far re-read under the source read after every read (``StreamingSession.flush``), not kept as written
DECODINGS = {"main-reencode": {"reencode": "read"}, "stream-0.3-x4-reencode": {"reencode": "read"},
             "from-x4-reencode": {"reencode": "read"}, "main-hold": {"hold_sentence_end": True},
             "from-x4-reencode-hold": {"reencode": "read", "hold_sentence_end": True},
             "from-x4-reencode-rebuilt": {"reencode": "read"},
             "main-reencode-hold": {"reencode": "read", "hold_sentence_end": True}}
# which variant's model a decoding runs (default: main)
DECODED_MODEL = {"stream-0.3-x4-reencode": "stream-0.3-x4", "from-x4-reencode": "from-x4",
                 "from-x4-reencode-hold": "from-x4", "from-x4-reencode-rebuilt": "from-x4"}
# a decoding set run by run against another decoding of its model (default: the model's own decode): the held
# sentence end against the same decode without it, run on the same corpus build (Piper's audio differs by build)
COMPARED_WITH = {"from-x4-reencode-hold": "from-x4-reencode-rebuilt", "main-reencode-hold": "main-reencode"}
# which text variant starts a speech variant (default: the same name)
INIT_VARIANT = {"encoder-lora": "main", "from-x4": "stream-0.3-x4"}
VARIANT_LABELS = {
    "main": "MSLM + SPSD",
    "no-spsd": "MSLM only (no SPSD)",
    "no-mslm": "full-sentence only",
    "stream-0.3": "MSLM + SPSD at 0.3 of the full view's weight",
    "stream-0.3-x4": "stream-0.3 for 2,000 steps",
    "no-mslm-x4": "no-mslm for 2,000 steps",
    "encoder-lora": "MSLM + SPSD, encoder LoRA",
    "main-seed1": "main, training seed 1",
    "no-mslm-seed1": "no-mslm, training seed 1",
    "stream-0.3-seed1": "stream-0.3, training seed 1",
    "no-mslm-seed2": "no-mslm, training seed 2",
    "stream-0.3-seed2": "stream-0.3, training seed 2",
    "main-reencode": "main's model, the words written re-read under the new source at every read (`--reencode read`)",
    "stream-0.3-x4-reencode": "stream-0.3-x4's model, the words written re-read (`--reencode read`)",
    "from-x4": "MSLM + SPSD at 0.3, the LLM from the text stream-0.3-x4 model",
    "from-x4-reencode": "from-x4's model, the words written re-read (`--reencode read`)",
    "main-hold": "main's model, a word closing the sentence held until the source ends (`--hold-sentence-end`)",
    "from-x4-reencode-hold": "from-x4-reencode with a word closing the sentence held until the source ends",
    "from-x4-reencode-rebuilt": "from-x4-reencode's settings of from-x4-reencode-hold, on the same corpus build's "
    "audio as it",
    "main-reencode-hold": "main-reencode with a word closing the sentence held until the source ends",
    "probe-word-start": "main's model, its probe trained again on main's states where the heads ask it (a word's "
    "first token; `training.probe --rows word_start`)",
    "probe-all-rows": "main's model, its probe trained again on main's states on every target token (`training.probe "
    "--rows all`)",
}
# the settings from-x4's re-read decode runs with the sentence end held and, as its baseline, without
FROM_X4_HELD = {"wait-k": {"k": [1]}, "entropy": {"threshold": [4.0, 5.0, 6.0]},
                "fixed-chunk": {"chunk": 1, "words": [2, 3]}}
ALL_HEADS = {  # in the order they run: the numbers the targets need first
    "offline": {},
    "entropy": {},  # threshold: TaskPlan.entropy
    "wait-k": {},  # k: TaskPlan.wait_k (words for text, 640 ms blocks for speech)
    "probe": {},  # threshold: TaskPlan.probe
    "oracle": {},
    "attention": {"frontier": 1, "layers": "upper", "normalise": "all"},  # threshold: TaskPlan.attention
    "fixed-chunk": {"chunk": [2], "words": 2},
    "local-agreement": {"n": [2]},
}
ABLATION_HEADS = {"offline": {}, "entropy": {"threshold": [1.0, 2.0, 3.0, 4.0]}, "wait-k": {}}  # k: TaskPlan
SHARD = 250  # test instances per SimulEval job (a killed one keeps its finished instances: batch_eval)
CA_INSTANCES = 100  # test instances of the computation-aware run (SimulEval itself, one at a time)
# its heads: the offline decode, entropy writing late (1.0: speech LAAL 92% of offline's) and mid-curve (3.0: 69%)
CA_HEADS = {"offline": {}, "entropy": {"threshold": [1.0, 3.0]}}
# agent flags; int4 calibrates (GPTQ) at its first load and --compile compiles before the first instance, untimed
CA_PRECISIONS = {"main-ca": {}, "main-ca-fp16": {"fp16": True}, "main-ca-int8": {"int8": True},
                 "main-ca-int4": {"int4": True}, "main-ca-int4-compiled": {"int4": True, "compile": True}}
CA_VARIANTS = tuple(CA_PRECISIONS)  # the computation-aware runs: the main model, its LLM in fp32, fp16, int8, int4
log = logging.getLogger("bench")


@dataclass(frozen=True)
class TaskPlan:
    name: str  # "text" or "speech"
    train_config: str  # training/configs/*.yaml
    corpus: str  # data folder
    steps: int
    test: int  # held-out test instances for SimulEval
    split_caps: dict = field(default_factory=dict)  # corpus builder caps (speech)
    segment: int | None = None  # SimulEval source segment size (speech, ms)
    agent_args: dict = field(default_factory=dict)
    train_overrides: dict = field(default_factory=dict)
    variants: tuple[str, ...] = ("no-mslm", "no-spsd")  # trained and swept after every task's main sweep
    init_from: str = ""  # a task whose model of the same variant starts this one's LLM (speech from text)
    wait_k: tuple[int, ...] = tuple(range(1, 10))  # wait-k's k on the main model (the ablations: every other)
    # the attention head's thresholds: the quartiles of its frontier share (benchmarks/attention_head.py on dev)
    attention: tuple[float, ...] = (0.03, 0.05, 0.08)
    entropy: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)  # the entropy head's thresholds on the main model
    probe: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # the probe head's (on the main model)
    probe_variants: tuple[str, ...] = ()  # ablations whose jointly trained probe is swept too (probe's thresholds)
    offline_only: tuple[str, ...] = ()  # variants swept on the offline decode alone (a seed replica's offline quality)
    # entropy or probe between lag bounds on the main model, (head, threshold, min_lag, max_lag; 0: no bound):
    # Zheng et al. 2020's adaptive policy between two wait-k schedules, its own curve ("entropy, lag-bounded")
    lag_bounded: tuple[tuple[str, float, int, int], ...] = ()
    decodings: dict = field(default_factory=dict)  # DECODINGS swept (on DECODED_MODEL's model): name -> its heads

    def compared(self) -> list[str]:
        """What the task's final comparison reads: main, its ablations and replicas, their other decodings."""
        return ["main", *self.variants, *self.decodings]

    def heads(self, variant: str) -> dict:
        """The heads and settings swept on ``variant``."""
        from simul_agents.sweep import setting_blocks

        if variant in self.decodings:
            return dict(self.decodings[variant])

        if variant in self.offline_only:
            return {"offline": {}}
        if variant in PROBES:
            return {"probe": {"threshold": list(PROBE_THRESHOLDS.get(variant, self.probe))}}
        heads = ALL_HEADS if variant == "main" else ABLATION_HEADS
        ks = list(self.wait_k) if variant == "main" else list(self.wait_k[::2])
        out = {**heads, "wait-k": {"k": ks}}
        if "attention" in out:
            out["attention"] = {**out["attention"], "threshold": list(self.attention)}
        if variant == "main":
            out["entropy"] = {"threshold": list(self.entropy)}
        if variant == "main" or variant in self.probe_variants:
            out["probe"] = {"threshold": list(self.probe)}
        if variant == "main":
            for head, t, lo, hi in self.lag_bounded:  # a list of settings: the sweep runs each block in turn
                bounded = {"threshold": [t], **({"min_lag": [lo]} if lo else {}), **({"max_lag": [hi]} if hi else {})}
                out[head] = [*setting_blocks(out[head]), bounded]
        return out


TASKS = {
    "text": TaskPlan(
        "text", "training/configs/offline_text.yaml", "data/offline_text", steps=500, test=1000,
        agent_args={"max_len_a": 2, "max_len_b": 10, "max_target_tokens": 96, "skip_failed": True},
        train_overrides={"eval_every": 200, "dev_subset": 64, "dev_bleu_subset": 48, "save_every": 25},
        variants=("no-mslm", "no-spsd", "stream-0.3", "stream-0.3-x4", "no-mslm-x4", "no-mslm-seed1", "main-seed1",
                  "stream-0.3-seed1", "no-mslm-seed2", "stream-0.3-seed2", "probe-word-start", "probe-all-rows"),
        # LAAL 0.9 to 5.3 words; 0.75 lies between 0.7 (2.33) and 0.8 (3.05), where #7's 35% limit (2.77) falls
        probe=(0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95),
        probe_variants=("stream-0.3-x4",),  # the longest-trained streaming model: does its probe keep 95%?
        # the third seeds answer the offline question (streaming training's cost, seed spread included) alone
        offline_only=("no-mslm-seed2", "stream-0.3-seed2"),
        # lags 1-3 straddle wait-k k=2, where the schedule starts to lose (k=1: 93.8% of offline, k=3: 99.0%);
        # 2-4 and 2-none: the 250-pair pilot's two settings, on the whole test set; 1-2 at 3.0 and 5.0: the
        # re-read decode's two points above time-shared wait-k, decoded the default way
        lag_bounded=(("entropy", 2.0, 1, 3), ("entropy", 3.0, 1, 3), ("entropy", 3.0, 2, 4), ("entropy", 4.0, 2, 0),
                     ("entropy", 3.0, 1, 2), ("entropy", 5.0, 1, 2)),
        # re-reading the written words (a 250-pair pilot: wait-k k=2 +0.88 chrF, entropy 4.0 +0.73, probe 0.8
        # +1.0): wait-k where main's loses to its offline decode (k <= 5), entropy at LAAL 1.7-4.7, the oracle; no
        # offline run: with nothing written before the source ends, re-reading changes nothing (main's is used);
        # the probe where #7's keep-95% limit (LAAL 2.77) falls: 0.7 (2.33), 0.75 (2.67), 0.8 (3.05); entropy
        # between lags 1 and 2 and between 1 and 3 (Zheng et al. 2020), where re-read wait-k has room (k=1: 96%
        # of offline, k=2: 99%; a pilot on the first 250 pairs put both above the line from k=1 to k=3)
        decodings={"main-reencode": {"wait-k": {"k": [1, 2, 3, 4, 5]},
                                     "entropy": [{"threshold": [3.0, 4.0, 5.0]},
                                                 {"threshold": [3.0, 4.0, 5.0], "min_lag": [1], "max_lag": [2]},
                                                 {"threshold": [3.0, 4.0, 5.0], "min_lag": [1], "max_lag": [3]}],
                                     "oracle": {}, "probe": {"threshold": [0.7, 0.75, 0.8]}},
                   # the same bounded settings, chosen on main's pilot, unchanged on the longest-trained streaming
                   # model (chrF 28.3, where wait-k k=1 loses 2 points): a test on a model the choice never saw
                   "stream-0.3-x4-reencode": {
                       "wait-k": {"k": [1, 2, 3]},
                       "entropy": [{"threshold": [3.0, 4.0, 5.0], "min_lag": [1], "max_lag": [2]},
                                   {"threshold": [3.0, 4.0, 5.0], "min_lag": [1], "max_lag": [3]}]},
                   # main's low-latency runs write a word closing the sentence before the source has ended, then a
                   # second, invented sentence (wait-k k=1: in 517 of the 1,000, output 1.23x the references;
                   # entropy 5.0: 269, 1.50x), which chrF's recall forgives: wait-k k=1-5 (to match entropy 3.0 and
                   # 4.0, at LAAL 4.7 and 3.8) and entropy 3.0-5.0 again with such a word held until the source
                   # ends, every head alike
                   "main-hold": {"wait-k": {"k": [1, 2, 3, 4, 5]}, "entropy": {"threshold": [3.0, 4.0, 5.0]}},
                   # two of the re-read bounded entropy points that scored above wait-k time-shared to their LAAL
                   # (between lags 1 and 2: p 0.041 and 0.046), and wait-k k=1 and k=2, held too: do the wins
                   # survive without the invented sentence?
                   "main-reencode-hold": {
                       "wait-k": {"k": [1, 2]},
                       "entropy": {"threshold": [3.0, 5.0], "min_lag": [1], "max_lag": [2]}}},
    ),
    "speech": TaskPlan(
        "speech", "training/configs/offline_speech.yaml", "data/offline", steps=600, test=500,
        split_caps={"train": 6000, "dev": 100, "test": 500}, segment=320,
        # main-seed1 starts from the text main-seed1 model: the whole recipe trained again with another seed
        # probe-word-start: text's answer (the rows do not matter, the final states do) asked of speech's probe
        variants=("encoder-lora", "no-mslm", "no-spsd", "main-seed1", "from-x4", "probe-word-start"), init_from="text",
        wait_k=tuple(range(1, 7)),  # 640 ms blocks: k=6 waits 3.84 s; 90% of test utterances are under 3.65 s
        attention=(0.04, 0.08, 0.13),  # the share's quartiles on speech dev: 0.036, 0.076, 0.126 (text: 0.03-0.08)
        # 5.0 writes at LAAL 37% of the mean source (868 ms); 6.0 reaches below the 35% #7's keep-95% target reads
        entropy=(0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
        # #7's keep-95% at LAAL <= 820 ms: the probe at 0.8 (834 ms, 94.5%) and entropy at 4.0 and 5.0 with their
        # lag capped at one 640 ms block, wait-k k=1's pace (LAAL 1074 ms, 98.8%), so that no word waits longer
        lag_bounded=(("probe", 0.8, 0, 1), ("entropy", 4.0, 0, 1), ("entropy", 5.0, 0, 1)),
        # its own offline run: main's was decoded on the audio of an earlier corpus build (Interruptions, README)
        decodings={"main-reencode": {"wait-k": {"k": [1, 2, 3]}, "entropy": {"threshold": [3.0, 4.0, 5.0]},
                                     "oracle": {}, "offline": {}},
                   # the stronger speech model re-read: wait-k's first three k, the entropy head alone and
                   # between lags 1-2 and 1-3 (text's settings, unchanged), the oracle; re-read wait-k k=1 keeps
                   # all of its offline chrF (20.25 at LAAL 1096 ms), so the room lies below k=1, where only a
                   # faster schedule reaches: 2 or 3 words after each 640 ms block (fixed-chunk), and entropy 6.0
                   "from-x4-reencode": {
                       "wait-k": {"k": [1, 2, 3]},
                       "entropy": [{"threshold": [3.0, 4.0, 5.0, 6.0]},
                                   {"threshold": [3.0, 4.0, 5.0], "min_lag": [1], "max_lag": [2]},
                                   {"threshold": [3.0, 4.0, 5.0], "min_lag": [1], "max_lag": [3]}],
                       "fixed-chunk": {"chunk": 1, "words": [2, 3]},
                       "oracle": {}},
                   # the runs below k=1 write a word closing the sentence before the audio has ended, then more
                   # (fixed-chunk 3 words: 346 of 500, length 1.50; entropy 6.0: 337, 1.15): the same re-read decode
                   # with such a word held until the source ends, every head alike, against its baseline: the same
                   # settings without the hold, swept on the same audio (a corpus rebuilt on another machine has
                   # other waveforms: from-x4-reencode's were not these)
                   "from-x4-reencode-hold": FROM_X4_HELD,
                   "from-x4-reencode-rebuilt": FROM_X4_HELD},
        agent_args={"max_len_a": 1, "max_len_b": 10, "max_target_tokens": 96, "skip_failed": True},
        train_overrides={"eval_every": 200, "dev_subset": 48, "dev_bleu_subset": 32, "save_every": 25},
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Bench:
    runs: Path = Path("runs/bench")
    results: Path = Path("results")
    jobs: int = 2  # parallel SimulEval processes
    batch: int = 32  # instances at a time per process (simul_agents.batch_eval); 1: SimulEval itself
    readme: Path | None = ROOT / "README.md"  # its bench section is rewritten from the summary

    @property
    def done_dir(self) -> Path:
        return self.runs / "done"

    def lock(self, stage: str) -> Path:
        """The file a running stage holds locked (``_stage_lock``; ``running`` asks it)."""
        return self.runs / "locks" / f"{stage}.lock"

    def clock(self, stage: str) -> Path:
        """Where a stage's time over its attempts is kept (``_StageClock``)."""
        return self.runs / "time" / f"{stage}.json"

    @property
    def records(self) -> Path:
        """The stage records kept with the results (committed): what a fresh machine restores from."""
        return self.results / "bench" / "stages"

    def model_dir(self, task: str, variant: str) -> Path:
        """Where a trained variant's final checkpoint is kept (``main``'s is the one ``make demo`` reuses)."""
        return self.results / task / ("model" if variant == "main" else f"models/{variant}")

    def archive_dir(self, task: str, variant: str) -> Path:
        """Where an evaluation's finished runs are kept (``simul_agents.archive``)."""
        return self.results / task / "logs" / f"eval-{variant}"


class StageFailed(RuntimeError):
    pass


HEARTBEAT_SECONDS = 30  # how often a running stage adds its time to runs/bench/time/<stage>.json
MAX_GAP_SECONDS = 2 * HEARTBEAT_SECONDS  # a longer silence is a stopped process (SIGSTOP, a suspended machine)


class _StageClock:
    """A stage's time over every attempt: a killed attempt's time (up to its last heartbeat) is kept in
    ``runs/bench/time/<stage>.json`` and the next attempt adds to it, so a stage resumed across sessions reports
    what it cost in all, not what its last attempt took. Time while the process was stopped (``kill -STOP``, to
    run something else alone on the machine) is not counted: a gap between heartbeats counts at most
    ``MAX_GAP_SECONDS``."""

    def __init__(self, path: Path):
        self.path = path
        before = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        self.before, self.attempts = float(before.get("seconds", 0.0)), int(before.get("attempts", 0)) + 1
        self.active, self.last = 0.0, time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"clock-{path.stem}", daemon=True)

    def seconds(self) -> float:
        with self._lock:
            now = time.time()
            self.active += min(max(now - self.last, 0.0), MAX_GAP_SECONDS)
            self.last = now
            return self.before + self.active

    def _write(self) -> None:
        _write_whole(self.path, json.dumps({"seconds": round(self.seconds(), 1), "attempts": self.attempts}) + "\n")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self._write()

    def __enter__(self) -> _StageClock:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._write()


def run_stage(bench: Bench, name: str, fn: Callable[[], dict | None]) -> dict:
    """Run ``fn`` unless the stage is done; record its time (over every attempt) and outcome; a failure names the
    stage and its log. A stage that another bench process is running is waited for, then skipped as done (run a
    later training stage alongside: ``python -m simul_agents.bench --only text-train-no-mslm-x4``)."""
    with _stage_lock(bench, name):
        return _run_stage(bench, name, fn)


STARTUP = "startup"  # the lock a starting process holds while it restores and unmarks outgrown stages


@contextlib.contextmanager
def _stage_lock(bench: Bench, name: str):
    """Hold ``runs/bench/locks/<stage>.lock`` (an exclusive ``flock``) while the stage runs, waiting for another
    process that holds it; the lock goes with its process, killed or not."""
    path = bench.lock(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            print(f"== {name}: running in another bench process (pid {holder}); waiting for it", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def running(bench: Bench, name: str) -> str | None:
    """The pid of the bench process running stage ``name`` now (holding its lock), else None."""
    path = bench.lock(name)
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "?"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _run_stage(bench: Bench, name: str, fn: Callable[[], dict | None]) -> dict:
    marker = bench.done_dir / f"{name}.json"
    unlogged = _runs_without_logs(bench, name)
    if marker.is_file() and unlogged:  # marked done before runs were archived: it reruns those (the rest are kept)
        print(f"== {name}: done earlier, but {unlogged} run(s) have no instances.log here; running them again",
              flush=True)  # fmt: skip
    elif marker.is_file():
        record = json.loads(marker.read_text(encoding="utf-8"))
        print(f"== {name}: done earlier ({record['seconds'] / 60:.1f} min), skipped", flush=True)
        return record
    log_path = bench.runs / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    print(f"\n== {name} (log: {log_path})", flush=True)
    try:
        with _StageClock(bench.clock(name)) as clock:
            info = fn() or {}
    except Exception as e:
        logging.getLogger().exception("stage %s failed", name)
        raise StageFailed(f"stage {name} failed: {type(e).__name__}: {e}; see {log_path}") from e
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    record = {"stage": name, "seconds": round(clock.seconds(), 1), "attempts": clock.attempts,
              "finished": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **info}  # fmt: skip
    for path in (marker, bench.records / f"{name}.json"):
        _write_whole(path, json.dumps(record, indent=2) + "\n")
    print(f"== {name}: finished in {record['seconds'] / 60:.1f} min", flush=True)
    return record


def _write_whole(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary sibling renamed): a process killed while it marks a stage
    done, ticks its clock or writes a table or summary leaves no half-written file for a later start to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _carry_clock(record: Path, clock: Path) -> None:
    """Start a stage's clock from its earlier record: the seconds and attempts it had when it finished."""
    earlier = json.loads(record.read_text(encoding="utf-8"))
    attempts = earlier.get("attempts")
    _write_whole(clock, json.dumps({"seconds": float(earlier.get("seconds", 0.0)),
                                    "attempts": attempts if isinstance(attempts, int) else 1}) + "\n")  # fmt: skip


# ---- stages ----------------------------------------------------------------------------------------------


def stage_assets() -> dict:
    from speech_frontend.assets import build_assets

    if build_assets(["whisper-tiny.en", "smollm2-135m-instruct", "piper-joe", "ding"]):
        raise RuntimeError("some assets could not be built (see the log above)")
    return {}


def stage_corpus(task: TaskPlan) -> dict:
    from training.corpus import build_offline_corpus

    report = build_offline_corpus(task.corpus, text_only=task.name == "text", split_caps=task.split_caps or None)
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} utterances could not be synthesised; rerun to retry them")
    rate = round(report.utterances_per_second, 2)
    return {"counts": report.counts, "made": report.made, "utterances_per_second": rate}


def stage_train(bench: Bench, task: TaskPlan, variant: str) -> dict:
    from training.config import load_config
    from training.train import train

    if variant in PROBES:
        return stage_probe(bench, task, variant)
    out = bench.runs / task.name / variant
    overrides = {
        "train_manifest": f"{task.corpus}/train.tsv",
        "dev_manifest": f"{task.corpus}/dev.tsv",
        "out_dir": str(out),
        "max_steps": task.steps,
        "warmup_steps": max(1, task.steps // 20),
        **task.train_overrides,
        **VARIANTS[variant],
    }
    if task.init_from:  # the LLM starts from the other task's model of the same recipe
        recipe = INIT_VARIANT.get(variant, variant)
        start = bench.runs / task.init_from / recipe / "final"
        if not (start / "checkpoint.json").is_file():
            source = f"{task.init_from}-train-{recipe}"
            raise RuntimeError(f"{task.name}-train-{variant} starts from {start}, which is missing: run `{source}` "
                               f"first (python -m simul_agents.bench --only {source})")  # fmt: skip
        overrides["init_llm"] = str(start)
    frozen = VARIANTS[variant].get("train_encoder", "frozen") == "frozen"
    if task.name == "speech" and variant != "main" and frozen:  # a frozen encoder's outputs are the same for all
        overrides["encoder_cache"] = str(bench.runs / task.name / "main" / "encoder_cache")
    final = train(load_config(ROOT / task.train_config, overrides), resume=True)
    return {"checkpoint": str(final), **training_summary(out / "log.jsonl"),
            "results_model": keep_model(bench, task, variant, final)}  # fmt: skip


def keep_model(bench: Bench, task: TaskPlan, variant: str, final: str | Path) -> str:
    """Copy a trained variant's final checkpoint under ``results/`` (a fresh machine restores it) -> where. The
    copy is made beside it and renamed into place: a kill while copying leaves the earlier model whole, never a
    ``checkpoint.json`` over part of its weights (which ``make demo`` would take); the earlier model is moved aside,
    not deleted, until the copy is in its place."""
    target = bench.model_dir(task.name, variant)
    _copy_whole(Path(final), target)
    return str(target)


def _copy_whole(source: Path, target: Path) -> None:
    """Copy the folder ``source`` to ``target`` beside it first, then rename it in (``checkpoint.replace_dir``)."""
    from streaming_llm.checkpoint import replace_dir

    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp)
    replace_dir(tmp, target)


def stage_probe(bench: Bench, task: TaskPlan, variant: str) -> dict:
    """Main's model with its probe trained again (``PROBES``; ``training/probe.py``). Main's states are collected
    once into ``probe-states``, which every variant of ``PROBES`` shares, and a stopped stage goes on from them."""
    from training.probe import ProbeConfig, run

    source = bench.runs / task.name / "main" / "final"
    if not (source / "checkpoint.json").is_file():
        stage = f"{task.name}-train-main"
        raise RuntimeError(f"{task.name}-train-{variant} retrains the probe of {source}, which is missing: run "
                           f"`{stage}` first (python -m simul_agents.bench --only {stage})")  # fmt: skip
    states = bench.runs / task.name / "probe-states"  # main's states, the same for every variant of PROBES
    report = run(source, bench.runs / task.name / variant, ProbeConfig(**PROBES[variant]), states=states)
    info = {"checkpoint": report["final"], "probe_rows": PROBES[variant]["rows"], "train_rows": report["train_rows"]}
    for probe, measured in report.get("dev", {}).items():  # where the heads ask it: a word's first token
        info[f"dev_auc_{probe}"] = measured["word_start"]["auc"]
        info[f"dev_accuracy_{probe}"] = measured["word_start"]["accuracy"]
    info["results_model"] = keep_model(bench, task, variant, report["final"])
    return info


def training_summary(log_jsonl: Path) -> dict:
    """Median seconds per step, the minutes an undisturbed run spends in alignment and steps (steps x median; dev
    evaluations not counted), the last training losses and the latest step's dev evaluation from a run's JSONL log
    (by step: an evaluation made up later, after a resume, may come after a later one in the file)."""
    records = [json.loads(line) for line in log_jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [r for r in records if "s_per_step" in r]
    dev = sorted((r for r in records if any(k.startswith("dev_") for k in r)), key=lambda r: r.get("step", 0))
    tail = steps[-20:]
    out = {"steps": steps[-1]["step"] if steps else 0}
    if steps:
        median = sorted(r["s_per_step"] for r in steps)[len(steps) // 2]  # not the mean: pauses, a busy machine
        out["s_per_step"] = round(median, 2)
        align = sum(r.get("align_seconds", 0.0) for r in records)
        out["train_minutes"] = round((align + out["steps"] * median) / 60, 1)  # what an undisturbed run takes
        for key in ("loss", "full", "mslm", "spsd", "probe_acc"):
            out[f"train_{key}"] = round(sum(r[key] for r in tail) / len(tail), 4)
    if dev:
        out.update({k: v for k, v in dev[-1].items() if k.startswith("dev_")})
        out["dev_full_by_step"] = {str(r["step"]): r["dev_full"] for r in dev if "dev_full" in r}
    return out


def dev_curves(bench: Bench, task: str) -> dict[str, dict[int, float]]:
    """variant -> {step: dev full-view loss}: from the run's log here (a training under way shows its progress so
    far), else from its stage record (a model trained on another machine), else the record's last value."""
    curves = {}
    for variant in ("main", *TASKS[task].variants):
        log_jsonl = bench.runs / task / variant / "log.jsonl"
        if log_jsonl.is_file():
            curve = training_summary(log_jsonl).get("dev_full_by_step", {})
        else:
            record = {}
            for folder in (bench.records, bench.done_dir):
                path = folder / f"{task}-train-{variant}.json"
                if path.is_file():
                    record = json.loads(path.read_text(encoding="utf-8"))
            curve = record.get("dev_full_by_step") or (
                {str(record["steps"]): record["dev_full"]} if "dev_full" in record and "steps" in record else {}
            )
        if curve:
            curves[variant] = {int(step): value for step, value in curve.items()}
    return curves


def dev_curve_table(bench: Bench, task: str) -> list[str]:
    """The dev full-view loss of every trained variant at each evaluated step, as Markdown lines."""
    curves = dev_curves(bench, task)
    if not curves:
        return []
    steps = sorted({step for curve in curves.values() for step in curve})
    lines = ["Dev full-view loss (nats per target token, the offline view; lower is better) at each evaluated "
             "training step; a variant still training shows its steps so far. Each run's learning rate follows "
             "its own schedule (warmup, then cosine to 10% at its last step): compare runs of one length.", "",
             "| variant | " + " | ".join(str(s) for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]  # fmt: skip
    for variant, curve in curves.items():
        done = (bench.done_dir / f"{task}-train-{variant}.json").is_file() or (
            bench.records / f"{task}-train-{variant}.json"
        ).is_file()
        name = variant if done else f"{variant} (training)"
        lines.append(f"| {name} | " + " | ".join(f"{curve[s]:.3f}" if s in curve else "-" for s in steps) + " |")
    return lines + [""]


def compared_with(variant: str) -> str:
    """The variant whose runs a decoding is set against, setting by setting (``COMPARED_WITH``, or its model)."""
    return COMPARED_WITH.get(variant, decoded_model(variant))


def decoded_model(variant: str) -> str:
    """The trained variant whose model ``variant`` evaluates (itself, or for a decoding its ``DECODED_MODEL``)."""
    return DECODED_MODEL.get(variant, "main") if variant in DECODINGS else variant


def test_files(task: TaskPlan, bench: Bench):
    from training.corpus import write_simuleval_files

    return write_simuleval_files(
        f"{task.corpus}/test.tsv", bench.runs / task.name / "simuleval-data", max_utterances=task.test, seed=0,
        text=task.name == "text",
    )  # fmt: skip


def stage_sweep(bench: Bench, task: TaskPlan, variant: str) -> dict:
    from simul_agents.sweep import SweepConfig, SweepError, sweep

    files = test_files(task, bench)
    model = decoded_model(variant)
    config = SweepConfig(
        task=f"offline-{task.name}-en-de/{variant}",
        checkpoint=str(bench.runs / task.name / model / "final"),
        source=str(files.source),
        target=str(files.target),
        output=bench.runs / task.name / f"eval-{variant}",
        heads=task.heads(variant),
        source_segment_size=task.segment,
        shards=math.ceil(task.test / SHARD),
        batch=bench.batch,
        agent_args={**task.agent_args, **DECODINGS.get(variant, {})},
    )
    try:
        rows, errors = sweep(config, jobs=bench.jobs)  # writes config.output/sweep.csv as runs finish
    except SweepError as e:  # e.g. runs made under other settings (another checkpoint, other agent arguments)
        stage = f"{task.name}-sweep-{variant}"
        raise SweepError(f"{e} (in the bench: python -m simul_agents.bench --redo {stage})") from None
    pack(config.output, bench.archive_dir(task.name, variant))
    if errors:
        raise RuntimeError("failed runs: " + "; ".join(errors))
    return {"runs": len(rows), "output": str(config.output)}


def stage_computation_aware(bench: Bench, task: TaskPlan) -> dict:
    """Computation-aware latency: SimulEval itself, one instance at a time, on all cores, on a test subset.

    The sweeps batch instances (``--batch``), which leaves ``elapsed`` empty; this run measures what a user's
    single stream costs on this machine: the entropy head (``CA_HEADS``: writing late and mid-curve) on the main
    model and the offline decode, in float32 (``main-ca``) and with the LLM in float16, int8 and 4 bits
    (``main-ca-fp16``, ``main-ca-int8``, ``main-ca-int4``: their speed and their quality on the same utterances),
    and 4 bits with compiled steps (``main-ca-int4-compiled``: ``--compile``).
    """
    from simul_agents.sweep import SweepConfig, sweep
    from training.corpus import write_simuleval_files

    files = write_simuleval_files(
        f"{task.corpus}/test.tsv", bench.runs / task.name / "simuleval-data-ca", max_utterances=CA_INSTANCES, seed=0,
        text=task.name == "text",
    )  # fmt: skip
    runs = 0
    for variant, extra in CA_PRECISIONS.items():
        config = SweepConfig(
            task=f"offline-{task.name}-en-de/{variant}",
            checkpoint=str(bench.runs / task.name / "main" / "final"),
            source=str(files.source),
            target=str(files.target),
            output=bench.runs / task.name / f"eval-{variant}",
            heads=CA_HEADS,
            source_segment_size=task.segment,
            agent_args={**task.agent_args, **extra},
        )
        rows, errors = sweep(config, jobs=1)  # writes config.output/sweep.csv
        pack(config.output, bench.archive_dir(task.name, variant))
        if errors:
            raise RuntimeError("failed runs: " + "; ".join(errors))
        runs += len(rows)
    return {"runs": runs, "instances": files.count}


def stage_compare(bench: Bench, task: TaskPlan, variants: list[str]) -> dict:
    from simul_agents.compare import compare_task

    for variant in variants:  # a table restored without its logs (an older machine's sweep) cannot be compared
        missing = missing_logs(bench.runs / task.name / f"eval-{variant}")
        if missing:
            raise RuntimeError(f"{len(missing)} run(s) of {task.name}-sweep-{variant} have no instances.log here "
                               f"(e.g. {missing[0]}); rerun that sweep: python -m simul_agents.bench --only "
                               f"{task.name}-sweep-{variant}")  # fmt: skip
    decodings = {v: compared_with(v) for v in variants if v in DECODINGS}
    decodings.update({v: "main" for v in variants if v in PROBES})  # main's model with another probe
    result = compare_task(bench.runs / task.name, variants, task.name, decodings=decodings)
    out = bench.results / task.name / "compare.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_whole(out, json.dumps(result, indent=2) + "\n")  # its presence marks the stage done
    return {"output": str(out), "variants": list(variants)}


def swept(bench: Bench, task: TaskPlan) -> list[str]:
    """The task's ablation variants whose sweep is done (with its logs here): ``<task>-compare-main`` compares them
    with ``main`` too, so that running it again (a threshold added to the main sweep) keeps the comparisons the
    summary had."""
    return [
        v for v in (*task.variants, *task.decodings)
        if (bench.done_dir / f"{task.name}-sweep-{v}.json").is_file()
        and not missing_logs(bench.runs / task.name / f"eval-{v}")
    ]  # fmt: skip


def outgrown_sweeps(bench: Bench, tasks: list[str]) -> list[str]:
    """The finished ``<task>-sweep-<variant>`` stages that ran fewer runs than the plan now has (a threshold added
    since): they run again when the plan reaches them, and the sweep runs only the new runs (it keeps every
    finished one)."""
    out = []
    for task in tasks:
        for variant in TASKS[task].compared():
            record = _done_record(bench, f"{task}-sweep-{variant}")
            if isinstance(record.get("runs"), int) and record["runs"] < planned_runs(task, variant):
                out.append(f"{task}-sweep-{variant}")
    return out


def outgrown_compares(bench: Bench, tasks: list[str]) -> list[str]:
    """The finished ``<task>-compare-main`` and ``<task>-compare`` stages to run again when the plan reaches them:
    the final comparison when its record compared other variants than the plan now trains (a variant added since),
    and either when a sweep it compared is to run again or finished after it did. Their ``compare.json`` stays
    until then, so the summary keeps the comparisons it had. Call it after ``outgrown_sweeps``' stages are
    unmarked."""
    out = []
    for task in tasks:
        for name in (f"{task}-compare-main", f"{task}-compare"):
            if not (bench.done_dir / f"{name}.json").is_file():
                continue
            record = _done_record(bench, name)
            compared = record.get("variants") or ["main"]
            sweeps = [_done_record(bench, f"{task}-sweep-{v}") for v in compared]
            stale = any(not s or s.get("finished", "") > record.get("finished", "") for s in sweeps)
            if stale or (name == f"{task}-compare" and compared != TASKS[task].compared()):
                out.append(name)
    return out


def _done_record(bench: Bench, name: str) -> dict:
    """A finished stage's record ({} when it is not done)."""
    marker = bench.done_dir / f"{name}.json"
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}


def stage_benchmark(bench: Bench, script: str, args: list[str]) -> dict:
    """Run a benchmark script; its last stdout line is one JSON object, kept in results/bench/."""
    out = bench.results / "bench" / (Path(script).stem + ".json")
    log_file = bench.runs / "logs" / (Path(script).stem + ".out")
    with open(log_file, "w", encoding="utf-8") as f:
        code = subprocess.call([sys.executable, script, *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    lines = [line for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if code != 0 or not lines:
        raise RuntimeError(f"{script} exited with {code}; see {log_file}")
    record = json.loads(lines[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return {"output": str(out)}


# ---- the plan ----------------------------------------------------------------------------------------------


def stages(bench: Bench, tasks: list[str]) -> list[tuple[str, Callable[[], dict | None]]]:
    """Every stage in order: every task's corpus and main model, then their sweeps, then the ablations, so that
    the most important things (the main models, which ``make demo`` reuses, then their curves) exist first
    when a CPU run is interrupted. Each task's ``compare`` follows its last ablation."""
    plan: list[tuple[str, Callable[[], dict | None]]] = [("assets", stage_assets)]
    for name in tasks:
        task = TASKS[name]
        plan.append((f"{name}-corpus", lambda t=task: stage_corpus(t)))
        plan.append((f"{name}-train-main", lambda t=task: stage_train(bench, t, "main")))
    for name in tasks:
        task = TASKS[name]
        plan.append((f"{name}-sweep-main", lambda t=task: stage_sweep(bench, t, "main")))
        plan.append((f"{name}-compare-main", lambda t=task: stage_compare(bench, t, ["main", *swept(bench, t)])))
        if task.segment:  # speech: computation-aware latency needs SimulEval's own timing
            plan.append((f"{name}-computation-aware", lambda t=task: stage_computation_aware(bench, t)))
        for variant in task.decodings:  # the main model decoded another way (another's: after its sweep)
            if decoded_model(variant) == "main":
                plan.append((f"{name}-sweep-{variant}", lambda t=task, v=variant: stage_sweep(bench, t, v)))
    ablations = [(name, variant) for name in tasks for variant in TASKS[name].variants]
    # first those that start from a main model (speech encoder-lora: does fine-tuning the encoder pay?), then
    # the recipe ablations, which a speech model takes from the text model of the same recipe
    first = [(name, variant) for name, variant in ablations if INIT_VARIANT.get(variant) == "main"]
    order = first + [a for a in ablations if a not in first]
    last = dict(order)  # each task's last ablation: its compare stage follows it
    for name, variant in order:
        task = TASKS[name]
        plan.append((f"{name}-train-{variant}", lambda t=task, v=variant: stage_train(bench, t, v)))
        plan.append((f"{name}-sweep-{variant}", lambda t=task, v=variant: stage_sweep(bench, t, v)))
        for decoding in task.decodings:  # this variant's model decoded another way
            if decoded_model(decoding) == variant:
                plan.append((f"{name}-sweep-{decoding}", lambda t=task, v=decoding: stage_sweep(bench, t, v)))
        if variant == last[name]:
            plan.append((f"{name}-compare", lambda t=task: stage_compare(bench, t, t.compared())))
    plan.append(("streaming-cost", lambda: stage_benchmark(bench, "benchmarks/streaming_cost.py", ["--real"])))
    plan.append(("training-cost", lambda: stage_benchmark(bench, "benchmarks/training_cost.py", ["--real"])))
    return plan


# ---- a fresh machine ---------------------------------------------------------------------------------------


def restore(bench: Bench, tasks: list[str], names: list[str]) -> list[str]:
    """Bring back from ``results/`` what finished stages left there, on a machine whose ``runs/bench`` is new (a
    later session landed elsewhere, or ``runs/`` was deleted): every archived sweep run (always, so that a sweep
    resumes from them), each trained variant's final checkpoint, and the done marker of every stage whose outputs
    are all back. Assets and corpora are rebuilt (they skip what exists; a rebuilt speech corpus has new
    waveforms, see the module's docstring). Returns the stages restored."""
    for task in tasks:
        for archive in sorted((bench.results / task / "logs").glob("eval-*")):
            count = unpack(archive, bench.runs / task / archive.name)
            if count:
                log.info("%s/%s: %d finished run(s) restored from %s", task, archive.name, count, archive)
        seed_tables(bench, task)
    restored = []
    for name in names:
        marker, record = bench.done_dir / f"{name}.json", bench.records / f"{name}.json"
        if not marker.is_file() and record.is_file() and _outputs_back(bench, name):
            _write_whole(marker, record.read_text(encoding="utf-8"))  # a kill while copying leaves no half marker
            restored.append(name)
    if restored:
        print(f"== restored from {bench.results}: {', '.join(restored)}", flush=True)
    return restored


COST_STAGES = ("streaming-cost", "training-cost")


def _cost_record(bench: Bench, name: str) -> Path:
    """Where a cost benchmark stage keeps its numbers: ``results/bench/streaming_cost.json``."""
    return bench.results / "bench" / f"{name.replace('-', '_')}.json"


def _runs_variants(kind: str) -> bool:
    """Whether a stage of this kind ("sweep-main", "computation-aware", "compare", ...) runs SimulEval."""
    return kind.startswith("sweep-") or kind == "computation-aware"


def _evaluated_variants(kind: str) -> list[str]:
    """The variants an evaluation stage runs ("sweep-main" -> main; "computation-aware" -> the CA variants)."""
    return [kind.removeprefix("sweep-")] if kind.startswith("sweep-") else list(CA_VARIANTS)


def _runs_without_logs(bench: Bench, name: str) -> int:
    """How many finished runs of evaluation stage ``name`` have no ``instances.log`` here (0 for other stages)."""
    task, _, kind = name.partition("-")
    if not _runs_variants(kind):
        return 0
    return sum(len(missing_logs(bench.runs / task / f"eval-{v}")) for v in _evaluated_variants(kind))


def forget(bench: Bench, name: str, dry_run: bool = False) -> list[Path]:
    """Make a finished evaluation stage (a sweep, a comparison, the computation-aware runs, a cost benchmark) to
    do again: its done marker, record and clock, and what it wrote, here and under ``results/``. The other stages'
    outputs stay. Returns what was removed (``dry_run``: what would be, removing nothing). Training, corpora and
    assets are not forgotten this way (a trained model is hours of work): delete their folders by hand if that is
    what you mean."""
    task, _, kind = name.partition("-")
    if name in COST_STAGES:
        outputs = [_cost_record(bench, name)]
    elif _runs_variants(kind):
        variants = _evaluated_variants(kind)
        outputs = [p for v in variants for p in (bench.runs / task / f"eval-{v}", bench.archive_dir(task, v))]
    elif kind in ("compare", "compare-main"):
        outputs = [bench.results / task / "compare.json"]
    else:
        raise ValueError(f"--redo {name}: only evaluation stages (sweeps, compares, computation-aware, costs) are "
                         "redone this way; a model, corpus or asset stage keeps what it made")  # fmt: skip
    records = [bench.done_dir / f"{name}.json", bench.records / f"{name}.json", bench.clock(name)]
    removed = [path for path in (*records, *outputs) if path.exists()]
    if dry_run:
        return removed
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if _runs_variants(kind):  # or ``seed_tables`` would bring their rows back
        _drop_table_rows(bench.results / task / "runs.csv", set(_evaluated_variants(kind)))
    return removed


def redo_problem(bench: Bench, name: str, known: set[str]) -> str | None:
    """Why ``--redo name`` cannot be done (not a stage of the plan, not an evaluation stage, running in another
    bench process now), or None."""
    if name not in known:
        return f"--redo {name}: no such stage; see --list"
    try:
        forget(bench, name, dry_run=True)
    except ValueError as e:
        return str(e)
    holder = running(bench, name)
    if holder is not None:  # forgetting it would delete the runs that process is writing, and it then marks it done
        return (f"--redo {name}: running in another bench process (pid {holder}); let it finish (or stop it), "
                "then redo it")
    return None


def _drop_table_rows(table: Path, variants: set[str]) -> None:
    """Rewrite ``results/<task>/runs.csv`` without the rows of ``variants``."""
    import csv

    from simul_agents.sweep import csv_text

    if not table.is_file():
        return
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if r["variant"] not in variants]
    _write_whole(table, csv_text(fields or [], rows))  # whole: a fresh machine's bench starts from runs.csv


def _outputs_back(bench: Bench, name: str) -> bool:
    """Whether what stage ``name`` made is here again (copying a trained model back from ``results/``)."""
    if name in COST_STAGES:
        return _cost_record(bench, name).is_file()
    task, _, kind = name.partition("-")
    if kind.startswith("train-"):
        variant = kind.removeprefix("train-")
        source, final = bench.model_dir(task, variant), bench.runs / task / variant / "final"
        if not (source / "checkpoint.json").is_file():
            return False
        if not (final / "checkpoint.json").is_file():
            _copy_whole(source, final)
        return True
    if _runs_variants(kind):
        return all(
            (bench.archive_dir(task, v) / "sweep.csv").is_file() and not missing_logs(bench.runs / task / f"eval-{v}")
            for v in _evaluated_variants(kind)
        )
    if kind in ("compare", "compare-main"):
        return (bench.results / task / "compare.json").is_file()
    return False


def seed_tables(bench: Bench, task: str) -> None:
    """The runs of ``results/<task>/runs.csv`` with no ``instances.log`` here (measured before runs were archived)
    keep their rows in ``eval-<variant>/earlier.csv``, so the summary keeps their numbers until the sweep has run
    them again (it does: their logs are missing) and a comparison refuses them meanwhile (``missing_logs``)."""
    import csv

    from simul_agents.sweep import run_output, write_csv

    table = bench.results / task / "runs.csv"
    if not table.is_file():
        return
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        eval_dir = bench.runs / task / f"eval-{variant}"
        if (eval_dir / EARLIER).is_file():
            continue
        mine = [{k: v for k, v in r.items() if k != "variant"} for r in rows if r["variant"] == variant]
        for r in mine:
            r["output"] = str(run_output(eval_dir, r["head"], r["param"]))
        mine = [r for r in mine if not (Path(r["output"]) / "instances.log").is_file()]
        if mine:
            eval_dir.mkdir(parents=True, exist_ok=True)
            write_csv(mine, eval_dir / EARLIER)
            log.info("%s: %d run(s) of %s restored from %s without their logs", task, len(mine), variant, table)


def planned_runs(task: str, variant: str) -> int:
    """How many runs the bench sweeps on ``variant`` (a computation-aware variant: ``CA_HEADS``)."""
    if variant in CA_VARIANTS:
        heads = CA_HEADS
    elif task in TASKS and (variant in VARIANTS or variant in PROBES or variant in TASKS[task].decodings):
        heads = TASKS[task].heads(variant)
    else:
        return 0
    from simul_agents.sweep import setting_blocks

    return sum(math.prod(len(v) for v in block.values() if isinstance(v, list))
               for params in heads.values() for block in setting_blocks(params))  # fmt: skip


def unmark(bench: Bench, names: list[str], why: str) -> None:
    """Remove these finished stages' done markers, so that the plan runs them again, and say why. A stage that
    finished on another machine (its marker restored, no clock here) goes on from its recorded time, as it would
    have there."""
    for name in names:
        marker = bench.done_dir / f"{name}.json"
        if not bench.clock(name).is_file():
            _carry_clock(marker, bench.clock(name))
        marker.unlink()
        print(f"== {name}: {why}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simul_agents.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["text", "speech"])
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run just these stages (then the summary)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel SimulEval processes per sweep")
    parser.add_argument(
        "--batch",
        type=int,
        default=Bench.batch,
        help="instances at a time per process (simul_agents.batch_eval); 1: SimulEval itself",
    )
    parser.add_argument(
        "--redo", nargs="+", metavar="STAGE", default=[],
        help="forget these finished evaluation stages (their runs and records) and run them again",
    )  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the stages: done, running (pid) or to run")
    parser.add_argument("--summary-only", action="store_true", help="rewrite results/SUMMARY.md and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    bench = Bench(jobs=args.jobs, batch=max(1, args.batch))
    plan = stages(bench, args.tasks)
    known = {name for name, _ in plan}
    unknown = sorted(set(args.only or []) - known)
    if unknown:  # before --redo removes anything: a misspelled --only must not cost a finished sweep
        print(f"error: unknown stage(s) {unknown}; see --list", file=sys.stderr)
        return 2
    problems = [problem for name in args.redo if (problem := redo_problem(bench, name, known))]
    if problems:  # every --redo checked before any is forgotten: one bad name leaves all of them as they were
        print("\n".join(f"error: {problem}" for problem in problems), file=sys.stderr)
        return 2
    for name in args.redo:
        removed = forget(bench, name)
        print(f"== {name}: forgotten ({len(removed)} path(s) removed); it runs again", flush=True)
    with _stage_lock(bench, STARTUP):  # two bench processes started together tidy the done markers one at a time
        # every task the summary shows: another task's runs (--tasks text) are back too, or a fresh machine's
        # summary would replace that task's results with "No sweep has finished yet"
        restore(bench, summary_tasks(bench, args.tasks), [name for name, _ in plan])
        unmark(bench, outgrown_sweeps(bench, args.tasks), "the plan has more runs than it ran; it runs again when "
               "the plan reaches it (only the new runs)")  # fmt: skip
        unmark(bench, outgrown_compares(bench, args.tasks), "the plan compares other variants or runs than it did; "
               "it runs again when the plan reaches it (its compare.json stays until then)")  # fmt: skip
    if args.list:
        for name, _ in plan:
            holder = running(bench, name)
            state = "done" if (bench.done_dir / f"{name}.json").is_file() else "to run"
            print(f"{name:24s} {state if holder is None else f'running (pid {holder})'}")
        return 0
    print(
        "make bench: the full offline experiment (text and speech En-De; MSLM+SPSD and two ablations; every head).\n"
        "On 2 CPU cores this takes many hours; it resumes where it stopped (stage by stage, and inside training).\n"
        "A later stage can run beside it in a second process, which waits for any stage this one is running:\n"
        "  OMP_NUM_THREADS=1 python -m simul_agents.bench --only STAGE   (stages and their state: --list)\n"
        f"Stages: {', '.join(name for name, _ in plan)}",
        flush=True,
    )
    if not args.summary_only:
        try:
            for name, fn in plan:
                if args.only and name not in args.only:
                    continue
                run_stage(bench, name, fn)
        except StageFailed as e:
            print(f"error: {e}", file=sys.stderr)
            write_summary(bench, summary_tasks(bench, args.tasks))
            return 1
    path = write_summary(bench, summary_tasks(bench, args.tasks))
    print(f"\nwrote {path}")
    return 0


# ---- the summary -------------------------------------------------------------------------------------------


def collect_rows(bench: Bench, task: str) -> list[dict]:
    """Every scored run of every variant of a task: the sweeps' CSVs, then any run of ``earlier.csv`` (measured
    before logs were kept, ``seed_tables``) that the sweep has not scored again yet, marked ``earlier``."""
    import csv

    rows = []
    for variant in (*VARIANTS, *PROBES, *DECODINGS, *CA_VARIANTS):  # every variant a sweep stage runs
        eval_dir = bench.runs / task / f"eval-{variant}"
        merged: dict[tuple, dict] = {}  # (head, param) -> row; a rerun takes its earlier row's place
        for name in (EARLIER, "sweep.csv"):
            if (eval_dir / name).is_file():
                with open(eval_dir / name, newline="", encoding="utf-8") as f:
                    for row in csv.DictReader(f):
                        merged[row["head"], row["param"]] = {"variant": variant, **{k: _number(v) for k, v in
                                                             row.items()}, "earlier": name == EARLIER}  # fmt: skip
        rows += sorted(merged.values(), key=_run_order)
    return rows


def _run_order(row: dict) -> tuple:
    """Heads in the order they run (``ALL_HEADS``), each one's runs by their first parameter's value, runs
    between lag bounds after the head's own."""
    from simul_agents.sweep import curve_name

    heads = list(ALL_HEADS)
    first, _, rest = str(row["param"]).partition(",")
    try:
        number = float(first.partition("=")[2])
    except ValueError:
        number = 0.0
    bounded = curve_name(row["head"], row["param"]) != row["head"]
    return (heads.index(row["head"]) if row["head"] in heads else len(heads), bounded, rest, number)


def _number(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None if value == "" else value


def write_task_results(bench: Bench, task: str) -> list[dict]:
    from simul_agents.sweep import COLUMNS, csv_text, fill_len_ratio, plot

    for eval_dir in sorted((bench.runs / task).glob("eval-*")):  # finished runs, even of an unfinished sweep
        fill_len_ratio(eval_dir)  # runs scored before the column existed
        pack(eval_dir, bench.archive_dir(task, eval_dir.name.removeprefix("eval-")))
    rows = collect_rows(bench, task)
    if not rows:
        return rows
    out = bench.results / task
    out.mkdir(parents=True, exist_ok=True)
    _write_whole(out / "runs.csv", csv_text(["variant", *COLUMNS], rows))
    unit = "words" if task == "text" else "ms"
    plot(main_curves(rows), out / "curve.png", f"offline {task}-to-text En-De (LAAL in {unit})")
    for steps in other_budgets(rows):  # longer-trained models on their own axes: they would squash main's curves
        budget_rows = [{**r, "head": f"{r['variant']}: {r['head']}"} for r in rows
                       if _steps(r["variant"]) == steps and r["head"] in BUDGET_HEADS]  # fmt: skip
        plot(budget_rows, out / f"curve-{steps}-steps.png",
             f"offline {task}-to-text En-De, models trained {steps:,} steps (LAAL in {unit})")
    for variant in decodings_swept(rows):  # a model decoded two ways, the heads the decoding ran
        model, base = decoded_model(variant), compared_with(variant)
        heads = {r["head"] for r in rows if r["variant"] == variant} & set(DECODING_HEADS)
        # the model's offline: the line; a head's runs between lag bounds: their own curve ("entropy, lag-bounded")
        decoded = [{**r, "head": f"{r['variant']}: {r['head']}"} for r in rows
                   if r["variant"] in (base, variant) and r["head"] in heads and r["head"] != "offline"]
        decoded += [r for r in rows if r["variant"] == model and r["head"] == "offline"]
        plot(decoded, out / f"curve-{variant}.png", f"offline {task}-to-text En-De, {model}'s model decoded two "
             f"ways (LAAL in {unit})")  # fmt: skip
    return rows


def main_curves(rows: list[dict]) -> list[dict]:
    """The rows ``curve.png`` draws: main's runs, and the ablations of main's budget as their own curves ("entropy
    (no-spsd)"); not seed replicas, nor a model trained longer or whose LLM started from a longer-trained text
    model (from-x4: its own plot, beside its re-read decode)."""
    out = [r for r in rows if r["variant"] == "main"]
    for r in rows:
        variant = r["variant"]
        if variant in VARIANTS and variant != "main" and r["head"] in ("entropy", "offline") \
                and not _steps(INIT_VARIANT.get(variant, variant)) and not _seed(variant):  # fmt: skip
            out.append({**r, "head": f"{r['head']} ({variant})"})
    return out


BUDGET_HEADS = ("offline", "entropy", "wait-k", "probe")  # a longer-trained pair's plot: what its sweep ran
DECODING_HEADS = ("offline", "entropy", "wait-k", "fixed-chunk", "probe", "oracle")  # a decoding's plot


def _steps(variant: str) -> int | None:
    """A variant's own training length (``max_steps``), where it trains longer than its task's plan."""
    return VARIANTS.get(variant, {}).get("max_steps")


def _seed(variant: str) -> int:
    """A variant's training seed where it is a seed replica of another recipe (``main-seed1``), else 0."""
    return VARIANTS.get(variant, {}).get("seed", 0)


def other_budgets(rows: list[dict]) -> list[int]:
    """The training lengths of the swept variants trained longer than the task's plan."""
    return sorted({steps for r in rows if (steps := _steps(r["variant"]))})


def decodings_swept(rows: list[dict]) -> list[str]:
    """The ``DECODINGS`` that have runs among ``rows``."""
    return [v for v in DECODINGS if any(r["variant"] == v for r in rows)]


def summary_tasks(bench: Bench, tasks: list[str]) -> list[str]:
    """The tasks the summary shows: those run now and every other with results (``--tasks text`` keeps speech's)."""
    return [t for t in TASKS if t in tasks or (bench.results / t / "runs.csv").is_file()]


def write_summary(bench: Bench, tasks: list[str]) -> Path:
    from simul_agents.sweep import cell

    done = {}  # the committed records (this machine's or an earlier one's), then this machine's markers
    for folder in (bench.records, bench.done_dir):
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            done[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    lines = [
        "# `make bench` results",
        "",
        "Written by `python -m simul_agents.bench` (`make bench`); every number below comes from files under",
        "`results/` and `runs/bench/`, none is typed by hand.",
        "",
        f"- commit: `{commit.stdout.strip() or 'unknown'}`; written {time.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- hardware (this summary): {machine()}, torch {_torch_version()}",
        "",
        "## Stages",
        "",
        "Minutes: the stage's wall-clock time over all its attempts (a CPU run is stopped and resumed; other work",
        "may have shared the machine). `train_minutes`: what its training takes undisturbed (median step x steps,",
        "plus the adapter's alignment). A run spread over sessions may change machines: each stage names its own.",
        "",
        "| stage | minutes | finished | machine | notes |",
        "|---|---|---|---|---|",
    ]
    for name, record in sorted(done.items(), key=lambda item: item[1].get("finished", "")):  # in the order run
        skip = ("stage", "seconds", "finished", "output", "checkpoint", "machine", "results_model")
        notes = {k: v for k, v in record.items() if k not in skip}
        lines.append(f"| {name} | {record['seconds'] / 60:.1f} | {record['finished']} | {record.get('machine', '?')} "
                     f"| {_compact(notes)} |")  # fmt: skip
    for task in tasks:
        rows = write_task_results(bench, task)
        lines += ["", f"## {task}-to-text En-De", ""]
        if not rows:
            lines.append("No sweep has finished yet.")
            continue
        unit = rows[0].get("latency_unit") or ""
        lines += [f"![quality-latency]({task}/curve.png)", ""]
        for steps in other_budgets(rows):
            lines += [f"The models trained {steps:,} steps, on their own axes:", "",
                      f"![quality-latency, {steps:,} steps]({task}/curve-{steps}-steps.png)", ""]  # fmt: skip
        for variant in decodings_swept(rows):
            base = compared_with(variant)
            beside = "its own decode" if base == decoded_model(variant) else f"`{base}`"
            lines += [f"{decoded_model(variant)}'s model decoded as `{variant}` ({VARIANT_LABELS[variant]}) beside "
                      f"{beside}:", "",
                      f"![quality-latency, {variant}]({task}/curve-{variant}.png)", ""]  # fmt: skip
        lines += [
            f"Latency in {unit}. n = {int(rows[0]['n_instances'] or 0)} test instances, mean source length "
            f"{rows[0]['mean_source_length']:.1f} {unit}. Every run: `{task}/runs.csv`. length: the output's length "
            "over the references' (BLEU's tokens); above 1 it runs long, which chrF hardly punishes.",
            "",
        ]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            stage = f"{task}-computation-aware" if variant in CA_VARIANTS else f"{task}-sweep-{variant}"
            n_runs, planned = sum(1 for r in rows if r["variant"] == variant), planned_runs(task, variant)
            if n_runs < planned:
                lines += [f"**Partial:** `{stage}` has not finished; the {n_runs} of {planned} run(s) of `{variant}` "
                          "below are the ones finished so far.", ""]  # fmt: skip
            earlier = sum(1 for r in rows if r["variant"] == variant and r.get("earlier"))
            if earlier:
                lines += [f"**Being rerun:** {earlier} run(s) of `{variant}` (marked †) are an earlier measurement "
                          f"whose logs were not kept; `{stage}` is running them again.", ""]  # fmt: skip
        variants = dict.fromkeys(r["variant"] for r in rows)
        lines += ["Variants: " + "; ".join(f"`{v}` {VARIANT_LABELS[v]}" for v in variants if v in VARIANT_LABELS)
                  + ".", ""]  # fmt: skip
        lines += dev_curve_table(bench, task)
        lines += [
            "| variant | head | param | BLEU | chrF | length | AL | LAAL | LAAL_CA | RCO |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            param = r["param"] + (" †" if r.get("earlier") else "")
            cells = [r["variant"], r["head"], param] + [cell(r.get(c)) for c in ("BLEU", "chrF", "len_ratio", "AL",
                                                                                 "LAAL", "LAAL_CA", "RCO")]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines += ca_table(rows)
        compare = bench.results / task / "compare.json"
        if compare.is_file():
            from simul_agents.compare import format_comparison

            lines += ["", *format_comparison(json.loads(compare.read_text(encoding="utf-8")))]
    for name in ("streaming_cost", "training_cost"):
        path = bench.results / "bench" / f"{name}.json"
        if path.is_file():
            lines += ["", f"## {name.replace('_', '-')} benchmark", "", "```", path.read_text(encoding="utf-8").strip(),
                      "```"]  # fmt: skip
    path = bench.results / "SUMMARY.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_whole(path, "\n".join(lines) + "\n")
    if bench.readme is not None and bench.readme.is_file():
        embed_in_readme(bench.readme, lines[2:], bench.results)
    return path


def ca_table(rows: list[dict]) -> list[str]:
    """The computation-aware runs (SimulEval one instance at a time) as LAAL_CA over LAAL, per LLM precision."""
    from simul_agents.sweep import cell

    ca = [r for r in rows if r["variant"] in CA_VARIANTS and r.get("LAAL_CA") is not None and r.get("LAAL")]
    if not ca:
        return []
    lines = [
        "",
        f"Computation-aware latency of one stream: SimulEval one instance at a time on this machine, "
        f"n = {int(ca[0]['n_instances'] or 0)}; the LLM in float32 (`main-ca`), float16 (`-fp16`), int8 (`-int8`) or "
        "4 bits (`-int4`, GPTQ; `-int4-compiled`: its steps compiled by `torch.compile`, `--compile`). "
        "The target is LAAL_CA at most 1.25x LAAL.",
        "",
        "| variant | head | param | LAAL | LAAL_CA | CA / plain | BLEU | chrF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ca:
        ratio = r["LAAL_CA"] / r["LAAL"]
        cells = [r["variant"], r["head"], r["param"], cell(r["LAAL"]), cell(r["LAAL_CA"]), f"{ratio:.2f}",
                 cell(r.get("BLEU")), cell(r.get("chrF"))]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def embed_in_readme(readme: Path, lines: list[str], results: Path) -> None:
    """Put the summary (minus its title) between the README's bench markers; image links made relative to it."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        log.warning("%s has no %s ... %s markers; the summary is only in results/", readme, README_START, README_END)
        return
    prefix = Path(os.path.relpath(results, readme.parent)).as_posix()
    body = [line.replace("](text/", f"]({prefix}/text/").replace("](speech/", f"]({prefix}/speech/") for line in lines]
    body = [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in body]
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    _write_whole(readme, head + README_START + "\n" + "\n".join(body) + "\n" + README_END + tail)


NOTE_FIRST = ("attempts", "train_minutes", "steps", "s_per_step", "dev_full", "dev_source_gain", "dev_bleu", "dev_chrf")
NOTE_CHARS = 240  # a stage's notes in the summary table; every value is in runs/bench/done/<stage>.json


def _compact(info: dict) -> str:
    """The notes of a stage, the ones a reader compares first, cut at a whole item."""
    keys = [k for k in NOTE_FIRST if k in info] + [k for k in info if k not in NOTE_FIRST]
    items = [f"{k}={info[k]}" for k in keys if not isinstance(info[k], (dict, list))]
    out = ""
    for item in items:
        if len(out) + len(item) > NOTE_CHARS:
            return out + ", …"
        out = f"{out}, {item}" if out else item
    return out


def machine() -> str:
    """This machine in a few words: its CPU model, cores and the kernels torch uses ("Intel(R) Xeon(R) Processor,
    2 CPUs, AVX512 + AMX"); a stage records it, since a run spread over sessions may change machines."""
    import torch

    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                     model)  # fmt: skip
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    else:
        flags = []
    kernels = torch.backends.cpu.get_cpu_capability() + (" + AMX" if "amx_bf16" in flags else "")
    return f"{model}, {os.cpu_count()} CPUs, {kernels}"


def _torch_version() -> str:
    import torch

    return torch.__version__


def run_from_root(argv: list[str] | None = None) -> int:
    """``python -m simul_agents.bench`` from any folder: the bench's data/, runs/bench/ and results/ are the
    repository's (run elsewhere, it would start the whole experiment again there and embed that in the README)."""
    if Path.cwd().resolve() != ROOT:
        print(f"== running in {ROOT} (the bench's data/, runs/bench/ and results/ live there)", flush=True)
        os.chdir(ROOT)
    return main(argv)


if __name__ == "__main__":
    sys.exit(run_from_root())
