"""int8 inference: LoRA merged into its base weights, then the LLM's linear layers quantized dynamically.

``quantize_int8(model)`` changes the model in place for inference only (no training, no saving): weights
are stored as int8 with one scale per output row and activations are quantized per batch at run time
(``torch.ao.quantization.quantize_dynamic``, the fbgemm kernels of the CPU build). A streaming step feeds a
few rows at a time, so its cost is reading the weights: int8 reads a quarter of the bytes. The Whisper
encoder stays float32 (it is small and its blocks are computed once). The outputs differ slightly from the
float32 model's, so the engine's exactness invariant holds for the float32 model only; measure what int8
costs in quality (``benchmarks/streaming_cost.py --int8`` for speed, a sweep with ``--int8`` for quality).
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
