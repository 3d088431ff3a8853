"""The LLM's linear layers in 4 bits, quantized by GPTQ on the checkpoint's own training data (inference, CPU).

    python -m streaming_llm.gptq CKPT            # calibrate once: writes CKPT/int4-g32.pt (about 2 min here)
    simuleval --agent simul_agents/proactive_agent.py --checkpoint CKPT --int4 ...

A streaming step reads every weight of the LLM for a row or two, so its cost is bytes: int8 (``quantize.py``)
reads a quarter of float32's, 4 bits an eighth. Rounding each group of 32 weights to the nearest of 16 levels
(RTN) costs SmolLM2-135M too much: it moved the text model's logits by about 2 on average and changed a third
of its greedy choices. GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") rounds the columns of each layer one at a time and spreads each rounding error over
the columns not yet rounded, weighted by the inverse of the layer's input second moment ``H = X^T X`` measured
on calibration inputs, so that the layer's outputs on such inputs move as little as possible.

Calibration: the full-source greedy decode of ``CALIBRATION_EXAMPLES`` training examples of the checkpoint's own
``train_manifest`` (source rows and written target rows, as a streaming session feeds them). Groups of
``GROUP_SIZE`` input columns share a scale and a zero point (``w = (q - 8) * scale + zero``, ``q`` in 0..15),
the layout of PyTorch's CPU 4-bit kernel (``torch._weight_int4pack_mm_for_cpu``, bfloat16 activations, float32
handed back as ``Int8Linear`` does). q/k/v and gate/up are quantized as one fused layer each (they read the same
input: the same ``H``), which ``lean.lean_forward`` runs as one product; the separate layers stay (``RowsOf``:
the fused product computed once per input, each keeping its rows) for ``transformers``' own forward.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from speech_frontend.assets import file_sha256

from .model import SpeechLLM
from .quantize import FUSED, merge_lora, put_fused, untie_output

log = logging.getLogger("streaming_llm.gptq")

GROUP_SIZE = 32  # input columns per scale and zero point
# torch._weight_int4pack_mm_for_cpu takes groups of 32, 64, 128 or 256 columns; gptq() rounds BLOCK (128) columns
# at a time and a group must not straddle two blocks, so 256 is out
GROUP_SIZES = (32, 64, 128)
CALIBRATION_EXAMPLES = 32
LEVELS = 16  # 4 bits
MIDPOINT = 8  # the kernel subtracts it: w = (q - 8) * scale + zero
BLOCK = 128  # columns rounded before the rest of the layer is updated (GPTQ's lazy batch)
DAMP = 0.01  # of H's mean diagonal, added to its diagonal (more when that is not enough to factor it)
FORMAT = "proactive-simulst-int4"
LAST_PRODUCT = "_last_rows_product"  # where RowsOf keeps a fused layer's last input and product


def weights_file(checkpoint: str | Path, group_size: int = GROUP_SIZE) -> Path:
    return Path(checkpoint) / f"int4-g{group_size}.pt"


# ---- the layer ---------------------------------------------------------------------------------------------


class Int4Linear(nn.Module):
    """A linear layer without bias whose weights are 4-bit, a scale and zero point per group of input columns."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features, self.group_size = packed.shape[0], in_features, group_size
        self.register_buffer("packed", packed)  # (out, in / 2) uint8, the CPU kernel's layout
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (in / group, out, 2) bfloat16

    @classmethod
    def of(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> Int4Linear:
        """q (out, in) in 0..15, scales and zeros (out, in / group) -> the layer."""
        out_features, in_features = q.shape
        group_size = in_features // scales.shape[1]
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return cls(packed, scales_and_zeros, group_size, in_features)

    def rows(self, start: int, stop: int) -> RowsOf:
        """The layer of output rows start:stop (the kernel packs rows in blocks, so no view of the weights)."""
        return RowsOf(self, start, stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out), in x's dtype
        if x.device.type != "cpu":
            raise RuntimeError("Int4Linear runs on the CPU (PyTorch's 4-bit CPU kernel); use int8 or fp16 elsewhere")
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class RowsOf(nn.Module):
    """Output rows start:stop of a fused layer: ``transformers``' own forward calls q_proj, k_proj, ... one by
    one (the attention head needs it) on the same input tensor. The first computes the fused product; the
    others find it kept on the fused layer (for that very tensor object) and take their rows of it."""

    def __init__(self, fused: nn.Module, start: int, stop: int):
        super().__init__()
        self.fused, self.start, self.stop = fused, start, stop
        self.in_features, self.out_features = fused.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.fused.__dict__.get(LAST_PRODUCT)  # (input, product) of the fused layer's last call from here
        if kept is None or kept[0] is not x:
            kept = (x, self.fused(x))
            self.fused.__dict__[LAST_PRODUCT] = kept  # one tuple, replaced whole: a reader sees a matching pair
        return kept[1][..., self.start : self.stop]


# ---- rounding ----------------------------------------------------------------------------------------------


def _group_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, group) -> scale, low (out,): the 16 levels span the group's range."""
    low, high = w.amin(dim=1), w.amax(dim=1)
    return (high - low).clamp(min=1e-8) / (LEVELS - 1), low


def _round(w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round((w - low[:, None]) / scale[:, None]), 0, LEVELS - 1)


def round_to_nearest(weight: torch.Tensor, group_size: int = GROUP_SIZE):
    """weight (out, in) -> q (out, in) in 0..15, scales, zeros (out, in / group): each weight rounded alone."""
    groups = weight.float().reshape(weight.shape[0], -1, group_size)  # (out, n_groups, group)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scales = (high - low).clamp(min=1e-8) / (LEVELS - 1)
    q = torch.clamp(torch.round((groups - low[..., None]) / scales[..., None]), 0, LEVELS - 1)
    return q.reshape(weight.shape).to(torch.uint8), scales, low + MIDPOINT * scales


def gptq(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = GROUP_SIZE):
    """weight (out, in), hessian (in, in) = sum of x^T x over calibration rows -> q, scales, zeros as
    ``round_to_nearest``, rounded column by column with each error spread over the later columns."""
    w = weight.double().clone()
    h = hessian.double().clone()
    n_out, n_in = w.shape
    if n_in % group_size or group_size % 2 or BLOCK % group_size:
        raise ValueError(f"{n_in} input columns do not split into groups of {group_size} (a divisor of {BLOCK})")
    dead = torch.diag(h) == 0  # inputs never seen: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h_inv = _inverse_factor(h)
    q = torch.zeros(n_out, n_in, dtype=torch.uint8)
    scales = torch.zeros(n_out, n_in // group_size, dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    for start in range(0, n_in, BLOCK):
        stop = min(start + BLOCK, n_in)
        block, errors, h_block = w[:, start:stop].clone(), torch.zeros(n_out, stop - start, dtype=w.dtype), \
            h_inv[start:stop, start:stop]  # fmt: skip
        for i in range(stop - start):
            column = start + i
            if column % group_size == 0:  # the group's range after the errors spread into it so far
                scale, low = _group_params(block[:, i : i + group_size])
                scales[:, column // group_size], zeros[:, column // group_size] = scale, low + MIDPOINT * scale
            rounded = _round(block[:, i : i + 1], scale, low)[:, 0]
            q[:, column] = rounded.to(torch.uint8)
            error = (block[:, i] - (rounded * scale + low)) / h_block[i, i]
            block[:, i:] -= error[:, None] * h_block[i, i:][None]
            errors[:, i] = error
        w[:, stop:] -= errors @ h_inv[start:stop, stop:]
    return q, scales.float(), zeros.float()


def _inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping)^-1, whose row i says how column i's error moves the columns
    after it; the damping grows tenfold while H is too ill-conditioned to factor."""
    eye, mean = torch.eye(h.shape[0], dtype=h.dtype), torch.mean(torch.diag(h))
    for damp in (DAMP, 10 * DAMP, 100 * DAMP):
        try:
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h + damp * mean * eye)),
                                         upper=True)  # fmt: skip
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("gptq: a layer's input statistics cannot be factored even with strong damping; calibrate "
                     "on more (or more varied) examples")  # fmt: skip


# ---- calibration -------------------------------------------------------------------------------------------


def _targets(llm: nn.Module) -> dict[str, list[str]]:
    """The layers to quantize, by the name of the layer each one's ``H`` is measured on: a fused group's first
    member (q_proj, gate_proj), every other linear layer itself; the output layer by its name."""
    groups: dict[str, list[str]] = {}
    for parent_name, parent in llm.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        fused_members = set()
        for names in FUSED.values():
            if all(type(getattr(parent, n, None)) is nn.Linear for n in names):
                groups[prefix + names[0]] = [prefix + n for n in names]
                fused_members.update(names)
        for name, child in parent.named_children():
            if type(child) is nn.Linear and name not in fused_members:
                groups[prefix + name] = [prefix + name]
    return groups


def collect_hessians(model: SpeechLLM, sources: list, progress: bool = True) -> dict[str, torch.Tensor]:
    """The sum of x^T x of every linear layer's inputs over the full-source greedy decodes of ``sources``
    (audio arrays or word lists). The output layer sees only the rows whose logits a session reads (the last of
    each forward), which are the rows it will see in use."""
    from .engine import translate_offline

    hessians: dict[str, torch.Tensor] = {}
    inputs: dict[str, list[torch.Tensor]] = {}  # one example's rows, folded into its H after the example

    def keep(name: str, x: torch.Tensor) -> None:
        inputs.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).float())

    hooks = [module.register_forward_hook(lambda m, args, out, name=name: keep(name, args[0]))
             for name, module in model.llm.named_modules() if type(module) is nn.Linear]  # fmt: skip
    try:
        with torch.inference_mode():
            for source in tqdm(sources, desc="gptq: calibration decodes", unit="ex", disable=not progress):
                translate_offline(model, source)
                for name, rows in inputs.items():
                    x = torch.cat(rows)  # (rows, in)
                    hessians[name] = hessians.get(name, 0) + x.T @ x
                inputs.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return hessians


def calibrate(model: SpeechLLM, sources: list, group_size: int = GROUP_SIZE, progress: bool = True) -> dict:
    """Quantize the LLM's linear layers by GPTQ on ``sources`` -> {layer name: (q, scales, zeros)} (fused names
    for q/k/v and gate/up), the state ``quantize_int4`` applies and ``save_weights`` stores."""
    if model.training:
        raise ValueError("gptq calibration is for inference: call model.eval() first")
    merge_lora(model.llm)
    hessians = collect_hessians(model, sources, progress)
    modules = dict(model.llm.named_modules())
    state = {}
    for key, names in tqdm(_targets(model.llm).items(), desc="gptq: layers", unit="layer", disable=not progress):
        if key not in hessians:
            raise RuntimeError(f"gptq: layer {key} saw no calibration input; is it used by the forward?")
        weight = torch.cat([modules[n].weight.detach().float() for n in names])
        state[_stored_name(names)] = gptq(weight, hessians[key], group_size)
    return state


def _stored_name(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    parent, _, first = names[0].rpartition(".")
    fused = next(f for f, members in FUSED.items() if members[0] == first)
    return f"{parent}.{fused}"


# ---- applying and storing ----------------------------------------------------------------------------------


def quantize_int4(model: SpeechLLM, state: dict) -> SpeechLLM:
    """In place: merge LoRA, then put ``state``'s 4-bit layers (``calibrate``) in place of the LLM's linear
    layers; a fused layer's members become ``RowsOf`` it."""
    if model.training:
        raise ValueError("quantize_int4 is for inference: call model.eval() first (a 4-bit model cannot train)")
    merge_lora(model.llm)
    untie_output(model.llm)
    modules = dict(model.llm.named_modules())
    expected = set(_targets(model.llm))
    if len(state) != len(expected):
        raise ValueError(f"4-bit weights for {len(state)} layers, but this LLM has {len(expected)} to quantize; "
                         "were they calibrated for another model? Run python -m streaming_llm.gptq again")  # fmt: skip
    for name, (q, scales, zeros) in state.items():
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model.llm
        layer = Int4Linear.of(q, scales, zeros)
        if attr in FUSED:
            put_fused(parent, attr, layer)
        else:
            setattr(parent, attr, layer)
    return model


def save_weights(state: dict, path: Path, meta: dict) -> None:
    """q packed two to a byte (low nibble first), scales and zeros in bfloat16, and what they were made from."""
    packed = {name: ((q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), s.to(torch.bfloat16), z.to(torch.bfloat16))
              for name, (q, s, z) in state.items()}  # fmt: skip
    tmp = path.with_suffix(".tmp")
    torch.save({"format": FORMAT, "meta": meta, "layers": packed}, tmp)
    tmp.replace(path)


def _read_weights(path: Path) -> dict:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a 4-bit weights file of this toolkit; delete it and run "
                         "python -m streaming_llm.gptq CHECKPOINT")  # fmt: skip
    return data


def load_weights(path: Path) -> dict:
    return _unpack(_read_weights(path))


def _unpack(data: dict) -> dict:
    state = {}
    for name, (packed, scales, zeros) in data["layers"].items():
        q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        state[name] = (q, scales, zeros)
    return state


def calibration_sources(checkpoint: str | Path, manifest: str | Path | None = None,
                        n: int = CALIBRATION_EXAMPLES) -> list:  # fmt: skip
    """The first ``n`` usable rows of ``manifest`` (default: the checkpoint's own ``train_manifest``), as a
    session takes them: audio arrays (speech) or word lists (text)."""
    import json

    from speech_frontend.audio import load_audio_spec
    from training.data import load_examples

    from .checkpoint import read_meta
    from .config import SPEECH

    meta = read_meta(checkpoint)
    train_config = meta.get("extra", {}).get("train_config", {})
    manifest = manifest or train_config.get("train_manifest")
    if not manifest or not Path(manifest).is_file():
        raise ValueError(f"{checkpoint}: 4-bit calibration needs examples like the model's input, and its training "
                         f"manifest {manifest or '(not recorded)'} is not here; make the 4-bit weights with "
                         f"python -m streaming_llm.gptq {checkpoint} --calibration TSV (a manifest of the same kind of "
                         "source)")  # fmt: skip
    config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    modality = config["modality"]
    examples = load_examples(manifest, modality, 20.0, 200, skip_bad=True)[:n]
    if modality == SPEECH:
        return [load_audio_spec(e.source) for e in examples]
    return [e.source.split() for e in examples]


def int4_weights(checkpoint: str | Path, model: SpeechLLM, manifest: str | Path | None = None,
                 group_size: int | None = None) -> dict:  # fmt: skip
    """The checkpoint's 4-bit weights: from ``int4-g<group>.pt`` beside it (any of GROUP_SIZES, the one
    ``python -m streaming_llm.gptq --group-size`` made; ``group_size``: that one only), made first at
    ``group_size`` or GROUP_SIZE (calibrating the float32 ``model``, which is left merged but not quantized) when
    missing or made from other checkpoint weights (the file records their SHA-256, so a copied checkpoint keeps
    its 4-bit weights whatever the copy did to the files' times; a file without it, from before, is taken when it
    is newer than the checkpoint's weights)."""
    weights = Path(checkpoint) / "model.safetensors"
    digest = file_sha256(weights) if weights.is_file() else None  # ~1 s for a full checkpoint
    for path in [weights_file(checkpoint, size) for size in ([group_size] if group_size else GROUP_SIZES)]:
        if not path.is_file():
            continue
        data = _read_weights(path)
        made_from = data.get("meta", {}).get("checkpoint_sha256")
        if made_from is None:  # written before the digest was kept
            fresh = digest is None or path.stat().st_mtime >= weights.stat().st_mtime
        else:
            fresh = made_from == digest
        if fresh:
            return _unpack(data)
    group_size = group_size or GROUP_SIZE
    path = weights_file(checkpoint, group_size)
    sources = calibration_sources(checkpoint, manifest)
    log.info("%s: no 4-bit weights for these checkpoint weights yet; GPTQ on %d calibration examples (a few "
             "minutes, once)", checkpoint, len(sources))  # fmt: skip
    start = time.time()
    state = calibrate(model, sources, group_size)
    meta = {"examples": len(sources), "group_size": group_size, "seconds": time.time() - start,
            "checkpoint_sha256": digest}  # fmt: skip
    save_weights(state, path, meta)
    log.info("wrote %s (%.0f s)", path, time.time() - start)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming_llm.gptq", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--calibration", help="a manifest TSV (default: the checkpoint's train_manifest)")
    parser.add_argument("--group-size", type=int, default=GROUP_SIZE, metavar="{32,64,128}",
                        help=f"input columns per scale and zero point (default: {GROUP_SIZE})")  # fmt: skip
    args = parser.parse_args(argv)
    if args.group_size not in GROUP_SIZES:
        parser.error(f"--group-size {args.group_size}: must be 32, 64 or 128 (the group sizes of PyTorch's 4-bit "
                     f"kernel that divide GPTQ's block of {BLOCK} columns)")  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from .checkpoint import CheckpointError, load_checkpoint

    try:
        model = load_checkpoint(args.checkpoint, merge_lora=True)
        modules = dict(model.llm.named_modules())
        for key in _targets(model.llm):  # refused now, not after the calibration decodes (minutes)
            if modules[key].in_features % args.group_size:
                print(f"error: --group-size {args.group_size}: layer {key} has {modules[key].in_features} input "
                      f"columns, not a multiple of it; choose a size that divides every layer (e.g. "
                      f"{GROUP_SIZE})", file=sys.stderr)  # fmt: skip
                return 2
        for size in GROUP_SIZES:  # the weights beside a checkpoint are the last ones made: --int4 takes them
            weights_file(args.checkpoint, size).unlink(missing_ok=True)
        int4_weights(args.checkpoint, model, args.calibration, args.group_size)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(weights_file(args.checkpoint, args.group_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
