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

Several views of one example share one forward: ``views=2`` lays the target group out twice after one copy
of prompt and source, ``[prompt][source][eos-src][target, view 1][target, view 2]``. Both copies carry the
same target positions; each attends to the shared part under its own phi and to its own copy's earlier
targets only. Prompt and source rows never see targets, so they are identical in every view and computed
once: that is how SPSD's two views (stream and full) cost far less than two forwards.
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
    views: int = 1  # copies of the target group (one per phi)

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
    def group_length(self) -> int:
        """Entries of one target group: prefix and target tokens."""
        return self.n_prefix + self.n_target

    @property
    def length(self) -> int:
        return self.target_start + self.views * self.group_length

    def positions(self) -> torch.Tensor:
        """(T,) group position ids."""
        head = torch.arange(self.target_start)
        tail = self.target_offset + torch.arange(self.group_length)
        return torch.cat([head, *[tail] * self.views])

    def key_views(self) -> torch.Tensor:
        """(T,) 0 for the shared prompt and source, v + 1 for the entries of view v's target group."""
        views = torch.zeros(self.length, dtype=torch.long)
        views[self.target_start :] = 1 + torch.arange(self.views).repeat_interleave(self.group_length)
        return views

    def key_units(self) -> torch.Tensor:
        """(T,) the source unit (1..M) each entry belongs to; the marker counts as unit M; 0 elsewhere."""
        units = torch.zeros(self.length, dtype=torch.long)
        sizes = torch.tensor(self.unit_sizes, dtype=torch.long)
        start = self.n_prompt
        units[start : start + int(sizes.sum())] = torch.repeat_interleave(torch.arange(1, self.n_units + 1), sizes)
        units[self.target_start - 1] = self.n_units  # the end-of-source marker
        return units

    def predictor_rows(self, view: int = 0) -> torch.Tensor:
        """(L,) the row whose hidden state predicts y_t, for t = 1..L, in the given view."""
        return self.target_start + view * self.group_length + self.n_prefix - 1 + torch.arange(self.n_target)

    def row_visibility(self, phi: torch.Tensor) -> torch.Tensor:
        """phi: (L,) or (views, L) units read before each y_t -> (T,) how many units each row may see.

        Rows outside the target groups get M + 1 (they are limited by causality alone).
        """
        phi = phi.reshape(-1, phi.shape[-1]) if phi.ndim else phi
        if phi.shape != (self.views, self.n_target):
            raise ValueError(
                f"phi has shape {tuple(phi.shape)}; expected ({self.views}, {self.n_target}): one per target token"
                " and view"
            )
        m = self.n_units
        vis = torch.full((self.length,), m + 1, dtype=torch.long)
        for v in range(self.views):
            start = self.target_start + v * self.group_length
            vis[start : start + self.n_prefix] = phi[v, 0]  # the prefix goes with y_1
            vis[self.predictor_rows(v)] = phi[v].long()
            vis[start + self.group_length - 1] = m  # y_L predicts nothing; it was written after everything
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
        kv = layout.key_views()
        own_view = (kv[None, :] == 0) | (kv[None, :] == kv[:, None])
        allowed[b, :t, :t] = causal & visible & own_view
        pad = torch.arange(t, length)
        allowed[b, pad, pad] = True
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, float("-inf"))
    return mask[:, None]
