"""Validation of a manifest: counts, hours, length histogram, sample rates, and every problem found.

Problems: a manifest without rows, lines that do not parse (field count, non-UTF-8, empty text, bad
n_frames), duplicate ids (both lines named), audio that is missing or unreadable, slices past the end of their
file, and ``n_frames`` that disagrees with the file. With ``decode`` every utterance is also decoded (slow,
but finds a compressed file that does not decode past its header).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from speech_frontend.audio import SAMPLE_RATE, AudioError, load_audio_spec

from .audio_files import probe_spec
from .errors import CorpusError
from .manifest import Row, read_manifest

DURATION_BINS_S = (1, 2, 5, 10, 20, 30)  # histogram edges, seconds
WORD_BINS = (3, 5, 10, 20, 30, 50)  # histogram edges, source words (text-to-text rows)
HEADER_ONLY_FORMATS = ("MP3",)  # header lengths that are estimates: not compared with n_frames unless decoded
BAR_WIDTH = 40


@dataclass(frozen=True)
class CheckReport:
    path: str
    rows: int
    speech_rows: int
    text_rows: int
    hours: float
    sample_rates: dict[int, int]  # rate -> files
    duration_histogram: dict[str, int]
    word_histogram: dict[str, int]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _histogram(values: list[float], edges: tuple[int, ...], unit: str) -> dict[str, int]:
    labels = [f"< {edges[0]} {unit}"] + [f"{a}-{b} {unit}" for a, b in zip(edges, edges[1:], strict=False)]
    labels.append(f">= {edges[-1]} {unit}")
    counts = dict.fromkeys(labels, 0)
    for v in values:
        i = sum(v >= e for e in edges)
        counts[labels[i]] += 1
    return counts


def check_manifest(path: str | os.PathLike, decode: bool = False, progress: bool = True) -> CheckReport:
    """Check every row; never raises for bad data (it is listed in ``problems``)."""
    errors: list[CorpusError] = []
    rows: list[Row] = []
    try:
        rows = read_manifest(path, on_error=errors.append)
    except CorpusError as e:
        errors.append(e)
    problems = [str(e) for e in errors]
    if not rows and not problems:
        problems.append(f"{path}: no rows, only the header; training needs at least one (rebuild the manifest)")
    rates: Counter[int] = Counter()
    seen_files: set[str] = set()
    speech = [r for r in rows if not r.is_text]
    for row in tqdm(speech, unit="utt", desc="checking audio", disable=not progress or not speech):
        try:
            header, n_frames = probe_spec(row.audio)
            if header.path not in seen_files:
                seen_files.add(header.path)
                rates[header.sample_rate] += 1
            if decode:
                n_frames = len(load_audio_spec(row.audio))
            if (decode or header.format not in HEADER_ONLY_FORMATS) and n_frames != row.n_frames:
                problems.append(
                    f"{path}: {row.id}: n_frames {row.n_frames}, but the audio has {n_frames} "
                    f"samples at 16 kHz; rebuild the manifest"
                )
        except AudioError as e:
            problems.append(f"{path}: {row.id}: {e}")
    return CheckReport(
        path=str(path),
        rows=len(rows),
        speech_rows=len(speech),
        text_rows=len(rows) - len(speech),
        hours=sum(r.n_frames for r in speech) / SAMPLE_RATE / 3600,
        sample_rates=dict(sorted(rates.items())),
        duration_histogram=_histogram([r.duration_s for r in speech], DURATION_BINS_S, "s") if speech else {},
        word_histogram=_histogram([len(r.src_text.split()) for r in rows], WORD_BINS, "words") if rows else {},
        problems=problems,
    )


def _bars(histogram: dict[str, int]) -> list[str]:
    top = max(histogram.values(), default=0) or 1
    width = max((len(k) for k in histogram), default=0)
    return [f"  {k:>{width}} {v:7d} {'#' * round(BAR_WIDTH * v / top)}" for k, v in histogram.items()]


def format_report(report: CheckReport, max_problems: int = 50) -> str:
    lines = [
        f"{report.path}: {report.rows} rows ({report.speech_rows} speech, {report.text_rows} text), "
        f"{report.hours:.2f} h of audio"
    ]
    if report.sample_rates:
        lines.append("sample rates (files): " + ", ".join(f"{r} Hz: {n}" for r, n in report.sample_rates.items()))
    if report.duration_histogram:
        lines += ["durations:"] + _bars(report.duration_histogram)
    if report.word_histogram:
        lines += ["source lengths:"] + _bars(report.word_histogram)
    if report.problems:
        lines.append(f"{len(report.problems)} problem(s):")
        lines += [f"  {p}" for p in report.problems[:max_problems]]
        if len(report.problems) > max_problems:
            lines.append(f"  ... and {len(report.problems) - max_problems} more")
    else:
        lines.append("no problems found")
    return "\n".join(lines)
