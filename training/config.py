"""Training configuration: YAML files in ``training/configs/`` plus ``key=value`` overrides."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .losses import LossConfig

LLM_MODES = ("none", "lora", "full")
TASKS = ("translate", "transcribe")  # transcribe: the source transcript is the target (aligns a new adapter)
ENCODER_MODES = ("frozen", "lora", "full")


AT_LEAST_ONE = ("batch_size", "grad_accum", "max_steps", "save_every", "eval_every", "log_every", "max_target_tokens")
NOT_NEGATIVE = ("lr", "weight_decay", "warmup_steps", "w_full", "w_mslm", "spsd_lambda", "align_steps",
                "keep_last", "clip_norm", "dev_subset", "dev_bleu_subset")  # fmt: skip
# what --resume may change: when and what the run saves, logs and evaluates, its length, and settings that act only
# at step 0 (init_*, align_steps); any other change would make the resumed run another run than the one saved
RESUME_MAY_CHANGE = ("max_steps", "save_every", "eval_every", "log_every", "keep_last", "dev_manifest", "dev_subset",
                     "dev_bleu_subset", "max_target_tokens", "out_dir", "encoder_cache", "skip_bad", "init_llm",
                     "init_adapter", "align_steps")  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    # model: "tiny" builds random tiny modules; otherwise paths, or "asset:NAME" for `make assets` models
    modality: str = "speech"
    llm: str = "tiny"
    whisper: str = "tiny"
    block_ms: int = 640
    stack: int = 4
    adapter_hidden: int = 1024
    prompt: str = ""  # "" = the default for the modality and task
    target_prefix: str = ""  # "" = "\nGerman:" (translate) or "\nText:" (transcribe)
    probe_hidden: int = 256
    # what to train
    train_llm: str = "full"  # none | lora | full
    freeze_embeddings: bool = False  # keep the (often tied) embedding / output matrix frozen
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train_encoder: str = "frozen"  # frozen | lora | full
    init_llm: str = ""  # a checkpoint folder whose trained LLM weights start this run (speech from a text model)
    init_adapter: str = ""  # a checkpoint folder whose speech adapter starts this run (from a transcribe run)
    align_steps: int = 0  # speech: CTC steps aligning a fresh adapter to the LLM's embeddings (training/align.py)
    task: str = "translate"  # translate | transcribe (speech: the English transcript as the target)
    # data
    train_manifest: str = ""
    dev_manifest: str = ""
    max_source_seconds: float = 30.0
    max_source_words: int = 200
    skip_bad: bool = False
    encoder_cache: str = ""  # "" = <out_dir>/encoder_cache; "none" disables it
    # objective (see training/losses.py)
    w_full: float = 1.0
    w_mslm: float = 1.0
    spsd_lambda: float = 1.0
    spsd_topk: int = 100
    spsd_temperature: float = 1.0
    spsd_stop_grad: bool = True
    phi_skew: float = 0.0
    probe: bool = True
    probe_label: str = "top1"
    probe_kl_bound: float = 0.1  # in SPSD's KL units: over the teacher's top spsd_topk, tempered, times T^2
    probe_rows: str = "all"  # "word_start": the probe learns only where the heads ask it (losses.LossConfig)
    # optimisation
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 1000
    batch_size: int = 8  # examples per micro-batch, over all ranks
    grad_accum: int = 1
    clip_norm: float = 1.0
    bf16: bool = False
    seed: int = 0
    # bookkeeping
    out_dir: str = "runs/default"
    save_every: int = 200
    keep_last: int = 3
    eval_every: int = 200
    dev_subset: int = 64
    dev_bleu_subset: int = 32
    # dev decoding only: a dev hypothesis stops after this many tokens (as the agent's --max-target-tokens);
    # training targets are never cut
    max_target_tokens: int = 200
    log_every: int = 10  # a progress line every N steps, for log files (log.jsonl holds every step)

    def __post_init__(self) -> None:
        if self.train_llm not in LLM_MODES:
            raise ValueError(f"train_llm={self.train_llm!r}: expected one of {LLM_MODES}")
        if self.train_encoder not in ENCODER_MODES:
            raise ValueError(f"train_encoder={self.train_encoder!r}: expected one of {ENCODER_MODES}")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: expected one of {TASKS}")
        if self.task == "transcribe" and self.modality != "speech":
            raise ValueError("task=transcribe needs modality=speech (a text source is its own transcript)")
        infinite = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                    if f.type == "float" and not math.isfinite(getattr(self, f.name))]  # fmt: skip
        if infinite:
            raise ValueError(f"{', '.join(infinite)}: must be a finite number")
        if not self.out_dir.strip():
            raise ValueError("out_dir is empty: give out_dir=PATH, the folder for the run's checkpoints and logs")
        small = [f"{k}={getattr(self, k)}" for k in AT_LEAST_ONE if getattr(self, k) < 1]
        if small:
            raise ValueError(f"{', '.join(small)}: each of {', '.join(AT_LEAST_ONE)} must be at least 1")
        lora = [f"{k}=lora" for k in ("train_llm", "train_encoder") if getattr(self, k) == "lora"]
        if lora and self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r} with {' and '.join(lora)}: a LoRA of rank {self.lora_r} trains "
                             "nothing; give lora_r >= 1 (16 is the default)")  # fmt: skip
        negative = [f"{k}={getattr(self, k)}" for k in NOT_NEGATIVE if getattr(self, k) < 0]
        if negative:
            raise ValueError(f"{', '.join(negative)}: must not be negative")
        if self.probe and self.probe_hidden < 1:
            raise ValueError(f"probe=true with probe_hidden={self.probe_hidden}: a model without a probe MLP cannot "
                             "train one; give probe_hidden >= 1 (256 is the default) or probe=false")  # fmt: skip
        loss = self.loss  # validates the objective's fields
        if not (loss.needs_full or loss.needs_stream):
            raise ValueError(
                f"w_full={self.w_full}, w_mslm={self.w_mslm}, spsd_lambda={self.spsd_lambda} and probe=false: nothing "
                "to train; give one of the loss weights a value above 0, or probe=true"
            )

    @property
    def loss(self) -> LossConfig:
        names = {f.name for f in dataclasses.fields(LossConfig)}
        return LossConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resume_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings of ``cfg`` that differ from ``saved`` (the config a checkpoint was written under) and that
    --resume may not change -> ["batch_size 4 -> 2", ...]. Settings the saved config lacks (older runs) are not
    compared."""
    changes = []
    for key, new in cfg.to_dict().items():
        if key in RESUME_MAY_CHANGE or key not in saved:
            continue
        old = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
        if old != new:
            changes.append(f"{key} {old!r} -> {new!r}" if isinstance(new, (str, tuple)) else f"{key} {old} -> {new}")
    return changes


def parse_overrides(pairs: list[str]) -> dict:
    """["lr=1e-4", "bf16=true", "prompt=English:"] -> {"lr": "1e-4", "bf16": True, "prompt": "English:"}: YAML
    scalars (load_config makes them the settings' types), except that a text setting takes its value as written
    (YAML would read ``English:`` as a mapping, cut ``#1`` off as a comment and make ``0755`` the number 493); a
    quoted value is YAML's string (``prompt='"a\\nb"'``: a line break)."""
    text = {f.name for f in dataclasses.fields(TrainConfig) if f.type == "str"}
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        key = key.strip()
        if key in text and not value.startswith(("'", '"')) and value not in ("null", "Null", "NULL", "~"):
            out[key] = value  # null or ~ stays YAML's empty value: ``init_llm=null`` drops a setting
            continue
        try:
            out[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            out[key] = value  # not a YAML scalar ("a: b"): the text itself, checked against the type
    return out


def load_config(path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    data: dict = {}
    if path:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"{path}: no such config; the shipped ones are in training/configs/")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
    data.update(overrides or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown training settings {unknown}; see training/config.py for the list")
    if isinstance(data.get("lora_targets"), (list, str)):
        targets = data["lora_targets"]
        data["lora_targets"] = tuple(targets.split(",") if isinstance(targets, str) else targets)
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for key, value in list(data.items()):
        data[key] = _typed(key, value, types[key])
    return TrainConfig(**data)


def _typed(key: str, value, kind: str):
    """A setting's value as its field's type (``kind``, the annotation's text), or a ValueError naming it."""
    if kind in ("int", "float") and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)  # YAML reads 1e-4 (no dot) as text
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int" and is_number and float(value).is_integer():
        return int(value)
    if kind == "float" and is_number:
        return float(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and not isinstance(value, (list, dict)):
        return "" if value is None else str(value)
    if kind.startswith("tuple") and isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return value
    expected = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}
    raise ValueError(f"{key}={value!r}: expected {expected.get(kind, 'a list of names')}")
