"""Training examples from manifests: validation, length-bucketed batches, and the encoder-output cache."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch

from speech_frontend.audio import SAMPLE_RATE, AudioError, load_audio_spec, parse_audio_spec
from streaming_llm.config import SPEECH
from streaming_llm.engine import max_source_samples
from streaming_llm.model import SpeechLLM

from .corpus.manifest import read_numbered_manifest

log = logging.getLogger("training")


@dataclass(frozen=True)
class Example:
    id: str
    source: str  # speech: the manifest's audio field (a path or path:offset:frames); text: the sentence
    target: str
    length: int  # for bucketing: samples (speech) or words (text)
    transcript: str = ""  # speech: the English transcript (src_text), for the adapter's CTC alignment
    line: str = ""  # "manifest:line", for errors found later


def load_examples(
    manifest: str | Path,
    modality: str,
    max_source_seconds: float,
    max_source_words: int,
    skip_bad: bool,
    transcribe: bool = False,
    text_capacity: tuple[Callable[[list[str]], int], int] | None = None,  # (SpeechLLM.source_tokens, capacity)
) -> list[Example]:
    """Rows of a manifest -> examples. A bad row is an error naming it, or with ``skip_bad`` a counted skip.
    ``text_capacity``: (the embeddings a text source's words make, the model's source capacity); a text row over
    it is a bad row, not an error at the step that draws it.

    Speech: every audio file is opened here (its header; float files, which can hold NaN, are read whole), so a
    file that cannot be decoded stops the run, or is skipped, before any work.
    ``transcribe``: the target is the row's source transcript instead of its translation (speech)."""
    skipped: list[str] = []

    def bad(message: str) -> None:
        if not skip_bad:
            raise ValueError(f"{message} (skip_bad=true, or training.probe's --skip-bad, skips such rows)")
        log.warning("skipping: %s", message)
        skipped.append(message)

    def on_error(error: Exception) -> None:
        bad(str(error))

    rows = read_numbered_manifest(manifest, on_error=on_error if skip_bad else None)
    unread = len(skipped)  # rows the manifest reader left out (their lines did not parse)
    examples = []
    headers: dict[str, object] = {}  # path -> its header, or why it has none (one open per file)
    for i, row in rows:
        where = f"{manifest}:{i} (id {row.id})"
        target = row.src_text if transcribe else row.tgt_text
        if not target.strip():
            bad(f"{where}: empty {'source' if transcribe else 'target'} text")
            continue
        if modality == SPEECH:
            path = parse_audio_spec(row.audio)[0] if row.audio else ""
            if not path or not os.path.exists(path):
                bad(f"{where}: audio {row.audio or '(none)'} is missing")
                continue
            if row.n_frames > max_source_seconds * SAMPLE_RATE:
                seconds = row.n_frames / SAMPLE_RATE
                bad(f"{where}: {seconds:.1f} s of audio, more than max_source_seconds={max_source_seconds}")
                continue
            problem = audio_problem(row.audio, headers)
            if problem:
                bad(f"{manifest}:{i}: example {row.id}: {problem}")
                continue
            examples.append(
                Example(row.id, row.audio, target, max(row.n_frames, 1), row.src_text.strip(), f"{manifest}:{i}")
            )
        else:
            words = row.src_text.split()
            if not words:
                bad(f"{where}: empty source text")
                continue
            if len(words) > max_source_words:
                bad(f"{where}: {len(words)} source words, more than max_source_words={max_source_words}")
                continue
            if text_capacity is not None and (size := text_capacity[0](words)) > text_capacity[1]:
                bad(f"{where}: its {len(words)} source words are {size} tokens, more than the model's source capacity "
                    f"of {text_capacity[1]}")  # fmt: skip
                continue
            examples.append(Example(row.id, row.src_text, target, len(words), line=f"{manifest}:{i}"))
    if skipped:
        log.warning("%s: skipped %d bad rows of %d", manifest, len(skipped), len(rows) + unread)
    if not examples:
        raise ValueError(f"{manifest}: no usable examples")
    return examples


def session_limits(model: SpeechLLM, max_source_seconds: float) -> tuple[float, tuple | None]:
    """``load_examples``'s bounds for what one streaming session holds: speech seconds, never above the session's
    own (the encoder's 30 s, in whole blocks), and for text (``text_capacity``) the tokens of the source group,
    which a row of few words can still exceed (a run would stop at the step that drew it)."""
    if model.config.modality == SPEECH:
        return min(max_source_seconds, max_source_samples(model) / SAMPLE_RATE), None
    return max_source_seconds, (model.source_tokens, model.config.source_capacity)


FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")  # the encodings that can hold NaN or Inf


def audio_problem(spec: str, headers: dict) -> str:
    """Why a manifest's audio field cannot be trained on ("" if it can), from the file's header: a file that will
    not open, holds no samples or is shorter than the slice's offset, or a float file with NaN or Inf samples.
    The reason is the one ``load_audio`` gives; ``headers`` caches each file's header (a talk has many slices)."""
    path, offset, _ = parse_audio_spec(spec)
    if path not in headers:
        try:
            headers[path] = sf.info(path)
        except Exception as e:  # noqa: BLE001 - whatever libsndfile says, load_audio below says it in its words
            headers[path] = str(e) or type(e).__name__
    info = headers[path]
    if isinstance(info, str) or info.frames == 0 or offset >= info.frames or info.subtype in FLOAT_SUBTYPES:
        try:
            load_audio_spec(spec)
        except AudioError as e:
            return str(e)
    return ""


def bucket_batches(
    examples: list[Example], batch_size: int, seed: int, epoch: int, min_size: int = 1
) -> list[list[int]]:
    """Batches of similar length, in a shuffled order that depends only on (seed, epoch). A last batch (the longest
    examples) of fewer than ``min_size`` examples joins the one before it: under torchrun each process needs one."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = sorted(range(len(examples)), key=lambda i: (examples[i].length, rng.random()))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min_size:
        last = batches.pop()
        batches[-1] += last
    rng.shuffle(batches)
    return batches


def hash_weights(h, state: dict[str, torch.Tensor], skip: str = "") -> None:
    """Feed ``h`` (a hashlib object) every weight's name and 64-odd of its values, strided over the tensor: enough
    to tell two trainings apart without hashing every byte. Names starting with ``skip`` (when given) are left out."""
    for name, tensor in sorted(state.items()):
        if skip and name.startswith(skip):
            continue
        h.update(name.encode())
        h.update(tensor.detach().float().flatten()[:: max(1, tensor.numel() // 64)].numpy().tobytes())


class SourceUnits:
    """Example -> the model's source units, with the frozen encoder's outputs cached on disk.

    The cached frames are exactly what streaming inference computes (block-causal encoder over the
    zero-padded audio), so a CPU epoch pays for the encoder once.
    """

    def __init__(self, model: SpeechLLM, cache_dir: str | Path | None, encoder_trained: bool):
        self.model = model
        self.encoder_trained = encoder_trained
        speech = model.config.modality == SPEECH
        self.cache_dir = Path(cache_dir) if cache_dir and speech and not encoder_trained else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._tag = self._encoder_tag()

    def __call__(self, example: Example) -> list[torch.Tensor]:
        model = self.model
        if model.config.modality != SPEECH:
            return model.text_units(example.source.split())
        return model.speech_units(self.frames(example))

    def frames(self, example: Example) -> torch.Tensor:
        if self.encoder_trained:
            return self.model.encode_speech(self._audio(example))
        path = self._cache_path(example) if self.cache_dir is not None else None
        if path is not None and path.exists():
            try:
                return torch.load(path, weights_only=True).to(self.model.device)
            except (RuntimeError, EOFError, OSError):
                log.warning("%s: unreadable cache entry, recomputing", path)
        with torch.no_grad():
            frames = self.model.encode_speech(self._audio(example)).float()
        if path is not None:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(frames.cpu(), tmp)
            os.replace(tmp, path)
        return frames

    def _audio(self, example: Example):
        try:
            return load_audio_spec(example.source)
        except AudioError as e:  # found only now: corrupt past its header, or changed since load_examples
            where = f"{example.line}: " if example.line else ""
            raise ValueError(f"{where}example {example.id}: {e} (fix or remove that row)") from None

    def _encoder_tag(self) -> str:
        """Identifies the encoder weights and block size, so a changed encoder never reads stale outputs."""
        h = hashlib.sha1(f"{self.model.config.block_ms}".encode())
        hash_weights(h, self.model.encoder.state_dict())
        return h.hexdigest()[:12]

    def _cache_path(self, example: Example) -> Path:
        path = parse_audio_spec(example.source)[0]
        stat = os.stat(path)
        key = f"{self._tag}|{example.source}|{stat.st_size}|{int(stat.st_mtime)}"
        return self.cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()}.pt"
