"""Faster inference: LoRA merged exactly; the int8 and float16 models stay close to float32 and stream."""

import pytest
import torch

from streaming_llm.engine import StreamingSession, translate_offline
from streaming_llm.quantize import half_precision, merge_lora, precision_from_flags, quantize_int8, set_precision
from streaming_llm.tiny import tiny_model

SOURCE = "I would like a cup of coffee in the garden .".split()


def _logits(model) -> torch.Tensor:
    session = StreamingSession(model)
    session.push_words(SOURCE[:4])
    first = session.next_logits().clone()
    session.push_words(SOURCE[4:])
    session.finish_source()
    return torch.stack([first, session.next_logits().clone()])


def test_merging_lora_keeps_the_logits():
    model = tiny_model("text", seed=1, llm_lora_r=4)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # peft starts B at zero: make the adapter do something
    before = _logits(model)
    assert merge_lora(model.llm) > 0
    assert not any("lora_" in name for name, _ in model.llm.named_parameters())
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-5)


def test_a_checkpoint_loads_with_its_lora_merged_for_inference(tmp_path):
    from streaming_llm.checkpoint import load_checkpoint, save_checkpoint

    model = tiny_model("text", seed=1, llm_lora_r=4)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_checkpoint(model.eval(), tmp_path / "ckpt")
    adapters = load_checkpoint(tmp_path / "ckpt")
    merged = load_checkpoint(tmp_path / "ckpt", merge_lora=True)
    assert any("lora_" in name for name, _ in adapters.named_parameters())
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), _logits(adapters), atol=1e-5, rtol=1e-5)


def test_int8_model_stays_close_to_float32_and_translates():
    model = tiny_model("text", seed=2)
    before = _logits(model)
    quantize_int8(model)
    after = _logits(model)
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    assert (after.argmax(-1) == before.argmax(-1)).all()
    assert isinstance(translate_offline(model, SOURCE, max_target_tokens=8), str)


def test_int8_refuses_a_model_in_training_mode():
    model = tiny_model("text").train()
    with pytest.raises(ValueError, match="for inference"):
        quantize_int8(model)


def test_fp16_model_stays_close_to_float32_and_translates():
    model = tiny_model("text", seed=2).eval()
    before = _logits(model)
    set_precision(model, "fp16")
    assert model.lm_dtype == torch.float16
    after = _logits(model).float()
    assert (after - before).abs().max() < 0.01 * before.abs().max()
    assert (after.argmax(-1) == before.argmax(-1)).all()
    assert isinstance(translate_offline(model, SOURCE, max_target_tokens=8), str)


def test_fp16_speech_model_feeds_its_float32_units_to_the_half_precision_llm():
    import numpy as np

    model = tiny_model("speech", seed=3).eval()
    audio = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)

    def stream():
        session = StreamingSession(model)
        session.push_audio(audio)
        session.finish_source()
        return session.next_logits().float().clone()

    before = stream()
    half_precision(model)
    assert {p.dtype for p in model.adapter.parameters()} == {torch.float32}
    after = stream()
    assert (after - before).abs().max() < 0.01 * before.abs().max()


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="precision 'fp8': expected one of fp32, fp16, int8"):
        set_precision(tiny_model("text").eval(), "fp8")


def test_the_int8_kernel_computes_the_dequantized_product():
    from streaming_llm.quantize import Int8Linear

    torch.manual_seed(0)
    layer = Int8Linear.of(torch.nn.Linear(64, 48, bias=False))
    rows = torch.randn(5, 64).to(torch.bfloat16)
    kernel = torch._weight_int8pack_mm(rows, layer.weight_int8, layer.scales)
    torch.testing.assert_close(kernel.float(), layer.dequantized_product(rows).float(), atol=0.02, rtol=0.02)


def test_int8_leaves_no_float32_linear_layer_and_fuses_the_layers_that_share_an_input():
    """Every projection and the output layer read int8 weights (a float32 one left would read 4x the bytes); q/k/v
    and gate/up each become one fused product of their module, which ``lean`` runs once."""
    from streaming_llm.quantize import Int8Linear

    model = set_precision(tiny_model("text", seed=2), "int8")
    assert not [name for name, m in model.llm.named_modules() if type(m) is torch.nn.Linear]
    assert isinstance(model.llm.lm_head, Int8Linear)
    for layer in model.llm.model.layers:
        assert isinstance(layer.self_attn.fused_qkv, Int8Linear) and isinstance(layer.mlp.fused_gate_up, Int8Linear)
        assert layer.self_attn.k_proj.weight_int8.data_ptr() != layer.self_attn.q_proj.weight_int8.data_ptr()


@pytest.mark.parametrize(("flags", "precision"), [({}, "fp32"), ({"int8": True}, "int8"), ({"fp16": True}, "fp16"),
                                                  ({"int4": True}, "int4")])  # fmt: skip
def test_each_precision_flag_selects_its_precision(flags: dict, precision: str):
    assert precision_from_flags(**flags) == precision


def test_fp16_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="half_precision is for inference"):
        set_precision(tiny_model("text").train(), "fp16")
