"""The trainer: a plain PyTorch loop over MSLM + SPSD (+ the probe head).

    python -m training.train --config training/configs/tiny_text.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 2 -m training.train --config ...   # DistributedDataParallel (gloo on CPU)

Everything a run needs to continue exactly is in its checkpoints (``<out_dir>/checkpoints/step-N/``): the
trained weights, AdamW and scheduler state, the RNG states and the step. The data order and every phi are
functions of (seed, step, example), so ``--resume`` reproduces the uninterrupted run, on any world size (but when
an epoch's last batch holds fewer examples than there are processes: it then joins the batch before it). So
``--resume`` refuses settings that would change the run (each named, old and new value; those that may change:
``config.RESUME_MAY_CHANGE``), and a run without ``--resume`` refuses an out_dir that holds another run's checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from streaming_llm.checkpoint import WEIGHTS, build_model, check_state, read_meta, save_checkpoint
from streaming_llm.config import SPEECH, SpeechLLMConfig
from streaming_llm.engine import translate_offline
from streaming_llm.model import SpeechLLM, build_llm

from .align import align_adapter
from .config import TrainConfig, load_config, parse_overrides, resume_changes
from .data import Example, SourceUnits, bucket_batches, load_examples, session_limits
from .losses import LossConfig, streaming_losses
from .phi import sample_token_phi

log = logging.getLogger("training")
LOGGED = ("loss", "full", "mslm", "spsd", "probe", "probe_acc", "agree")


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, a checkpoint that cannot be written); the message says where."""


# ---- the model -------------------------------------------------------------------------------------


def resolve_path(spec: str) -> str:
    """ "asset:NAME" -> the file or directory `make assets` built; anything else is a path."""
    if spec.startswith("asset:"):
        from speech_frontend.assets import asset_file

        return str(asset_file(spec.split(":", 1)[1]))
    if not Path(spec).exists():
        raise ValueError(f"{spec}: no such model path")
    return spec


TRANSCRIBE_PROMPT = "Write down the English speech.\nSpeech:"
TARGET_PREFIX = {"translate": "\nGerman:", "transcribe": "\nText:"}


def model_config(cfg: TrainConfig) -> tuple[SpeechLLMConfig, object]:
    """The SpeechLLMConfig and tokenizer a training config asks for."""
    lora = dict(
        llm_lora_r=cfg.lora_r if cfg.train_llm == "lora" else 0,
        llm_lora_alpha=cfg.lora_alpha,
        llm_lora_targets=tuple(cfg.lora_targets),
        encoder_lora_r=cfg.lora_r if cfg.train_encoder == "lora" else 0,
        encoder_lora_alpha=cfg.lora_alpha,
    )
    shared = dict(
        modality=cfg.modality, block_ms=cfg.block_ms, stack=cfg.stack, adapter_hidden=cfg.adapter_hidden,
        target_prefix=cfg.target_prefix or TARGET_PREFIX[cfg.task], probe_hidden=cfg.probe_hidden, **lora,
    )  # fmt: skip
    if cfg.prompt:
        shared["prompt"] = cfg.prompt
    elif cfg.task == "transcribe":
        shared["prompt"] = TRANSCRIBE_PROMPT
    elif cfg.modality != SPEECH:
        shared["prompt"] = "Translate English to German.\nEnglish:"
    if cfg.llm == "tiny":
        from streaming_llm.tiny import tiny_config, tiny_tokenizer

        if cfg.modality == SPEECH and cfg.whisper != "tiny":
            raise ValueError("llm=tiny goes with whisper=tiny")
        modality = shared.pop("modality")
        return tiny_config(modality, **{**shared, "adapter_hidden": cfg.adapter_hidden}), tiny_tokenizer()
    llm_path, llm_config, tokenizer = load_llm_files(cfg.llm)
    whisper_path, dims = "", None
    if cfg.modality == SPEECH:
        whisper_path = resolve_path(cfg.whisper)
        from speech_frontend.convert import load_whisper

        dims = load_whisper(whisper_path).dims.__dict__
    config = SpeechLLMConfig(
        llm_config=llm_config, llm_path=llm_path, whisper_dims=dims, whisper_path=whisper_path, **shared
    )
    return config, tokenizer


def load_llm_files(spec: str) -> tuple[str, dict, object]:
    """llm=PATH or asset:NAME -> (its path, its config as a dict, its tokenizer), or an error that says what the
    folder lacks and what to pass."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = resolve_path(spec)
    what = (
        f"llm={spec}: {path} is not a causal LM checkpoint (a Hugging Face folder with config.json, the weights and "
        "a tokenizer); pass llm=tiny, llm=asset:smollm2-135m-instruct or such a folder"
    )
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{what} (it is a file, not a folder)")
    if not (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))):
        raise ValueError(f"{what} (no weights in it)")
    try:
        llm_config = AutoConfig.from_pretrained(path).to_dict()
        if llm_config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"its model_type {llm_config.get('model_type')!r} is not a causal LM")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - whatever transformers finds wrong, the user needs the same advice
        raise ValueError(f"{what} ({_first_line(e)})") from None
    return path, llm_config, tokenizer


def check_lora_targets(config: SpeechLLMConfig) -> None:
    """lora_targets must name layers of the LLM that LoRA can adapt (peft matches a module name's last parts);
    checked on an empty (meta) copy of the LLM, so a misspelt name is refused by name before any weights load."""
    with torch.device("meta"):
        llm = build_llm(replace(config, llm_lora_r=0), from_path=False)
    names = [name for name, m in llm.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    missing = [t for t in config.llm_lora_targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        known = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"lora_targets: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not among this LLM's layers; "
            f"its layers are {','.join(known)} (give lora_targets=q_proj,v_proj, say)"
        )


def build_training_model(cfg: TrainConfig, start: bool = True) -> SpeechLLM:
    """The model a run trains; ``start``: with the weights ``init_llm`` and ``init_adapter`` give it (a run resumed
    from a checkpoint takes every trained weight from the checkpoint, and those folders may be gone by then)."""
    config, tokenizer = model_config(cfg)
    if config.llm_lora_r:
        check_lora_targets(config)
    try:
        model = build_model(config, tokenizer, from_paths=cfg.llm != "tiny")
    except Exception as e:  # noqa: BLE001 - weights that do not load (cut off, another model's): what and why
        if cfg.llm == "tiny":
            raise
        raise ValueError(
            f"llm={cfg.llm}" + (f", whisper={cfg.whisper}" if cfg.modality == SPEECH else "") + ": the weights do not "
            f"load ({type(e).__name__}: {_first_line(e)}); pass the folder of a complete checkpoint"
        ) from None
    set_trainable(model, cfg)
    if start and cfg.init_llm:
        init_llm_from(model, cfg.init_llm)
    if start and cfg.init_adapter:
        init_adapter_from(model, cfg.init_adapter)
    return model


LLM_ARCHITECTURE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")  # fmt: skip


def init_llm_from(model: SpeechLLM, directory: str | Path) -> int:
    """Start the LLM from a checkpoint's trained LLM weights (its LoRA, say: a text model under a new speech
    adapter) -> tensors loaded. Only weights this run trains are taken, so its own delta checkpoints keep them;
    anything else (another base LLM, another LoRA shape, weights this run keeps frozen) is refused by name."""
    directory = Path(directory)
    try:
        meta = read_meta(directory)
        other = SpeechLLMConfig.load(directory / "config.json")
        state = load_file(str(directory / WEIGHTS))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise TrainingError(f"init_llm={directory}: not a checkpoint this run can start from ({e})") from None
    if any(other.llm_config.get(k) != model.config.llm_config.get(k) for k in LLM_ARCHITECTURE):
        raise TrainingError(
            f"init_llm={directory}: its LLM ({other.llm_path or 'tiny'}) is not this run's "
            f"({model.config.llm_path or 'tiny'}); start from a checkpoint of the same base LLM"
        )
    tied = set(meta.get("tied", {}))
    llm = {k: v for k, v in state.items() if k.startswith("llm.") and k not in tied}
    if not llm:
        raise TrainingError(f"init_llm={directory}: it holds no LLM weights")
    params = dict(model.named_parameters())
    unknown = sorted(k for k in llm if k not in params)
    frozen = sorted(k for k in llm if k in params and not params[k].requires_grad)
    shapes = sorted(k for k in llm if k in params and params[k].shape != llm[k].shape)
    for problem, names in (
        ("has weights this model lacks (another train_llm or lora_targets?)", unknown),
        ("has weights this run keeps frozen, which its delta checkpoints would drop (train_llm?)", frozen),
        ("has weights of another shape (another lora_r?)", shapes),
    ):
        if names:
            more = " ..." if len(names) > 3 else ""
            raise TrainingError(f"init_llm={directory}: {problem}: {', '.join(names[:3])}{more}")
    # a LoRA's update is B @ A * alpha / r: the same tensors under another alpha are another LLM (r: the shapes)
    if any(".lora_" in k for k in llm) and other.llm_lora_alpha != model.config.llm_lora_alpha:
        raise TrainingError(
            f"init_llm={directory}: its LoRA was trained with lora_alpha={other.llm_lora_alpha}, this run has "
            f"lora_alpha={model.config.llm_lora_alpha}; give lora_alpha={other.llm_lora_alpha}"
        )
    if _real(other.llm_path) != _real(model.config.llm_path):
        log.warning(
            "init_llm=%s was trained over the LLM at %s, this run's is %s: the same architecture, but unless the two "
            "hold the same weights (a base and an instruct model do not), the run does not start from that model",
            directory, other.llm_path or "tiny", model.config.llm_path or "tiny",
        )  # fmt: skip
    with torch.no_grad():
        for name, tensor in llm.items():
            params[name].copy_(tensor)
    log.info("LLM initialised from %s (%d tensors)", directory, len(llm))
    return len(llm)


def _real(path: str) -> str:
    return str(Path(path).resolve()) if path else ""


def init_adapter_from(model: SpeechLLM, directory: str | Path) -> int:
    """Start the speech adapter from a checkpoint's (a ``task=transcribe`` run's, say) -> tensors loaded.
    Its encoder and LLM width must be this model's."""
    directory = Path(directory)
    if model.adapter is None:
        raise TrainingError(f"init_adapter={directory}: a text model has no speech adapter")
    try:
        state = load_file(str(directory / WEIGHTS))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise TrainingError(f"init_adapter={directory}: not a checkpoint this run can start from ({e})") from None
    adapter = {k.removeprefix("adapter."): v for k, v in state.items() if k.startswith("adapter.")}
    own = model.adapter.state_dict()
    if set(adapter) != set(own):
        raise TrainingError(f"init_adapter={directory}: it holds no speech adapter of this model's kind")
    shapes = sorted(k for k in own if own[k].shape != adapter[k].shape)
    if shapes:
        raise TrainingError(
            f"init_adapter={directory}: adapter weights of another shape ({', '.join(shapes)}): another encoder, "
            "LLM, stack or adapter_hidden"
        )
    model.adapter.load_state_dict(adapter)
    log.info("speech adapter initialised from %s", directory)
    return len(adapter)


def set_trainable(model: SpeechLLM, cfg: TrainConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    model.end_of_source.requires_grad_(True)
    if model.adapter is not None:
        model.adapter.requires_grad_(True)
    if model.probe is not None and cfg.probe:
        model.probe.requires_grad_(True)
    if cfg.train_llm == "full":
        model.llm.requires_grad_(True)
        if cfg.freeze_embeddings:
            model.llm.get_input_embeddings().weight.requires_grad_(False)
            model.llm.get_output_embeddings().weight.requires_grad_(False)
    elif cfg.train_llm == "lora":
        for name, p in model.llm.named_parameters():
            p.requires_grad_("lora_" in name)
    if model.encoder is not None:
        if cfg.train_encoder == "full":
            model.encoder.requires_grad_(True)
        elif cfg.train_encoder == "lora":
            for name, p in model.encoder.named_parameters():
                p.requires_grad_("lora_" in name)


def is_delta(model: SpeechLLM) -> bool:
    """Checkpoints store only trained weights when the frozen rest can be rebuilt from named base files."""
    config = model.config
    return bool(config.llm_path) and (config.modality != SPEECH or bool(config.whisper_path))


class TrainStep(nn.Module):
    """One micro-batch's losses; wrapped by DistributedDataParallel when several processes train."""

    def __init__(self, model: SpeechLLM, units: SourceUnits, loss: LossConfig, skew: float):
        super().__init__()
        self.model = model
        self.units = units
        self.loss = loss
        self.skew = skew

    def forward(self, examples: list[Example], seeds: list[int], n_tokens: float) -> dict[str, torch.Tensor]:
        model = self.model
        units = [self.units(ex) for ex in examples]
        targets = [model.target_ids(ex.target) for ex in examples]
        phis = [
            sample_token_phi(len(u), t, model.word_start, torch.Generator().manual_seed(s), self.skew)
            for u, t, s in zip(units, targets, seeds, strict=True)
        ]
        return streaming_losses(model, units, targets, phis, self.loss, n_tokens=n_tokens)


# ---- the loop --------------------------------------------------------------------------------------


def example_seed(seed: int, step: int, index: int) -> int:
    """The phi generator's seed for one example at one step: independent of rank and world size."""
    return int(hashlib.sha1(f"{seed}:{step}:{index}".encode()).hexdigest()[:15], 16)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Train (or, with ``resume``, continue) the run in ``cfg.out_dir`` -> the final checkpoint's folder.

    ``stop_after``: leave after that step of the schedule with a checkpoint (to fit a time slot; ``--resume``
    then goes on exactly, in any world size) -> that step checkpoint's folder."""
    rank, world = init_distributed()
    if not cfg.train_manifest:
        raise ValueError("train_manifest is not set: give train_manifest=PATH (a TSV from python -m training.corpus)")
    if cfg.batch_size < world:
        raise ValueError(
            f"batch_size={cfg.batch_size} is under the {world} processes of torchrun; each process needs at least one "
            f"example per step: give batch_size >= {world}"
        )
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    found = latest_checkpoint(ckpt_root) if resume else None
    saved = resumable_state(found, cfg) if found else None  # refused here if it cannot continue exactly
    if not resume:
        refuse_another_run(out)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    model = build_training_model(cfg, start=found is None).to(training_device())
    if cfg.bf16 and model.device.type == "cpu" and torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        log.warning(
            "bf16=true on a CPU without native bf16 (%s): autocast is emulated and several times slower; "
            "bf16=false is faster here",
            torch.backends.cpu.get_cpu_capability(),
        )
    max_seconds, fits = session_limits(model, cfg.max_source_seconds)
    transcribe = cfg.task == "transcribe"
    train_ex = load_examples(
        cfg.train_manifest, cfg.modality, max_seconds, cfg.max_source_words, cfg.skip_bad, transcribe, fits
    )
    dev_ex = (
        load_examples(cfg.dev_manifest, cfg.modality, max_seconds, cfg.max_source_words, cfg.skip_bad, transcribe, fits)
        if cfg.dev_manifest
        else []
    )
    if len(train_ex) < world:
        raise ValueError(
            f"{cfg.train_manifest}: {len(train_ex)} usable examples, under the {world} processes of torchrun; each "
            f"process needs at least one example per step: give more rows, or --nproc_per_node {len(train_ex)}"
        )
    if rank == 0:  # every check has passed: the run's folder is made now, not for a run refused at start-up
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")
    cache = None if cfg.encoder_cache == "none" else (cfg.encoder_cache or out / "encoder_cache")
    units = SourceUnits(model, cache, encoder_trained=cfg.train_encoder != "frozen")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps))
    step = 0
    if resume:
        if found is None:
            log.info("no checkpoint in %s: starting from step 0", ckpt_root)
        else:
            step = restore(found, model, optimizer, scheduler, saved)
            log.info("resumed from %s (step %d)", found, step)
            _warn_of_a_new_schedule(saved, cfg, step)
            if step == cfg.max_steps:
                log.info("step %d is max_steps: nothing to train; the final model is written again", step)
    logged = _truncate_log(out / "log.jsonl", step) if rank == 0 else []
    if step and dev_ex and _dev_due(cfg, step):  # every rank meets the barrier; rank 0 alone reads the log
        if rank == 0 and not any(r.get("step") == step and "dev_full" in r for r in logged):  # killed before it ran
            record = evaluate(model, dev_ex, units, cfg, step)
            _append_log(out / "log.jsonl", record)
            log.info("dev @ %d (missed before the resume): dev_full=%s", step, record.get("dev_full"))
        _barrier(world)
    if step == 0 and cfg.align_steps and model.adapter is not None and not cfg.init_adapter:
        aligned = align_adapter(
            model, train_ex, dev_ex, units, cfg.align_steps, 2 * cfg.batch_size, cfg.seed, progress=rank == 0
        )
        if rank == 0:
            _append_log(out / "log.jsonl", {"step": 0, **aligned})

    step_module = TrainStep(model, units, cfg.loss, cfg.phi_skew)
    runner = step_module
    if world > 1:
        device_ids = [model.device] if model.device.type == "cuda" else None
        runner = nn.parallel.DistributedDataParallel(step_module, device_ids=device_ids, find_unused_parameters=True)
    n_trainable = sum(p.numel() for p in params)
    if rank == 0:
        log.info(
            "training %s on %d examples (%d dev): %.2fM trained parameters, %d steps, world size %d",
            cfg.modality, len(train_ex), len(dev_ex), n_trainable / 1e6, cfg.max_steps, world,
        )  # fmt: skip
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0, desc="train", unit="step", dynamic_ncols=True)
    epoch_batches: dict[int, list[list[int]]] = {}
    last_saved = latest_checkpoint(ckpt_root)
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    while step < end:
        started = time.time()
        micro = micro_batches(train_ex, cfg, step, world, epoch_batches)
        n_tokens = float(sum(len(model.target_ids(train_ex[i].target)) for idx in micro for i in idx))
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = defaultdict(float)
        for j, idx in enumerate(micro):
            mine = idx[rank::world]
            seeds = [example_seed(cfg.seed, step, i) for i in mine]
            sync = j == len(micro) - 1 or world == 1
            ctx = runner.no_sync() if (world > 1 and not sync) else _nullcontext()
            with ctx, torch.autocast("cpu" if model.device.type == "cpu" else "cuda", torch.bfloat16, enabled=cfg.bf16):
                losses = runner([train_ex[i] for i in mine], seeds, n_tokens / world)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss is {float(loss)} at step {step} (batch ids {[train_ex[i].id for i in mine]}); "
                    f"the last good checkpoint is {last_saved or 'none'}: lower lr or check those rows, then --resume"
                )
            loss.backward()
            for k in LOGGED:
                sums[k] += float(losses[k].detach()) * (1.0 if k not in ("probe_acc", "agree") else 1.0 / len(micro))
        if world > 1:  # each rank's terms are scaled by world (DDP averages gradients): the mean is global
            totals = torch.tensor([sums[k] for k in LOGGED], dtype=torch.float64)
            dist.all_reduce(totals)
            sums = {k: float(v) / world for k, v in zip(LOGGED, totals, strict=True)}
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm) if cfg.clip_norm > 0 else torch.tensor(0.0)
        optimizer.step()
        scheduler.step()
        step += 1
        seconds = time.time() - started
        if rank == 0:
            record = {"step": step, "lr": scheduler.get_last_lr()[0], **{k: round(sums[k], 6) for k in LOGGED}}
            record.update(grad_norm=round(float(grad_norm), 4), tokens=int(n_tokens), s_per_step=round(seconds, 3),
                          tokens_per_s=round(n_tokens / max(seconds, 1e-9), 1))  # fmt: skip
            _append_log(out / "log.jsonl", record)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", mslm=f"{sums['mslm']:.3f}", spsd=f"{sums['spsd']:.3f}")
            if step % cfg.log_every == 0:  # a line a log file keeps (the bar only redraws itself)
                bar.write(f"step {step}/{cfg.max_steps}: loss {sums['loss']:.4f} (full {sums['full']:.4f}, mslm "
                          f"{sums['mslm']:.4f}, spsd {sums['spsd']:.4f}), lr {record['lr']:.3g}, {seconds:.2f} s/step")
        if step % cfg.save_every == 0 or step == end:
            if rank == 0:
                last_saved = save_training_checkpoint(ckpt_root, step, model, optimizer, scheduler, cfg)
            _barrier(world)
        if dev_ex and _dev_due(cfg, step):
            if rank == 0:
                record = evaluate(model, dev_ex, units, cfg, step)
                _append_log(out / "log.jsonl", record)
                bar.write(f"dev @ {step}: " + ", ".join(f"{k}={v}" for k, v in record.items() if k != "step"))
            _barrier(world)
    bar.close()
    if step < cfg.max_steps:  # stopped early on request: the step checkpoint holds everything to go on
        _barrier(world)  # the process group stays: main() ends a torchrun worker (_end_worker)
        log.info("stopped after step %d of %d (stop_after); continue with --resume", step, cfg.max_steps)
        return latest_checkpoint(ckpt_root) or ckpt_root
    final = out / "final"
    if rank == 0:
        save_checkpoint(model, final, delta=is_delta(model), extra={"step": step, "train_config": cfg.to_dict()})
        log.info("final model: %s", final)
    _barrier(world)  # the process group stays: main() ends a torchrun worker (_end_worker)
    return final


def micro_batches(
    examples: list[Example], cfg: TrainConfig, step: int, world: int, cache: dict[int, list[list[int]]]
) -> list[list[int]]:
    """The grad_accum micro-batches (global example indices) of one optimizer step."""
    n_batches = len(bucket_batches(examples, cfg.batch_size, cfg.seed, 0, min_size=world))  # the same every epoch
    per_epoch = max(1, n_batches // cfg.grad_accum)
    epoch, within = divmod(step, per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = bucket_batches(examples, cfg.batch_size, cfg.seed, epoch, min_size=world)
    batches = cache[epoch]
    chosen = batches[within * cfg.grad_accum : (within + 1) * cfg.grad_accum]
    return chosen or batches[: cfg.grad_accum]


def evaluate(model: SpeechLLM, examples: list[Example], units: SourceUnits, cfg: TrainConfig, step: int) -> dict:
    """Dev losses (fixed phi seeds) and offline greedy BLEU/chrF on a dev subset.

    ``dev_source_gain``: the full-view NLL of each target under another example's source minus under its own,
    in nats per token. A model that ignores its input (a speech adapter that has not learned yet) scores ~0.
    """
    import sacrebleu

    from speech_frontend.audio import load_audio_spec

    model.eval()
    subset = examples[: cfg.dev_subset]
    sums: dict[str, float] = defaultdict(float)
    n_tokens = 0.0

    def batches(chosen: list[Example], loss: LossConfig):
        """(losses, target tokens) per dev batch, with the fixed phi seeds."""
        for i in range(0, len(chosen), cfg.batch_size):
            batch = chosen[i : i + cfg.batch_size]
            tokens = float(sum(len(model.target_ids(ex.target)) for ex in batch))
            seeds = [example_seed(0, 0, i + k) for k in range(len(batch))]
            yield TrainStep(model, units, loss, cfg.phi_skew)(batch, seeds, tokens), tokens

    with torch.no_grad():
        for losses, tokens in batches(subset, cfg.loss):
            for k in ("full", "mslm", "spsd", "probe_acc", "agree"):
                sums[k] += float(losses[k].detach()) * tokens
            n_tokens += tokens
        if len(subset) > 1:  # does the model listen? each target under the next example's source (full view only)
            other = [replace(ex, source=subset[(j + 1) % len(subset)].source) for j, ex in enumerate(subset)]
            full_only = replace(cfg.loss, w_full=1.0, w_mslm=0.0, spsd_lambda=0.0, probe=False)
            for losses, tokens in batches(other, full_only):
                sums["full_other_source"] += float(losses["full"].detach()) * tokens
        hyps, refs = [], []
        for ex in tqdm(examples[: cfg.dev_bleu_subset], desc="dev decode", leave=False, disable=None):
            source = load_audio_spec(ex.source) if cfg.modality == SPEECH else ex.source.split()
            hyps.append(translate_offline(model, source, cfg.max_target_tokens))
            refs.append(ex.target)
    model.train()
    record = {"step": step, **{f"dev_{k}": round(v / max(n_tokens, 1), 4) for k, v in sums.items()}}
    if "dev_full_other_source" in record:  # nats per token the right source is worth; about 0: not listening
        record["dev_source_gain"] = round(record["dev_full_other_source"] - record["dev_full"], 4)
    if hyps:
        record["dev_bleu"] = round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
        record["dev_chrf"] = round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)
    return record


# ---- checkpoints -----------------------------------------------------------------------------------


def save_training_checkpoint(root: Path, step: int, model: SpeechLLM, optimizer, scheduler, cfg: TrainConfig) -> Path:
    """Write step-N atomically (temporary directory renamed at the end); keep the last ``keep_last``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    for stale in root.glob(".tmp-step-*"):  # left by a killed run (one process writes checkpoints: rank 0)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        extra = {"step": step, "train_config": cfg.to_dict()}
        save_checkpoint(model, tmp / "model", delta=is_delta(model), extra=extra)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "config": cfg.to_dict(),
        }
        torch.save(state, tmp / "trainer.pt")
        with open(tmp / "trainer.pt", "rb") as f:
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except Exception as e:  # noqa: BLE001 - a full disk is an OSError, or a RuntimeError from torch.save's zip writer
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {_first_line(e)}"
        raise TrainingError(
            f"could not write the checkpoint of step {step} in {root} ({reason}; {_free_mib(root)} free there: "
            f"is the disk full?); the previous checkpoint is kept: {previous or 'none'}"
        ) from e
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[: -cfg.keep_last] if cfg.keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _free_mib(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown space"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root (an interrupted write never counts)."""
    if not root.is_dir():
        return None
    for path in sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True):
        if (path / "trainer.pt").exists() and (path / "model" / "checkpoint.json").exists():
            return path
        log.warning("%s: incomplete checkpoint, ignored", path)
    return None


def refuse_another_run(out: Path) -> None:
    """A new run (no --resume) may not start in a folder that holds another run's checkpoints: they would stay
    next to its own, keep_last would delete its own first, and a later --resume would continue the other run."""
    steps = [int(p.name[5:]) for p in (out / "checkpoints").glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    if steps:
        raise ValueError(
            f"{out} already holds checkpoints up to step {max(steps)} (another run); pass --resume to continue it, "
            "or another out_dir"
        )
    if (out / "final" / "checkpoint.json").exists():
        raise ValueError(f"{out} already holds a final model (another run); pass another out_dir")


def resumable_state(path: Path, cfg: TrainConfig) -> dict:
    """The trainer state of the checkpoint --resume continues from, or an error that says why this run's settings
    would not continue it exactly (the settings that change its maths, named with their old and new values)."""
    try:
        trainer = torch.load(path / "trainer.pt", weights_only=False)
        step, saved = int(trainer["step"]), dict(trainer.get("config") or {})
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise TrainingError(f"{path}: cannot resume from this checkpoint ({e})") from None
    changes = resume_changes(saved, cfg)
    if changes:
        raise ValueError(
            f"--resume: {path} was trained with other settings: {', '.join(changes)}; a resumed run continues "
            f"exactly, so give the old values (or drop those settings), or another out_dir for a new run"
        )
    if cfg.max_steps < step:
        raise ValueError(
            f"--resume: max_steps={cfg.max_steps} is under step {step}, where {path} stands; give max_steps >= "
            f"{step} (a run does not go back), or another out_dir for a new run"
        )
    return trainer


def _warn_of_a_new_schedule(trainer: dict, cfg: TrainConfig, step: int) -> None:
    """max_steps may change on --resume (to train longer), but the cosine decay is stretched to the new length:
    the learning rate jumps where the run stands, a warm restart; said once, with both rates."""
    old = int((trainer.get("config") or {}).get("max_steps", cfg.max_steps))
    before, after = (cfg.lr * lr_factor(step, cfg.warmup_steps, total) for total in (old, cfg.max_steps))
    if old != cfg.max_steps and not math.isclose(before, after, rel_tol=1e-3):
        log.warning(
            "max_steps %d -> %d: the learning rate schedule is stretched to the new length, so at step %d the rate "
            "goes from %.3g to %.3g (a warm restart; the run is neither the %d- nor the %d-step one)",
            old, cfg.max_steps, step, before, after, old, cfg.max_steps,
        )  # fmt: skip


def restore(path: Path, model: SpeechLLM, optimizer, scheduler, trainer: dict | None = None) -> int:
    """Load a training checkpoint into the freshly built model, optimizer and scheduler -> its step.
    ``trainer``: its trainer.pt, if already read (``resumable_state``)."""
    meta = read_meta(path / "model")
    try:
        state = load_file(str(path / "model" / WEIGHTS))
        trainer = trainer or torch.load(path / "trainer.pt", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise TrainingError(f"{path}: cannot resume from this checkpoint ({e})") from None
    check_state(model, state, meta, str(path / "model"))
    model.load_state_dict(state, strict=False)
    try:
        optimizer.load_state_dict(trainer["optimizer"])
    except ValueError as e:  # another set of trained parameters (resume_changes names the setting when it can)
        raise TrainingError(f"{path}: its optimizer state does not fit this run's trained parameters ({e})") from None
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"]["torch"])
    np.random.set_state(trainer["rng"]["numpy"])
    random.setstate(trainer["rng"]["python"])
    return int(trainer["step"])


# ---- plumbing --------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def training_device() -> torch.device:
    """This process's GPU (torchrun's LOCAL_RANK) when there is one, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _dev_due(cfg: TrainConfig, step: int) -> bool:
    """Whether the dev set is evaluated after this step (every ``eval_every`` steps and after the last)."""
    return step % cfg.eval_every == 0 or step == cfg.max_steps


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> list[dict]:
    """On resume, drop log lines past the resumed step (they will be written again), and a last line cut off by a
    kill; rewritten atomically (temporary file, then rename), so a kill now loses nothing -> the records kept."""
    if not path.exists():
        return []
    keep, records = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a kill mid-write
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            keep.append(line)
            records.append(record)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description=__doc__.split("\n\n")[0],
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="a YAML file from training/configs/")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    parser.add_argument("--stop-after", type=int, metavar="STEP",
                        help="leave after this step with a checkpoint (fit a time slot; --resume goes on)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that override the YAML")
    args = parser.parse_intermixed_args(argv)  # key=value settings before and after the options alike
    if args.stop_after is not None and args.stop_after < 1:
        parser.error(f"--stop-after {args.stop_after}: give the step to stop after (1 or more)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    cfg = None
    try:
        cfg = load_config(args.config, parse_overrides(args.overrides))
        final = train(cfg, resume=args.resume, stop_after=args.stop_after)
    except (ValueError, TrainingError, OSError) as e:  # OSError: a log or output folder that cannot be written
        tqdm.write(f"error: {e}", file=sys.stderr)  # on a line of its own, not after the progress bar
        code = 1
    except KeyboardInterrupt:  # Ctrl-C: where the run stands, not a traceback
        tqdm.write(f"interrupted: {_where_it_stands(cfg)}", file=sys.stderr)
        code = 130
    else:
        print(f"done: {final}")
        code = 0
    if dist.is_initialized():
        _end_worker(code)
    return code


def settings_help() -> str:
    """Every key=value setting with its default (what each means: ``TrainConfig`` in training/config.py)."""
    import textwrap
    from dataclasses import fields

    def shown(value) -> str:  # as it is written on the command line: true, q_proj,v_proj
        if isinstance(value, bool):
            return str(value).lower()
        return ",".join(value) if isinstance(value, tuple) else str(value)

    pairs = [f"{f.name}={shown(getattr(TrainConfig, f.name, ''))}" for f in fields(TrainConfig)]
    return (
        "settings (key=value, after the YAML; defaults shown; each is described in training/config.py):\n"
        + textwrap.fill("  ".join(pairs), 100, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
    )


def _where_it_stands(cfg: TrainConfig | None) -> str:
    """What an interrupted run left: its last checkpoint and how to go on."""
    if cfg is None:
        return "before training started"
    last = latest_checkpoint(Path(cfg.out_dir) / "checkpoints")
    if last is None:
        return f"no checkpoint was written in {cfg.out_dir}; the same command starts the run again"
    return f"the last checkpoint is {last} (step {int(last.name[5:])}); the same command with --resume continues it"


def _end_worker(code: int) -> None:
    """End a torchrun worker now, with its output flushed, without tearing down its gloo process group.

    Tearing it down can deadlock (seen here with torch 2.13: the group's destructor, run with the GIL held when
    the last reference goes, joins the gloo worker thread, which is waiting for the GIL to free a finished
    collective's tensors). Every collective has finished (the last barrier), the checkpoint is on disk; the
    operating system closes the sockets.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
