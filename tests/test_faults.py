"""Faults: a training run killed at random points, an asset build killed mid-conversion, a disk that fills up.

What each proves: whatever the moment of a SIGKILL, the newest checkpoint that ``--resume`` would pick loads, and
resuming reproduces the uninterrupted losses exactly; a killed asset build never leaves an asset that looks built;
a full disk during a checkpoint write stops the run with one line that says so and keeps the previous checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from speech_frontend import assets
from speech_frontend.assets import Asset, AssetMissingError, Source, asset_file, build_assets
from streaming_llm.checkpoint import load_checkpoint
from training.config import load_config
from training.train import TrainingError, latest_checkpoint, main, train

ROOT = Path(__file__).resolve().parents[1]
TINY_TEXT = ROOT / "training" / "configs" / "tiny_text.yaml"
MANIFEST = ROOT / "tests" / "data" / "tiny_text.tsv"
RUN = {"max_steps": 10, "save_every": 1, "keep_last": 2, "batch_size": 3, "eval_every": 1000, "dev_manifest": ""}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the numerics of the in-process run


def losses(out: Path) -> list[tuple[int, float, float, float]]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    return [(r["step"], r["loss"], r["mslm"], r["spsd"]) for r in rows]


def logged_steps(out: Path) -> int:
    path = out / "log.jsonl"
    return path.read_text().count('"loss"') if path.exists() else 0


def assert_loads(checkpoint: Path) -> None:
    """What ``--resume`` reads: the model directory and the trainer state."""
    load_checkpoint(checkpoint / "model")
    state = torch.load(checkpoint / "trainer.pt", weights_only=False)
    assert state["step"] == int(checkpoint.name.split("-")[1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("reference") / "run"
    train(load_config(TINY_TEXT, {**RUN, "out_dir": str(out), "train_manifest": str(MANIFEST)}))
    return losses(out)


# ---- SIGKILL during training ---------------------------------------------------------------------------


@pytest.mark.slow
def test_training_killed_at_random_points_always_resumes_to_the_uninterrupted_losses(tmp_path, reference):
    """Three SIGKILLs at seeded random moments (checkpoints are written every step, so some land mid-write)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.train", "--config", str(TINY_TEXT), f"out_dir={out}",
           f"train_manifest={MANIFEST}", *(f"{k}={v}" for k, v in RUN.items())]  # fmt: skip
    rng = random.Random(8)
    kills = 0
    for attempt in range(3):
        proc = subprocess.Popen(cmd + (["--resume"] if attempt else []), cwd=ROOT, env=ONE_THREAD,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        wanted = logged_steps(out) + rng.randint(1, 2)
        deadline = time.time() + 120
        while proc.poll() is None and logged_steps(out) < wanted and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the next step or its checkpoint write
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        found = latest_checkpoint(out / "checkpoints")
        assert found is not None
        assert_loads(found)  # never a checkpoint that fails to load
    assert kills >= 2, "the run finished before it could be killed; kill earlier"
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(out) == reference  # bit-identical, step by step
    assert not list((out / "checkpoints").glob(".tmp-*")), "a killed write's temporary folder was not cleaned up"


def test_a_log_line_cut_off_by_a_kill_does_not_stop_the_resume(tmp_path, reference):
    cfg = load_config(TINY_TEXT, {**RUN, "max_steps": 4, "out_dir": str(tmp_path / "run"),
                                  "train_manifest": str(MANIFEST)})  # fmt: skip
    train(cfg)
    log = tmp_path / "run" / "log.jsonl"
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    log.write_text(log.read_text() + '{"step": 5, "lr": 0.00')  # the kill came in the middle of a write
    train(load_config(TINY_TEXT, {**RUN, "max_steps": 5, "out_dir": str(tmp_path / "run"),
                                  "train_manifest": str(MANIFEST)}), resume=True)  # fmt: skip
    assert losses(tmp_path / "run") == reference[:5]


# ---- the asset cache -----------------------------------------------------------------------------------

SLOW_BUILD = """
import sys, time
from pathlib import Path
from speech_frontend import assets

def build(tmp):
    (tmp / "model.bin").write_bytes(b"half a conversion")
    Path(sys.argv[2]).touch()  # tell the test we are mid-conversion
    time.sleep(60)
    (tmp / "model.bin").write_bytes(b"the whole converted model")
    return [assets.Source("fake-package", "1.0")], "fine"

assets.ASSETS["fake"] = assets.Asset("fake", "model.bin", "a slow fake asset", build)
sys.exit(assets.build_assets(["fake"], Path(sys.argv[1]), force=True))
"""


def kill_mid_conversion(tmp_path: Path, cache: Path) -> None:
    script = tmp_path / "slow_build.py"
    script.write_text(textwrap.dedent(SLOW_BUILD))
    started = tmp_path / "started"
    started.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(script), str(cache), str(started)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 60
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert started.exists(), "the fake build never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    def build(tmp):
        (tmp / "model.bin").write_bytes(b"the whole converted model")
        return [Source("fake-package", "1.0")], "fine"

    monkeypatch.setitem(assets.ASSETS, "fake", Asset("fake", "model.bin", "a fake asset", build))
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_asset_build_killed_mid_conversion_leaves_no_asset_and_the_next_build_completes(tmp_path, fake_asset):
    cache = fake_asset
    kill_mid_conversion(tmp_path, cache)
    assert [p for p in cache.iterdir() if p.name.startswith(assets.TMP_PREFIX)], "the half build was not in a temp dir"
    with pytest.raises(AssetMissingError, match="run `make assets`"):
        asset_file("fake")  # a half-converted file is never handed out
    assert build_assets(["fake"]) == 0
    assert asset_file("fake").read_bytes() == b"the whole converted model"
    assert not [p for p in cache.iterdir() if p.name.startswith(assets.TMP_PREFIX)], "leftovers were not cleaned"


def test_forced_rebuild_killed_mid_conversion_keeps_the_old_asset(tmp_path, fake_asset):
    cache = fake_asset
    assert build_assets(["fake"]) == 0
    before = json.loads((cache / "assets.json").read_text())
    kill_mid_conversion(tmp_path, cache)
    assert asset_file("fake").read_bytes() == b"the whole converted model"
    assert json.loads((cache / "assets.json").read_text()) == before
    assert build_assets(["fake"]) == 0  # and it is up to date: no rebuild needed
    assert asset_file("fake").read_bytes() == b"the whole converted model"


# ---- a full disk -----------------------------------------------------------------------------------------


def test_full_disk_during_a_checkpoint_write_is_one_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, reference
):
    import training.train as trainer

    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "step-0000004" in str(path):
            Path(path).write_bytes(b"partial")  # what a full disk leaves: part of the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(trainer.torch, "save", save)
    overrides = {**RUN, "out_dir": str(tmp_path / "run"), "train_manifest": str(MANIFEST), "save_every": 2}
    with pytest.raises(TrainingError, match=r"checkpoint of step 4 .*No space left on device.*is the disk full\?.*"
                                            r"previous checkpoint is kept: .*step-0000002"):  # fmt: skip
        train(load_config(TINY_TEXT, overrides))
    root = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(root) == root / "step-0000002"
    assert_loads(root / "step-0000002")
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002"]  # the half-written step 4 is gone
    monkeypatch.setattr(trainer.torch, "save", real_save)  # space freed: resume continues exactly
    train(load_config(TINY_TEXT, {**overrides, "max_steps": 6}), resume=True)
    assert losses(tmp_path / "run") == reference[:6]


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    import training.train as trainer

    def save(obj, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 353344 vs 353232")

    monkeypatch.setattr(trainer.torch, "save", save)  # what torch.save raises on a real full disk
    argv = ["--config", str(TINY_TEXT), f"out_dir={tmp_path / 'run'}", f"train_manifest={MANIFEST}",
            "dev_manifest=", "max_steps=2", "save_every=2"]  # fmt: skip
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "could not write the checkpoint of step 2" in err[0] and "is the disk full?" in err[0]


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -r -m` (user and mount namespaces) for a tmpfs")
def test_a_really_full_tmpfs_during_a_checkpoint_write(tmp_path):
    """A 2 MiB tmpfs holds one tiny checkpoint (1.3 MB) but not two: the second write fills the disk."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    script = tmp_path / "full.sh"
    script.write_text(textwrap.dedent(f"""
        mount -t tmpfs -o size=2m tmpfs {mount} || exit 99
        {sys.executable} -m training.train --config {TINY_TEXT} out_dir={mount}/run train_manifest={MANIFEST} \\
            dev_manifest= max_steps=6 save_every=2 keep_last=3
        echo "rc=$?"
        {sys.executable} -c "from training.train import latest_checkpoint; from pathlib import Path; \\
from streaming_llm.checkpoint import load_checkpoint; c = latest_checkpoint(Path('{mount}/run/checkpoints')); \\
load_checkpoint(c / 'model'); print('kept', c.name)"
        ls -a {mount}/run/checkpoints
    """))
    done = subprocess.run(["unshare", "-r", "-m", "bash", str(script)], cwd=ROOT, env=ONE_THREAD,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith(("error:", "Traceback"))]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "could not write the checkpoint of step 4" in errors[0] and "is the disk full?" in errors[0]
    assert "previous checkpoint is kept" in errors[0] and "step-0000002" in errors[0]
    assert "rc=1" in done.stdout and "kept step-0000002" in done.stdout, done.stdout
    assert ".tmp-step" not in done.stdout  # the half-written folder was removed
