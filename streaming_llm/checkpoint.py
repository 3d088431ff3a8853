"""Build, save and load a SpeechLLM: one directory of safetensors + config JSON + tokenizer files.

Layout of a checkpoint directory::

    checkpoint.json     {"format": "proactive-simulst", "version": 1, "delta": false, "tied": {...}}
    config.json         SpeechLLMConfig
    model.safetensors   weights (all of them, or with delta=true only the trained ones)
    tokenizer*.json     the LM's tokenizer

A *delta* checkpoint stores only the parameters that were trained (adapter, marker, probe, LoRA or
fine-tuned layers) and rebuilds the rest from the base weights named in its config (``llm_path``,
``whisper_path``), so a trained result stays small enough to keep in git.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import whisper.model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from speech_frontend.encoder import BlockCausalEncoder

from .config import SPEECH, SpeechLLMConfig
from .model import SpeechLLM, build_llm

FORMAT = "proactive-simulst"
VERSION = 1
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, foreign or does not match its config."""


def build_model(config: SpeechLLMConfig, tokenizer, from_paths: bool = False) -> SpeechLLM:
    """Modules for ``config``: random init, or the base weights named by its paths when ``from_paths``."""
    llm = build_llm(config, from_path=from_paths)
    encoder = None
    if config.modality == SPEECH:
        if from_paths and config.whisper_path:
            from speech_frontend.convert import load_whisper

            encoder = BlockCausalEncoder.from_whisper(load_whisper(config.whisper_path), config.block_frames)
        else:
            encoder = BlockCausalEncoder(whisper.model.ModelDimensions(**config.whisper_dims), config.block_frames)
    model = SpeechLLM(config, llm, tokenizer, encoder)
    apply_lora(model)
    return model


def apply_lora(model: SpeechLLM) -> None:
    """Inject the LoRA adapters the config asks for (peft), on the LM and/or the encoder's attention."""
    config = model.config
    if not (config.llm_lora_r or config.encoder_lora_r):
        return
    from peft import LoraConfig, inject_adapter_in_model

    if config.llm_lora_r:
        lora = LoraConfig(
            r=config.llm_lora_r, lora_alpha=config.llm_lora_alpha, target_modules=list(config.llm_lora_targets)
        )
        inject_adapter_in_model(lora, model.llm)
    if config.encoder_lora_r and model.encoder is not None:
        lora = LoraConfig(
            r=config.encoder_lora_r,
            lora_alpha=config.encoder_lora_alpha,
            target_modules=["query", "key", "value", "out"],
        )
        inject_adapter_in_model(lora, model.encoder)


def save_checkpoint(model: SpeechLLM, directory: str | Path, delta: bool = False, extra: dict | None = None) -> Path:
    """Write ``model`` to ``directory`` atomically (a temporary sibling renamed at the end)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    state, tied, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        if delta and name not in trained:
            continue
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            tied[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(state, str(tmp / WEIGHTS))
        (tmp / "config.json").write_text(model.config.to_json(), encoding="utf-8")
        model.tokenizer.save_pretrained(str(tmp))
        meta = {"format": FORMAT, "version": VERSION, "delta": delta, "tied": tied, "extra": extra or {}}
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        for f in tmp.iterdir():
            _fsync(f)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def replace_dir(new: Path, directory: Path) -> None:
    """Put the finished folder ``new`` where ``directory`` is: the old one is moved aside first and removed last,
    so a kill at any point leaves one whole model at ``directory`` (or, between the two renames, its sibling
    ``.NAME.old``), never a folder half-deleted."""
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(new, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, directory)


def read_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    meta_path = directory / "checkpoint.json"
    if not meta_path.exists():
        raise CheckpointError(
            f"{directory}: not a {FORMAT} checkpoint (no checkpoint.json); pass a directory written by training.train"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{directory}: checkpoint version {meta['version']} is newer than this toolkit's")
    return meta


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu", merge_lora: bool = False) -> SpeechLLM:
    """Load a checkpoint; the weights are checked against the config and every mismatch is named.

    ``merge_lora`` folds the LoRA adapters into their base weights, for inference: the same function up to
    float rounding, without two extra small matmuls per adapted layer (a streaming step with few rows pays
    for those calls, not for their arithmetic). A merged model cannot save a delta or train its adapters.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        config = SpeechLLMConfig.load(directory / "config.json")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{directory}: bad config.json ({e})") from None
    try:
        state = load_file(str(directory / WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{directory / WEIGHTS}: unreadable weights ({e})") from None
    tokenizer = load_tokenizer(directory)
    if meta.get("delta"):  # its frozen rest is the base models at these paths
        config = config.replace(**{k: find_base(directory, k, getattr(config, k)) for k in BASE_PATHS})
    model = build_model(config, tokenizer, from_paths=bool(meta.get("delta")))
    check_state(model, state, meta, str(directory))
    model.load_state_dict(state, strict=False)
    if model.probe is not None and not probe_trained(state, meta):
        model.probe = None  # its probe would be random weights: a run with probe=false has no probe to ask
    if merge_lora and (config.llm_lora_r or config.encoder_lora_r):
        from .quantize import merge_lora as merge

        merge(model)
    return model.to(device).eval()


BASE_PATHS = ("llm_path", "whisper_path")  # a delta checkpoint's base models, as absolute paths when trained


def find_base(directory: Path, key: str, path: str) -> str:
    """A base model's path as the checkpoint names it, or, where that is not on this machine (trained by another
    user, or with another $PROACTIVE_CACHE), the same asset in this machine's cache: the path's last one or two
    parts (``smollm2-135m-instruct``, ``whisper-tiny.en/model.pt``) under ``speech_frontend.assets.cache_dir()``."""
    if not path or Path(path).exists():
        return path
    from speech_frontend.assets import cache_dir

    parts = Path(path).parts
    for n in (1, 2):
        moved = cache_dir().joinpath(*parts[-n:])
        if len(parts) >= n and moved.exists():
            return str(moved)
    raise CheckpointError(
        f"{directory}: its base model ({key}) {path} is not on this machine, nor in the asset cache {cache_dir()}; "
        "build the assets (make assets) or set $PROACTIVE_CACHE to the cache that holds them"
    )


def probe_trained(state: dict[str, torch.Tensor], meta: dict) -> bool:
    """Whether the checkpoint holds a trained probe: its weights are in the file (a delta stores only what was
    trained) and the run that wrote it trained one (``probe`` in its training config, true by default), or
    ``training.probe`` trained it since."""
    extra = meta.get("extra") or {}
    trained = (extra.get("train_config") or {}).get("probe", True) or "probe_retrained" in extra
    return bool(trained) and any(k.startswith("probe.") for k in state)


def load_tokenizer(directory: Path):
    """The checkpoint's tokenizer; a missing or broken one is a ``CheckpointError`` naming the folder and file."""
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, KeyError) as e:
        if not (directory / TOKENIZER).is_file():
            raise CheckpointError(f"{directory}: no {TOKENIZER} (the tokenizer); copy it from the checkpoint's "
                                  "training run, or pass a folder written by training.train") from None  # fmt: skip
        raise CheckpointError(f"{directory / TOKENIZER}: unreadable tokenizer ({' '.join(str(e).split())})") from None


def check_state(model: SpeechLLM, state: dict[str, torch.Tensor], meta: dict, source: str) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped weights."""
    expected = model.state_dict()
    tied = set(meta.get("tied", {}))
    problems = []
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        problems.append(f"unexpected weights {_few(unexpected)}")
    if not meta.get("delta"):
        missing = sorted(set(expected) - set(state) - tied)
        if missing:
            problems.append(f"missing weights {_few(missing)}")
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the config"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else ""))
    if problems:
        raise CheckpointError(f"{source}: weights do not match config.json: " + " | ".join(problems))


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
