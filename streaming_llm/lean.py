"""A lean forward of a Llama-shaped LM for streaming steps: the same arithmetic, without the framework's layers.

A streaming step feeds one row (a target token) or a block of rows (new source) over a KV cache. For
SmolLM2-135M a one-row forward through ``transformers`` costs 38-44 ms on the 2-core Xeon of the README, of
which about 24 ms are the matrix multiplies and most of the rest is the framework's per-layer machinery (output
capture, mask and cache bookkeeping, dtype round trips). ``lean_forward`` runs the same modules and kernels
(RMSNorm's arithmetic, rotary embedding, the projection layers as they are: float32, LoRA or int8,
scaled-dot-product attention) in the order ``LlamaDecoderLayer`` does, and nothing else: 32-35 ms in float32
(the same logits to the last bit there), 22-25 ms with the int8 projections of ``quantize.py``.

It serves ``batching.forward_one`` when no attention weights are asked for (the attention head needs them:
``transformers``' eager attention returns them) and the LM is a float32 Llama without biases; anything else
goes through ``transformers`` unchanged (``supports_lean``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel


def supports_lean(llm: PreTrainedModel) -> bool:
    """Whether ``lean_forward`` computes what ``llm``'s own forward does: a Llama with float32 activations (its
    projections float32, LoRA or int8), no biases, no tensor-parallel slicing, a SiLU MLP."""
    config = llm.config
    return (
        config.model_type == "llama"
        and llm.get_input_embeddings().weight.dtype == torch.float32
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "pretraining_tp", 1) == 1
        and config.hidden_act == "silu"
    )


def lean_forward(
    llm: PreTrainedModel, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache,
    logits_to_keep: int | torch.Tensor = 1,
) -> SimpleNamespace:  # fmt: skip
    """x (1, q, d) new rows, positions (1, q), mask (1, 1, q, past + q) additive, cache extended in place ->
    ``logits`` (1, kept, V), ``hidden_states`` (last layer after the final norm: (1, q, d),) and no attentions.

    ``logits_to_keep``: n for the last n rows (0: all), or a tensor of row indices, as ``transformers``'.
    """
    core = llm.model
    config = llm.config
    n_heads, n_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    q_len = x.shape[1]
    cos, sin = core.rotary_emb(x, positions)  # (1, q, head_dim) each
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    h = x
    for i, layer in enumerate(core.layers):
        attn, mlp = layer.self_attn, layer.mlp
        normed = _rms_norm(layer.input_layernorm, h)
        if hasattr(attn, "fused_qkv"):  # quantize.py's int8 layers: one product for the three
            q, k, v = attn.fused_qkv(normed).split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
        else:
            q, k, v = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
        q = q.view(1, q_len, n_heads, head_dim).transpose(1, 2)  # (1, heads, q, head_dim)
        k = k.view(1, q_len, n_kv, head_dim).transpose(1, 2)
        v = v.view(1, q_len, n_kv, head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = cache.update(k, v, i)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=n_kv != n_heads)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(1, q_len, n_heads * head_dim))
        normed = _rms_norm(layer.post_attention_layernorm, h)
        if hasattr(mlp, "fused_gate_up"):
            gate, up = mlp.fused_gate_up(normed).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(normed), mlp.up_proj(normed)
        h = h + mlp.down_proj(F.silu(gate) * up)
    h = _rms_norm(core.norm, h)
    if isinstance(logits_to_keep, torch.Tensor):
        kept = h[:, logits_to_keep]
    else:
        kept = h[:, -logits_to_keep:] if logits_to_keep else h
    return SimpleNamespace(logits=llm.lm_head(kept), hidden_states=(h,), attentions=None)


def _rms_norm(norm, h: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm`` of float32 rows, op for op (so the values are the same to the last bit)."""
    return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)
