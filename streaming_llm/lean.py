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

``compile_steps`` (``--compile`` on the agent, ``live`` and ``serve``) hands the decoder layers to
``torch.compile``: TorchInductor fuses what lies between the products (norms, rotary embedding, casts, residual
adds) into C++ loops and calls the products' kernels from one generated function, once per step instead of ~1,500
small operations. With the 4-bit LLM of ``gptq.py`` a one-row step of the speech model went from 14.5 to 11.5 ms
and an utterance's offline decode from 375 to 301 ms here (the kernels alone: ~6 ms per step). Compiling costs
~50 s per process (~2.5 min the first time on a machine: TorchInductor keeps its C++ in a cache under /tmp).
"""

from __future__ import annotations

import shutil
import time
import weakref
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

COMPILED = "_lean_compiled_layers"  # where compile_steps keeps the compiled layers, in the LM's __dict__
WARM_UP_ROWS = (9, 4, 1, 1, 3)  # the row counts compile_steps feeds: every shape family a session reaches
_COMPILED_LMS: weakref.WeakSet = weakref.WeakSet()  # the LM whose layers are compiled now (one per process)


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
    The layers run compiled when ``compile_steps`` was called on ``llm``, else eagerly.
    """
    cos, sin = llm.model.rotary_emb(x, positions)  # (1, q, head_dim) each
    keys, values = _past(llm, cache, x)
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    compiled = llm.__dict__.get(COMPILED)
    if compiled is None:
        h, keys, values = _layers(llm, x, cos, sin, mask, keys, values)
    else:  # contiguous: the compiled code is specialised to dense layouts (a cropped cache is a strided view)
        dense = [t.contiguous() for t in (x, cos, sin, mask)]
        h, keys, values = compiled(*dense, [k.contiguous() for k in keys], [v.contiguous() for v in values])
    _store(cache, keys, values)
    if isinstance(logits_to_keep, torch.Tensor):
        kept = h[:, logits_to_keep]
    else:
        kept = h[:, -logits_to_keep:] if logits_to_keep else h
    return SimpleNamespace(logits=llm.lm_head(kept), hidden_states=(h,), attentions=None)


def _layers(
    llm: PreTrainedModel, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
    keys: list[torch.Tensor], values: list[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """The decoder layers and the final norm: x (1, q, d), past keys/values (1, kv_heads, past, head_dim) per layer
    -> h (1, q, d), and keys/values with the q new entries appended (the cache's next contents)."""
    config = llm.config
    n_heads, n_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    q_len = x.shape[1]
    h, new_keys, new_values = x, [], []
    for i, layer in enumerate(llm.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        normed = _rms_norm(layer.input_layernorm, h)
        if hasattr(attn, "fused_qkv"):  # quantize.py's int8 and gptq.py's 4-bit layers: one product for the three
            q, k, v = attn.fused_qkv(normed).split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
        else:
            q, k, v = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
        q = q.view(1, q_len, n_heads, head_dim).transpose(1, 2)  # (1, heads, q, head_dim)
        k = k.view(1, q_len, n_kv, head_dim).transpose(1, 2)
        v = v.view(1, q_len, n_kv, head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = torch.cat([keys[i], k], dim=-2), torch.cat([values[i], v], dim=-2)  # as DynamicCache.update does
        new_keys.append(k)
        new_values.append(v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=n_kv != n_heads)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(1, q_len, n_heads * head_dim))
        normed = _rms_norm(layer.post_attention_layernorm, h)
        if hasattr(mlp, "fused_gate_up"):
            gate, up = mlp.fused_gate_up(normed).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(normed), mlp.up_proj(normed)
        h = h + mlp.down_proj(F.silu(gate) * up)
    return _rms_norm(llm.model.norm, h), new_keys, new_values


def _past(llm: PreTrainedModel, cache: DynamicCache, x: torch.Tensor) -> tuple[list, list]:
    """The cache's keys and values per layer; an empty cache's as (1, kv_heads, 0, head_dim) tensors."""
    config = llm.config
    empty = x.new_zeros(1, config.num_key_value_heads, 0, _head_dim(config))
    keys, values = [], []
    for i in range(config.num_hidden_layers):
        stored = cache.layers[i] if i < len(cache.layers) else None
        live = stored is not None and stored.is_initialized and stored.keys.dim() == 4
        keys.append(stored.keys if live else empty)
        values.append(stored.values if live else empty)
    return keys, values


def _store(cache: DynamicCache, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Make ``keys``/``values`` (past and new entries) the cache's contents, as ``DynamicCache.update`` would."""
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        stored = cache.layers[i] if i < len(cache.layers) else None
        if stored is not None and stored.is_initialized:
            stored.keys, stored.values = k, v
        else:  # a layer not yet made: update() makes it, from empty
            cache.update(k, v, i)


# ---- compiled steps ------------------------------------------------------------------------------------------


def compile_steps(llm: PreTrainedModel) -> float:
    """From now on ``lean_forward`` runs ``llm``'s layers compiled by ``torch.compile`` (TorchInductor: the small
    operations between the products fused into C++ loops); compiles them now, on a warm-up of the shapes a
    streaming session feeds (a prompt into an empty cache, a block of rows, one row), so that no instance pays for
    it. Returns the seconds it took. Needs a C++ compiler; the values equal the eager ones up to float rounding.
    One LM per process runs compiled: compiling another returns the earlier one to eager steps. Steps run under
    ``torch.inference_mode`` with inputs made there, as the engine's are (others compile a second variant, once).
    """
    if not supports_lean(llm):
        raise ValueError(f"compiled steps need a float32 Llama-shaped LM (lean.supports_lean); this is a "
                         f"{llm.config.model_type} with {llm.get_input_embeddings().weight.dtype} weights")  # fmt: skip
    if cxx_compiler() is None:
        raise ValueError("compiled steps need a C++ compiler for TorchInductor and none is on PATH (g++, c++, "
                         "clang++); install one (Debian: apt-get install g++) or run without --compile")  # fmt: skip
    # every LM's compiled layers are entries of one function's cache (``_layers``), which keeps at most 8: an
    # earlier LM's entries go, or a third LM compiled in one process would run eagerly without a word
    torch._dynamo.reset()
    for other in list(_COMPILED_LMS):
        other.__dict__.pop(COMPILED, None)
    _COMPILED_LMS.add(llm)
    llm.__dict__[COMPILED] = torch.compile(partial(_layers, llm), dynamic=True)
    start = time.perf_counter()
    d = llm.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode():
            cache, past = DynamicCache(), 0
            for q_len in WARM_UP_ROWS:
                x = torch.randn(1, q_len, d, generator=generator) * 0.1
                positions = torch.arange(past, past + q_len)[None]
                mask = torch.zeros(1, 1, q_len, past + q_len)
                mask[..., past:] = torch.full((q_len, q_len), float("-inf")).triu(1)
                lean_forward(llm, x, positions, mask, cache)
                past += q_len
    except Exception as e:  # TorchInductor's failures (a compiler error, a missing header) are long; keep the gist
        llm.__dict__.pop(COMPILED, None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"compiling the LM's steps failed ({type(e).__name__}: {first[:300]}); "
                         "run without --compile") from e  # fmt: skip
    return time.perf_counter() - start


def cxx_compiler() -> str | None:
    """The C++ compiler TorchInductor would use, or None (then ``compile_steps`` cannot work)."""
    return next((path for name in ("g++", "c++", "clang++") if (path := shutil.which(name))), None)


def is_compiled(llm: PreTrainedModel) -> bool:
    return COMPILED in llm.__dict__


def _rms_norm(norm, h: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm`` of float32 rows, op for op (so the values are the same to the last bit)."""
    return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)
