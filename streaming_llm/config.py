"""The speech LLM's configuration: one frozen dataclass, saved as JSON inside every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

SPEECH = "speech"
TEXT = "text"
ENCODER_FRAME_MS = 20  # one whisper encoder frame: two 10 ms mel frames


@dataclass(frozen=True)
class SpeechLLMConfig:
    """Everything needed to rebuild the model's modules before its weights are loaded.

    ``llm_config`` and ``whisper_dims`` are stored in full so that a checkpoint is self-describing;
    ``llm_path`` / ``whisper_path`` name the base weights a checkpoint was trained from (informational,
    and used when a checkpoint stores only the trained delta).
    """

    modality: str = SPEECH  # "speech" (whisper encoder + adapter) or "text" (source words as tokens)
    llm_config: dict = field(default_factory=dict)  # a transformers config, as `config.to_dict()`
    llm_path: str = ""
    whisper_dims: dict | None = None  # whisper.model.ModelDimensions fields (speech only)
    whisper_path: str = ""
    block_ms: int = 640  # encoder block = the LLM's source unit for speech
    stack: int = 4  # encoder frames stacked into one LLM source embedding
    adapter_hidden: int = 1024
    prompt: str = "Translate the English speech into German.\nEnglish:"
    target_prefix: str = "\nGerman:"
    max_source_embeddings: int = 0  # 0: derived (speech: the encoder's context / stack; text: 512)
    probe_hidden: int = 256  # the learned decision probe's MLP width (0: no probe)
    llm_lora_r: int = 0  # LoRA rank on the LM's attention projections (0: none)
    llm_lora_alpha: int = 32
    llm_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    encoder_lora_r: int = 0  # LoRA rank on the encoder's attention (0: none)
    encoder_lora_alpha: int = 32

    def __post_init__(self) -> None:
        if self.modality not in (SPEECH, TEXT):
            raise ValueError(f"modality {self.modality!r}: expected {SPEECH!r} or {TEXT!r}")
        if self.modality == SPEECH:
            if not self.whisper_dims:
                raise ValueError("a speech model needs whisper_dims (the encoder's ModelDimensions)")
            if self.block_ms % ENCODER_FRAME_MS:
                raise ValueError(f"block_ms={self.block_ms} is not a multiple of {ENCODER_FRAME_MS} ms")
            if self.block_frames % self.stack:
                raise ValueError(
                    f"block_ms={self.block_ms} gives {self.block_frames} encoder frames per block, "
                    f"not a multiple of stack={self.stack}"
                )

    @property
    def block_frames(self) -> int:
        """Encoder frames per source unit (speech)."""
        return self.block_ms // ENCODER_FRAME_MS

    @property
    def embeddings_per_block(self) -> int:
        return self.block_frames // self.stack

    @property
    def source_capacity(self) -> int:
        """How many source embeddings fit before the target position group starts."""
        if self.max_source_embeddings:
            return self.max_source_embeddings
        if self.modality == SPEECH:
            return self.whisper_dims["n_audio_ctx"] // self.stack
        return 512

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> SpeechLLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config keys {unknown}; is this a proactive-simulst checkpoint?")
        if isinstance(data.get("llm_lora_targets"), list):
            data = {**data, "llm_lora_targets": tuple(data["llm_lora_targets"])}
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> SpeechLLMConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON config ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes) -> SpeechLLMConfig:
        return dataclasses.replace(self, **changes)
