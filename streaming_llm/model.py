"""The speech LLM: whisper encoder (block-causal) -> adapter -> causal LM, in one module.

``SpeechLLM`` turns a source into *units* (speech: one unit per encoder block, ``block_frames / stack``
embeddings each; text: one unit per word, its tokens) and lays a batch out with ``layout.Layout``. The same
module serves training (one masked forward over whole sequences) and streaming inference
(``engine.StreamingSession`` feeds the same embeddings incrementally).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from speech_frontend.adapter import Adapter, AdapterConfig
from speech_frontend.audio import SAMPLE_RATE
from speech_frontend.encoder import BlockCausalEncoder
from speech_frontend.mel import HOP_LENGTH, log_mel

from .config import SPEECH, SpeechLLMConfig
from .layout import Layout, attention_mask

# a token that starts with one of these begins a new word: byte-level BPE's space, newline and tab
# ("Ġ", "Ċ", "ĉ"), sentencepiece's space, plain whitespace
WORD_START_MARKS = ("Ġ", "Ċ", "ĉ", "▁", " ", "\n", "\t")


class SpeechLLM(nn.Module):
    def __init__(self, config: SpeechLLMConfig, llm: PreTrainedModel, tokenizer, encoder: BlockCausalEncoder | None):
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        d_model = llm.config.hidden_size
        if config.modality == SPEECH:
            if encoder is None:
                raise ValueError("a speech model needs an encoder")
            if encoder.block_frames != config.block_frames:
                raise ValueError(f"encoder block of {encoder.block_frames} frames, config says {config.block_frames}")
            self.encoder = encoder
            self.adapter = Adapter(AdapterConfig(encoder.n_state, d_model, config.stack, config.adapter_hidden))
        else:
            self.encoder = None
            self.adapter = None
        # the end-of-source marker: a learned embedding, appended after the last source unit
        self.end_of_source = nn.Parameter(torch.randn(d_model) * llm.config.initializer_range)
        # the learned decision probe: P(stream prediction already equals the full-view prediction)
        self.probe = probe_mlp(d_model, config.probe_hidden) if config.probe_hidden else None
        self.prompt_ids = self._ids(config.prompt)
        self.prefix_ids = self._ids(config.target_prefix)
        if not self.prefix_ids:
            raise ValueError("target_prefix tokenizes to nothing; it must hold at least one token")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-sentence token (eos_token_id is None)")
        self.eos_id = int(tokenizer.eos_token_id)
        self.register_buffer("word_start", _word_start_table(tokenizer, self.vocab_size, self.eos_id), persistent=False)

    # ---- sizes -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.llm.get_input_embeddings().weight.shape[0]  # the output layer may be int8 (quantize.py)

    @property
    def hidden_size(self) -> int:
        return self.llm.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.end_of_source.device

    @property
    def lm_dtype(self) -> torch.dtype:
        """The dtype of the LLM's inputs: float32, or float16 after ``quantize.half_precision``."""
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def block_samples(self) -> int:
        """Audio samples per source unit (speech)."""
        return self.config.block_ms * SAMPLE_RATE // 1000

    @property
    def target_offset(self) -> int:
        """T0: the first position of the target group."""
        return len(self.prompt_ids) + self.config.source_capacity + 1

    # ---- tokens ------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def target_ids(self, text: str) -> list[int]:
        """A reference translation -> its token ids followed by the end-of-sentence token."""
        return self._ids(" " + text.strip()) + [self.eos_id]

    def source_tokens(self, words: Sequence[str]) -> int:
        """The source embeddings ``text_units`` makes of ``words``: each word's tokens (``word_ids``), counted in one
        tokenizer call; what ``config.source_capacity`` bounds."""
        return sum(map(len, self.tokenizer([" " + w.strip() for w in words], add_special_tokens=False)["input_ids"]))

    def source_overflow(self, words: Sequence[str]) -> str:
        """"" when ``words`` fit one session's source group, else what is wrong (for an error that names where)."""
        size, capacity = self.source_tokens(words), self.config.source_capacity
        if size <= capacity:
            return ""
        return f"{len(words)} words make {size} source tokens, more than the model's context of {capacity}"

    def word_ids(self, word: str) -> list[int]:
        """One source word (text modality) -> its tokens, with the leading space it has mid-sentence."""
        ids = self._ids(" " + word.strip())
        if not ids:
            raise ValueError(f"source word {word!r} tokenizes to nothing")
        return ids

    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        """(n,) ids -> (n, d_model)."""
        table = self.llm.get_input_embeddings()
        return table(torch.as_tensor(list(ids), dtype=torch.long, device=self.device))

    # ---- sources -> units --------------------------------------------------------------------------

    def pad_audio(self, audio: np.ndarray) -> np.ndarray:
        """Pad 16 kHz audio with zeros to a whole number of blocks (done the same way when streaming)."""
        if audio.shape[0] == 0:
            raise ValueError("0 samples; a speech source needs at least one sample")
        short = (-audio.shape[0]) % self.block_samples
        return np.concatenate([audio, np.zeros(short, dtype=audio.dtype)]) if short else audio

    def encode_speech(self, audio: np.ndarray) -> torch.Tensor:
        """audio: (n,) float32 16 kHz -> encoder frames (n_blocks * block_frames, n_state), block-causal.

        This is exactly what the streaming engine computes block by block (a frozen encoder's output can be
        cached on disk for training).
        """
        mel = log_mel(self.pad_audio(audio), self.encoder.n_mels).to(self.device)  # (n_mels, frames)
        assert mel.shape[1] * HOP_LENGTH == self.pad_audio(audio).shape[0]
        return self.encoder(mel[None].to(self.end_of_source.dtype))[0]

    def speech_units(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Encoder frames (n_blocks * block_frames, n_state) -> one (embeddings_per_block, d_model) per block."""
        embeds = self.adapter(frames[None])[0]
        return list(embeds.split(self.config.embeddings_per_block))

    def text_units(self, words: Sequence[str]) -> list[torch.Tensor]:
        """Source words -> one (tokens_of_word, d_model) per word."""
        if not words:
            raise ValueError("an empty source sentence; a text source needs at least one word")
        return [self.embed_ids(self.word_ids(w)) for w in words]

    # ---- batches -----------------------------------------------------------------------------------

    def layout(self, unit_sizes: Sequence[int], n_target: int, views: int = 1) -> Layout:
        if sum(unit_sizes) > self.config.source_capacity:
            raise ValueError(
                f"source of {sum(unit_sizes)} embeddings exceeds the model's capacity of "
                f"{self.config.source_capacity}; split the input or raise max_source_embeddings"
            )
        return Layout(
            len(self.prompt_ids), tuple(unit_sizes), len(self.prefix_ids), n_target, self.target_offset, views
        )

    def assemble(
        self, units: Sequence[Sequence[torch.Tensor]], targets: Sequence[Sequence[int]], views: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, list[Layout]]:
        """Lay out a batch -> (embeds (B, T, d), positions (B, T), layouts), right-padded to the longest.

        With ``views`` > 1 each sequence holds that many copies of its target group (see ``layout``).
        """
        layouts = [self.layout([u.shape[0] for u in us], len(ys), views) for us, ys in zip(units, targets, strict=True)]
        length = max(layout.length for layout in layouts)
        embeds = torch.zeros(len(layouts), length, self.hidden_size, device=self.device, dtype=self.lm_dtype)
        positions = torch.zeros(len(layouts), length, dtype=torch.long, device=self.device)
        prompt = self.embed_ids(self.prompt_ids)
        for b, (us, ys, layout) in enumerate(zip(units, targets, layouts, strict=True)):
            target_group = self.embed_ids(self.prefix_ids + list(ys))
            row = torch.cat([prompt, *us, self.end_of_source[None], *[target_group] * views])
            embeds[b, : layout.length] = row
            positions[b, : layout.length] = layout.positions().to(self.device)
        return embeds, positions, layouts

    def hidden(
        self, embeds: torch.Tensor, positions: torch.Tensor, layouts: list[Layout], phis: list[torch.Tensor]
    ) -> torch.Tensor:
        """One masked forward of the LM body -> last hidden states (B, T, d), after the final norm."""
        mask = attention_mask(layouts, phis, embeds.shape[1], dtype=embeds.dtype).to(self.device)
        body = self.llm.get_decoder()
        return body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., V)."""
        return self.llm.get_output_embeddings()(hidden)

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, layouts: list[Layout], phis: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One masked forward -> (logits (B, T, V), last hidden states (B, T, d))."""
        hidden = self.hidden(embeds, positions, layouts, phis)
        return self.lm_logits(hidden), hidden

    def probe_logit(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> (...) logit of "the stream prediction already agrees with the full view"."""
        if self.probe is None:
            raise ValueError("this model has no probe head (probe_hidden=0)")
        return self.probe(hidden).squeeze(-1)


def probe_mlp(d_model: int, hidden: int) -> nn.Sequential:
    """The decision probe: hidden state (d_model,) -> one logit of P(the stream view already agrees)."""
    return nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, 1))


def run_llm(
    llm: PreTrainedModel, embeds, positions, mask, cache=None, attentions: bool = False, logits_to_keep=0
):
    """The one place that calls the LM (transformers 5.24 names the KV cache argument ``cache``).

    ``logits_to_keep``: 0 for every row's logits, n for the last n rows, or a tensor of row indices.
    """
    kwargs = dict(
        logits_to_keep=logits_to_keep,
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        output_hidden_states=True,
        output_attentions=attentions,
        use_cache=cache is not None,
    )
    if cache is not None:
        kwargs["cache"] = cache
    return llm(**kwargs)


@contextlib.contextmanager
def eager_attention(llm: PreTrainedModel) -> Iterator[None]:
    """Run the LM with eager attention (the only kind that returns attention weights) inside the block."""
    previous = llm.config._attn_implementation
    if previous == "eager":
        yield
        return
    llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        llm.set_attn_implementation(previous)


def _word_start_table(tokenizer, vocab_size: int, eos_id: int) -> torch.Tensor:
    """(V,) bool: token v begins a new word (or ends the sentence). Specials count as boundaries."""
    table = torch.zeros(vocab_size, dtype=torch.bool)
    n = min(vocab_size, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    for i, piece in enumerate(pieces):
        table[i] = i in special or (piece is not None and piece.startswith(WORD_START_MARKS))
    table[eos_id] = True
    return table


def build_llm(config: SpeechLLMConfig, from_path: bool = True) -> PreTrainedModel:
    """The causal LM: from ``llm_path`` (a local Hugging Face directory) or a random init of ``llm_config``."""
    if from_path and config.llm_path:
        return AutoModelForCausalLM.from_pretrained(config.llm_path, dtype=torch.float32)
    data = dict(config.llm_config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError("llm_config has no model_type; store `llm.config.to_dict()`")
    hf_config = AutoConfig.for_model(model_type, **data)
    return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
