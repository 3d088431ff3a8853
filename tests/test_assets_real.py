"""The asset cache: its bookkeeping on a fake asset (fast), and the real built assets (marked ``real``)."""

from __future__ import annotations

import errno
import json
import os
import random

import numpy as np
import pytest
import torch

from speech_frontend import assets
from speech_frontend.assets import Asset, AssetMissingError, Source, asset_file, asset_path, build_assets

FLUENT = "She opened the window because the room was too warm."


def _built(name: str):
    """The main file of a built real asset, or skip saying how to build it."""
    try:
        return asset_file(name)
    except AssetMissingError as e:
        pytest.skip(f"real asset missing: {e}")


# ------------------------------------------------------------------------------------------- bookkeeping


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "data.txt").write_text("hello")
        return [Source("fake-package", "1.0")], "fine"

    monkeypatch.setitem(assets.ASSETS, "fake", Asset("fake", "data.txt", "a fake asset", build))
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache", calls


def test_missing_asset_tells_to_run_make_assets(fake_asset):
    with pytest.raises(AssetMissingError, match=r"run `make assets`"):
        asset_path("fake")
    with pytest.raises(ValueError, match="unknown asset 'nope'"):
        asset_path("nope")


def test_build_once_then_nothing_and_rebuild_when_broken(fake_asset, capsys):
    cache, calls = fake_asset
    assert build_assets(["fake"]) == 0 and len(calls) == 1
    entry = json.loads((cache / "assets.json").read_text())["assets"]["fake"]
    assert entry["files"]["data.txt"]["size"] == 5 and entry["sources"][0]["package"] == "fake-package"
    assert asset_file("fake").read_text() == "hello"
    assert not [p for p in cache.iterdir() if p.name.startswith(assets.TMP_PREFIX)]

    assert build_assets(["fake"]) == 0 and len(calls) == 1  # up to date: nothing rebuilt
    assert "up to date" in capsys.readouterr().out
    (cache / "fake" / "data.txt").write_text("hello, truncated?")  # size no longer matches the manifest
    assert build_assets(["fake"]) == 0 and len(calls) == 2


def test_failed_build_leaves_nothing_half_written(fake_asset, monkeypatch, capsys):
    cache, _ = fake_asset

    def broken(tmp):
        (tmp / "data.txt").write_text("half")
        raise assets.AssetError("package fake-package is not installed: pip install fake-package==1.0")

    monkeypatch.setitem(assets.ASSETS, "fake", Asset("fake", "data.txt", "a fake asset", broken))
    assert build_assets(["fake"]) == 1
    assert "error: fake: package fake-package is not installed: pip install" in capsys.readouterr().err
    assert not (cache / "fake").exists()
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []


def test_a_relative_cache_is_made_absolute(fake_asset, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(assets.CACHE_ENV, "cache")
    assert build_assets(["fake"]) == 0
    path = asset_file("fake")  # what a training run writes into its checkpoint's config
    assert path.is_absolute() and path == tmp_path / "cache" / "fake" / "data.txt"
    monkeypatch.chdir("/")
    assert path.read_text() == "hello"


def test_a_read_only_cache_reports_up_to_date_assets_and_names_the_rest(fake_asset, monkeypatch, capsys):
    cache, calls = fake_asset
    assert build_assets(["fake"]) == 0 and len(calls) == 1
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wa+x"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(assets, "open", read_only, raising=False)
    capsys.readouterr()
    assert build_assets(["fake"]) == 0 and len(calls) == 1
    assert "fake: up to date" in capsys.readouterr().out
    (cache / "fake" / "data.txt").write_text("changed!")  # another size: needs a build it cannot do
    assert build_assets(["fake"]) == 1 and len(calls) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fake: needs a build" in err[0] and "cannot be written (Read-only file system)" in err[0]


def test_a_rebuild_killed_while_swapping_the_asset_in_keeps_one_of_them(fake_asset, capsys):
    cache, calls = fake_asset
    assert build_assets(["fake"]) == 0 and len(calls) == 1
    (cache / "fake").rename(cache / f"{assets.OLD_PREFIX}fake.12345")  # killed right after moving the old one aside
    assert build_assets(["fake"]) == 0 and len(calls) == 1  # moved back: up to date, nothing rebuilt
    assert asset_file("fake").read_text() == "hello"
    assert not [p for p in cache.iterdir() if p.name.startswith(assets.OLD_PREFIX)]


# ----------------------------------------------------------------------------------------- real assets


@pytest.mark.real
def test_real_whisper_tiny_en_encodes_one_second():
    import whisper

    model = whisper.load_model(str(_built("whisper-tiny.en")), device="cpu")
    assert (model.dims.n_audio_layer, model.dims.n_audio_state, model.dims.n_vocab) == (4, 384, 51864)
    t = np.arange(whisper.audio.SAMPLE_RATE) / whisper.audio.SAMPLE_RATE
    one_second = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    mel = whisper.log_mel_spectrogram(torch.from_numpy(whisper.pad_or_trim(one_second)))
    with torch.inference_mode():
        features = model.embed_audio(mel[None])
    assert features.shape == (1, 1500, 384)
    assert torch.isfinite(features).all()


@pytest.mark.real
def test_real_smollm2_prefers_a_fluent_sentence():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _built("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer) == 49152

    def loss(text: str) -> float:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.inference_mode():
            return float(model(input_ids=ids, labels=ids).loss)

    words = FLUENT.rstrip(".").split()
    random.Random(1).shuffle(words)
    fluent, shuffled = loss(FLUENT), loss(" ".join(words) + ".")
    assert fluent < 5.0 and fluent < shuffled - 1.0, (fluent, shuffled)
