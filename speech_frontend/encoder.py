"""Whisper's audio encoder, block-causal and cached, for streaming.

The encoder is cut into blocks of ``block_frames`` encoder frames (20 ms each; 16 frames = 320 ms). A frame
in block k attends to every frame of blocks 0..k and to nothing later, so a block's output never changes
once it is computed: ``encode_block`` encodes each block once, keeping per-layer keys and values of the
blocks before it in an ``EncoderCache``, and ``forward`` computes the same thing for a whole input at once
(for training). Both give the same numbers (to float rounding).

Whisper's conv front end: ``conv1`` (kernel 3, stride 1, pad 1) then ``conv2`` (kernel 3, stride 2, pad 1),
so encoder frame j reads mel frames 2j - 2 .. 2j + 2 (2j + 2 through conv1's output 2j + 1). Inside a block
that is all there; at the block edges:

- Left: the first frame of block k reads the last CONV_LEFT_CONTEXT = 2 mel frames of block k - 1, which
  are real and already known (the cache keeps them). Block 0 sees whisper's own zero padding.
- Right: the last frame of a block would read mel frame 2 * block_frames of the *next* block. We do not wait
  for it: the conv sees a zero frame there, exactly as whisper's padding at the end of an input. The cost:
  the last encoder frame of every block (1 in ``block_frames``) is computed with one zero mel frame (10 ms)
  where the real one would be; only that frame's conv1 output at position 2j + 1 is affected.

With a single block spanning the input this is whisper's ``AudioEncoder`` exactly (with the positional
embedding sliced to the input length instead of padding to 30 s).

Lengths: any input up to ``n_ctx`` encoder frames (30 s for whisper) whose mel length is a whole number of
blocks. A caller pads the *audio* with zeros at the end of the source up to a whole block
(``samples_per_block``); longer streams must be segmented by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from whisper.model import Conv1d, LayerNorm, Linear, ModelDimensions, Whisper, sinusoids

from .mel import HOP_LENGTH

ENCODER_FRAME_MS = 20  # one encoder frame = 2 mel frames
MEL_PER_FRAME = 2  # conv2's stride
CONV_LEFT_CONTEXT = 2  # mel frames of the previous block that a block's first encoder frame reads
CONV_RIGHT_ZEROS = 1  # zero mel frames after a block's end that its last encoder frame reads

__all__ = ["ENCODER_FRAME_MS", "BlockCausalEncoder", "EncoderCache"]


class EncoderCache:
    """What ``encode_block`` needs from the earlier blocks of one batch of streams.

    Keys and values live in per-layer buffers that double in length when full (up to ``max_frames``), so
    appending a block copies only that block, not the whole history.
    """

    def __init__(self, n_layer: int, max_frames: int):
        self.n_frames = 0  # encoder frames encoded so far
        self.max_frames = max_frames
        self.mel_tail: Tensor | None = None  # (batch, n_mels, CONV_LEFT_CONTEXT): the last mel frames seen
        self._keys: list[Tensor | None] = [None] * n_layer  # (batch, n_head, capacity, d_head)
        self._values: list[Tensor | None] = [None] * n_layer

    @property
    def batch(self) -> int | None:
        return None if self.mel_tail is None else self.mel_tail.shape[0]

    @property
    def keys(self) -> list[Tensor | None]:
        """per layer: (batch, n_head, n_frames, d_head)"""
        return [None if k is None else k[:, :, : self.n_frames] for k in self._keys]

    @property
    def values(self) -> list[Tensor | None]:
        return [None if v is None else v[:, :, : self.n_frames] for v in self._values]

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one layer's keys and values of the new frames (batch, n_head, n_new, d_head) after the
        cached ones; returns those of all frames so far. ``n_frames`` moves on in ``commit``."""
        end = self.n_frames + k.shape[2]
        buffer = self._keys[layer]
        if buffer is None or buffer.shape[2] < end:
            capacity = min(max(end, 2 * (0 if buffer is None else buffer.shape[2])), self.max_frames)
            for store, new in ((self._keys, k), (self._values, v)):
                grown = new.new_empty(*new.shape[:2], max(capacity, end), new.shape[3])
                if store[layer] is not None:
                    grown[:, :, : self.n_frames] = store[layer][:, :, : self.n_frames]
                store[layer] = grown
        self._keys[layer][:, :, self.n_frames : end] = k
        self._values[layer][:, :, self.n_frames : end] = v
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]

    def commit(self, n_new: int, mel_tail: Tensor) -> None:
        self.n_frames += n_new
        self.mel_tail = mel_tail


class BlockAttention(nn.Module):
    """Whisper's self-attention (same weight names and numerics) with an optional mask or a cache."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = Linear(n_state, n_state)
        self.key = Linear(n_state, n_state, bias=False)
        self.value = Linear(n_state, n_state)
        self.out = Linear(n_state, n_state)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, cache: EncoderCache | None = None, layer: int = 0
    ) -> Tensor:
        """x: (batch, n_new, n_state) -> (batch, n_new, n_state). mask: (n_new, n_new) bool, True = may
        attend; with a cache, the new frames attend to all cached frames and to each other."""
        q, k, v = (self._heads(f(x)) for f in (self.query, self.key, self.value))
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(d_head), as whisper
        return self.out(a.permute(0, 2, 1, 3).flatten(start_dim=2))

    def _heads(self, x: Tensor) -> Tensor:
        """(batch, n, n_state) -> (batch, n_head, n, d_head)"""
        return x.view(*x.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)


class EncoderLayer(nn.Module):
    """Whisper's ``ResidualAttentionBlock`` without cross-attention, with block-causal attention."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = BlockAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        n_mlp = n_state * 4
        self.mlp = nn.Sequential(Linear(n_state, n_mlp), nn.GELU(), Linear(n_mlp, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, cache: EncoderCache | None = None, layer: int = 0
    ) -> Tensor:
        x = x + self.attn(self.attn_ln(x), mask=mask, cache=cache, layer=layer)
        x = x + self.mlp(self.mlp_ln(x))
        return x


class BlockCausalEncoder(nn.Module):
    """Whisper's ``AudioEncoder`` (same state dict keys), block-causal, with a cached incremental path."""

    def __init__(self, dims: ModelDimensions, block_frames: int):
        super().__init__()
        if block_frames < 1:
            raise ValueError(f"block_frames={block_frames}; a block needs at least 1 encoder frame (20 ms)")
        self.n_mels = dims.n_mels
        self.n_ctx = dims.n_audio_ctx
        self.n_state = dims.n_audio_state
        self.n_head = dims.n_audio_head
        self.n_layer = dims.n_audio_layer
        self.block_frames = block_frames
        self.mel_per_block = MEL_PER_FRAME * block_frames
        # no padding: the block edges are padded by hand (see the module docstring)
        self.conv1 = Conv1d(self.n_mels, self.n_state, kernel_size=3)
        self.conv2 = Conv1d(self.n_state, self.n_state, kernel_size=3, stride=2)
        self.register_buffer("positional_embedding", sinusoids(self.n_ctx, self.n_state))
        self.blocks = nn.ModuleList([EncoderLayer(self.n_state, self.n_head) for _ in range(self.n_layer)])
        self.ln_post = LayerNorm(self.n_state)

    @classmethod
    def from_whisper(cls, model: Whisper, block_frames: int) -> BlockCausalEncoder:
        """A copy of ``model.encoder``'s weights, in float32 on the encoder's device."""
        encoder = cls(model.dims, block_frames)
        encoder.load_state_dict(model.encoder.state_dict())
        return encoder.to(model.encoder.conv1.weight.device)

    @property
    def block_ms(self) -> int:
        return self.block_frames * ENCODER_FRAME_MS

    @property
    def samples_per_block(self) -> int:
        """16 kHz samples per block: pad the audio at the end of a source to a multiple of this."""
        return self.mel_per_block * HOP_LENGTH

    def forward(self, mel: Tensor) -> Tensor:
        """mel: (batch, n_mels, n_blocks * mel_per_block) -> (batch, n_blocks * block_frames, n_state).

        Block-causal over the whole input; equal to feeding the blocks one by one to ``encode_block``.
        """
        self._check_mel(mel, "mel")
        n_mel = mel.shape[-1]
        if n_mel % self.mel_per_block:
            raise ValueError(
                f"mel of {n_mel} frames is not a whole number of blocks of {self.mel_per_block} frames "
                f"({self.block_ms} ms); pad the audio with zeros at the end to a multiple of "
                f"{self.samples_per_block} samples"
            )
        n_frames = n_mel // MEL_PER_FRAME
        self._check_length(n_frames)
        batch, n_blocks = mel.shape[0], n_mel // self.mel_per_block
        if n_blocks == 0:
            return mel.new_zeros(batch, 0, self.n_state)

        # every block with its left context and a zero frame on the right: (batch * n_blocks, n_mels, width)
        padded = F.pad(mel, (CONV_LEFT_CONTEXT, 0))
        segments = padded.unfold(-1, CONV_LEFT_CONTEXT + self.mel_per_block, self.mel_per_block)
        segments = F.pad(segments, (0, CONV_RIGHT_ZEROS)).transpose(1, 2).flatten(0, 1)
        first = (torch.arange(n_blocks, device=mel.device) == 0).repeat(batch)
        x = self._conv(segments, first).reshape(batch, n_frames, self.n_state)

        x = (x + self.positional_embedding[:n_frames]).to(x.dtype)
        mask = self._block_causal_mask(n_blocks, mel.device) if n_blocks > 1 else None
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.ln_post(x)

    def new_cache(self) -> EncoderCache:
        return EncoderCache(self.n_layer, max_frames=self.n_ctx)

    def encode_block(self, mel_block: Tensor, cache: EncoderCache) -> Tensor:
        """mel_block: (batch, n_mels, mel_per_block) -> (batch, block_frames, n_state); extends ``cache``.

        For inference (under ``torch.inference_mode()`` or ``no_grad``): the cache is written in place. To
        train, use ``forward``, which gives the same outputs.
        """
        self._check_mel(mel_block, "mel_block")
        batch = mel_block.shape[0]
        if mel_block.shape[-1] != self.mel_per_block:
            raise ValueError(
                f"mel_block has {mel_block.shape[-1]} frames; a block is {self.mel_per_block} mel frames "
                f"({self.block_ms} ms); pad the audio at the end of the source to a whole block"
            )
        if cache.batch is not None and cache.batch != batch:
            raise ValueError(f"mel_block has batch {batch} but the cache holds {cache.batch} streams")
        start = cache.n_frames
        self._check_length(start + self.block_frames)

        left = cache.mel_tail
        if left is None:
            left = mel_block.new_zeros(batch, self.n_mels, CONV_LEFT_CONTEXT)
        right = mel_block.new_zeros(batch, self.n_mels, CONV_RIGHT_ZEROS)
        segment = torch.cat([left, mel_block, right], dim=-1)
        first = torch.full((batch,), start == 0, device=mel_block.device)
        x = self._conv(segment, first)

        x = (x + self.positional_embedding[start : start + self.block_frames]).to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=cache, layer=i)
        cache.commit(self.block_frames, mel_tail=mel_block[..., -CONV_LEFT_CONTEXT:].clone())
        return self.ln_post(x)

    def _conv(self, segments: Tensor, first: Tensor) -> Tensor:
        """segments: (n, n_mels, CONV_LEFT_CONTEXT + mel_per_block + CONV_RIGHT_ZEROS), one block each;
        first: (n,) bool, True where the block is the first of its stream -> (n, block_frames, n_state)."""
        x = F.gelu(self.conv1(segments))  # (n, n_state, 1 + mel_per_block): conv1 outputs -1 .. 2B - 1
        # before the stream start, conv2 reads whisper's zero padding, not conv1 of zeros
        x = torch.where(first[:, None, None] & (torch.arange(x.shape[-1], device=x.device) == 0), 0.0, x)
        x = F.gelu(self.conv2(x))  # (n, n_state, block_frames)
        return x.permute(0, 2, 1)

    def _block_causal_mask(self, n_blocks: int, device: torch.device) -> Tensor:
        """(n_frames, n_frames) bool: frame i may attend to frame j iff block(j) <= block(i)."""
        block = torch.arange(n_blocks * self.block_frames, device=device) // self.block_frames
        return block[None, :] <= block[:, None]

    def _check_mel(self, mel: Tensor, name: str) -> None:
        if mel.ndim != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"{name} of shape {tuple(mel.shape)}; expected (batch, {self.n_mels}, frames)")

    def _check_length(self, n_frames: int) -> None:
        if n_frames > self.n_ctx:
            seconds, limit = n_frames * ENCODER_FRAME_MS / 1000, self.n_ctx * ENCODER_FRAME_MS / 1000
            raise ValueError(
                f"{seconds:.2f} s of audio ({n_frames} encoder frames) exceeds the encoder's limit of "
                f"{limit:.2f} s ({self.n_ctx} frames); segment the stream and start a new cache per segment"
            )
