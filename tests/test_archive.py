"""simul_agents.archive: a sweep's finished runs kept under results/ and put back on a fresh machine."""

import csv
import gzip
from pathlib import Path

import pytest

from simul_agents import archive


def _sweep(eval_dir: Path, runs: dict[str, str], table: str = "sweep.csv", output_root: Path | None = None) -> None:
    """Runs ``<head>/<param>`` with these instances.log texts, listed in ``table`` (outputs under output_root)."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    for run, log in runs.items():
        (eval_dir / run).mkdir(parents=True, exist_ok=True)
        (eval_dir / run / archive.LOG).write_text(log, encoding="utf-8")
        (eval_dir / run / "config.yaml").write_text(f"run: {run}\n", encoding="utf-8")
    with open(eval_dir / table, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["output", "AL"])
        writer.writeheader()
        writer.writerows({"output": str((output_root or eval_dir) / run), "AL": 1.0} for run in runs)


def test_a_packed_sweep_unpacks_on_a_fresh_machine_with_its_logs_configs_and_table(tmp_path: Path) -> None:
    _sweep(tmp_path / "eval", {"wait-k/k=1": '{"index": 0}\n', "probe/t=0.5": '{"index": 1}\n'})
    assert archive.pack(tmp_path / "eval", tmp_path / "results") == 2
    assert archive.unpack(tmp_path / "results", tmp_path / "fresh") == 2
    for run in ("wait-k/k=1", "probe/t=0.5"):
        for name in (archive.LOG, "config.yaml"):
            assert (tmp_path / "fresh" / run / name).read_bytes() == (tmp_path / "eval" / run / name).read_bytes()
    assert (tmp_path / "fresh" / "sweep.csv").read_bytes() == (tmp_path / "eval" / "sweep.csv").read_bytes()


def test_packing_again_copies_only_the_runs_whose_log_changed(tmp_path: Path) -> None:
    _sweep(tmp_path / "eval", {"wait-k/k=1": "a\n", "wait-k/k=2": "b\n"})
    assert archive.pack(tmp_path / "eval", tmp_path / "results") == 2
    assert archive.pack(tmp_path / "eval", tmp_path / "results") == 0
    (tmp_path / "eval" / "wait-k/k=2" / archive.LOG).write_text("b, run again\n", encoding="utf-8")
    assert archive.pack(tmp_path / "eval", tmp_path / "results") == 1
    packed = tmp_path / "results" / "wait-k/k=2" / (archive.LOG + ".gz")
    assert gzip.decompress(packed.read_bytes()) == b"b, run again\n"


def test_the_same_log_packs_to_the_same_bytes_at_any_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """So an unchanged run never shows up as a change in git."""
    _sweep(tmp_path / "eval", {"wait-k/k=1": "a\n"})
    packed = []
    for now in (1_000_000_000.0, 1_700_000_000.0):
        monkeypatch.setattr(gzip.time, "time", lambda now=now: now)
        archive.pack(tmp_path / "eval", tmp_path / f"results-{int(now)}")
        packed.append((tmp_path / f"results-{int(now)}" / "wait-k/k=1" / (archive.LOG + ".gz")).read_bytes())
    assert packed[0] == packed[1]


def test_unpack_leaves_a_run_and_a_table_already_here_alone(tmp_path: Path) -> None:
    """What is in the evaluation folder may be newer than the archive."""
    _sweep(tmp_path / "eval", {"wait-k/k=1": "old\n", "wait-k/k=2": "old\n"})
    archive.pack(tmp_path / "eval", tmp_path / "results")
    (tmp_path / "eval" / "wait-k/k=1" / archive.LOG).write_text("newer\n", encoding="utf-8")
    (tmp_path / "eval" / "wait-k/k=2" / archive.LOG).unlink()
    (tmp_path / "eval" / "sweep.csv").write_text("output\nnewer\n", encoding="utf-8")
    assert archive.unpack(tmp_path / "results", tmp_path / "eval") == 1
    assert (tmp_path / "eval" / "wait-k/k=1" / archive.LOG).read_text(encoding="utf-8") == "newer\n"
    assert (tmp_path / "eval" / "wait-k/k=2" / archive.LOG).read_text(encoding="utf-8") == "old\n"
    assert (tmp_path / "eval" / "sweep.csv").read_text(encoding="utf-8") == "output\nnewer\n"


def test_a_table_written_on_another_machine_names_its_runs_by_their_last_two_parts(tmp_path: Path) -> None:
    _sweep(tmp_path / "eval", {"wait-k/k=1": "a\n"}, output_root=Path("/elsewhere/runs/eval"))
    assert archive.finished_runs(tmp_path / "eval") == [Path("wait-k/k=1")]
    assert archive.pack(tmp_path / "eval", tmp_path / "results") == 1


def test_runs_of_the_earlier_table_are_packed_and_listed_when_their_logs_are_missing(tmp_path: Path) -> None:
    _sweep(tmp_path / "eval", {"wait-k/k=1": "a\n"})
    _sweep(tmp_path / "eval", {"seeded/k=3": "s\n"}, table=archive.EARLIER)
    assert archive.finished_runs(tmp_path / "eval") == [Path("wait-k/k=1"), Path("seeded/k=3")]
    (tmp_path / "eval" / "seeded/k=3" / archive.LOG).unlink()
    assert archive.missing_logs(tmp_path / "eval") == [Path("seeded/k=3")]
