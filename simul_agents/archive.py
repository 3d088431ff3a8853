"""A sweep's finished runs, kept under ``results/`` so that they outlive the machine that ran them.

A CPU bench runs for days over sessions that may land on a fresh machine, where ``runs/`` is gone. What the
comparisons and the summary need from a sweep is small: each finished run's ``instances.log`` (SimulEval's
per-instance predictions and delays; gzipped, about 7 KB per 100 speech instances), its ``failed.jsonl`` and
``config.yaml``, and the sweep's ``sweep.csv``. ``pack`` copies those from an evaluation folder into the archive;
``unpack`` puts them back, after which the sweep finds those runs complete and only scores them again.

    archive/<head>/<param>/instances.log.gz, failed.jsonl, config.yaml; archive/sweep.csv
"""

from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

SMALL_FILES = ("failed.jsonl", "config.yaml")  # copied as they are
LOG = "instances.log"
EARLIER = "earlier.csv"  # rows of runs measured before their logs were kept (the bench's ``seed_tables``)


def finished_runs(eval_dir: Path) -> list[Path]:
    """The run folders a sweep has scored (its ``sweep.csv`` rows, and the ``earlier.csv`` rows of runs measured
    before logs were kept), relative to ``eval_dir``."""
    outputs = []
    for name in ("sweep.csv", EARLIER):
        if (eval_dir / name).is_file():
            with open(eval_dir / name, newline="", encoding="utf-8") as f:
                outputs += [Path(row["output"]) for row in csv.DictReader(f) if row.get("output")]
    runs = []
    for output in outputs:
        run = run_folder(eval_dir, output)
        if run not in runs:
            runs.append(run)
    return runs


def run_folder(eval_dir: Path, output: Path) -> Path:
    """A sweep row's ``output`` relative to its evaluation folder: ``<head>/<param>``."""
    try:
        return output.relative_to(eval_dir)
    except ValueError:  # an absolute path, or a table moved here: the last two parts are <head>/<param>
        return Path(*output.parts[-2:])


def pack(eval_dir: Path, archive: Path) -> int:
    """Copy every scored run of ``eval_dir`` into ``archive`` (only what changed); returns the runs copied."""
    copied = 0
    for run in finished_runs(eval_dir):
        log = eval_dir / run / LOG
        if not log.is_file():
            continue
        target = archive / run / (LOG + ".gz")
        data = log.read_bytes()
        if target.is_file() and gzip.decompress(target.read_bytes()) == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        # mtime 0: the same log always gives the same bytes, so an unchanged run never shows up as a change in git
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(data)
        tmp.replace(target)
        for name in SMALL_FILES:
            if (eval_dir / run / name).is_file():
                shutil.copyfile(eval_dir / run / name, archive / run / name)
        copied += 1
    if (eval_dir / "sweep.csv").is_file():
        archive.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(eval_dir / "sweep.csv", archive / "sweep.csv")
    return copied


def unpack(archive: Path, eval_dir: Path) -> int:
    """Put the archived runs missing from ``eval_dir`` back (and its ``sweep.csv`` if it has none); returns the
    runs restored. A run already in ``eval_dir`` is left alone: it may be newer."""
    restored = 0
    for packed in sorted(archive.glob(f"*/*/{LOG}.gz")):
        run = packed.parent.relative_to(archive)
        if (eval_dir / run / LOG).is_file():
            continue
        (eval_dir / run).mkdir(parents=True, exist_ok=True)
        tmp = eval_dir / run / (LOG + ".tmp")
        tmp.write_bytes(gzip.decompress(packed.read_bytes()))
        tmp.replace(eval_dir / run / LOG)
        for name in SMALL_FILES:
            if (packed.parent / name).is_file():
                shutil.copyfile(packed.parent / name, eval_dir / run / name)
        restored += 1
    if (archive / "sweep.csv").is_file() and not (eval_dir / "sweep.csv").is_file():
        eval_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(archive / "sweep.csv", eval_dir / "sweep.csv")
    return restored


def missing_logs(eval_dir: Path) -> list[Path]:
    """The runs ``sweep.csv`` lists whose ``instances.log`` is not in ``eval_dir`` (a table restored without its
    logs): a comparison cannot use them."""
    return [run for run in finished_runs(eval_dir) if not (eval_dir / run / LOG).is_file()]
