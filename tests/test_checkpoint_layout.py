"""Checkpoint checks, config validation and the source capacity bound, on tiny random models."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from streaming_llm.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from streaming_llm.config import SpeechLLMConfig
from streaming_llm.layout import Layout, attention_mask
from streaming_llm.tiny import tiny_config, tiny_model, tiny_tokenizer


def test_weights_the_config_has_no_place_for_are_refused_by_name(tmp_path: Path) -> None:
    """A checkpoint whose config.json says probe_hidden=0 but whose file holds a probe must not load silently
    (strict=False would drop the probe weights without a word)."""
    save_checkpoint(tiny_model("text"), tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "probe_hidden": 0}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"unexpected weights probe\."):
        load_checkpoint(tmp_path / "ckpt")


def test_a_checkpoint_of_another_format_is_refused_by_its_format(tmp_path: Path) -> None:
    save_checkpoint(tiny_model("text"), tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "checkpoint.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta_path.write_text(json.dumps({**meta, "format": "someone-elses"}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="checkpoint format 'someone-elses', expected 'proactive-simulst'"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_delta_checkpoint_uses_its_base_model_where_it_names_it_before_the_asset_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base is where the checkpoint says: an asset cache holding another model of the same name is not used."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path / "their-cache" / "tiny-llm"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig.from_dict(tiny_config("text").llm_config)).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    torch.manual_seed(1)  # the same name in this machine's cache, other weights
    LlamaForCausalLM(LlamaConfig.from_dict(tiny_config("text").llm_config)).save_pretrained(
        tmp_path / "my-cache" / "tiny-llm"
    )
    model = build_model(tiny_config("text").replace(llm_path=str(base)), tiny_tokenizer(), from_paths=True)
    for p in model.llm.parameters():
        p.requires_grad_(False)
    folder = save_checkpoint(model, tmp_path / "ckpt", delta=True)
    monkeypatch.setenv("PROACTIVE_CACHE", str(tmp_path / "my-cache"))
    loaded = load_checkpoint(folder)
    assert loaded.config.llm_path == str(base)
    for a, b in zip(model.llm.parameters(), loaded.llm.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    shutil.rmtree(tmp_path / "my-cache")
    assert load_checkpoint(folder).config.llm_path == str(base)  # no cache at all: still found where named


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (dict(block_ms=330), "not a multiple of 20 ms"),
        (dict(block_ms=300, stack=4), "15 encoder frames per block, not a multiple of stack=4"),
    ],
)
def test_a_speech_config_that_cannot_make_whole_units_is_refused(changes: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        tiny_config("speech", **changes)
    with pytest.raises(ValueError, match="modality 'video'"):
        tiny_config("speech").replace(modality="video")


def test_a_config_with_an_unknown_key_is_named_not_a_type_error() -> None:
    data = json.loads(tiny_config("text").to_json())
    with pytest.raises(ValueError, match=r"unknown config keys \['block_size'\]"):
        SpeechLLMConfig.from_dict({**data, "block_size": 3})


def test_a_config_survives_its_json_round_trip() -> None:
    config = tiny_config("text", llm_lora_r=4, llm_lora_targets=("q_proj", "v_proj"))
    loaded = SpeechLLMConfig.from_dict(json.loads(config.to_json()))
    assert loaded.llm_lora_targets == ("q_proj", "v_proj")  # a tuple again, not JSON's list
    assert loaded.replace(llm_config=config.llm_config) == config  # (JSON turns id2label's int keys to str)


def test_a_source_one_embedding_over_the_capacity_is_refused() -> None:
    """capacity + 1 source embeddings would put the last one (or the marker) on the target group's positions."""
    model = tiny_model("text", max_source_embeddings=8)
    assert model.layout([4, 4], 3).n_source == 9
    with pytest.raises(ValueError, match="source of 9 embeddings exceeds the model's capacity of 8"):
        model.layout([4, 5], 3)


def test_a_source_of_exactly_the_capacity_does_not_overflow() -> None:
    model = tiny_model("text", max_source_embeddings=8)
    words = ["I", "would", "like", "a", "of"]  # 1 + 3 + 2 + 1 + 1 tokens
    assert model.source_tokens(words) == 8
    assert model.source_overflow(words) == ""
    assert "more than the model's context of 8" in model.source_overflow([*words, "in"])


def test_a_reference_ends_in_exactly_one_end_of_sentence_token() -> None:
    """Training targets end in eos: without it the model never learns to stop."""
    model = tiny_model("text")
    ids = model.target_ids("  Ich möchte Kaffee. ")
    assert ids[-1] == model.eos_id and model.eos_id not in ids[:-1]
    assert ids[:-1] == model._ids(" Ich möchte Kaffee.")


def test_a_batch_longer_than_the_padded_length_is_a_value_error() -> None:
    layout = Layout(n_prompt=2, unit_sizes=(2, 1), n_prefix=1, n_target=3, target_offset=10)
    with pytest.raises(ValueError, match=f"has {layout.length} entries, more than the padded length"):
        attention_mask([layout], [layout.full_phi()], layout.length - 1)


def test_phi_for_the_wrong_number_of_views_is_refused() -> None:
    layout = Layout(n_prompt=2, unit_sizes=(2, 1), n_prefix=1, n_target=3, target_offset=10, views=2)
    with pytest.raises(ValueError, match=r"phi has shape \(1, 3\); expected \(2, 3\)"):
        layout.row_visibility(layout.full_phi())


def test_eager_attention_gives_the_lm_its_attention_kind_back_after_the_block() -> None:
    from streaming_llm.model import eager_attention

    llm = tiny_model("text").llm
    llm.set_attn_implementation("sdpa")
    with eager_attention(llm):
        assert llm.config._attn_implementation == "eager"
    assert llm.config._attn_implementation == "sdpa"  # not left on the slow path for every later forward


def test_a_delta_checkpoint_holds_only_the_trained_weights_and_loads_to_the_same_model(tmp_path: Path) -> None:
    """Frozen base LLM + trained rest: the file holds the rest only, and base + rest is the model that was saved."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path / "tiny-llm"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig.from_dict(tiny_config("text").llm_config)).save_pretrained(base)
    torch.manual_seed(5)
    model = build_model(tiny_config("text").replace(llm_path=str(base)), tiny_tokenizer(), from_paths=True).eval()
    for p in model.llm.parameters():
        p.requires_grad_(False)
    folder = save_checkpoint(model, tmp_path / "ckpt", delta=True)
    stored = load_file(str(folder / "model.safetensors"))
    assert set(stored) == {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(k.startswith("llm.") for k in stored)
    torch.manual_seed(6)  # another random init under the trained weights: they must all be overwritten
    loaded = load_checkpoint(folder)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_saving_over_a_checkpoint_replaces_it_and_leaves_no_old_copy_or_temporary_folder(tmp_path: Path) -> None:
    save_checkpoint(tiny_model("text", seed=0), tmp_path / "ckpt")
    newer = tiny_model("text", seed=1)
    save_checkpoint(newer, tmp_path / "ckpt", extra={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .ckpt.old, no .ckpt.XXXX
    meta = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text(encoding="utf-8"))
    assert meta["extra"] == {"step": 2}
    torch.testing.assert_close(load_checkpoint(tmp_path / "ckpt").end_of_source, newer.end_of_source)


def test_merge_lora_also_folds_an_encoder_only_lora(tmp_path: Path) -> None:
    """A model with LoRA on the speech encoder alone is merged too: no adapter matmuls left at inference."""
    model = tiny_model("speech", encoder_lora_r=2)
    save_checkpoint(model, tmp_path / "ckpt")
    assert any("lora_" in name for name, _ in load_checkpoint(tmp_path / "ckpt").encoder.named_parameters())
    merged = load_checkpoint(tmp_path / "ckpt", merge_lora=True)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
