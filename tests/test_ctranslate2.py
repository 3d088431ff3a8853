"""CTranslate2 model.bin reader/writer and the CT2 -> openai-whisper conversion, on a tiny random model."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
import whisper

from speech_frontend.convert import ConversionError, convert_ct2_whisper, load_whisper, whisper_dims
from speech_frontend.ctranslate2 import CT2FormatError, load_variables, read_model_bin, write_model_bin

DIMS = {"n_mels": 4, "n_audio_ctx": 6, "n_audio_state": 8, "n_audio_head": 2, "n_audio_layer": 2,
        "n_vocab": 20, "n_text_ctx": 5, "n_text_state": 8, "n_text_head": 2, "n_text_layer": 1}
ALIASES = {"decoder/projection/weight": "decoder/embeddings/weight"}


def _tiny_ct2_whisper(seed: int = 0) -> dict[str, np.ndarray]:
    """Variables named and shaped like a real CT2 Whisper model.bin (float16 weights, int scalars)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16)

    def attention(prefix: str, s: int, fused: int) -> dict[str, np.ndarray]:
        return {f"{prefix}/linear_0/weight": w(fused * s, s), f"{prefix}/linear_0/bias": w(fused * s),
                f"{prefix}/linear_1/weight": w(s, s), f"{prefix}/linear_1/bias": w(s),
                f"{prefix}/layer_norm/gamma": w(s), f"{prefix}/layer_norm/beta": w(s)}

    def layer(prefix: str, s: int, cross: bool) -> dict[str, np.ndarray]:
        out = attention(f"{prefix}/self_attention", s, 3)
        if cross:
            out |= {f"{prefix}/attention/linear_0/weight": w(s, s), f"{prefix}/attention/linear_0/bias": w(s),
                    f"{prefix}/attention/linear_1/weight": w(2 * s, s), f"{prefix}/attention/linear_1/bias": w(2 * s),
                    f"{prefix}/attention/linear_2/weight": w(s, s), f"{prefix}/attention/linear_2/bias": w(s),
                    f"{prefix}/attention/layer_norm/gamma": w(s), f"{prefix}/attention/layer_norm/beta": w(s)}
        return out | {f"{prefix}/ffn/linear_0/weight": w(4 * s, s), f"{prefix}/ffn/linear_0/bias": w(4 * s),
                      f"{prefix}/ffn/linear_1/weight": w(s, 4 * s), f"{prefix}/ffn/linear_1/bias": w(s),
                      f"{prefix}/ffn/layer_norm/gamma": w(s), f"{prefix}/ffn/layer_norm/beta": w(s)}

    a, t = DIMS["n_audio_state"], DIMS["n_text_state"]
    v: dict[str, np.ndarray] = {
        "decoder/activation": np.array(3, np.int8),
        "decoder/alignment_heads": np.array(1, np.int16),
        "decoder/embeddings/weight": w(DIMS["n_vocab"], t),
        "decoder/num_heads": np.array(DIMS["n_text_head"], np.int16),
        "decoder/position_encodings/encodings": w(DIMS["n_text_ctx"], t),
        "decoder/scale_embeddings": np.array(0, np.int8),
        "decoder/layer_norm/gamma": w(t), "decoder/layer_norm/beta": w(t),
        "encoder/conv1/weight": w(a, DIMS["n_mels"], 3), "encoder/conv1/bias": w(a),
        "encoder/conv2/weight": w(a, a, 3), "encoder/conv2/bias": w(a),
        "encoder/num_heads": np.array(DIMS["n_audio_head"], np.int16),
        "encoder/position_encodings/encodings": w(DIMS["n_audio_ctx"], a),
        "encoder/layer_norm/gamma": w(a), "encoder/layer_norm/beta": w(a),
    }
    for i in range(DIMS["n_audio_layer"]):
        v |= layer(f"encoder/layer_{i}", a, cross=False)
    for i in range(DIMS["n_text_layer"]):
        v |= layer(f"decoder/layer_{i}", t, cross=True)
    return v


@pytest.fixture
def tiny_model_dir(tmp_path):
    variables = _tiny_ct2_whisper()
    write_model_bin(tmp_path / "model.bin", variables, aliases=ALIASES)
    return tmp_path, variables


def test_a_variable_of_a_dtype_ct2_cannot_store_is_refused_before_anything_is_written(tmp_path):
    variables = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.complex64)}
    with pytest.raises(ValueError, match="variable b has dtype complex64"):
        write_model_bin(tmp_path / "model.bin", variables)
    assert not (tmp_path / "model.bin").exists()  # it used to leave a truncated file behind


def test_round_trip_is_exact(tiny_model_dir):
    path, variables = tiny_model_dir
    model = read_model_bin(path)  # a directory reads its model.bin
    assert (model.spec, model.revision, model.version) == ("WhisperSpec", 3, 6)
    assert model.aliases == ALIASES
    assert list(model.variables) == list(variables)
    for name, array in variables.items():
        got = model.variables[name]
        assert got.dtype == array.dtype and got.shape == array.shape, name
        np.testing.assert_array_equal(got, array)
    resolved = load_variables(path / "model.bin")
    assert resolved["decoder/projection/weight"] is resolved["decoder/embeddings/weight"]


def test_split_parts_read_as_one(tiny_model_dir, tmp_path_factory):
    path, variables = tiny_model_dir
    raw = (path / "model.bin").read_bytes()
    parts = tmp_path_factory.mktemp("parts")
    (parts / "model.bin.part1").write_bytes(raw[: len(raw) // 2])
    (parts / "model.bin.part2").write_bytes(raw[len(raw) // 2 :])
    got = read_model_bin([parts / "model.bin.part1", parts / "model.bin.part2"]).variables
    np.testing.assert_array_equal(got["encoder/conv2/weight"], variables["encoder/conv2/weight"])


def test_parts_are_read_in_the_order_given_not_by_name(tiny_model_dir, tmp_path_factory):
    path, variables = tiny_model_dir
    raw = (path / "model.bin").read_bytes()
    thirds = [raw[: len(raw) // 3], raw[len(raw) // 3 : 2 * len(raw) // 3], raw[2 * len(raw) // 3 :]]
    parts = tmp_path_factory.mktemp("parts")
    names = ["model.bin.part9", "model.bin.part10", "model.bin.part11"]  # by name, part9 would come last
    for name, chunk in zip(names, thirds, strict=True):
        (parts / name).write_bytes(chunk)
    got = read_model_bin([parts / name for name in names]).variables
    np.testing.assert_array_equal(got["decoder/embeddings/weight"], variables["decoder/embeddings/weight"])


def test_bfloat16_is_widened_to_float32(tmp_path):
    values = np.array([1.5, -2.25, 3.0e-3], np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")  # exact for these values' top halves
    name = b"x\0"
    blob = (struct.pack("<I", 6) + struct.pack("<H", 3) + b"Sp\0" + struct.pack("<II", 1, 1)
            + struct.pack("<H", len(name)) + name + struct.pack("<BIBI", 1, 3, 5, 6) + bits.tobytes()
            + struct.pack("<I", 0))
    (tmp_path / "model.bin").write_bytes(blob)
    got = load_variables(tmp_path / "model.bin")["x"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (bits.astype(np.uint32) << 16).view(np.float32))


def test_truncated_and_foreign_files_say_what_is_wrong(tiny_model_dir, tmp_path_factory):
    path, _ = tiny_model_dir
    bad = tmp_path_factory.mktemp("bad")
    truncated = bad / "truncated.bin"
    truncated.write_bytes((path / "model.bin").read_bytes()[:-100])
    with pytest.raises(CT2FormatError, match=r"truncated.bin: truncated CTranslate2 model\.bin") as err:
        read_model_bin(truncated)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)
    foreign = bad / "foreign.bin"
    foreign.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ValueError, match=r"foreign.bin: not a CTranslate2 model\.bin \(binary version"):
        read_model_bin(foreign)
    with pytest.raises(ValueError, match="no such file"):
        read_model_bin(bad / "absent.bin")


def test_converted_checkpoint_loads_in_whisper_and_runs(tiny_model_dir, tmp_path_factory):
    path, v = tiny_model_dir
    out = convert_ct2_whisper(path, tmp_path_factory.mktemp("out") / "tiny.pt")
    model = whisper.load_model(str(out), device="cpu")
    assert model.dims.__dict__ == DIMS
    sd = model.state_dict()
    s = DIMS["n_audio_state"]
    qkv_w = torch.from_numpy(v["encoder/layer_1/self_attention/linear_0/weight"].astype(np.float32))
    qkv_b = torch.from_numpy(v["encoder/layer_1/self_attention/linear_0/bias"].astype(np.float32))
    assert torch.equal(sd["encoder.blocks.1.attn.key.weight"], qkv_w[s : 2 * s])
    assert torch.equal(sd["encoder.blocks.1.attn.value.bias"], qkv_b[2 * s :])
    assert model.encoder.blocks[1].attn.key.bias is None
    kv_w = torch.from_numpy(v["decoder/layer_0/attention/linear_1/weight"].astype(np.float32))
    assert torch.equal(sd["decoder.blocks.0.cross_attn.value.weight"], kv_w[s:])
    assert all(t.dtype == torch.float32 for t in sd.values() if t.is_floating_point())

    mel = torch.randn(1, DIMS["n_mels"], 2 * DIMS["n_audio_ctx"])
    with torch.inference_mode():
        features = model.encoder(mel)
        logits = model.decoder(torch.tensor([[1, 2, 3]]), features)
    assert features.shape == (1, DIMS["n_audio_ctx"], s) and torch.isfinite(features).all()
    assert logits.shape == (1, 3, DIMS["n_vocab"])

    in_memory = load_whisper(path / "model.bin")
    assert all(torch.equal(t, in_memory.state_dict()[k]) for k, t in sd.items())
    from_pt = load_whisper(out)
    assert all(torch.equal(t, from_pt.state_dict()[k]) for k, t in sd.items())


def test_each_whisper_tensor_is_the_ct2_variable_of_the_same_role(tmp_path):
    """Layer norms (gamma -> weight, beta -> bias), attention outputs, cross-attention queries and the MLP: every
    tensor whisper gets is the CT2 variable of that role (same-shaped ones could be swapped without an error)."""
    v = _tiny_ct2_whisper()
    sd = load_whisper(write_model_bin(tmp_path / "model.bin", v, aliases=ALIASES)).state_dict()
    roles = {"attn_ln": "self_attention/layer_norm", "attn.out": "self_attention/linear_1",
             "cross_attn.query": "attention/linear_0", "cross_attn.out": "attention/linear_2",
             "cross_attn_ln": "attention/layer_norm", "mlp.0": "ffn/linear_0", "mlp.2": "ffn/linear_1",
             "mlp_ln": "ffn/layer_norm"}
    expected = {"encoder.ln_post.weight": "encoder/layer_norm/gamma", "encoder.ln_post.bias": "encoder/layer_norm/beta",
                "decoder.ln.weight": "decoder/layer_norm/gamma", "decoder.ln.bias": "decoder/layer_norm/beta",
                "encoder.conv1.weight": "encoder/conv1/weight", "encoder.conv2.bias": "encoder/conv2/bias"}
    for stack, n in (("encoder", DIMS["n_audio_layer"]), ("decoder", DIMS["n_text_layer"])):
        for i in range(n):
            for role, ct2 in roles.items():
                if "cross" in role and stack == "encoder":
                    continue
                ln = ct2.endswith("layer_norm")
                for param, ct2_param in (("weight", "gamma" if ln else "weight"), ("bias", "beta" if ln else "bias")):
                    expected[f"{stack}.blocks.{i}.{role}.{param}"] = f"{stack}/layer_{i}/{ct2}/{ct2_param}"
    for name, ct2 in expected.items():
        assert torch.equal(sd[name], torch.from_numpy(v[ct2].astype(np.float32))), (name, ct2)


def test_head_count_falls_back_to_width_over_64():
    variables = _tiny_ct2_whisper()
    del variables["encoder/num_heads"]
    variables["encoder/conv1/weight"] = np.zeros((128, 4, 3), np.float16)
    assert whisper_dims(variables)["n_audio_head"] == 2  # 128 / 64, the head width of every Whisper size
    assert whisper_dims(variables, n_audio_head=4)["n_audio_head"] == 4


def test_missing_weight_is_named(tmp_path):
    variables = _tiny_ct2_whisper()
    del variables["decoder/layer_0/attention/linear_2/bias"]
    with pytest.raises(ConversionError, match="decoder/layer_0/attention/linear_2/bias is missing"):
        convert_ct2_whisper(variables, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_a_model_whisper_cannot_represent_is_refused_not_converted_wrongly(tmp_path):
    """whisper ties its output projection to the token embedding and never scales embeddings; a CT2 model that
    does otherwise, or that is not a Whisper model at all, is refused rather than converted to something else."""
    untied = _tiny_ct2_whisper()
    untied["decoder/projection/weight"] = _tiny_ct2_whisper(seed=1)["decoder/embeddings/weight"]
    with pytest.raises(ConversionError, match="decoder/projection/weight differs from the token embedding"):
        convert_ct2_whisper(untied, tmp_path / "x.pt")
    scaled = _tiny_ct2_whisper() | {"decoder/scale_embeddings": np.array(1, np.int8)}
    with pytest.raises(ConversionError, match="decoder/scale_embeddings is set"):
        convert_ct2_whisper(scaled, tmp_path / "x.pt")
    write_model_bin(tmp_path / "model.bin", _tiny_ct2_whisper(), spec="TransformerSpec", aliases=ALIASES)
    with pytest.raises(ConversionError, match="a CTranslate2 TransformerSpec, not a WhisperSpec model"):
        load_whisper(tmp_path)
    assert not (tmp_path / "x.pt").exists()


def test_alignment_heads_come_from_the_config_next_to_the_model_and_out_of_range_ones_are_ignored(tiny_model_dir):
    path, _ = tiny_model_dir
    (path / "config.json").write_text(json.dumps({"alignment_heads": [[0, 1]]}))
    heads = load_whisper(path).alignment_heads.to_dense()
    assert heads.tolist() == [[False, True]]  # n_text_layer 1, n_text_head 2
    (path / "config.json").write_text(json.dumps({"alignment_heads": [[0, 1], [1, 0]]}))  # no layer 1
    assert load_whisper(path).alignment_heads.to_dense().tolist() == [[True, True]]  # whisper's default


def test_load_whisper_refuses_a_model_name():
    with pytest.raises(FileNotFoundError, match="make assets"):
        load_whisper("tiny.en")


def _quantized_like_ct2(variables: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """What ``ct2-transformers-converter --quantization int8|int16`` stores: every Linear/Embeddings weight as an
    integer ``weight`` and a ``weight_scale`` (int8: 127 / amax per row; int16: 2**10 / amax), q = rint(w * scale)."""
    out = {}
    for name, array in variables.items():
        if name.endswith("/weight") and array.ndim == 2 and "conv" not in name:
            w = array.astype(np.float32)
            if kind == "int8":
                scale = (127.0 / np.abs(w).max(axis=1)).astype(np.float32)
                out[name] = np.rint(w * scale[:, None]).astype(np.int8)
            else:
                scale = np.float32(2**10 / np.abs(w).max())
                out[name] = np.rint(w * scale).astype(np.int16)
            out[name + "_scale"] = np.asarray(scale, np.float32)
        else:
            out[name] = array
    return out


@pytest.mark.parametrize("kind", ["int8", "int16"])
def test_quantized_ct2_weights_are_dequantized_with_their_scales(tmp_path, kind):
    variables = _tiny_ct2_whisper()
    write_model_bin(tmp_path / "model.bin", _quantized_like_ct2(variables, kind), aliases=ALIASES)
    got = load_whisper(tmp_path).state_dict()
    # a square weight too: its per-row scales, applied per column, would broadcast without an error
    for name, ct2 in (("encoder.blocks.0.mlp.0.weight", "encoder/layer_0/ffn/linear_0/weight"),
                      ("decoder.token_embedding.weight", "decoder/embeddings/weight"),
                      ("encoder.blocks.0.attn.out.weight", "encoder/layer_0/self_attention/linear_1/weight")):
        want = torch.from_numpy(variables[ct2].astype(np.float32))
        step = want.abs().amax(dim=1, keepdim=True) / 127 if kind == "int8" else want.abs().max() / 2**10
        assert ((got[name] - want).abs() <= step / 2 + 1e-6).all(), name
    s = DIMS["n_audio_state"]
    qkv = torch.from_numpy(variables["encoder/layer_1/self_attention/linear_0/weight"].astype(np.float32))
    assert torch.allclose(got["encoder.blocks.1.attn.value.weight"], qkv[2 * s :], atol=0.05)


def test_an_integer_weight_without_a_scale_is_refused(tmp_path):
    variables = _quantized_like_ct2(_tiny_ct2_whisper(), "int8")
    del variables["encoder/layer_0/ffn/linear_0/weight_scale"]
    write_model_bin(tmp_path / "model.bin", variables, aliases=ALIASES)
    with pytest.raises(ConversionError, match="encoder/layer_0/ffn/linear_0/weight is int8 without"):
        load_whisper(tmp_path)


def test_alignment_heads_are_found_next_to_a_model_bin_given_as_a_file(tiny_model_dir):
    path, _ = tiny_model_dir
    (path / "config.json").write_text(json.dumps({"alignment_heads": [[0, 1]]}))
    assert load_whisper(path / "model.bin").alignment_heads.to_dense().tolist() == [[False, True]]


def test_alignment_heads_can_be_given_as_a_dict(tmp_path):
    out = convert_ct2_whisper(_tiny_ct2_whisper(), tmp_path / "x.pt", config={"alignment_heads": [[0, 0]]})
    assert load_whisper(out).alignment_heads.to_dense().tolist() == [[True, False]]


def test_a_head_count_that_does_not_divide_the_width_is_refused():
    with pytest.raises(ConversionError, match="encoder: 3 heads do not divide the width 8"):
        whisper_dims(_tiny_ct2_whisper(), n_audio_head=3)


def test_a_model_without_encoder_layers_is_refused(tmp_path):
    variables = {k: v for k, v in _tiny_ct2_whisper().items() if not k.startswith("encoder/layer_")}
    with pytest.raises(ConversionError, match="no encoder/layer_0 variables"):
        convert_ct2_whisper(variables, tmp_path / "x.pt")


def test_a_weight_with_no_whisper_counterpart_is_named_not_dropped(tmp_path):
    variables = _tiny_ct2_whisper() | {"encoder/layer_0/adapter/weight": np.zeros((8, 8), np.float16)}
    with pytest.raises(ConversionError, match="CT2 variable encoder/layer_0/adapter/weight has no openai-whisper"):
        convert_ct2_whisper(variables, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("content", [b"not a checkpoint", "dict"], ids=["foreign-bytes", "dict-without-dims"])
def test_a_pt_file_that_is_not_a_whisper_checkpoint_is_named(tmp_path, content):
    path = tmp_path / "model.pt"
    if content == "dict":
        torch.save({"state_dict": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConversionError, match=r"model\.pt: not an openai-whisper checkpoint"):
        load_whisper(path)
