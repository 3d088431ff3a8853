"""Which attention signal says "the next word is ready"? The measurement behind the attention head's defaults.

    python benchmarks/attention_head.py --checkpoint results/text/model --source data/offline_text/dev.tsv --n 100

For each sentence the model's full-source greedy translation is the reference. The source is read word by word
(speech: block by block) along the oracle's path: at each decision point the next word is *ready* when the
greedy word under the source read so far equals the full-source word; a ready word is written, otherwise one
more unit is read. Every decision point before the source ends is one sample: its label (ready or not) and the
signals a head could use. Each candidate attention setting (layers x normalisation x frontier) scores the
samples by its frontier share, in both directions (``write_when=low``: low share means write; ``high``: high
share means write, the head's default; the two AUCs add up to 1), and is ranked by ROC AUC, the probability that
a random ready point scores as readier than a random not-ready point (0.5: no signal). The entropy head's signal
is listed for comparison. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from speech_frontend.audio import load_audio  # noqa: E402
from streaming_llm.checkpoint import load_checkpoint  # noqa: E402
from streaming_llm.config import SPEECH  # noqa: E402
from streaming_llm.engine import StreamingSession, translate_offline  # noqa: E402
from streaming_llm.heads import AttentionHead, peek_words  # noqa: E402
from training.corpus import read_manifest  # noqa: E402

LAYERS = ("upper", "all", "last", "lower")
NORMALISE = ("source", "all")
FRONTIER = (1, 2)
SHARE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)  # of each setting's frontier share: where thresholds should go


def layer_set(spec: str, n_layers: int) -> list[int]:
    if spec == "lower":
        return list(range(n_layers // 2))
    return AttentionHead(layers=spec).layer_indices(n_layers)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` (higher: more likely label 1), ties counted half (Mann-Whitney U)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def samples(model, source, n_layers: int, max_target_tokens: int) -> list[dict]:
    """The decision points of one source along the oracle's path."""
    full = translate_offline(model, source, max_target_tokens=max_target_tokens).split()
    session = StreamingSession(model, attention_layers=list(range(n_layers)), max_target_tokens=max_target_tokens)
    units = []
    if model.config.modality == SPEECH:
        step = model.block_samples
        units = [source[i : i + step] for i in range(0, len(source), step)]
    else:
        units = [[word] for word in source]
    out: list[dict] = []
    for unit in units[:-1]:  # after the last unit the source is finished and every word is forced
        if model.config.modality == SPEECH:
            if session.push_audio(unit) == 0:
                continue
        else:
            session.push_words(unit)
        while len(session.words) < len(full):
            signals = session.signals()
            if signals.ends_sentence:  # the shared rule reads on: not a head's decision
                break
            ready = peek_words(session, 1) == [full[len(session.words)]]
            out.append({"ready": ready, "entropy": signals.entropy, "attention": session.attention_by_layer()})
            if not ready:
                break
            session.write_word()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--source", required=True, help="a manifest (dev.tsv): text sources or audio")
    parser.add_argument("--n", type=int, default=100, help="sentences (the first n)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-target-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint, merge_lora=True)
    n_layers = model.llm.config.num_hidden_layers
    rows = read_manifest(args.source)[: args.n]
    points: list[dict] = []
    with torch.inference_mode():
        for row in tqdm(rows, desc="sentences", unit="sent"):
            source = load_audio(row.audio) if model.config.modality == SPEECH else row.src_text.split()
            points += samples(model, source, n_layers, args.max_target_tokens)
    labels = np.array([p["ready"] for p in points], dtype=int)
    results = [{"signal": "entropy (low: write)", "auc": auc(-np.array([p["entropy"] for p in points]), labels)}]
    for layers, normalise, frontier in itertools.product(LAYERS, NORMALISE, FRONTIER):
        chosen = layer_set(layers, n_layers)
        share = []
        for p in points:
            mass = p["attention"][chosen].mean(0)
            front = float(mass[-frontier:].sum())
            total = float(mass.sum()) if normalise == "source" else 1.0
            share.append(front / total if total > 0 else 1.0)
        results.append({
            "signal": f"attention layers={layers} normalise={normalise} frontier={frontier} (low share: write)",
            "layers": layers, "normalise": normalise, "frontier": frontier,
            "auc": auc(-np.array(share), labels),  # write_when=low
            "auc_high": auc(np.array(share), labels),  # write_when=high
            "share_ready": float(np.median([s for s, y in zip(share, labels, strict=True) if y] or [np.nan])),
            "share_not_ready": float(np.median([s for s, y in zip(share, labels, strict=True) if not y] or [np.nan])),
            "share_quantiles": [round(float(q), 4) for q in np.quantile(share, SHARE_QUANTILES)] if share else [],
        })  # fmt: skip
    print(f"{len(rows)} sentences, {len(points)} decision points, {labels.mean():.2f} ready")
    for r in sorted(results, key=lambda r: -r["auc"]):
        medians = ""
        if "layers" in r:
            medians = f"  median share ready {r['share_ready']:.3f} / not {r['share_not_ready']:.3f}"
            medians += "; share at " + ", ".join(
                f"p{round(100 * q)} {v:.3f}" for q, v in zip(SHARE_QUANTILES, r["share_quantiles"], strict=True)
            )
        high = f" (high share: write: {r['auc_high']:.3f})" if "auc_high" in r else ""
        print(f"AUC {r['auc']:.3f}  {r['signal']}{high}{medians}")
    best = max((r for r in results if "layers" in r), key=lambda r: max(r["auc"], r["auc_high"]))
    best = {**best, "write_when": "high" if best["auc_high"] > best["auc"] else "low"}
    print(json.dumps({"points": len(points), "ready": float(labels.mean()), "best_attention": best,
                      "entropy_auc": results[0]["auc"], "all": results}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
