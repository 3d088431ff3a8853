"""Adapter from encoder frames to LLM embeddings: group ``stack`` frames, then a 2-layer MLP.

With whisper's 20 ms frames, ``stack=4`` gives one LLM source embedding per 80 ms. A group never spans two
encoder blocks as long as ``block_frames`` is a multiple of ``stack``, so the adapter is as causal as the
encoder (it sees no frame of a later block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

ADAPTER_MODES = ("stack", "mean")

__all__ = ["Adapter", "AdapterConfig"]


@dataclass(frozen=True)
class AdapterConfig:
    d_in: int  # encoder width (whisper tiny: 384, base: 512)
    d_out: int  # LLM hidden size
    stack: int = 4  # encoder frames per output embedding (2..4 is usual)
    hidden: int = 1024
    mode: Literal["stack", "mean"] = "stack"  # concatenate the group's frames, or average them

    def __post_init__(self):
        if self.stack < 1:
            raise ValueError(f"stack={self.stack}; it must be a positive number of frames (2..4 is usual)")
        if self.mode not in ADAPTER_MODES:
            raise ValueError(f"mode={self.mode!r}; choose one of {ADAPTER_MODES}")
        if min(self.d_in, self.d_out, self.hidden) < 1:
            raise ValueError(f"d_in, d_out and hidden must be positive: {self}")


class Adapter(nn.Module):
    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        d_group = config.d_in * config.stack if config.mode == "stack" else config.d_in
        self.mlp = nn.Sequential(nn.Linear(d_group, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.d_out))

    def forward(self, frames: Tensor) -> Tensor:
        """frames: (batch, n, d_in) -> (batch, n // stack, d_out); n must be a multiple of stack."""
        stack, d_in = self.config.stack, self.config.d_in
        if frames.ndim != 3 or frames.shape[-1] != d_in:
            raise ValueError(f"frames of shape {tuple(frames.shape)}; expected (batch, n, {d_in})")
        batch, n, _ = frames.shape
        if n % stack:
            raise ValueError(
                f"{n} frames is not a multiple of stack={stack}; use an encoder block size that is a "
                f"multiple of {stack} frames"
            )
        groups = frames.reshape(batch, n // stack, stack * d_in)  # frames of a group side by side, in order
        if self.config.mode == "mean":
            groups = groups.view(batch, n // stack, stack, d_in).mean(dim=2)
        return self.mlp(groups)
