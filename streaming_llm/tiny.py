"""Tiny random models, built offline in milliseconds, for tests and the ``tiny`` training config.

The tokenizer is a byte-level BPE trained in memory on a few English and German sentences (like the real
LLMs' tokenizers: words carry their leading space as ``Ġ``), the LM a 2-layer Llama, the encoder a 2-layer
whisper encoder with random weights.
"""

from __future__ import annotations

import functools

import torch
import whisper.model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from .checkpoint import build_model
from .config import SPEECH, SpeechLLMConfig
from .model import SpeechLLM

TINY_TEXTS = (
    "Translate the English speech into German. English: German:",
    "The weather is nice today. Das Wetter ist heute schön.",
    "I would like a cup of coffee. Ich möchte eine Tasse Kaffee.",
    "Where is the train station? Wo ist der Bahnhof?",
    "She reads a book in the garden. Sie liest ein Buch im Garten.",
    "We are going home now. Wir gehen jetzt nach Hause.",
    "This is a very good idea. Das ist eine sehr gute Idee.",
    "He has been working all day. Er hat den ganzen Tag gearbeitet.",
    "Thank you for your help. Danke für Ihre Hilfe.",
)
EOS = "<|endoftext|>"
PAD = "<|pad|>"


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(TINY_TEXTS) * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)), eos_token=EOS, pad_token=PAD
    )


def tiny_whisper_dims(n_mels: int = 80) -> whisper.model.ModelDimensions:
    return whisper.model.ModelDimensions(
        n_mels=n_mels, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=2,
        n_vocab=64, n_text_ctx=16, n_text_state=32, n_text_head=2, n_text_layer=1,
    )  # fmt: skip


def tiny_config(modality: str = SPEECH, block_ms: int = 320, stack: int = 4, **overrides) -> SpeechLLMConfig:
    tokenizer = tiny_tokenizer()
    llm = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    dims = tiny_whisper_dims().__dict__ if modality == SPEECH else None
    prompt = "Translate the English speech into German.\nEnglish:" if modality == SPEECH else "English:"
    fields = dict(
        modality=modality, llm_config=llm.to_dict(), whisper_dims=dims, block_ms=block_ms, stack=stack,
        adapter_hidden=64, prompt=prompt, target_prefix="\nGerman:", probe_hidden=16,
    )  # fmt: skip
    fields.update(overrides)
    return SpeechLLMConfig(**fields)


def tiny_model(modality: str = SPEECH, seed: int = 0, **overrides) -> SpeechLLM:
    """A random tiny SpeechLLM in eval mode (fp32)."""
    torch.manual_seed(seed)
    return build_model(tiny_config(modality, **overrides), tiny_tokenizer()).eval()
