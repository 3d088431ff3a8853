"""Where an utterance's computation goes, per precision of the LLM, on a trained checkpoint's test utterances.

Each utterance is decoded offline (the whole source, then greedy words to the end), one after another in one
process, timed in three parts:

    source   speech: the streaming mel and the encoder's blocks; text: the words' tokenization
    feed     the LLM's forward over the source units (and the pending rows) when the target starts
    target   the greedy target tokens, one LLM step each

and its output compared with float32's (predictions identical, of N). int4 takes the GPTQ weights beside the
checkpoint (``int4-g32.pt``; calibrated on its training manifest the first time: minutes).

    python benchmarks/precision_cost.py                                  # results/speech/model, 12 test utterances
    python benchmarks/precision_cost.py --checkpoint results/text/model --manifest data/offline_text/test.tsv
    python benchmarks/precision_cost.py --precisions fp32 int4 --compile # the LLM's steps compiled too

The last line is one JSON object: per precision ``ms_per_target_token``, ``ms_per_utterance`` and its parts,
``same_as_fp32``. Timings are wall-clock, the best of ``--repeats`` passes over the utterances.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming_llm.config import SPEECH  # noqa: E402
from streaming_llm.engine import StreamingSession  # noqa: E402
from streaming_llm.gptq import calibration_sources  # noqa: E402
from streaming_llm.quantize import PRECISIONS, set_precision  # noqa: E402

MAX_TARGET_TOKENS = 96  # the bench's cap


def decode(model, source) -> tuple[str, int, dict]:
    """One offline decode -> (translation, target tokens, seconds of source / feed / target)."""
    start = time.perf_counter()
    session = StreamingSession(model, max_target_tokens=MAX_TARGET_TOKENS)
    if model.config.modality == SPEECH:
        session.push_audio(source)
    else:
        session.push_words(source)
    session.finish_source()
    read = time.perf_counter()
    session.flush()
    fed = time.perf_counter()
    before = len(session.written)
    while session.write_word() is not None:
        pass
    done = time.perf_counter()
    parts = {"source": read - start, "feed": fed - read, "target": done - fed}
    return " ".join(session.words), len(session.written) - before, parts


def measure(model, sources: list, repeats: int, desc: str) -> dict:
    best: list[dict] = [{} for _ in sources]
    texts, tokens = [], []
    for r in range(repeats):
        for i, source in enumerate(tqdm(sources, desc=f"{desc} pass {r + 1}/{repeats}", leave=False)):
            text, n, parts = decode(model, source)
            if r == 0:
                texts.append(text)
                tokens.append(n)
            if not best[i] or sum(parts.values()) < sum(best[i].values()):
                best[i] = parts
    total = {k: sum(b[k] for b in best) for k in ("source", "feed", "target")}
    utterance_s = sum(total.values())
    return {
        "ms_per_target_token": round(1000 * total["target"] / max(1, sum(tokens)), 2),
        "ms_per_utterance": round(1000 * utterance_s / len(sources), 1),
        "share": {k: round(v / utterance_s, 3) for k, v in total.items()},
        "target_tokens": sum(tokens),
        "texts": texts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="results/speech/model")
    parser.add_argument("--manifest", default=None, help="default: data/offline/test.tsv (speech), "
                        "data/offline_text/test.tsv (text)")  # fmt: skip
    parser.add_argument("--utterances", type=int, default=12)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"], choices=PRECISIONS)
    parser.add_argument("--compile", action="store_true", help="compile the LLM's steps first (streaming_llm/lean.py)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from streaming_llm.checkpoint import load_checkpoint
    from streaming_llm.lean import compile_steps

    modality = json.loads((Path(args.checkpoint) / "config.json").read_text(encoding="utf-8"))["modality"]
    default = "data/offline/test.tsv" if modality == SPEECH else "data/offline_text/test.tsv"
    manifest = Path(args.manifest or default)
    if not manifest.is_file():
        raise SystemExit(f"error: {manifest} is missing; build the corpus (make demo or make bench) or pass --manifest")
    sources = calibration_sources(args.checkpoint, manifest, args.utterances)  # the first N usable rows
    if not sources:
        raise SystemExit(f"error: {manifest}: no usable {modality} rows")
    results = {}
    for precision in args.precisions:
        model = set_precision(load_checkpoint(args.checkpoint, merge_lora=True), precision, args.checkpoint)
        if args.compile:
            print(f"{precision}: compiled in {compile_steps(model.llm):.0f} s", flush=True)
        decode(model, sources[0])  # warm-up: the shared start state, first-call allocations
        results[precision] = measure(model, sources, args.repeats, precision)
        r = results[precision]
        print(f"{precision:>5}: {r['ms_per_target_token']:6.1f} ms per target token, {r['ms_per_utterance']:7.1f} ms "
              f"per utterance (source {r['share']['source']:.0%}, feed {r['share']['feed']:.0%}, target "
              f"{r['share']['target']:.0%}), {r['target_tokens']} tokens", flush=True)  # fmt: skip
    reference = results.get("fp32", {}).get("texts")
    for r in results.values():
        texts = r.pop("texts")
        r["same_as_fp32"] = sum(a == b for a, b in zip(texts, reference, strict=True)) if reference else None
    print(json.dumps({"checkpoint": args.checkpoint, "manifest": str(manifest), "utterances": len(sources),
                      "threads": args.threads, "compiled": args.compile, "precisions": results}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
