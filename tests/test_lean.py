"""The lean Llama forward computes what transformers' forward computes, for one session's streaming steps."""

import pytest
import torch
import torch._dynamo
from transformers import DynamicCache

from streaming_llm.lean import compile_steps, cxx_compiler, is_compiled, lean_forward, supports_lean
from streaming_llm.model import run_llm
from streaming_llm.quantize import quantize_int8
from streaming_llm.tiny import tiny_model


def _steps(llm, forward):
    """A 7-row prefix under a causal mask, then a 3-row block and a 1-row step over the cache -> their outputs."""
    torch.manual_seed(0)
    d = llm.config.hidden_size
    cache, outs, past = DynamicCache(), [], 0
    for q in (7, 3, 1):
        with torch.inference_mode():  # as the engine makes its inputs
            x = torch.randn(1, q, d) * 0.5
            positions = torch.arange(past, past + q)[None]
            allowed = torch.ones(q, past + q, dtype=torch.bool).tril(diagonal=past)
            if past:
                allowed[0, past - 2] = False  # a row that may not see an earlier entry (as source rows skip targets)
            mask = torch.zeros(1, 1, q, past + q).masked_fill(~allowed, float("-inf"))
            outs.append(forward(llm, x, positions, mask, cache))
        past += q
    return outs


def test_lean_forward_equals_the_transformers_forward_step_by_step():
    llm = tiny_model("text", seed=3).eval().llm
    assert supports_lean(llm)
    lean = _steps(llm, lambda *a: lean_forward(*a, logits_to_keep=0))
    full = _steps(llm, lambda *a: run_llm(*a, logits_to_keep=0))
    for a, b in zip(lean, full, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.hidden_states[-1], b.hidden_states[-1], atol=1e-5, rtol=1e-5)


def test_lean_forward_keeps_the_rows_it_is_asked_for():
    llm = tiny_model("text", seed=3).eval().llm
    x, positions = torch.randn(1, 5, llm.config.hidden_size), torch.arange(5)[None]
    mask = torch.zeros(1, 1, 5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    with torch.inference_mode():
        every = lean_forward(llm, x, positions, mask, DynamicCache(), logits_to_keep=0).logits
        last = lean_forward(llm, x, positions, mask, DynamicCache(), logits_to_keep=1).logits
        some = lean_forward(llm, x, positions, mask, DynamicCache(), logits_to_keep=torch.tensor([0, 3])).logits
    assert every.shape[1] == 5 and last.shape[1] == 1 and some.shape[1] == 2
    torch.testing.assert_close(last[0, 0], every[0, -1])
    torch.testing.assert_close(some[0], every[0, [0, 3]])


def test_an_int8_llm_runs_lean_with_the_same_layers_as_transformers():
    model = quantize_int8(tiny_model("text", seed=3).eval())
    assert supports_lean(model.llm)
    lean = _steps(model.llm, lambda *a: lean_forward(*a, logits_to_keep=0))
    full = _steps(model.llm, lambda *a: run_llm(*a, logits_to_keep=0))
    for a, b in zip(lean, full, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_a_half_precision_llm_is_left_to_transformers():
    llm = tiny_model("text", seed=3).eval().llm.to(torch.float16)
    assert not supports_lean(llm)


def test_a_4bit_llm_runs_lean_with_the_same_layers_as_transformers():
    from streaming_llm import gptq

    model = tiny_model("text", seed=3).eval()
    state = gptq.calibrate(model, [["a", "house", "is", "here"], ["the", "dog", "runs"]], progress=False)
    llm = gptq.quantize_int4(model, state).llm
    assert supports_lean(llm) and isinstance(llm.model.layers[0].self_attn.k_proj, gptq.RowsOf)
    lean = _steps(llm, lambda *a: lean_forward(*a, logits_to_keep=0))
    full = _steps(llm, lambda *a: run_llm(*a, logits_to_keep=0))
    for a, b in zip(lean, full, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def _tiny_llm(precision: str):
    model = tiny_model("text", seed=3).eval()
    if precision == "int8":
        model = quantize_int8(model)
    elif precision == "int4":
        from streaming_llm import gptq

        state = gptq.calibrate(model, [["a", "house", "is", "here"], ["the", "dog", "runs"]], progress=False)
        model = gptq.quantize_int4(model, state)
    return model.llm


@pytest.mark.skipif(cxx_compiler() is None, reason="TorchInductor needs a C++ compiler (make setup installs g++)")
@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_compiled_steps_equal_the_eager_steps(precision):
    llm = _tiny_llm(precision)
    eager = _steps(llm, lambda *a: lean_forward(*a, logits_to_keep=0))
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    seconds = compile_steps(llm)
    assert is_compiled(llm) and seconds > 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs - before >= 3  # the warm-up's: a prompt into an empty cache, a block of rows, one row
    compiled = _steps(llm, lambda *a: lean_forward(*a, logits_to_keep=0))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # the steps compiled nothing more
    tolerance = 1e-4 if precision == "fp32" else 1e-3  # bfloat16 inputs to the int8/4-bit products may round apart
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(a.hidden_states[-1], b.hidden_states[-1], atol=tolerance, rtol=tolerance)


def test_a_compiler_failure_leaves_the_lm_eager_and_says_to_run_without_compile(monkeypatch):
    llm = tiny_model("text", seed=3).eval().llm

    def broken(*args, **kwargs):
        raise RuntimeError("g++: fatal error: Python.h: No such file or directory\ncompilation terminated.")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    if cxx_compiler() is None:
        monkeypatch.setattr("streaming_llm.lean.cxx_compiler", lambda: "/usr/bin/g++")
    with pytest.raises(ValueError, match=r"failed \(RuntimeError: g\+\+: fatal error: Python.h.*run without --compile"):
        compile_steps(llm)
    assert not is_compiled(llm)
    assert lean_forward(llm, torch.randn(1, 2, llm.config.hidden_size), torch.arange(2)[None],
                        torch.zeros(1, 1, 2, 2), DynamicCache()).logits.shape[1] == 1  # fmt: skip


@pytest.mark.parametrize(("key", "value"), [("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True),
                                            ("pretraining_tp", 2)])  # fmt: skip
def test_a_llama_the_lean_forward_does_not_compute_is_left_to_transformers(key: str, value):
    """lean_forward has SiLU, no biases and unsliced projections built in: a Llama of another kind would get other
    logits from it."""
    llm = tiny_model("text", seed=3).eval().llm
    setattr(llm.config, key, value)
    assert not supports_lean(llm)
