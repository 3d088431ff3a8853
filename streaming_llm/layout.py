"""Sequence layout, group positions and the streaming attention mask.

A training sequence is laid out ``[prompt][source units][end-of-source][target prefix][y_1 .. y_L]``
(y_L is the end-of-sentence token). Positions come in groups:

- prompt: ``0 .. P-1``;
- source embeddings and the end-of-source marker: ``P, P+1, ...`` in arrival order;
- target group (prefix, then target tokens): ``T0, T0+1, ...`` with ``T0 = P + capacity + 1`` fixed by the
  config, so a target token's position never depends on how much source has been read. That is what keeps
  every cached key valid when more source arrives during streaming.

``phi`` (L,) says how many source units were read when y_t was written. The hidden state of row p predicts
the token at p+1, so row p carries the visibility of the token it predicts: the row predicting y_t sees
source units ``1 .. phi(t)``; the rows of the target prefix see what the first target token sees (the
prefix is fed, like the first word, at the first write); the end-of-source marker belongs to the last unit,
so it is seen exactly when ``phi(t) = M``.
The full (offline) view is ``phi(t) = M`` for every t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """Index bookkeeping for one laid-out sequence (no tensors of embeddings)."""

    n_prompt: int
    unit_sizes: tuple[int, ...]  # embeddings per source unit (speech: per encoder block; text: per word)
    n_prefix: int  # target prefix tokens ("\nGerman:")
    n_target: int  # L: target tokens including the final end-of-sentence token
    target_offset: int  # T0, the first position of the target group

    @property
    def n_units(self) -> int:
        return len(self.unit_sizes)

    @property
    def n_source(self) -> int:
        """Source embeddings plus the end-of-source marker."""
        return sum(self.unit_sizes) + 1

    @property
    def target_start(self) -> int:
        """Index of the first target-group entry (the first prefix token)."""
        return self.n_prompt + self.n_source

    @property
    def length(self) -> int:
        return self.target_start + self.n_prefix + self.n_target

    def positions(self) -> torch.Tensor:
        """(T,) group position ids."""
        head = torch.arange(self.target_start)
        tail = self.target_offset + torch.arange(self.n_prefix + self.n_target)
        return torch.cat([head, tail])

    def key_units(self) -> torch.Tensor:
        """(T,) the source unit (1..M) each entry belongs to; the marker counts as unit M; 0 elsewhere."""
        units = torch.zeros(self.length, dtype=torch.long)
        sizes = torch.tensor(self.unit_sizes, dtype=torch.long)
        start = self.n_prompt
        units[start : start + int(sizes.sum())] = torch.repeat_interleave(torch.arange(1, self.n_units + 1), sizes)
        units[self.target_start - 1] = self.n_units  # the end-of-source marker
        return units

    def predictor_rows(self) -> torch.Tensor:
        """(L,) the row whose hidden state predicts y_t, for t = 1..L."""
        return self.target_start + self.n_prefix - 1 + torch.arange(self.n_target)

    def row_visibility(self, phi: torch.Tensor) -> torch.Tensor:
        """phi: (L,) units read before each y_t -> (T,) how many units each row may see.

        Rows outside the target group get M + 1 (they are limited by causality alone).
        """
        if phi.shape != (self.n_target,):
            raise ValueError(f"phi has shape {tuple(phi.shape)}; expected ({self.n_target},), one per target token")
        m = self.n_units
        vis = torch.full((self.length,), m + 1, dtype=torch.long)
        vis[self.target_start : self.target_start + self.n_prefix] = phi[0]  # the prefix goes with y_1
        vis[self.predictor_rows()] = phi.long()
        vis[self.length - 1] = m  # y_L predicts nothing; it was written after everything
        return vis

    def full_phi(self) -> torch.Tensor:
        """The offline view: every target token sees the whole source."""
        return torch.full((self.n_target,), self.n_units, dtype=torch.long)


def attention_mask(layouts: list[Layout], phis: list[torch.Tensor], length: int, dtype=torch.float32) -> torch.Tensor:
    """The additive mask of a batch laid out by ``layouts`` and right-padded to ``length``.

    Returns (batch, 1, length, length) with 0 where a row may attend and -inf elsewhere. The same function
    builds the stream view (sampled phi) and the full view (``layout.full_phi()``). Padding rows attend to
    themselves only, so no row is all -inf.
    """
    if len(layouts) != len(phis):
        raise ValueError(f"{len(layouts)} layouts but {len(phis)} phi vectors")
    allowed = torch.zeros(len(layouts), length, length, dtype=torch.bool)
    for b, (layout, phi) in enumerate(zip(layouts, phis, strict=True)):
        t = layout.length
        if t > length:
            raise ValueError(f"sequence {b} has {t} entries, more than the padded length {length}")
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        visible = layout.key_units()[None, :] <= layout.row_visibility(phi)[:, None]
        allowed[b, :t, :t] = causal & visible
        pad = torch.arange(t, length)
        allowed[b, pad, pad] = True
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, float("-inf"))
    return mask[:, None]


def monotonic(phi: torch.Tensor, n_units: int) -> bool:
    """Whether phi is a valid read schedule: non-decreasing, within 0..M, ending at M."""
    if phi.numel() == 0:
        return False
    return bool((phi[1:] >= phi[:-1]).all() and phi[0] >= 0 and phi[-1] == n_units)
