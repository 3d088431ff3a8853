"""Load test of the WebSocket server: N clients on loopback, each streaming audio in real time.

    python benchmarks/serve_load.py                  # the trained speech model (results/speech/model), else tiny
    python benchmarks/serve_load.py --checkpoint CKPT --clients 1,2,3,4,6 --seconds 12 --threads 1
    python benchmarks/serve_load.py --checkpoint runs/bench/speech/main/final --test data/offline/test.tsv \
        --int4 --compile                                             # 4-bit LLM, compiled steps

The server runs as its own process (``python -m simul_agents.serve``), as it would in use. For each N the clients
start within one chunk of each other, each sends float32 chunks at real-time pace (utterances of the demo test set
back to back in one stream, or a synthetic signal), then ``end``, and waits for the last word. Per client:

- real-time factor: the server's ``busy_ms / source_ms`` for its stream (model time plus waiting behind other
  streams' jobs on the one model thread); under 1 the server keeps up with that client;
- time from chunk sent to word received: for each word, from sending the chunk that completed the audio the word was
  written after (its ``delay_ms``) to receiving it; words written after ``end`` count from sending ``end``.

N keeps up when every client's real-time factor is under 1; the sweep stops at the first N that does not. Then it
opens ``--idle`` idle connections (each with a started stream) and reports the server's memory per connection, and
how long the server takes to free them after the clients vanish (reset, no close). The last line is one JSON object
with ``max_realtime_clients`` and ``p95_ms`` (at that N), and the details.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from speech_frontend.audio import SAMPLE_RATE, load_audio  # noqa: E402

TRAINED_CHECKPOINTS = (ROOT / "results/speech/model", ROOT / "runs/demo/train/final")  # make bench's, make demo's
DEMO_TEST = ROOT / "data/demo/test.tsv"


def tiny_checkpoint(directory: Path) -> Path:
    import torch

    from streaming_llm.checkpoint import build_model, save_checkpoint
    from streaming_llm.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("speech", block_ms=640)
    torch.manual_seed(0)
    return save_checkpoint(build_model(config, tiny_tokenizer()).eval(), directory / "tiny-ckpt")


def source_audio(seconds: float, test: Path = DEMO_TEST) -> tuple[np.ndarray, str]:
    """A test manifest's utterances back to back (to ``seconds``), or a synthetic signal where there are none."""
    if test.is_file():
        with open(test, encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        pieces, total = [], 0
        for row in rows:
            path = test.parent / row["audio"]
            if not path.is_file():
                continue
            audio = load_audio(path)
            pieces.append(audio)
            total += audio.shape[0]
            if total >= seconds * SAMPLE_RATE:
                break
        if pieces:
            return np.concatenate(pieces)[: int(seconds * SAMPLE_RATE)], f"{test.parent.name} test speech"
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 0.5 * t) + 0.05 * np.sin(2 * np.pi * 1300 * t)
    return signal.astype(np.float32), "synthetic signal"


def start_server(checkpoint: Path, threads: int, head: str, flags: Sequence[str] = ()) -> tuple[subprocess.Popen, int]:
    """The server process and its port; ``flags``: its flags (``--int8``, ``--int4``, ``--compile``, ``--batch``)."""
    command = [sys.executable, "-m", "simul_agents.serve", "--checkpoint", str(checkpoint), "--port", "0",
               "--max-clients", "256", "--idle-timeout", "60", "--head", head]  # fmt: skip
    if threads:
        command += ["--threads", str(threads)]
    command += list(flags)
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600  # 4-bit calibration and --compile's warm-up come first
    for line in server.stdout:
        if line.startswith("serving on http://"):
            port = int(line.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
            return server, port
        if time.monotonic() > deadline:
            break
    server.kill()
    raise SystemExit(f"serve_load: the server did not start: {line.strip() if line else 'no output'}")


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        return json.loads(response.read())


async def client(url: str, audio: np.ndarray, chunk: int, start: dict, offset: float) -> dict:
    from websockets.asyncio.client import connect

    await asyncio.sleep(offset)
    sent: list[tuple[float, float]] = []  # (end of the chunk's audio in ms, send time)
    words: list[dict] = []
    end_sent = [0.0]
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", **start}))
        started = json.loads(await ws.recv())
        if started["type"] != "started":
            raise SystemExit(f"serve_load: the server refused the start: {started}")

        async def receive() -> dict:
            async for message in ws:
                event = json.loads(message)
                now = time.perf_counter()
                if event["type"] == "write":
                    words.append({**event, "received": now})
                elif event["type"] == "end":
                    return {**event, "received": now}
                elif event["type"] == "error":
                    raise SystemExit(f"serve_load: server error: {event}")
            raise SystemExit("serve_load: the server closed the connection before the end")

        receiver = asyncio.create_task(receive())
        t0 = time.perf_counter()
        for i in range(0, audio.shape[0], chunk):
            piece = audio[i : i + chunk]
            end_ms = (i + piece.shape[0]) * 1000 / SAMPLE_RATE
            wait = t0 + end_ms / 1000 - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            await ws.send(piece.astype("<f4").tobytes())
            sent.append((end_ms, time.perf_counter()))
        end_sent[0] = time.perf_counter()
        await ws.send(json.dumps({"type": "end"}))
        end = await receiver
    lags = []
    total_ms = sent[-1][0]
    for word in words:
        sent_at = next((at for end_ms, at in sent if end_ms >= word["delay_ms"] - 0.5), end_sent[0])
        if word["received"] > end_sent[0] and word["delay_ms"] >= total_ms - 0.5:
            sent_at = end_sent[0]
        lags.append((word["received"] - sent_at) * 1000)
    return {"rtf": end["rtf"], "lags": lags, "words": len(words), "tail_ms": (end["received"] - end_sent[0]) * 1000,
            "AL": end["AL"], "AL_CA": end["AL_CA"]}  # fmt: skip


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(values, q))


async def trial(port: int, n: int, audio: np.ndarray, chunk: int, start: dict) -> dict:
    url = f"ws://127.0.0.1:{port}/"
    period = chunk / SAMPLE_RATE
    rng = random.Random(n)
    results = await asyncio.gather(*(client(url, audio, chunk, start, rng.uniform(0, period)) for _ in range(n)))
    lags = [lag for r in results for lag in r["lags"]]
    rtfs = [r["rtf"] for r in results]
    return {
        "clients": n, "rtf_max": max(rtfs), "rtf_mean": statistics.mean(rtfs), "rtf_per_client": rtfs,
        "p50_ms": percentile(lags, 50), "p95_ms": percentile(lags, 95), "words": sum(r["words"] for r in results),
        "tail_ms_max": max(r["tail_ms"] for r in results), "keeps_up": max(rtfs) < 1.0,
    }  # fmt: skip


async def idle_memory(port: int, server_pid: int, n: int, start: dict) -> dict:
    """RSS added per idle connection (each with a started stream), and how fast vanished clients are freed."""
    import psutil
    from websockets.asyncio.client import connect

    process = psutil.Process(server_pid)
    before = process.memory_info().rss
    sockets, connections = [], []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port))
        ws = await connect(f"ws://127.0.0.1:{port}/", sock=sock)
        await ws.send(json.dumps({"type": "start", **start}))
        assert json.loads(await ws.recv())["type"] == "started"
        sockets.append(sock)
        connections.append(ws)
    await asyncio.sleep(0.5)
    after = process.memory_info().rss
    open_streams = stats(port)["streams"]
    vanished = time.perf_counter()
    for sock in sockets:  # the clients vanish: a reset, no closing handshake
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    freed_s = None
    while time.perf_counter() - vanished < 90:
        if stats(port)["connections"] == 0 and stats(port)["streams"] == 0:
            freed_s = time.perf_counter() - vanished
            break
        await asyncio.sleep(0.05)
    for ws in connections:
        ws.transport.abort()
    return {"idle_connections": n, "open_streams": open_streams,
            "idle_mib_per_connection": (after - before) / n / 2**20, "vanished_freed_s": freed_s}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None,
                   help="default: results/speech/model (or runs/demo/train/final) if present, else a tiny model")
    p.add_argument("--clients", default="1,2,3,4,6,8", help="the N to try, in order (stops at the first that fails)")
    p.add_argument("--seconds", type=float, default=12.0, help="audio per client (at most the model's context)")
    p.add_argument("--chunk-ms", type=int, default=320)
    p.add_argument("--head", default="entropy")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: torch's default)")
    p.add_argument("--idle", type=int, default=20, help="idle connections for the memory figure")
    p.add_argument("--test", type=Path, default=DEMO_TEST, help="the speech manifest whose utterances are streamed")
    p.add_argument("--int8", action="store_true", help="the server runs the LLM in int8 (simul_agents.serve --int8)")
    p.add_argument("--int4", action="store_true", help="the LLM in 4 bits (GPTQ; simul_agents.serve --int4)")
    p.add_argument("--compile", action="store_true", help="compiled streaming steps (simul_agents.serve --compile)")
    p.add_argument("--batch", action="store_true", help="the streams' LM forwards batched (simul_agents.serve --batch)")
    args = p.parse_args(argv)
    if args.test != DEMO_TEST and not args.test.is_file():  # the default may be missing: then a synthetic signal
        p.error(f"--test {args.test}: no such manifest (a TSV with an audio column, e.g. data/offline/test.tsv)")

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
        elif trained := [c for c in TRAINED_CHECKPOINTS if (c / "checkpoint.json").is_file()]:
            checkpoint = trained[0]
        else:
            print("no trained speech model (results/speech/model, runs/demo/train/final): a random tiny model, whose "
                  "load figures are not a trained model's; pass --checkpoint", flush=True)
            checkpoint = tiny_checkpoint(Path(tmp))
        audio, what = source_audio(args.seconds, args.test)
        start = {"head": args.head}
        if args.threshold is not None:
            start["threshold"] = args.threshold
        chunk = args.chunk_ms * SAMPLE_RATE // 1000
        threads = args.threads or "default"
        print(f"checkpoint {checkpoint}; {audio.shape[0] / SAMPLE_RATE:.1f} s of {what} per client in "
              f"{args.chunk_ms} ms chunks; head {start}; server threads {threads}", flush=True)  # fmt: skip
        flags = [f"--{name}" for name in ("int8", "int4", "compile") if getattr(args, name)]
        flags += ["--batch"] if args.batch else []
        server, port = start_server(checkpoint, args.threads, args.head, flags)
        try:
            trials = []
            for n in [int(x) for x in args.clients.split(",")]:
                result = asyncio.run(trial(port, n, audio, chunk, start))
                trials.append(result)
                rtfs = " ".join(f"{r:.2f}" for r in result["rtf_per_client"])
                print(f"N={n:2d}  real-time factor per client: {rtfs}  | chunk sent -> word received: p50 "
                      f"{result['p50_ms'] or 0:.0f} ms, p95 {result['p95_ms'] or 0:.0f} ms ({result['words']} words) "
                      f"| last word {result['tail_ms_max']:.0f} ms after end | "
                      f"{'keeps up' if result['keeps_up'] else 'FALLS BEHIND'}", flush=True)  # fmt: skip
                if not result["keeps_up"]:
                    break
            server_stats = stats(port)
            memory = asyncio.run(idle_memory(port, server.pid, args.idle, start))
            freed = memory["vanished_freed_s"]
            print(f"idle: {memory['idle_mib_per_connection']:.2f} MiB per connection with a started stream "
                  f"({args.idle} open); vanished clients freed in "
                  f"{f'{freed:.2f} s' if freed is not None else 'more than 90 s'}", flush=True)  # fmt: skip
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
    passing = [t for t in trials if t["keeps_up"]]  # a prefix: the sweep stops at the first N that falls behind
    best = passing[-1] if passing else None
    at = best or trials[0]
    summary = {
        "max_realtime_clients": best["clients"] if best else 0, "p95_ms": at["p95_ms"], "p50_ms": at["p50_ms"],
        "rtf_max_at_max": at["rtf_max"], "checkpoint": str(checkpoint), "audio_s": audio.shape[0] / SAMPLE_RATE,
        "chunk_ms": args.chunk_ms, "head": start, "server_threads": args.threads or "default", "int8": args.int8,
        "int4": args.int4, "compile": args.compile, "batch": args.batch,
        "trials": [{k: v for k, v in t.items() if k != "rtf_per_client"} for t in trials],
        **memory, "server_stats": server_stats,
    }  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
