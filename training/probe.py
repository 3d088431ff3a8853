"""Train a checkpoint's probe head again, on the finished model's own states.

    python -m training.probe CHECKPOINT --out DIR [--rows word_start] [--examples N] [--manifest TRAIN.tsv]

The probe learns from detached states (training/losses.py), so it can be trained after the model as well as
beside it: here it learns from the final model's states, not from states that moved while the model trained,
and from the rows of one's choosing (``--rows word_start``: only where the heads ask it, a word's first token).
The states and labels of ``--examples`` training examples (by default as many as the model's training saw:
batch_size x max_steps), each under one monotonic random prefix drawn as in training, are computed once (the long
part: one forward pass of both views per batch, kept in ``DIR/states-*.pt``, so a killed run goes on where it
stopped; ``--states`` shares them between runs); the MLP trains on them in seconds. The dev manifest's examples
measure the old and the new probe where the heads ask them and on every token (``DIR/report.json``).

``DIR/final`` is then the input checkpoint with the new probe, for ``--checkpoint`` and sweeps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from streaming_llm.checkpoint import WEIGHTS, CheckpointError, load_checkpoint, read_meta
from streaming_llm.config import SpeechLLMConfig
from streaming_llm.model import SpeechLLM, probe_mlp

from .data import Example, SourceUnits, hash_weights, load_examples, session_limits
from .losses import PROBE_LABELS, PROBE_ROWS, probe_labels, probe_rows, spsd_kl, view_outputs
from .phi import sample_token_phi

log = logging.getLogger("training")
FEATURES_VERSION = 1
SAVE_EVERY = 25  # batches between two saves of the states collected so far
DEFAULT_PROBE_HIDDEN = 256  # the probe's width for a model that has none (SpeechLLMConfig's default)
DEFAULT_EXAMPLES = 8000  # --examples for a checkpoint that does not say how long it trained


@dataclass(frozen=True)
class ProbeConfig:
    rows: str = "word_start"  # the rows the probe learns from: "all" target tokens or a word's first ("word_start")
    label: str = ""  # "top1" argmax agreement, "kl" KL(full || stream) < kl_bound; "": the model's probe_label
    kl_bound: float = 0.0  # 0: the model's probe_kl_bound
    examples: int = 0  # training examples whose states the probe learns from; 0: as many as the model's training
    # saw (batch_size x grad_accum x max_steps: text main 16 x 1 x 500 = 8,000)
    dev_examples: int = 500
    batch_size: int = 16  # examples per forward pass while collecting
    epochs: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    rows_per_step: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rows not in PROBE_ROWS:
            raise ValueError(f"--rows {self.rows}: expected one of {', '.join(PROBE_ROWS)}")
        if self.label and self.label not in PROBE_LABELS:
            raise ValueError(f"--label {self.label}: expected one of {', '.join(PROBE_LABELS)}")
        small = [f"{k}={getattr(self, k)}" for k in ("batch_size", "epochs", "rows_per_step") if getattr(self, k) < 1]
        negative = [f"{k}={getattr(self, k)}" for k in ("examples", "dev_examples") if getattr(self, k) < 0]
        if small or negative:
            raise ValueError(f"{', '.join(small + negative)}: batch_size, epochs and rows_per_step must be at least "
                             "1, examples and dev_examples at least 0")  # fmt: skip
        if not (math.isfinite(self.lr) and self.lr > 0 and math.isfinite(self.kl_bound) and self.kl_bound >= 0):
            raise ValueError(f"lr={self.lr}, kl_bound={self.kl_bound}: lr must be a number above 0, kl_bound at "
                             "least 0 (0: the model's)")  # fmt: skip


@dataclass
class States:
    """What the probe learns from, one row per target token: the stream view's state and what the label needs."""

    hidden: torch.Tensor  # (N, d) the stream view's state at the row predicting the token
    agree: torch.Tensor  # (N,) bool: the stream view's argmax equals the full view's
    kl: torch.Tensor  # (N,) KL(full || stream) over the full view's top 100
    word_start: torch.Tensor  # (N,) bool: a row the heads ask (training.losses.probe_rows "word_start")

    def labels(self, config: ProbeConfig) -> torch.Tensor:
        return probe_labels(self.agree, self.kl, config.label, config.kl_bound)

    def rows(self, which: str) -> torch.Tensor:
        return self.word_start if which == "word_start" else torch.ones_like(self.word_start)

    @staticmethod
    def cat(parts: list[States]) -> States:
        return States(*(torch.cat([getattr(p, f) for p in parts]) for f in ("hidden", "agree", "kl", "word_start")))


# ---- the states -----------------------------------------------------------------------------------


def collect(
    model: SpeechLLM, examples: list[Example], units: SourceUnits, seed: int, batch_size: int, store: Path, what: str,
    skew: float = 0.0, kl: tuple[int, float] = (100, 1.0),
) -> States:  # fmt: skip
    """The states of ``examples`` (each under one random prefix from ``seed``, drawn with the phi ``skew`` the model
    trained with; ``kl``: SPSD's top-k and temperature, for the KL label), in batches of similar length, kept in
    ``store`` every ``SAVE_EVERY`` batches: a store left by a killed run of the same model, examples and settings is
    continued, one of anything else is refused."""
    key = _key(model, examples, f"{seed}|{batch_size}|{skew}|{kl}")
    order = sorted(range(len(examples)), key=lambda i: (examples[i].length, i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    parts: list[States] = []
    if store.exists():
        saved = torch.load(store, weights_only=False)
        if saved.get("key") != key:
            raise ValueError(f"{store}: states of another model, manifest or settings; remove it or pick another --out")
        parts = [States(**p) for p in saved["parts"]]
        if parts:
            log.info("%s: %d of %d batches already collected in %s", what, len(parts), len(batches), store)
    with torch.inference_mode():
        done = len(parts)
        for n, batch in enumerate(tqdm(batches[done:], desc=f"{what} states", initial=done, total=len(batches),
                                       disable=None), done):  # fmt: skip
            chosen = [examples[i] for i in batch]
            source = [units(ex) for ex in chosen]
            targets = [model.target_ids(ex.target) for ex in chosen]
            phis = [
                sample_token_phi(len(u), t, model.word_start, torch.Generator().manual_seed(_seed(seed, i)), skew)
                for u, t, i in zip(source, targets, batch, strict=True)
            ]
            views = view_outputs(model, source, targets, phis, ["stream", "full"])
            (h, stream), (_, full) = views["stream"], views["full"]
            labels = torch.tensor([y for ys in targets for y in ys], device=h.device)
            parts.append(States(
                hidden=h.float().cpu(),
                agree=(stream.argmax(-1) == full.argmax(-1)).cpu(),
                kl=spsd_kl(full, stream, *kl).cpu(),
                word_start=probe_rows(model, targets, labels, "word_start").cpu(),
            ))  # fmt: skip
            if (n + 1) % SAVE_EVERY == 0 or n + 1 == len(batches):
                _save(store, key, parts)
    return States.cat(parts)


def _seed(seed: int, index: int) -> int:
    return int(hashlib.sha1(f"probe:{seed}:{index}".encode()).hexdigest()[:15], 16)


def _key(model: SpeechLLM, examples: list[Example], settings: str) -> str:
    h = hashlib.sha1(f"{FEATURES_VERSION}|{settings}|{model.config.to_json()}".encode())
    hash_weights(h, model.state_dict(), skip="probe.")
    for ex in examples:
        h.update(f"{ex.id}\t{ex.source}\t{ex.target}\n".encode())
    return h.hexdigest()


def _save(store: Path, key: str, parts: list[States]) -> None:
    tmp = store.with_name(f".{store.name}.tmp")
    torch.save({"key": key, "parts": [asdict(p) for p in parts]}, tmp)
    tmp.replace(store)


# ---- the probe ------------------------------------------------------------------------------------


def train_probe(states: States, config: ProbeConfig, hidden_size: int) -> nn.Sequential:
    """A fresh probe MLP (the model's shape) fit to the chosen rows' labels by binary cross-entropy."""
    torch.manual_seed(config.seed)
    probe = probe_mlp(states.hidden.shape[1], hidden_size)
    x, y = states.hidden[states.rows(config.rows)], states.labels(config)[states.rows(config.rows)]
    if len(y) == 0:
        raise ValueError("no rows to learn from: the examples hold no target words")
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(y) / config.rows_per_step)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=config.lr * 0.1)
    generator = torch.Generator().manual_seed(config.seed)
    for _ in tqdm(range(config.epochs), desc="probe epochs", disable=None):
        for idx in torch.randperm(len(y), generator=generator).split(config.rows_per_step):
            loss = F.binary_cross_entropy_with_logits(probe(x[idx]).squeeze(-1), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return probe.eval()


def measure(probe: nn.Module, states: States, config: ProbeConfig) -> dict:
    """How well ``probe`` predicts the labels where the heads ask (word_start) and on every token."""
    with torch.no_grad():
        logit = probe(states.hidden).squeeze(-1).float()
    labels = states.labels(config)
    out = {}
    for which in ("word_start", "all"):
        rows = states.rows(which)
        x, y = logit[rows], labels[rows]
        out[which] = {
            "rows": int(rows.sum()),
            "positive": round(float(y.mean()), 4),
            "accuracy": round(float(((x > 0).float() == y).float().mean()), 4),
            "bce": round(float(F.binary_cross_entropy_with_logits(x, y)), 4),
            "auc": round(auc(x, y), 4),
        }
    return out


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: P(a positive row scores above a negative one), ties counted half."""
    pos, neg = int(labels.sum()), int((1 - labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)  # sorted values
    upper = counts.cumsum(0).double()
    ranks = (upper - (counts.double() - 1) / 2)[inverse]  # 1-based ranks, a tie's the mean of its places
    return float((ranks[labels > 0.5].sum() - pos * (pos + 1) / 2) / (pos * neg))


def write_checkpoint(source: Path, out: Path, probe: nn.Module, record: dict, config: SpeechLLMConfig) -> Path:
    """``source`` with ``probe``'s weights in place of its own (or added) and ``config`` -> the new folder (its
    other files copied)."""
    state = load_file(str(source / WEIGHTS))
    for k, v in probe.state_dict().items():
        old = state.get(f"probe.{k}")
        state[f"probe.{k}"] = v.detach().to(old.dtype if old is not None else v.dtype).contiguous()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    save_file(state, str(tmp / WEIGHTS))
    (tmp / "config.json").write_text(config.to_json(), encoding="utf-8")
    meta = json.loads((tmp / "checkpoint.json").read_text(encoding="utf-8"))
    meta.setdefault("extra", {})["probe_retrained"] = record
    (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


# ---- the command ----------------------------------------------------------------------------------


def run(checkpoint: Path, out: Path, config: ProbeConfig, manifest: str = "", dev_manifest: str = "",
        states: Path | None = None, skip_bad: bool = False) -> dict:  # fmt: skip
    """Train the probe of ``checkpoint`` again into ``out/final`` -> the report. ``states``: where the states are
    kept (default ``out``; two probes of one model, from other rows, say, can share them). ``skip_bad``: skip a bad
    manifest row, counted (also when the model's training did)."""
    meta = read_meta(checkpoint)
    trained = (meta.get("extra") or {}).get("train_config") or {}
    manifest = manifest or trained.get("train_manifest", "")
    dev_manifest = dev_manifest if dev_manifest or config.dev_examples == 0 else trained.get("dev_manifest", "")
    if not manifest:
        raise ValueError(f"{checkpoint}: it does not name its training manifest; give --manifest TRAIN.tsv")
    config = replace(config, label=config.label or str(trained.get("probe_label", "top1")),
                     kl_bound=config.kl_bound or float(trained.get("probe_kl_bound", 0.1)))  # the model's label rule
    skip_bad = skip_bad or bool(trained.get("skip_bad", False))  # its manifest may hold rows its training skipped
    model = load_checkpoint(checkpoint, merge_lora=True)
    old_probe = model.probe  # None: trained without one (probe=false, or probe_hidden=0): it gets one here
    hidden_size = model.config.probe_hidden or DEFAULT_PROBE_HIDDEN
    modality = model.config.modality
    max_seconds, fits = session_limits(model, float(trained.get("max_source_seconds", 30.0)))  # as the trainer
    max_words = int(trained.get("max_source_words", 200))

    def examples(path: str, n: int) -> list[Example]:
        rows = load_examples(path, modality, max_seconds, max_words, skip_bad, text_capacity=fits)
        return random.Random(config.seed).sample(rows, min(n, len(rows)))

    seen = int(trained.get("batch_size", 0)) * int(trained.get("grad_accum", 1)) * int(trained.get("max_steps", 0))
    n_train = config.examples or seen or DEFAULT_EXAMPLES
    train_examples = examples(manifest, n_train)  # a bad manifest stops it here, before any folder is made
    dev_examples = examples(dev_manifest, config.dev_examples) if dev_manifest else []
    states = states or out
    out.mkdir(parents=True, exist_ok=True)
    states.mkdir(parents=True, exist_ok=True)
    cache = Path(trained.get("encoder_cache") or Path(trained.get("out_dir", out)) / "encoder_cache")
    units = SourceUnits(model, cache if cache.is_dir() else out / "encoder_cache", encoder_trained=False)
    # the prefixes and the KL label as the model's training drew them (training/config.py's defaults otherwise)
    drawn = {"skew": float(trained.get("phi_skew", 0.0)),
             "kl": (int(trained.get("spsd_topk", 100)), float(trained.get("spsd_temperature", 1.0)))}  # fmt: skip
    train_states = collect(model, train_examples, units, config.seed, config.batch_size, states / "states-train.pt",
                           "train", **drawn)  # fmt: skip
    dev_states = (
        collect(model, dev_examples, units, config.seed + 1, config.batch_size, states / "states-dev.pt", "dev",
                **drawn)  # fmt: skip
        if dev_examples
        else None
    )
    probe = train_probe(train_states, config, hidden_size)
    report = {"checkpoint": str(checkpoint), "manifest": manifest, "dev_manifest": dev_manifest,
              "config": asdict(config), "train_rows": int(train_states.rows(config.rows).sum())}  # fmt: skip
    if dev_states is not None:
        report["dev"] = {"new": measure(probe, dev_states, config)}
        if old_probe is not None:
            report["dev"]["old"] = measure(old_probe, dev_states, config)
    model_config = replace(model.config, probe_hidden=hidden_size)
    final = write_checkpoint(checkpoint, out / "final", probe, report, model_config)
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    report["final"] = str(final)
    return report


def summary(report: dict) -> str:
    lines = [f"probe trained on {report['train_rows']} rows ({report['config']['rows']}); -> {report['final']}"]
    if "dev" in report:
        lines.append(f"{'dev':<24}{'rows':>7}{'positive':>10}{'accuracy':>10}{'BCE':>8}{'AUC':>8}")
        for probe, measured in sorted(report["dev"].items(), reverse=True):  # old, then new
            for which, m in measured.items():
                lines.append(f"{probe + ' probe, ' + which:<24}{m['rows']:>7}{m['positive']:>10.3f}"
                             f"{m['accuracy']:>10.3f}{m['bce']:>8.3f}{m['auc']:>8.3f}")  # fmt: skip
    return "\n".join(lines)


HELP = {
    "rows": "the rows it learns from: a word's first token (where the heads ask it) or every target token",
    "label": "top1: the stream view's argmax equals the full view's; kl: KL(full || stream) under --kl-bound; "
    "'': the model's training's probe_label",
    "kl_bound": "the KL under which a row counts as agreeing (--label kl); 0: the model's training's probe_kl_bound",
    "examples": "training examples whose states it learns from, one random prefix each; 0: as many as the "
    "model's training saw (batch_size x grad_accum x max_steps)",
    "dev_examples": "dev examples that measure the old and the new probe (0: none)",
    "batch_size": "examples per forward pass while collecting the states",
    "epochs": "passes of the MLP over the states",
    "lr": "AdamW's peak learning rate (cosine decay to a tenth)",
    "weight_decay": "AdamW's weight decay",
    "rows_per_step": "rows per MLP step",
    "seed": "the examples drawn, their prefixes and the MLP's initialisation",
}


def main(argv: list[str] | None = None) -> int:
    defaults = ProbeConfig()
    parser = argparse.ArgumentParser(prog="python -m training.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a trained checkpoint folder (runs/.../final)")
    parser.add_argument("--out", type=Path, required=True, help="the work folder; OUT/final gets the new checkpoint")
    parser.add_argument("--manifest", default="", help="training TSV (default: the one the checkpoint trained on)")
    parser.add_argument("--dev-manifest", default="", help="dev TSV (default: the checkpoint's dev manifest)")
    parser.add_argument("--states", type=Path, help="where the states are kept (default: OUT); probes of one "
                        "model trained from other rows can share them")  # fmt: skip
    parser.add_argument("--skip-bad", action="store_true", help="skip a bad manifest row, counted (as the model's "
                        "training did with skip_bad=true)")  # fmt: skip
    for name, value in asdict(defaults).items():
        choices = {"rows": PROBE_ROWS, "label": ("", *PROBE_LABELS)}.get(name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, choices=choices,
                            help=f"{HELP[name]} (default: {value})")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        config = ProbeConfig(**{k: getattr(args, k) for k in asdict(defaults)})
        report = run(args.checkpoint, args.out, config, args.manifest, args.dev_manifest, args.states, args.skip_bad)
    except (ValueError, CheckpointError, OSError) as e:
        tqdm.write(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
