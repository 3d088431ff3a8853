"""Tiny models and test audio shared by the agent, live, server and browser tests."""

from __future__ import annotations

import numpy as np
import torch

from streaming_llm.checkpoint import build_model
from streaming_llm.engine import StreamingSession
from streaming_llm.tiny import tiny_config, tiny_tokenizer


def untied_tiny(modality: str = "speech", seed: int = 0, **overrides):
    """A tiny random model whose greedy output is several short words (a tied one repeats its last token)."""
    config = tiny_config(modality, **overrides)
    config = config.replace(llm_config={**config.llm_config, "tie_word_embeddings": False})
    torch.manual_seed(seed)
    return build_model(config, tiny_tokenizer()).eval()


def tone(seconds: float, rate: int = 16000, shift: float = 0.0) -> np.ndarray:
    """Two sines (220 + shift Hz and 1300 Hz): a speech source the tiny models write several words for."""
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * (220 + shift) * t) + 0.2 * np.sin(2 * np.pi * 1300 * t + 1)).astype(np.float32)


def offline_words(model, source, max_target_tokens: int = 24) -> list[str]:
    """The full-source greedy decode, word by word, cleaned as LiveStream cleans words (no inner whitespace)."""
    session = StreamingSession(model, max_target_tokens=max_target_tokens)
    if model.config.modality == "speech":
        session.push_audio(source)
    else:
        session.push_words(source)
    session.finish_source()
    words = []
    while (word := session.write_word()) is not None:
        words.append("".join(word.split()))
    return [w for w in words if w]
