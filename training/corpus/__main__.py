"""``python -m training.corpus {build,check,simuleval,mustc,covost,tsv} ...``; ``--help`` on each."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .audio_files import AUDIO_FORMATS
from .check import check_manifest, format_report
from .covost import covost_tsv_name, read_covost
from .ding import DingFilter
from .errors import BadInput, CorpusError
from .manifest import SPLITS, write_manifest
from .mustc import parse_lang_pair, read_mustc
from .offline import DEFAULT_WORKERS, build_offline_corpus
from .simuleval_files import write_simuleval_files
from .sources import AssetMissing
from .splits import SplitShares
from .synth import VOICES, SynthesisError
from .user_tsv import read_user_tsv

log = logging.getLogger("training.corpus")

TSV_HELP = (
    "A headed, tab-separated UTF-8 file, one utterance per line, e.g. `audio<TAB>src_text<TAB>tgt_text`: "
    "an audio column (a file or path:offset:frames, relative to --audio-root), a source and a target text "
    "column, and optionally id and speaker columns; other columns are ignored. With --audio-column '' the rows "
    "are text-to-text."
)
LANG_PAIR_HELP = "source and target language, en-de or en_de (default: %(default)s)"


def _build(args: argparse.Namespace) -> int:
    report = build_offline_corpus(
        args.out,
        max_utterances=args.max_utterances,
        split_caps={s: getattr(args, f"max_{s}") for s in SPLITS if getattr(args, f"max_{s}") is not None},
        voice=args.voice,
        audio_format=args.format,
        workers=args.workers,
        shares=SplitShares(dev=args.dev_share, test=args.test_share),
        filt=DingFilter(min_words=args.min_words, max_words=args.max_words),
        ding=args.ding,
        text_only=args.text_only,
    )
    print(
        f"{args.out}: "
        + ", ".join(f"{s} {n}" for s, n in report.counts.items())
        + (
            f"; made {report.made} in {report.seconds:.1f} s ({report.utterances_per_second:.2f} utt/s),"
            f" reused {report.reused}, {report.audio_hours:.2f} h of audio"
            if not args.text_only
            else ""
        )
    )
    for split, n in report.counts.items():
        if n == 0 and getattr(args, f"max_{split}") != 0:
            log.warning("%s", _empty_split(args, split, report.counts))
    if report.failed:
        print(f"{len(report.failed)} sentence(s) could not be synthesised (see warnings); rerun to retry them")
        return 1
    return 0


def _empty_split(args: argparse.Namespace, split: str, counts: dict[str, int]) -> str:
    """Why ``split`` came out empty and which options give it rows (training needs train and dev)."""
    share = {"dev": args.dev_share, "test": args.test_share}.get(split, 1 - args.dev_share - args.test_share)
    empty = f"{Path(args.out) / f'{split}.tsv'} has no rows"
    if share == 0:
        return f"{empty}: --{split}-share is 0; pass e.g. --{split}-share 0.05"
    if args.max_utterances is None:
        return f"{empty}: the Ding file gives {split} none of its sentences; pass a larger --{split}-share"
    keep_train = f" --max-train {counts['train']}" if split != "train" and counts["train"] else ""
    return (
        f"{empty}: {split} takes about {share:.0%} of the sentences and --max-utterances {args.max_utterances} "
        f"gave it none; pass e.g. --max-utterances {math.ceil(10 / share)}{keep_train}"
    )


def _check(args: argparse.Namespace) -> int:
    status = 0
    for manifest in args.manifest:
        report = check_manifest(manifest, decode=args.decode)
        print(format_report(report))
        status |= 0 if report.ok else 1
    return status


def _simuleval(args: argparse.Namespace) -> int:
    files = write_simuleval_files(
        args.manifest, args.out, max_utterances=args.max_utterances, seed=args.seed, text=args.text
    )
    print(f"{files.count} utterances: {files.source}, {files.target}, {files.ids}")
    return 0


def _write_splits(out: Path, rows_by_split: dict, bad: BadInput) -> int:
    for split, rows in rows_by_split.items():
        n = write_manifest(out / f"{split}.tsv", rows)
        print(f"{out / f'{split}.tsv'}: {n} rows")
    print(bad.summary())
    return 0


def _mustc(args: argparse.Namespace) -> int:
    bad = BadInput(args.skip_bad)
    lang_pair = "-".join(args.lang_pair)  # MuST-C's folder: en-de
    rows = {split: read_mustc(args.root, split, lang_pair, bad) for split in args.splits}
    return _write_splits(Path(args.out), rows, bad)


def _covost(args: argparse.Namespace) -> int:
    bad = BadInput(args.skip_bad)
    tsv_dir = Path(args.tsv_dir)
    rows = {
        split: read_covost(
            tsv_dir / covost_tsv_name(split, "_".join(args.lang_pair)),  # CoVoST's file names: en_de
            args.clips,
            to_flac=Path(args.to_flac) / split if args.to_flac else None,
            decode=not args.header_only,
            bad=bad,
        )
        for split in args.splits
    }
    return _write_splits(Path(args.out), rows, bad)


def _tsv(args: argparse.Namespace) -> int:
    bad = BadInput(args.skip_bad)
    rows = read_user_tsv(
        args.tsv,
        audio_column=args.audio_column or None,
        src_column=args.src_column,
        tgt_column=args.tgt_column,
        id_column=args.id_column,
        speaker_column=args.speaker_column,
        audio_root=args.audio_root,
        bad=bad,
    )
    print(f"{args.out}: {write_manifest(args.out, rows)} rows")
    print(bad.summary())
    return 0


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum``."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value

    return count


def _share(text: str) -> float:
    """An argparse type: a fraction of the sentences, 0 <= share < 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if not (math.isfinite(value) and 0 <= value < 1):
        raise argparse.ArgumentTypeError(f"{text}: a fraction of the sentences, at least 0 and below 1 (e.g. 0.05)")
    return value


def _lang_pair(text: str) -> tuple[str, str]:
    """An argparse type: ``en-de`` or ``en_de`` -> ("en", "de")."""
    try:
        return parse_lang_pair(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (so no folder can be made under it)."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def _out_folder(text: str) -> str:
    """An argparse type: a folder to write into (made if missing); an existing file there is refused, and so is
    an empty path (an unset shell variable, say), which would write into the working folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a folder (e.g. data/offline), or . for this folder")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a file, not a folder; give a folder path")
    blocking = _file_in_the_way(path)
    if blocking is not None:
        raise argparse.ArgumentTypeError(f"{text}: {blocking} is a file, not a folder; give another path")
    _refuse_unwritable(text, path)  # nor can a folder that cannot be written
    return text


def _out_file(text: str) -> str:
    """An argparse type: a file to write (its folder is made if missing); an existing folder there is refused."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a folder; give the manifest's file path (e.g. {path / 'm.tsv'})")
    blocking = _file_in_the_way(path)
    if blocking is not None:
        raise argparse.ArgumentTypeError(f"{text}: {blocking} is a file, not a folder; give another path")
    _refuse_unwritable(text, path.parent)  # nor can a folder that cannot be written
    return text


def _unwritable(path: Path) -> Path | None:
    """The nearest existing folder of ``path`` (itself or an ancestor) when nothing can be made in it (a
    read-only file system or folder), or None."""
    folder = next((p for p in (path, *path.parents) if p.is_dir()), None)
    return folder if folder is not None and not os.access(folder, os.W_OK | os.X_OK) else None


def _refuse_unwritable(text: str, path: Path) -> None:
    """An argparse error, in one line, when ``path`` (an output folder, or a file's folder) cannot be written."""
    locked = _unwritable(path)
    if locked is not None:
        raise argparse.ArgumentTypeError(f"{text}: {locked} cannot be written (read-only); give a writable path")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.corpus", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="the offline corpus: Ding sentence pairs + synthetic English speech")
    b.add_argument("--out", required=True, type=_out_folder, help="folder for audio/ and {train,dev,test}.tsv")
    b.add_argument("--max-utterances", type=_at_least(1),
                   help="first N of a stable hash order (bigger N: a superset; default: every sentence)")  # fmt: skip
    for split in ("train", "dev", "test"):
        b.add_argument(f"--max-{split}", type=_at_least(0),
                       help=f"at most N {split} utterances (first N of the same order; 0: none; "
                            "default: no cap)")  # fmt: skip
    b.add_argument("--voice", choices=VOICES, default="piper", help="English voice (default: %(default)s)")
    b.add_argument("--format", choices=sorted(AUDIO_FORMATS), default="flac", help="audio files (default: %(default)s)")
    b.add_argument("--workers", type=_at_least(1), default=DEFAULT_WORKERS,
                   help="synthesis processes, one ONNX thread each (default: %(default)s)")
    b.add_argument("--dev-share", type=_share, default=SplitShares.dev,
                   help="share of the sentences in dev; dev + test must stay below 1 (default: %(default)s)")
    b.add_argument("--test-share", type=_share, default=SplitShares.test,
                   help="share of the sentences in test (default: %(default)s)")
    b.add_argument("--min-words", type=int, default=DingFilter.min_words,
                   help="shortest English sentence kept, in words (default: %(default)s)")
    b.add_argument("--max-words", type=int, default=DingFilter.max_words,
                   help="longest English sentence kept, in words (default: %(default)s)")
    b.add_argument("--ding", help="the Ding file (default: the ding asset or /usr/share/trans/de-en)")
    b.add_argument("--text-only", action="store_true",
                   help="text-to-text manifests (empty audio), no synthesis: e.g. --out data/offline_text")
    b.set_defaults(run=_build)

    c = sub.add_parser("check", help="validate manifests; exit 1 when anything is wrong")
    c.add_argument("manifest", nargs="+")
    c.add_argument("--decode", action="store_true", help="also decode every utterance (slow)")
    c.set_defaults(run=_check)

    s = sub.add_parser("simuleval", help="source.txt / target.txt for SimulEval from a manifest")
    s.add_argument("manifest")
    s.add_argument("--out", required=True, type=_out_folder,
                   help="folder for source.txt, target.txt, ids.txt and wav/ (the slices of speech rows)")
    s.add_argument("--max-utterances", type=_at_least(1), help="at most N utterances (default: every row)")
    s.add_argument("--seed", type=int,
                   help="with --max-utterances: a seeded random subset (default: none, the first N)")
    s.add_argument("--text", action="store_true", help="source.txt holds source sentences (text-to-text)")
    s.set_defaults(run=_simuleval)

    m = sub.add_parser("mustc", help="MuST-C release -> OUT/{split}.tsv (path:offset:frames slices)")
    m.add_argument("root", help="the release folder holding en-de/ (or the en-de folder itself)")
    m.add_argument("--out", required=True, type=_out_folder)
    m.add_argument("--splits", nargs="+", default=["train", "dev", "tst-COMMON"],
                   help="folders under en-de/data/ (default: train dev tst-COMMON)")
    m.add_argument("--lang-pair", type=_lang_pair, default="en-de", help=LANG_PAIR_HELP)
    m.add_argument("--skip-bad", action="store_true", help="log and count bad segments instead of stopping")
    m.set_defaults(run=_mustc)

    v = sub.add_parser("covost", help="CoVoST 2 TSVs + Common Voice clips -> OUT/{split}.tsv")
    v.add_argument("--tsv-dir", required=True,
                   help="folder with covost_v2.en_de.{split}.tsv (from CoVoST's get_covost_splits.py)")
    v.add_argument("--clips", required=True, help="Common Voice clips/ folder")
    v.add_argument("--out", required=True, type=_out_folder)
    v.add_argument("--splits", nargs="+", default=["train", "dev", "test"],
                   help="the {split} of covost_v2.en_de.{split}.tsv (default: train dev test)")
    v.add_argument("--lang-pair", type=_lang_pair, default="en_de", help=LANG_PAIR_HELP)
    v.add_argument("--to-flac", type=_out_folder, help="convert clips once to 16 kHz FLAC under TO_FLAC/{split}/")
    v.add_argument("--header-only", action="store_true", help="do not decode clips (fast; unchecked)")
    v.add_argument("--skip-bad", action="store_true", help="log and count bad lines instead of stopping")
    v.set_defaults(run=_covost)

    t = sub.add_parser("tsv", help="your own TSV (columns named by options) -> a manifest", description=TSV_HELP)
    t.add_argument("tsv", help="a UTF-8 TSV whose first line names the columns; no quoting")
    t.add_argument("--out", required=True, type=_out_file, help="the manifest to write")
    t.add_argument("--audio-column", default="audio",
                   help="audio file or path:offset:frames; '' for text-to-text (default: %(default)s)")
    t.add_argument("--src-column", default="src_text", help="source transcript or sentence (default: %(default)s)")
    t.add_argument("--tgt-column", default="tgt_text", help="translation (default: %(default)s)")
    t.add_argument("--id-column", help="unique ids without spaces (default: <tsv name>-<line>)")
    t.add_argument("--speaker-column", help="speaker (default: none)")
    t.add_argument("--audio-root", help="relative audio paths are under this (default: the TSV's folder)")
    t.add_argument("--skip-bad", action="store_true", help="log and count bad lines instead of stopping")
    t.set_defaults(run=_tsv)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "build" and args.dev_share + args.test_share >= 1:
        p.error(f"--dev-share {args.dev_share} + --test-share {args.test_share}: must be below 1 (the rest is train)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.run(args)
    except (CorpusError, AssetMissing, SynthesisError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
