"""4-bit weights by GPTQ: the rounding beats rounding to nearest where it is meant to, the kernel computes the
stored weights, the 4-bit model stays close to float32, and the weights are made once per checkpoint."""

import pytest
import torch

from streaming_llm import gptq
from streaming_llm.checkpoint import save_checkpoint
from streaming_llm.engine import StreamingSession, translate_offline
from streaming_llm.quantize import merge_lora, set_precision
from streaming_llm.tiny import tiny_model

SENTENCES = [
    "I would like a cup of coffee in the garden .",
    "The children had their attention .",
    "We walked to the station in the rain .",
    "She reads a book every evening .",
]


def _dequantized(q, scales, zeros):
    group = q.shape[1] // scales.shape[1]
    return (q.float() - gptq.MIDPOINT) * scales.repeat_interleave(group, 1) + zeros.repeat_interleave(group, 1)


def test_gptq_moves_a_layers_outputs_on_its_calibration_inputs_less_than_rounding_to_nearest():
    torch.manual_seed(0)
    weight = torch.randn(48, 128)
    x = torch.randn(2000, 32) @ torch.randn(32, 128) + 0.1 * torch.randn(2000, 128)  # correlated, as an LM's are
    exact = x @ weight.T
    errors = {}
    for name, (q, s, z) in {"gptq": gptq.gptq(weight, x.T @ x), "rtn": gptq.round_to_nearest(weight)}.items():
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        errors[name] = float((x @ _dequantized(q, s, z).T - exact).pow(2).mean())
    assert errors["gptq"] < 0.5 * errors["rtn"], errors  # measured: 3.6 against 24.9


def test_gptq_refuses_columns_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="groups of 32"):
        gptq.gptq(torch.randn(16, 48), torch.eye(48))


def test_the_4bit_kernel_computes_the_stored_weights():
    torch.manual_seed(1)
    q, scales, zeros = gptq.round_to_nearest(torch.randn(64, 96))
    layer = gptq.Int4Linear.of(q, scales, zeros)
    x = torch.randn(3, 96)
    expected = x.bfloat16().float() @ _dequantized(q, scales.bfloat16().float(), zeros.bfloat16().float()).T
    torch.testing.assert_close(layer(x), expected, atol=0.05, rtol=0.02)
    torch.testing.assert_close(layer.rows(16, 48)(x), layer(x)[:, 16:48])


def test_the_rows_of_one_fused_layer_share_one_product_per_input(monkeypatch):
    torch.manual_seed(1)
    layer = gptq.Int4Linear.of(*gptq.round_to_nearest(torch.randn(64, 96)))
    q, k, v = layer.rows(0, 32), layer.rows(32, 48), layer.rows(48, 64)
    calls = []
    kernel = torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or kernel(*a))
    x = torch.randn(2, 96)
    parts = [q(x), k(x), v(x)]
    assert len(calls) == 1  # as transformers' attention calls q_proj, k_proj, v_proj on one tensor
    y = x.clone()  # an equal tensor is another input: computed again, never mistaken for the kept one
    k_of_y = k(y)
    assert len(calls) == 2
    torch.testing.assert_close(torch.cat(parts, dim=-1), layer(x))
    torch.testing.assert_close(k_of_y, layer(x)[:, 32:48])


def _logits(model) -> torch.Tensor:
    session = StreamingSession(model)
    session.push_words(SENTENCES[0].split()[:4])
    first = session.next_logits().clone()
    session.push_words(SENTENCES[0].split()[4:])
    session.finish_source()
    return torch.stack([first, session.next_logits().clone()])


def test_a_4bit_model_stays_close_to_float32_and_translates():
    model = tiny_model("text", seed=2)
    before = _logits(model)
    state = gptq.calibrate(model, [s.split() for s in SENTENCES], progress=False)
    gptq.quantize_int4(model, state)
    assert sum(isinstance(m, gptq.Int4Linear) for m in model.llm.modules()) == 2 * 4 + 1  # per layer 4, the output
    after = _logits(model)
    assert (after - before).abs().mean() < 0.1 * before.abs().mean()
    assert isinstance(translate_offline(model, SENTENCES[1].split(), max_target_tokens=8), str)


def _manifest(path):
    rows = ["id\taudio\tn_frames\tsrc_text\ttgt_text\tspeaker"]
    rows += [f"s{i}\t\t0\t{s}\tein Satz .\tx" for i, s in enumerate(SENTENCES)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_int4_weights_are_made_once_beside_the_checkpoint_from_its_training_manifest(tmp_path, monkeypatch):
    manifest = _manifest(tmp_path / "train.tsv")
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_model("text", seed=3), ckpt, extra={"train_config": {"train_manifest": str(manifest)}})
    from streaming_llm.checkpoint import load_checkpoint

    first = set_precision(load_checkpoint(ckpt, merge_lora=True), "int4", ckpt)
    assert gptq.weights_file(ckpt).is_file()
    monkeypatch.setattr(gptq, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    second = set_precision(load_checkpoint(ckpt, merge_lora=True), "int4", ckpt)
    torch.testing.assert_close(_logits(second), _logits(first))


def test_a_copied_checkpoint_keeps_its_4bit_weights_and_changed_weights_are_calibrated_again(tmp_path, monkeypatch):
    import os
    import shutil

    from streaming_llm.checkpoint import load_checkpoint

    manifest = _manifest(tmp_path / "train.tsv")
    ckpt, copy = tmp_path / "ckpt", tmp_path / "copy"
    save_checkpoint(tiny_model("text", seed=3), ckpt, extra={"train_config": {"train_manifest": str(manifest)}})
    first = set_precision(load_checkpoint(ckpt, merge_lora=True), "int4", ckpt)
    shutil.copytree(ckpt, copy)
    weights, made = copy / "model.safetensors", gptq.weights_file(copy)
    os.utime(weights, (made.stat().st_mtime + 5,) * 2)  # as cp -r leaves them: the times of its copying order
    calls = []
    calibrate = gptq.calibrate
    monkeypatch.setattr(gptq, "calibrate", lambda *a, **k: calls.append(1) or calibrate(*a, **k))
    torch.testing.assert_close(_logits(set_precision(load_checkpoint(copy, merge_lora=True), "int4", copy)),
                               _logits(first))  # fmt: skip
    assert not calls  # the same checkpoint weights: the 4-bit weights beside them are theirs
    save_checkpoint(tiny_model("text", seed=4), tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / "model.safetensors", weights)
    os.utime(weights, (made.stat().st_mtime - 5,) * 2)  # other weights, older than the 4-bit file (cp -p, rsync)
    set_precision(load_checkpoint(copy, merge_lora=True), "int4", copy)
    assert calls == [1]


def test_int4_without_calibration_data_says_how_to_make_the_weights(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_model("text", seed=3), ckpt)
    from streaming_llm.checkpoint import load_checkpoint

    with pytest.raises(ValueError, match=r"python -m streaming_llm.gptq .*ckpt --calibration TSV"):
        set_precision(load_checkpoint(ckpt, merge_lora=True), "int4", ckpt)
    assert gptq.main([str(ckpt), "--calibration", str(_manifest(tmp_path / "other.tsv"))]) == 0
    assert isinstance(set_precision(load_checkpoint(ckpt, merge_lora=True), "int4", ckpt), torch.nn.Module)


def test_int4_takes_the_weights_the_gptq_cli_made_at_another_group_size(tmp_path, monkeypatch):
    """`python -m streaming_llm.gptq CKPT --group-size 64` wrote int4-g64.pt, which --int4 never read (it
    calibrated int4-g32.pt again); the last weights made are the ones used, and the only ones kept."""
    from streaming_llm.checkpoint import load_checkpoint

    manifest = _manifest(tmp_path / "train.tsv")
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_model("text", seed=3), ckpt, extra={"train_config": {"train_manifest": str(manifest)}})
    set_precision(load_checkpoint(ckpt, merge_lora=True), "int4", ckpt)  # int4-g32.pt, the default
    assert gptq.main([str(ckpt), "--group-size", "64"]) == 0
    assert gptq.weights_file(ckpt, 64).is_file() and not gptq.weights_file(ckpt).exists()
    monkeypatch.setattr(gptq, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    model = set_precision(load_checkpoint(ckpt, merge_lora=True), "int4", ckpt)
    assert {m.group_size for m in model.llm.modules() if isinstance(m, gptq.Int4Linear)} == {64}


def test_a_foreign_weights_file_is_refused_by_name(tmp_path):
    path = tmp_path / "int4-g32.pt"
    torch.save({"something": 1}, path)
    with pytest.raises(ValueError, match="not a 4-bit weights file"):
        gptq.load_weights(path)


def test_gptq_damps_a_singular_hessian_enough_to_factor_it():
    torch.manual_seed(2)
    x = torch.randn(8, 64)  # 8 rows for 64 inputs: H has rank 8
    q, scales, zeros = gptq.gptq(torch.randn(16, 64), x.T @ x)
    assert torch.isfinite(scales).all() and torch.isfinite(zeros).all() and int(q.max()) <= 15


@pytest.mark.parametrize("size", ["0", "-32", "48", "256"])
def test_gptq_cli_refuses_a_group_size_the_kernel_cannot_take(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as caught:
        gptq.main([str(tmp_path / "ckpt"), "--group-size", size])
    assert caught.value.code == 2
    assert f"error: --group-size {size}: must be 32, 64 or 128" in capsys.readouterr().err


def test_gptq_cli_refuses_a_group_size_that_does_not_divide_the_layers_before_calibrating(tmp_path, capsys,
                                                                                          monkeypatch):  # fmt: skip
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_model("text", seed=3), ckpt)  # hidden size 64
    monkeypatch.setattr(gptq, "calibrate", lambda *a, **k: pytest.fail("calibrated"))
    assert gptq.main([str(ckpt), "--group-size", "128"]) == 2
    err = capsys.readouterr().err
    assert "error: --group-size 128: layer " in err and "has 64 input columns" in err and err.count("\n") == 1
    assert not gptq.weights_file(ckpt, 128).exists()


def _steps_off(weight: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """How far each stored weight is from the weight it stands for, in steps of its group: (out, in)."""
    group = weight.shape[1] // scales.shape[1]
    return (_dequantized(q, scales, zeros) - weight).abs() / scales.repeat_interleave(group, 1)


def test_rounding_to_nearest_keeps_every_weight_within_half_a_step():
    torch.manual_seed(3)
    weight = torch.randn(16, 128)  # (out, in): 4 groups of 32 per row
    q, scales, zeros = gptq.round_to_nearest(weight)
    assert float(_steps_off(weight, q, scales, zeros).max()) <= 0.5 + 1e-4


def test_gptq_with_uncorrelated_inputs_rounds_every_weight_to_its_nearest_level():
    """H = I: no column's error can be made up by another, so each weight goes to the nearest of its group's 16
    levels, the group's extremes included (none clipped a step short)."""
    torch.manual_seed(3)
    weight = torch.randn(16, 256)  # (out, in): two blocks of 128, 8 groups of 32 per row
    for group_size in gptq.GROUP_SIZES:
        q, scales, zeros = gptq.gptq(weight, torch.eye(256), group_size)
        assert float(_steps_off(weight, q, scales, zeros).max()) <= 0.5 + 1e-4, group_size


def test_gptq_spreads_errors_into_the_blocks_after_the_first():
    """A layer wider than GPTQ's block of 128 columns (SmolLM2's have 576 and 1536 inputs): each block's rounding
    errors are made up for in the blocks after it too, not only within it."""
    torch.manual_seed(0)
    weight = torch.randn(48, 384)  # (out, in): three blocks
    x = torch.randn(3000, 32) @ torch.randn(32, 384) + 0.1 * torch.randn(3000, 384)  # correlated, as an LM's are
    exact = x @ weight.T
    errors = {}
    for name, (q, s, z) in {"gptq": gptq.gptq(weight, x.T @ x), "rtn": gptq.round_to_nearest(weight)}.items():
        errors[name] = float((x @ _dequantized(q, s, z).T - exact).pow(2).mean())
    assert errors["gptq"] < 0.2 * errors["rtn"], errors  # measured: 3.4 against 73 (36 with blocks apart)


def test_gptq_rounds_alike_whatever_the_scale_of_the_layers_inputs():
    """The damping is a share of H's own diagonal: inputs a thousand times smaller (an LM's layers differ so) are
    rounded as their larger copies, not as if H were the identity."""
    torch.manual_seed(0)
    weight = torch.randn(32, 128)
    x = torch.randn(500, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(500, 128)
    q, _, _ = gptq.gptq(weight, x.T @ x)
    q_small, _, _ = gptq.gptq(weight, (1e-3 * x).T @ (1e-3 * x))
    assert float((q != q_small).float().mean()) < 0.01


def test_calibration_statistics_sum_over_every_example():
    """H of two examples is the sum of each one's: every calibration decode counts, once."""
    model = tiny_model("text", seed=2)
    translate_offline(model, ["hello"], max_target_tokens=2)  # the prompt's rows, run once per model and kept
    one, two = SENTENCES[0].split(), SENTENCES[1].split()
    both = gptq.collect_hessians(model, [one, two], progress=False)
    first = gptq.collect_hessians(model, [one], progress=False)
    second = gptq.collect_hessians(model, [two], progress=False)
    assert both.keys() == first.keys()
    for name, h in both.items():  # (in, in) per linear layer
        torch.testing.assert_close(h, first[name] + second[name], rtol=1e-4, atol=1e-3)


def test_4bit_weights_for_another_model_are_refused_by_name():
    model = tiny_model("text", seed=2)
    state = gptq.calibrate(model, [s.split() for s in SENTENCES[:2]], progress=False)
    state.pop(next(iter(state)))  # one layer short, as weights made for a shallower model
    with pytest.raises(ValueError, match="calibrated for another model"):
        gptq.quantize_int4(tiny_model("text", seed=2), state)


def test_the_gptq_cli_calibrates_on_the_manifest_it_is_given_over_the_training_one(tmp_path):
    manifest, given = _manifest(tmp_path / "train.tsv"), tmp_path / "given.tsv"
    given.write_text("id\taudio\tn_frames\tsrc_text\ttgt_text\tspeaker\ng0\t\t0\tgood morning .\tguten Morgen .\tx\n",
                     encoding="utf-8")  # fmt: skip
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_model("text", seed=3), ckpt, extra={"train_config": {"train_manifest": str(manifest)}})
    assert gptq.calibration_sources(ckpt, given) == [["good", "morning", "."]]
    assert len(gptq.calibration_sources(ckpt)) == len(SENTENCES)


def test_4bit_weights_from_before_the_digest_are_kept_while_newer_than_the_checkpoint_weights(tmp_path, monkeypatch):
    """A weights file without checkpoint_sha256 (written before it was kept) goes by its time: newer than
    model.safetensors, it is used; older (the weights were trained on since), it is made again."""
    import os

    from streaming_llm.checkpoint import load_checkpoint

    manifest = _manifest(tmp_path / "train.tsv")
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_model("text", seed=3), ckpt, extra={"train_config": {"train_manifest": str(manifest)}})
    set_precision(load_checkpoint(ckpt, merge_lora=True), "int4", ckpt)
    made = gptq.weights_file(ckpt)
    data = torch.load(made, weights_only=True)
    del data["meta"]["checkpoint_sha256"]
    torch.save(data, made)
    weights = ckpt / "model.safetensors"
    calls = []
    calibrate = gptq.calibrate
    monkeypatch.setattr(gptq, "calibrate", lambda *a, **k: calls.append(1) or calibrate(*a, **k))
    os.utime(weights, (made.stat().st_mtime - 5,) * 2)
    set_precision(load_checkpoint(ckpt, merge_lora=True), "int4", ckpt)
    assert not calls
    os.utime(weights, (made.stat().st_mtime + 5,) * 2)
    set_precision(load_checkpoint(ckpt, merge_lora=True), "int4", ckpt)
    assert calls == [1]


def _lora_model():
    model = tiny_model("text", seed=1, llm_lora_r=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=generator)  # peft starts B at zero: make the adapter do something
    return model


def test_a_lora_model_is_calibrated_as_its_merged_weights():
    """calibrate() merges the adapters first: the 4-bit weights of a LoRA model are those of its merged copy."""
    merged = _lora_model()
    merge_lora(merged.llm)
    sources = [s.split() for s in SENTENCES[:2]]
    want = gptq.calibrate(merged, sources, progress=False)
    got = gptq.calibrate(_lora_model(), sources, progress=False)
    assert got.keys() == want.keys()
    for name, stored in got.items():  # q, scales, zeros
        assert all(torch.equal(a, b) for a, b in zip(stored, want[name], strict=True)), name
