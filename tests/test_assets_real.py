"""The asset cache: its bookkeeping on a fake asset (fast), and the real built assets (marked ``real``)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
from pathlib import Path

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


def _built_entry(cache) -> dict:
    return json.loads((cache / "assets.json").read_text())["assets"]["fake"]


def test_the_manifest_records_each_files_sha256(fake_asset):
    cache, _ = fake_asset
    assert build_assets(["fake"]) == 0
    assert _built_entry(cache)["files"]["data.txt"]["sha256"] == hashlib.sha256(b"hello").hexdigest()


def test_verify_rebuilds_a_file_changed_to_other_bytes_of_the_same_size(fake_asset, capsys):
    cache, calls = fake_asset
    assert build_assets(["fake"]) == 0 and len(calls) == 1
    (cache / "fake" / "data.txt").write_text("jello")  # same size: only the hash tells
    assert build_assets(["fake"]) == 0 and len(calls) == 1  # without --verify: sizes only, fast
    capsys.readouterr()
    assert build_assets(["fake"], verify=True) == 0 and len(calls) == 2
    assert "data.txt does not match its sha256" in capsys.readouterr().out
    assert asset_file("fake").read_text() == "hello"


def test_a_deleted_file_is_rebuilt_and_until_then_the_asset_says_it_is_missing(fake_asset, capsys):
    cache, calls = fake_asset
    assert build_assets(["fake"]) == 0
    (cache / "fake" / "data.txt").unlink()
    with pytest.raises(AssetMissingError, match=r"data\.txt is missing: rebuild it with .*--only fake --force"):
        asset_file("fake")
    capsys.readouterr()
    assert build_assets(["fake"]) == 0 and len(calls) == 2
    assert "building (data.txt is missing)" in capsys.readouterr().out
    assert asset_file("fake").read_text() == "hello"


def test_an_asset_built_from_another_version_of_an_installed_package_is_rebuilt(fake_asset, monkeypatch, capsys):
    cache, _ = fake_asset
    versions = iter(["0.0.1", np.__version__])

    def build(tmp):
        (tmp / "data.txt").write_text("hello")
        return [Source("numpy", next(versions))], "fine"

    monkeypatch.setitem(assets.ASSETS, "fake", Asset("fake", "data.txt", "a fake asset", build))
    assert build_assets(["fake"]) == 0
    capsys.readouterr()
    assert build_assets(["fake"]) == 0
    assert f"building (numpy is now {np.__version__} (built from 0.0.1))" in capsys.readouterr().out
    assert build_assets(["fake"]) == 0
    assert "fake: up to date" in capsys.readouterr().out


@pytest.mark.parametrize("manifest", ["{\"version\": 1, \"assets\": {\"fa", "[]", "{\"assets\": []}"])
def test_a_damaged_manifest_means_not_built_and_the_next_build_repairs_it(fake_asset, manifest):
    cache, calls = fake_asset
    assert build_assets(["fake"]) == 0
    (cache / "assets.json").write_text(manifest)
    with pytest.raises(AssetMissingError, match="run `make assets`"):
        asset_path("fake")  # the directory is there, but nothing vouches for it
    assert build_assets(["fake"]) == 0 and len(calls) == 2
    assert asset_file("fake").read_text() == "hello"


def test_a_kill_after_the_swap_leaves_the_old_asset_aside_and_the_next_run_drops_it(fake_asset):
    cache, calls = fake_asset
    assert build_assets(["fake"]) == 0
    aside = cache / f"{assets.OLD_PREFIX}fake.12345"
    aside.mkdir()
    (aside / "data.txt").write_text("old!!")
    assert build_assets(["fake"]) == 0 and len(calls) == 1
    assert not aside.exists() and asset_file("fake").read_text() == "hello"


def test_an_asset_whose_name_has_a_dot_is_moved_back_after_a_kill_mid_swap(fake_asset, monkeypatch):
    cache, calls = fake_asset
    asset = assets.ASSETS["fake"]
    monkeypatch.setitem(assets.ASSETS, "fake.en", Asset("fake.en", asset.main, asset.what, asset.build))
    assert build_assets(["fake.en"]) == 0
    (cache / "fake.en").rename(cache / f"{assets.OLD_PREFIX}fake.en.12345")
    assert build_assets(["fake.en"]) == 0 and len(calls) == 1  # moved back to fake.en, not to fake
    assert asset_file("fake.en").read_text() == "hello" and not (cache / "fake").exists()


def test_a_forced_rebuild_leaves_only_the_new_asset(fake_asset):
    cache, calls = fake_asset
    assert build_assets(["fake"]) == 0
    assert build_assets(["fake"], force=True) == 0 and len(calls) == 2
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "assets.json", "fake"]


def test_built_files_are_readable_by_everyone_sharing_the_cache(fake_asset, monkeypatch):
    cache, _ = fake_asset

    def owner_only(tmp):
        (tmp / "weights").mkdir()
        for path in (tmp / "data.txt", tmp / "weights" / "w.bin"):
            path.write_text("hello")
            path.chmod(0o600)
        (tmp / "weights").chmod(0o700)
        return [Source("fake-package", "1.0")], "fine"

    monkeypatch.setitem(assets.ASSETS, "fake", Asset("fake", "data.txt", "a fake asset", owner_only))
    assert build_assets(["fake"]) == 0
    modes = {p.relative_to(cache / "fake").as_posix(): p.stat().st_mode & 0o777 for p in (cache / "fake").rglob("*")}
    assert modes == {"data.txt": 0o644, "weights": 0o755, "weights/w.bin": 0o644}


def test_an_empty_cache_variable_means_the_default_cache(monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, "")
    assert assets.cache_dir() == Path(assets.DEFAULT_CACHE).expanduser().absolute()


def test_the_command_exits_1_when_an_asset_fails_and_0_when_all_are_built(fake_asset, monkeypatch, capsys):
    cache, _ = fake_asset
    assert assets.main(["--only", "fake", "--cache", str(cache)]) == 0

    def broken(tmp):
        raise assets.AssetError("package fake-package is not installed: pip install fake-package==1.0")

    monkeypatch.setitem(assets.ASSETS, "fake", Asset("fake", "data.txt", "a fake asset", broken))
    assert assets.main(["--only", "fake", "--cache", str(cache), "--force"]) == 1
    assert "error: 1 asset(s) failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("heard", "wer"),
    [("The weather is nice today.", 0.0), ("the weather's nice today", 0.2), ("weather is nice", 0.4), ("", 1.0)],
)
def test_the_conversion_check_scores_word_errors_against_the_sentence(heard: str, wer: float):
    """A converted Whisper is kept when it hears CHECK_SENTENCE with a WER of at most MAX_CHECK_WER."""
    assert assets._wer(assets.CHECK_SENTENCE, heard) == pytest.approx(wer)


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
