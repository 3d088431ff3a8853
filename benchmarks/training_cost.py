"""What SPSD costs: step time and tokens/s of full-view only, MSLM, and MSLM + SPSD on the same batch.

    python benchmarks/training_cost.py            # tiny random model
    python benchmarks/training_cost.py --real     # Whisper tiny.en + SmolLM2-135M (needs `make assets`)

The last line is one JSON object with at least ``spsd_over_full`` and ``peak_rss_gib``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import load_config  # noqa: E402
from training.data import Example, SourceUnits  # noqa: E402
from training.losses import LossConfig  # noqa: E402
from training.train import TrainStep, build_training_model, example_seed  # noqa: E402

SENTENCES = [
    ("I would like a cup of coffee with milk, please.", "Ich hätte gern eine Tasse Kaffee mit Milch, bitte."),
    ("The train to Berlin leaves at half past nine.", "Der Zug nach Berlin fährt um halb zehn ab."),
    ("She has been reading this book for three weeks.", "Sie liest dieses Buch seit drei Wochen."),
    ("We should talk about it tomorrow morning.", "Wir sollten morgen früh darüber reden."),
]
OBJECTIVES = {
    "full": LossConfig(w_full=1.0, w_mslm=0.0, spsd_lambda=0.0, probe=False),
    "mslm": LossConfig(w_full=1.0, w_mslm=1.0, spsd_lambda=0.0, probe=False),
    "mslm_spsd": LossConfig(w_full=1.0, w_mslm=1.0, spsd_lambda=1.0, probe=True),
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def batch_examples(tmp: Path, batch: int, modality: str) -> list[Example]:
    """A fixed batch: ~3.5 s utterances of noise-shaped speech stand-ins (the cost does not depend on content)."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    examples = []
    for i in range(batch):
        src, tgt = SENTENCES[i % len(SENTENCES)]
        if modality == "speech":
            path = tmp / f"u{i}.wav"
            sf.write(path, (0.05 * rng.standard_normal(int(16000 * 3.5))).astype(np.float32), 16000)
            examples.append(Example(f"u{i}", str(path), tgt, 56000))
        else:
            examples.append(Example(f"u{i}", src, tgt, len(src.split())))
    return examples


def time_objective(model, units, examples, loss, steps: int, bf16: bool) -> float:
    step = TrainStep(model, units, loss, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    n_tokens = float(sum(len(model.target_ids(ex.target)) for ex in examples))
    times = []
    for s in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = step(examples, [example_seed(0, s, i) for i in range(len(examples))], n_tokens)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if s:  # the first step warms caches up
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="store_true", help="Whisper tiny.en + SmolLM2-135M from `make assets`")
    parser.add_argument("--modality", default="speech", choices=["speech", "text"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (slow on CPUs without native bf16)")
    args = parser.parse_args()
    bf16 = args.bf16
    overrides = {"modality": args.modality, "train_llm": "full", "probe_hidden": 64}
    if args.real:
        overrides.update(llm="asset:smollm2-135m-instruct", whisper="asset:whisper-tiny.en", train_llm="lora")
    else:
        overrides.update(llm="tiny", whisper="tiny", block_ms=320, adapter_hidden=64)
    cfg = load_config(None, overrides)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model = build_training_model(cfg)
        model.train()
        examples = batch_examples(Path(tmp), args.batch, args.modality)
        units = SourceUnits(model, Path(tmp) / "cache", encoder_trained=False)
        for ex in examples:  # encoder outputs cached once, as the trainer does with a frozen encoder
            units(ex) if args.modality == "speech" else None
        n_tokens = sum(len(model.target_ids(ex.target)) for ex in examples)
        seq_tokens = sum(len(model.prompt_ids) + sum(u.shape[0] for u in units(ex)) + 1 for ex in examples) + n_tokens
        results = {}
        for name, loss in OBJECTIVES.items():
            seconds = time_objective(model, units, examples, loss, args.steps, bf16)
            results[name] = seconds
            print(f"{name:10s} {seconds:7.3f} s/step  {seq_tokens / seconds:8.1f} sequence tokens/s", flush=True)
    summary = {
        "model": "tiny.en+SmolLM2-135M" if args.real else "tiny",
        "modality": args.modality,
        "batch": args.batch,
        "bf16": bf16,
        "target_tokens": n_tokens,
        "sequence_tokens": seq_tokens,
        **{f"s_per_step_{k}": round(v, 4) for k, v in results.items()},
        "tokens_per_s_full": round(seq_tokens / results["full"], 1),
        "tokens_per_s_mslm_spsd": round(seq_tokens / results["mslm_spsd"], 1),
        "mslm_over_full": round(results["mslm"] / results["full"], 3),
        "spsd_over_full": round(results["mslm_spsd"] / results["full"], 3),
        "peak_rss_gib": round(peak_rss_gib(), 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
