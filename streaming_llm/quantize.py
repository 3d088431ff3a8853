"""Faster inference on a CPU: the LLM in float16, or its linear layers in int8; LoRA merged first.

A streaming step feeds a few rows at a time, so its cost is reading the LLM's weights (540 MB in float32 for
SmolLM2-135M). Both options read fewer bytes; both change the model in place for inference only (no training,
no saving), and the Whisper encoder and the speech adapter stay float32 (they are small, and a block is encoded
once):

- ``half_precision(model)``: the LLM's weights, and so its activations, in float16 (half the bytes). The
  adapter's float32 units are cast at the LLM's input (``SpeechLLM.lm_dtype``).
- ``quantize_int8(model)``: weights stored as int8 with one scale per output row, activations quantized per
  batch at run time (``torch.ao.quantization.quantize_dynamic``, the fbgemm kernels of the CPU build): a
  quarter of the bytes, but more work per layer.

Which is faster depends on the CPU's kernels: on the 2-core AVX2 machine of the README a one-row forward (a
target token) took 94-105 ms in float32, 54-69 ms in int8 and 52-68 ms in float16, but an 11-row forward (a
source block) 181, 64 and 211 ms (2 threads). float16 kept 28 of 30 test predictions of the float32 model and
all its delays; int8 none. The engine's exactness invariant holds for the float32 model only; measure what each
costs (``benchmarks/streaming_cost.py --fp16/--int8`` for speed, a SimulEval run with ``--fp16``/``--int8``
for quality).
"""

from __future__ import annotations

import warnings

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


def quantize_int8(model: SpeechLLM) -> SpeechLLM:
    """In place: merge LoRA, quantize the LLM's nn.Linear layers (output layer included) to int8."""
    if model.training:
        raise ValueError("quantize_int8 is for inference: call model.eval() first (an int8 model cannot train)")
    merge_lora(model.llm)
    output = model.llm.get_output_embeddings()
    if output is not None and output.weight is model.llm.get_input_embeddings().weight:
        model.llm.config.tie_word_embeddings = False  # the int8 output layer gets its own copy of the weights
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize.*", category=UserWarning)
        torch.ao.quantization.quantize_dynamic(model.llm, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def half_precision(model: SpeechLLM) -> SpeechLLM:
    """In place: merge LoRA, then put the LLM's weights in float16 (its activations follow)."""
    if model.training:
        raise ValueError("half_precision is for inference: call model.eval() first (a float16 model cannot train)")
    merge_lora(model.llm)
    model.llm.to(torch.float16)
    return model


PRECISIONS = ("fp32", "fp16", "int8")  # what the agent, live and serve accept


def set_precision(model: SpeechLLM, precision: str) -> SpeechLLM:
    """In place: the LLM in ``precision`` (one of PRECISIONS); float32 is left as it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16":
        return half_precision(model)
    if precision == "int8":
        return quantize_int8(model)
    return model


def precision_from_flags(int8: bool = False, fp16: bool = False) -> str:
    """The ``--int8`` / ``--fp16`` flags of a command line -> one of PRECISIONS."""
    if int8 and fp16:
        raise ValueError("--int8 and --fp16 both given: choose one precision for the LLM")
    return "int8" if int8 else "fp16" if fp16 else "fp32"
