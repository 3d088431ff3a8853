"""Faster inference on a CPU: the LLM in float16, or its linear layers in int8 (or 4 bits: ``gptq.py``); LoRA
merged first.

A streaming step feeds a few rows at a time, so its cost is reading the LLM's weights (540 MB in float32 for
SmolLM2-135M). Both options read fewer bytes; both change the model in place for inference only (no training,
no saving), and the Whisper encoder and the speech adapter stay float32 (they are small, and a block is encoded
once):

- ``half_precision(model)``: the LLM's weights, and so its activations, in float16 (half the bytes). The
  adapter's float32 units are cast at the LLM's input (``SpeechLLM.lm_dtype``).
- ``quantize_int8(model)``: weights stored as int8 with one scale per output row (``Int8Linear``); each layer
  multiplies bfloat16 activations by them (``torch._weight_int8pack_mm``) and hands float32 back, so norms,
  attention and the residual stream stay float32: a quarter of the bytes.

On the 2-core Xeon (AVX-512, AMX) of the README a one-row forward of SmolLM2-135M (a target token, through
``lean.lean_forward``) took 32-40 ms in float32 and 22-25 ms in int8 (the machine's speed drifts by about 15% from
hour to hour); an 11-row one (a source block) 61-69 and 42-49 ms.
float16 gains nothing there (oneDNN's one-row float16 and bfloat16 products are no faster than float32's).
On the earlier AVX2 machine the README's first numbers came from, float16 halved the one-row cost. int8 moves
logits by up to about 1.3 (mean 0.17) on a 40-token sentence and changes a close greedy choice now and then (on
100 test utterances: 42-45 predictions identical to float32's, chrF 16.30-16.59 against 16.13-16.50);
the engine's exactness invariant holds for the float32 model only; measure what each costs
(``benchmarks/streaming_cost.py --fp16/--int8`` for speed, a SimulEval run with ``--fp16``/``--int8`` for
quality).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .model import SpeechLLM


def merge_lora(module: nn.Module) -> int:
    """Fold every peft LoRA layer into its base layer and put the base layer in its place -> layers merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
                merged += 1
    return merged


class Int8Linear(nn.Module):
    """A linear layer without bias whose weights are int8, one bfloat16 scale per output row (inference only)."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) bfloat16

    @classmethod
    def of(cls, *linears: nn.Linear) -> Int8Linear:
        """One int8 layer computing the outputs of ``linears`` (same input) end to end."""
        if any(layer.bias is not None for layer in linears):
            raise ValueError("Int8Linear takes linear layers without bias")
        weight = torch.cat([layer.weight.detach().float() for layer in linears])  # (out, in)
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        return cls(torch.round(weight / scales[:, None]).to(torch.int8), scales.to(torch.bfloat16))

    def rows(self, start: int, stop: int) -> Int8Linear:
        """The layer of output rows start:stop, sharing this one's weights (no copy)."""
        return Int8Linear(self.weight_int8[start:stop], self.scales[start:stop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out), in x's dtype
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.device.type == "cpu":
            y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scales)
        else:  # the fused kernel is the CPU build's; elsewhere the same product, dequantized first
            y = self.dequantized_product(rows)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantized_product(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (n, in) bfloat16 -> (n, out): what the int8 kernel computes, with the weights made bfloat16."""
        weight = self.weight_int8.to(torch.bfloat16) * self.scales[:, None]
        return rows @ weight.T


FUSED = {"fused_qkv": ("q_proj", "k_proj", "v_proj"), "fused_gate_up": ("gate_proj", "up_proj")}  # lean.py


def untie_output(llm: nn.Module) -> None:
    """A quantized output layer gets its own copy of the weights: the input embeddings stay float32."""
    output = llm.get_output_embeddings()
    if output is not None and output.weight is llm.get_input_embeddings().weight:
        llm.config.tie_word_embeddings = False


def put_fused(module: nn.Module, fused_name: str, fused: nn.Module) -> None:
    """Set ``module.<fused_name>`` (a ``FUSED`` layer) and make each member layer the rows of it that it was."""
    start = 0
    for name in FUSED[fused_name]:
        size = getattr(module, name).out_features
        setattr(module, name, fused.rows(start, start + size))
        start += size
    setattr(module, fused_name, fused)


def quantize_int8(model: SpeechLLM) -> SpeechLLM:
    """In place: merge LoRA, then every linear layer of the LLM (output layer included) an ``Int8Linear``.

    Layers that read the same input (a Llama's q/k/v projections, its gate and up projections) are quantized
    as one ``fused_*`` layer of their module, which ``lean.lean_forward`` runs as one product; the separate
    layers stay, as views of its rows, for ``transformers``' own forward.
    """
    if model.training:
        raise ValueError("quantize_int8 is for inference: call model.eval() first (an int8 model cannot train)")
    merge_lora(model.llm)
    untie_output(model.llm)
    for module in list(model.llm.modules()):
        for fused_name, names in FUSED.items():
            parts = [getattr(module, name, None) for name in names]
            if not all(type(p) is nn.Linear and p.bias is None for p in parts):
                continue
            put_fused(module, fused_name, Int8Linear.of(*parts))
    for parent in list(model.llm.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                setattr(parent, name, Int8Linear.of(child))
    return model


def half_precision(model: SpeechLLM) -> SpeechLLM:
    """In place: merge LoRA, then put the LLM's weights in float16 (its activations follow)."""
    if model.training:
        raise ValueError("half_precision is for inference: call model.eval() first (a float16 model cannot train)")
    merge_lora(model.llm)
    model.llm.to(torch.float16)
    return model


PRECISIONS = ("fp32", "fp16", "int8", "int4")  # what the agent, live and serve accept


def set_precision(model: SpeechLLM, precision: str, checkpoint: str | Path | None = None) -> SpeechLLM:
    """In place: the LLM in ``precision`` (one of PRECISIONS); float32 is left as it is. int4 takes the GPTQ
    weights kept beside ``checkpoint`` (``gptq.int4_weights``: calibrated on first use)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16":
        return half_precision(model)
    if precision == "int8":
        return quantize_int8(model)
    if precision == "int4":
        from .gptq import int4_weights, quantize_int4

        if checkpoint is None:
            raise ValueError("int4 needs the checkpoint directory: its 4-bit weights are calibrated for it")
        return quantize_int4(model, int4_weights(checkpoint, model))
    return model


def add_precision_args(parser, fp16: bool = True) -> None:
    """The flags that say how the LLM runs, the same on the agent, ``live`` and ``serve``: ``--int8``, ``--int4``,
    ``--fp16`` (not the agent's: SimulEval has its own) and ``--compile``; ``precision_from_flags`` reads them."""
    parser.add_argument("--int8", action="store_true",
                        help="the LLM in int8 (streaming_llm/quantize.py): faster on CPU, slightly different")
    parser.add_argument("--int4", action="store_true",
                        help="the LLM in 4 bits (streaming_llm/gptq.py; calibrated on the checkpoint's training "
                             "data the first time, then kept beside it as int4-g32.pt, or the int4-g*.pt that "
                             "python -m streaming_llm.gptq --group-size made): faster still")
    if fp16:
        parser.add_argument("--fp16", action="store_true",
                            help="the LLM in float16 (streaming_llm/quantize.py): faster on some CPUs")
    parser.add_argument("--compile", action="store_true",
                        help="compile the LLM's streaming steps (torch.compile, TorchInductor: needs a C++ compiler; "
                             "about a minute at start, then faster steps on CPU)")  # fmt: skip


def precision_from_flags(int8: bool = False, fp16: bool = False, int4: bool = False) -> str:
    """The ``--int8`` / ``--fp16`` / ``--int4`` flags of a command line -> one of PRECISIONS."""
    given = [flag for flag, on in (("--int8", int8), ("--fp16", fp16), ("--int4", int4)) if on]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} both given: choose one precision for the LLM")
    return "int8" if int8 else "fp16" if fp16 else "int4" if int4 else "fp32"
