"""The offline speech translation corpus: Ding sentence pairs with synthetic English speech.

``build_offline_corpus(out_dir)`` writes ``out_dir/audio/<id>.flac`` (16 kHz mono) and the manifests
``out_dir/{train,dev,test}.tsv``. Splits come from a hash of the normalised English sentence (stable when the
dictionary grows); ``max_utterances`` takes the first N sentences of a second, independent hash order, so the
subset grows with N and each split gets its proportional share in expectation. ``split_caps`` (e.g.
``{"test": 500}``) caps a split at its first N sentences of that same order, so a large test split does not
need a proportionally large (and slow to synthesise) train split; a bigger cap is again a superset.

The build is resumable: an audio file is written under a temporary name and renamed when complete, a second
run synthesises only the files that are missing (or unreadable), and the manifests list exactly the files that exist.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from speech_frontend.audio import SAMPLE_RATE, AudioError, to_mono_16k

from .audio_files import AUDIO_FORMATS, PART_SUFFIX, probe_audio, write_audio
from .ding import DingFilter, SentencePair, read_ding
from .errors import CorpusError
from .manifest import SPLITS, Row, write_manifest
from .sources import ding_file
from .splits import SplitShares, selection_rank, split_of, stable_id
from .synth import SPEAKERS, VOICES, Synthesizer, check_voice, make_synthesizer

log = logging.getLogger("training.corpus")

AUDIO_DIR = "audio"
META_FILE = "corpus.json"  # how the folder was built; a rerun must be of the same kind, voice and format
ID_PREFIX = "ding"
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)  # Piper is ~0.3 CPU-s per sentence with one thread


@dataclass(frozen=True)
class PlannedUtterance:
    id: str
    split: str
    pair: SentencePair


@dataclass(frozen=True)
class BuildReport:
    """What a build did. ``counts`` are manifest rows per split."""

    counts: dict[str, int]
    made: int
    reused: int
    failed: list[str] = field(default_factory=list)  # ids whose synthesis failed (logged with the reason)
    seconds: float = 0.0
    audio_hours: float = 0.0

    @property
    def utterances_per_second(self) -> float:
        return self.made / self.seconds if self.seconds > 0 else 0.0


def plan_corpus(
    pairs: list[SentencePair],
    max_utterances: int | None = None,
    shares: SplitShares | None = None,
    split_caps: dict[str, int] | None = None,
) -> list[PlannedUtterance]:
    """Assign ids and splits; keep the first ``max_utterances`` of the stable order, then the first
    ``split_caps[split]`` of each capped split. Result in file order."""
    shares = shares or SplitShares()
    split_caps = split_caps or {}
    for split, cap in split_caps.items():
        if split not in SPLITS or cap < 0:
            raise ValueError(f"split cap {split}={cap}: expected one of {', '.join(SPLITS)} and a count >= 0")
    if max_utterances is not None and max_utterances < 0:
        raise ValueError(f"max_utterances {max_utterances} is negative")
    chosen = sorted(pairs, key=lambda p: selection_rank(p.key))[:max_utterances]
    taken: Counter[str] = Counter()
    planned = []
    for p in chosen:
        split = split_of(p.key, shares)
        if taken[split] >= split_caps.get(split, len(chosen)):
            continue
        taken[split] += 1
        planned.append(PlannedUtterance(stable_id(ID_PREFIX, p.key), split, p))
    planned.sort(key=lambda u: u.pair.line)
    ids = Counter(u.id for u in planned)
    clash = [i for i, n in ids.items() if n > 1]
    if clash:  # 48-bit ids over ~20k sentences: practically never
        raise RuntimeError(f"id collision for {clash[:3]}; lengthen stable_id")
    return planned


# --- synthesis, in this process or in worker processes -------------------------------------------------

_worker_synthesize: Synthesizer | None = None
_worker_error = ""


def _init_worker(voice: str) -> None:
    # an initializer that raises makes multiprocessing restart workers forever: keep the error for the jobs
    global _worker_synthesize, _worker_error
    try:
        _worker_synthesize = make_synthesizer(voice, threads=1)
    except Exception as e:  # reported for every job of this worker, then by the builder
        _worker_error = f"{type(e).__name__}: {e}"


def _make_one(job: tuple[str, str, str, str], synthesize: Synthesizer) -> tuple[str, str | None]:
    """Synthesise one text into one file; (id, None) or (id, why it failed)."""
    utt_id, text, path, audio_format = job
    try:
        samples, rate = synthesize(text)
        write_audio(path, to_mono_16k(samples, rate, name=utt_id), audio_format)
    except (AudioError, RuntimeError, ValueError, OSError) as e:
        return utt_id, f"{type(e).__name__}: {e}"
    return utt_id, None


def _make_in_worker(job: tuple[str, str, str, str]) -> tuple[str, str | None]:
    if _worker_synthesize is None:
        return job[0], f"the voice did not load in this worker: {_worker_error}"
    return _make_one(job, _worker_synthesize)


def _kind(meta: dict) -> str:
    if meta.get("text_only"):
        return "a text-only corpus"
    return f"a speech corpus (voice {meta.get('voice')}, format {meta.get('format')})"


def _speech_manifest(out_dir: Path) -> Path | None:
    """A split manifest in ``out_dir`` whose first row has audio (text-only corpora made before ``META_FILE``
    recorded the kind have none), or None."""
    for split in SPLITS:
        manifest = out_dir / f"{split}.tsv"
        if manifest.is_file():
            with open(manifest, encoding="utf-8", errors="replace") as f:
                header, first = f.readline().rstrip("\n").split("\t"), f.readline().rstrip("\n").split("\t")
            if "audio" in header and len(first) == len(header) and first[header.index("audio")].strip():
                return manifest
    return None


def _check_meta(out_dir: Path, meta: dict) -> None:
    """Refuse to rebuild a folder with another voice, format or kind (speech / text-only), which would replace
    its manifests; then record ``meta`` there."""
    path = out_dir / META_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorpusError(path, None, f"unreadable ({e}); remove it to build this folder again") from None
        if bool(old.get("text_only")) != meta["text_only"]:
            flag = "pass --text-only" if old.get("text_only") else "drop --text-only"
            raise CorpusError(
                path, None, f"this folder holds {_kind(old)}, not {_kind(meta)}; {flag} or pass a new --out"
            )
        for key in () if meta["text_only"] else ("voice", "format"):
            if old.get(key) != meta[key]:
                raise CorpusError(
                    path,
                    None,
                    f"this folder was built with {key} {old.get(key)!r}, not "
                    f"{meta[key]!r}; pass --{key} {old.get(key)} or a new --out",
                )
    elif not meta["text_only"] and any((out_dir / f"{s}.tsv").is_file() for s in SPLITS):
        raise CorpusError(
            out_dir,
            None,
            f"holds manifests but no {META_FILE} (a text-only corpus, or another command's output); building "
            "speech here would replace them: pass a new --out",
        )
    elif meta["text_only"] and (speech := _speech_manifest(out_dir)):
        raise CorpusError(
            speech, None, f"holds speech rows and the folder has no {META_FILE} (another command's output, e.g. "
            "mustc or covost); a text-only build here would replace it: pass a new --out",
        )  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")  # written whole or not at all: a kill leaves the earlier record
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def build_offline_corpus(
    out_dir: str | os.PathLike,
    *,
    max_utterances: int | None = None,
    split_caps: dict[str, int] | None = None,
    voice: str = "piper",
    audio_format: str = "flac",
    workers: int = DEFAULT_WORKERS,
    shares: SplitShares | None = None,
    filt: DingFilter | None = None,
    ding: str | os.PathLike | None = None,
    synthesize: Synthesizer | None = None,
    text_only: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Build (or complete) the offline corpus in ``out_dir``; see the module docstring.

    ``synthesize`` replaces the named voice (runs in this process; ``voice`` then only names the speaker).
    ``workers`` > 1 synthesises in that many processes with one ONNX thread each. ``text_only`` writes
    text-to-text manifests (empty audio) and synthesises nothing.
    """
    if voice not in VOICES:
        raise ValueError(f"voice {voice!r}; choose one of {', '.join(VOICES)}")
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"format {audio_format!r}; choose one of {', '.join(AUDIO_FORMATS)}")
    shares, filt = shares or SplitShares(), filt or DingFilter()
    out_dir = Path(out_dir).resolve()
    start = time.perf_counter()
    ding_path = Path(ding) if ding is not None else ding_file()
    pairs = read_ding(ding_path, filt)
    planned = plan_corpus(pairs, max_utterances, shares, split_caps)
    log.info("%s: %d sentence pairs; building %d", ding_path, len(pairs), len(planned))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "text_only": text_only,
        "shares": asdict(shares),
        "filter": asdict(filt),
        "ding": str(ding_path),
        "max_utterances": max_utterances,  # the selection: which sentences the manifests hold
        "split_caps": dict(split_caps or {}),
    }

    if text_only:
        _check_meta(out_dir, meta)
        counts = {
            s: write_manifest(
                out_dir / f"{s}.tsv", [Row(u.id, "", 0, u.pair.en, u.pair.de) for u in planned if u.split == s]
            )
            for s in SPLITS
        }
        return BuildReport(counts, made=0, reused=0, seconds=time.perf_counter() - start)

    meta.update(voice=voice, speaker=SPEAKERS[voice], format=audio_format, sample_rate=SAMPLE_RATE)
    _check_meta(out_dir, meta)
    audio_dir = out_dir / AUDIO_DIR
    audio_dir.mkdir(exist_ok=True)
    for stale in audio_dir.glob(f"*{PART_SUFFIX}"):  # left by an interrupted run
        stale.unlink()

    def target(u: PlannedUtterance) -> Path:
        return audio_dir / f"{u.id}.{audio_format}"

    def unusable(u: PlannedUtterance) -> bool:
        """Missing, or a file whose header cannot be read (e.g. 0 bytes after a crash): removed, to be made again."""
        path = target(u)
        if not path.is_file():
            return True
        try:
            probe_audio(path)
        except AudioError as e:
            log.warning("%s; removing it and synthesising it again", e)
            path.unlink()
            return True
        return False

    todo = [u for u in planned if unusable(u)]
    reused = len(planned) - len(todo)
    jobs = [(u.id, u.pair.en, str(target(u)), audio_format) for u in todo]
    failures: dict[str, str] = {}
    synth_start = time.perf_counter()
    workers = max(1, min(workers, len(jobs)))
    if jobs:
        log.info("synthesising %d utterances with %s (%d already there)", len(jobs), voice, reused)
        if synthesize is None:
            check_voice(voice)  # a missing voice stops here, with what to install, not in every worker
        bar = tqdm(total=len(jobs), unit="utt", desc="synthesising", disable=not progress, smoothing=0.1)
        if synthesize is None and workers > 1:
            context = multiprocessing.get_context("spawn")  # no ONNX session is ever shared through a fork
            with context.Pool(workers, initializer=_init_worker, initargs=(voice,)) as pool:
                for utt_id, error in pool.imap_unordered(_make_in_worker, jobs, chunksize=4):
                    if error:
                        failures[utt_id] = error
                    bar.update()
        else:
            synth = synthesize or make_synthesizer(voice, threads=1)
            for job in jobs:
                utt_id, error = _make_one(job, synth)
                if error:
                    failures[utt_id] = error
                bar.update()
        bar.close()
    synth_seconds = time.perf_counter() - synth_start
    texts = {u.id: u.pair.en for u in todo}
    for utt_id, error in sorted(failures.items()):
        log.warning("no audio for %s (%r): %s", utt_id, texts[utt_id], error)

    rows: dict[str, list[Row]] = {s: [] for s in SPLITS}
    frames_total = 0
    for u in planned:
        path = target(u)
        if not path.is_file():
            continue
        header = probe_audio(path)
        if header.sample_rate != SAMPLE_RATE or header.channels != 1:
            raise CorpusError(
                path,
                None,
                f"{header.sample_rate} Hz, {header.channels} channels; expected 16 kHz mono: delete the file and rerun",
            )
        rows[u.split].append(Row(u.id, str(path), header.frames, u.pair.en, u.pair.de, SPEAKERS[voice]))
        frames_total += header.frames
    counts = {s: write_manifest(out_dir / f"{s}.tsv", rows[s]) for s in SPLITS}
    chosen = {target(u).name for u in planned}
    unused = [p for p in audio_dir.glob(f"*.{audio_format}") if p.name not in chosen]
    if unused:
        log.info("%d audio files in %s are not in this selection (another --max-utterances or filter); "
                 "kept, not listed", len(unused), audio_dir)
    report = BuildReport(
        counts,
        made=len(jobs) - len(failures),
        reused=reused,
        failed=sorted(failures),
        seconds=synth_seconds,
        audio_hours=frames_total / SAMPLE_RATE / 3600,
    )
    log.info(
        "made %d utterances in %.1f s (%.2f utt/s), reused %d, failed %d; %s; %.2f h of audio",
        report.made,
        synth_seconds,
        report.utterances_per_second,
        reused,
        len(failures),
        ", ".join(f"{s} {n}" for s, n in counts.items()),
        report.audio_hours,
    )
    return report
