"""Read schedules for mask-based streaming training: phi by multinomial allocation.

Delta ~ Multinomial(M, w) over L+1 bins (Delta_0 is read before the first write); phi(t) = sum_{k<=t} Delta_k
for t = 1..L, so phi is monotonic and phi(L) = M. Units: encoder blocks for speech, words for text. The
schedule is drawn per target *word* (a word is written at one moment, as the engine does) and expanded to
its tokens.
"""

from __future__ import annotations

import torch


def latency_weights(n_bins: int, skew: float = 0.0) -> torch.Tensor:
    """Bin weights w over the L+1 bins: uniform at skew 0.

    skew > 0 moves reading towards later bins (each word is written with less source: lower latency);
    skew < 0 moves it towards the first bins (read more before writing: higher latency, safer).
    """
    if n_bins < 1:
        raise ValueError(f"need at least one bin, got {n_bins}")
    k = torch.arange(n_bins, dtype=torch.float64) / max(n_bins - 1, 1)
    logits = skew * k
    w = torch.exp(logits - logits.max())  # shifted: any finite skew (1e9: all reading in the last bin), no overflow
    return w / w.sum()


def sample_phi(n_units: int, n_words: int, generator: torch.Generator, skew: float = 0.0) -> torch.Tensor:
    """-> (n_words,) units read before each target word; monotonic, ending at n_units."""
    if n_units < 1 or n_words < 1:
        raise ValueError(f"phi needs at least one source unit and one target word (got M={n_units}, L={n_words})")
    w = latency_weights(n_words + 1, skew)
    bins = torch.multinomial(w, n_units, replacement=True, generator=generator)
    delta = torch.bincount(bins, minlength=n_words + 1)
    return torch.cumsum(delta, 0)[1:].long()


def word_index(token_ids: list[int], word_start: torch.Tensor) -> torch.Tensor:
    """(L,) target tokens -> the index of the word each belongs to (the first token opens word 0)."""
    starts = torch.tensor([i == 0 or bool(word_start[t]) for i, t in enumerate(token_ids)], dtype=torch.long)
    return torch.cumsum(starts, 0) - 1


def sample_token_phi(
    n_units: int, token_ids: list[int], word_start: torch.Tensor, generator: torch.Generator, skew: float = 0.0
) -> torch.Tensor:
    """phi per target token: drawn per word, equal for the tokens of one word."""
    words = word_index(token_ids, word_start)
    return sample_phi(n_units, int(words[-1]) + 1, generator, skew)[words]
