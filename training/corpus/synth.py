"""English text-to-speech for the offline corpus: Piper (voice en_US joe medium) or espeak-ng.

A synthesiser is any function ``text -> (samples, sample_rate)``; tests inject a fake one. ``make_synthesizer``
builds the named ones; each worker process of the builder calls it once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable

import numpy as np
import soundfile as sf

from .sources import piper_voice_files

Synthesizer = Callable[[str], tuple[np.ndarray, int]]
VOICES = ("piper", "espeak")
SPEAKERS = {"piper": "piper-joe", "espeak": "espeak-en-us"}  # the manifest's speaker column
SENTENCE_PAUSE_S = 0.15  # silence between the sentences of one text (Piper yields one chunk per sentence)
ESPEAK_VOICE = "en-us"


class SynthesisError(RuntimeError):
    """A voice could not be loaded or produced no audio for a text."""


def piper_synthesizer(threads: int = 1) -> Synthesizer:
    """Piper with the joe medium voice (22,050 Hz); ``threads`` ONNX threads (1 per worker process)."""
    try:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig
    except ImportError as e:
        raise SynthesisError(
            f"Piper is not installed ({e}); pip install piper-tts==1.8.0, or use --voice espeak"
        ) from e
    model, config = piper_voice_files()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    voice = PiperVoice(config=PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8"))), session=session)
    rate = voice.config.sample_rate

    def synthesize(text: str) -> tuple[np.ndarray, int]:
        chunks = [c.audio_float_array for c in voice.synthesize(text) if c.audio_float_array.size]
        if not chunks:
            raise SynthesisError(f"Piper produced no audio for {text!r}")
        pause = np.zeros(int(SENTENCE_PAUSE_S * rate), dtype=np.float32)
        pieces = [chunks[0]]
        for chunk in chunks[1:]:
            pieces += [pause, chunk]
        return np.concatenate(pieces), rate

    return synthesize


def espeak_synthesizer(voice: str = ESPEAK_VOICE) -> Synthesizer:
    """The espeak-ng command (Debian ``espeak-ng``): robotic but ~0.01 s per sentence."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SynthesisError("espeak-ng is not installed; apt-get install espeak-ng, or use --voice piper")

    def synthesize(text: str) -> tuple[np.ndarray, int]:
        fd, wav = tempfile.mkstemp(suffix=".wav")
        os.close(fd)
        try:
            done = subprocess.run(
                [binary, "-v", voice, "-w", wav, "--stdin"],
                input=text.encode("utf-8"),
                capture_output=True,
                check=False,
            )
            if done.returncode != 0:
                raise SynthesisError(f"espeak-ng failed on {text!r}: {done.stderr.decode(errors='replace')}")
            samples, rate = sf.read(wav, dtype="float32")
        finally:
            os.unlink(wav)
        if samples.size == 0:
            raise SynthesisError(f"espeak-ng produced no audio for {text!r}")
        return samples, rate

    return synthesize


def check_voice(voice: str) -> None:
    """Raise (``SynthesisError`` or ``AssetMissing``, saying what to install) unless ``voice`` can load."""
    if voice == "piper":
        if importlib.util.find_spec("piper") is None or importlib.util.find_spec("onnxruntime") is None:
            raise SynthesisError("Piper is not installed; pip install piper-tts==1.8.0, or use --voice espeak")
        piper_voice_files()
    elif voice == "espeak":
        if shutil.which("espeak-ng") is None:
            raise SynthesisError("espeak-ng is not installed; apt-get install espeak-ng, or use --voice piper")
    else:
        raise ValueError(f"voice {voice!r}; choose one of {', '.join(VOICES)}")


def make_synthesizer(voice: str, threads: int = 1) -> Synthesizer:
    if voice == "piper":
        return piper_synthesizer(threads)
    if voice == "espeak":
        return espeak_synthesizer()
    raise ValueError(f"voice {voice!r}; choose one of {', '.join(VOICES)}")
