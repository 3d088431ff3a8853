"""Convert a CTranslate2 Whisper model to an openai-whisper checkpoint, and load either kind.

openai-whisper checkpoints are ``{'dims': ModelDimensions fields, 'model_state_dict': ...}`` saved with
``torch.save``; ``whisper.load_model(path)`` reads them. The offline packages ship Whisper as a CTranslate2
``model.bin`` (float16), so this module maps its variables onto whisper's names:

- self-attention ``linear_0`` holds q, k and v fused along dim 0. whisper's key has no bias: the key part of
  the fused bias is dropped (it adds the same value to every score of a query, so softmax ignores it).
- decoder cross-attention: ``linear_0`` is q, ``linear_1`` is k and v fused, ``linear_2`` is the output.
- all weights become float32. Weights that CTranslate2 quantized (``--quantization int8*`` / ``int16``: an
  integer ``weight`` with a ``weight_scale``, per output row or one for the tensor, ``q = rint(w * scale)``)
  are dequantized as ``q / scale``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .ctranslate2 import MODEL_FILE, read_model_bin

if TYPE_CHECKING:
    from whisper.model import Whisper

WHISPER_HEAD_DIM = 64  # every released Whisper size; used only when a model stores no head count
CONFIG_FILE = "config.json"
CHECKPOINT_SUFFIX = ".pt"

PathLike = str | os.PathLike
ModelSource = PathLike | Iterable[PathLike]

_LAYER_NORM = {"gamma": "weight", "beta": "bias"}


class ConversionError(ValueError):
    """A model that cannot become an openai-whisper checkpoint; the message says what is missing."""


def _count_layers(variables: Mapping[str, np.ndarray], stack: str) -> int:
    n = 0
    while f"{stack}/layer_{n}/self_attention/linear_0/weight" in variables:
        n += 1
    return n


def _num_heads(variables: Mapping[str, np.ndarray], stack: str, state: int, override: int | None) -> int:
    if override is not None:
        return int(override)
    if f"{stack}/num_heads" in variables:
        return int(np.asarray(variables[f"{stack}/num_heads"]).item())
    return state // WHISPER_HEAD_DIM


def whisper_dims(
    variables: Mapping[str, np.ndarray], n_audio_head: int | None = None, n_text_head: int | None = None
) -> dict[str, int]:
    """openai-whisper ``ModelDimensions`` fields inferred from CT2 variable shapes and head counts."""
    _require(variables, ["encoder/conv1/weight", "encoder/position_encodings/encodings",
                         "decoder/embeddings/weight", "decoder/position_encodings/encodings"])
    n_audio_state, n_mels, _ = variables["encoder/conv1/weight"].shape
    n_vocab, n_text_state = variables["decoder/embeddings/weight"].shape
    dims = {
        "n_mels": int(n_mels),
        "n_audio_ctx": int(variables["encoder/position_encodings/encodings"].shape[0]),
        "n_audio_state": int(n_audio_state),
        "n_audio_head": _num_heads(variables, "encoder", int(n_audio_state), n_audio_head),
        "n_audio_layer": _count_layers(variables, "encoder"),
        "n_vocab": int(n_vocab),
        "n_text_ctx": int(variables["decoder/position_encodings/encodings"].shape[0]),
        "n_text_state": int(n_text_state),
        "n_text_head": _num_heads(variables, "decoder", int(n_text_state), n_text_head),
        "n_text_layer": _count_layers(variables, "decoder"),
    }
    for stack, layers, state, heads in (("encoder", "n_audio_layer", "n_audio_state", "n_audio_head"),
                                        ("decoder", "n_text_layer", "n_text_state", "n_text_head")):
        if dims[layers] == 0:
            raise ConversionError(f"not a CTranslate2 Whisper model: no {stack}/layer_0 variables")
        if dims[heads] <= 0 or dims[state] % dims[heads]:
            raise ConversionError(f"{stack}: {dims[heads]} heads do not divide the width {dims[state]}")
    return dims


def _require(variables: Mapping[str, np.ndarray], names: Iterable[str]) -> None:
    missing = [n for n in names if n not in variables]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConversionError(f"not a CTranslate2 Whisper model: variable {missing[0]} is missing{more}")


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def ct2_whisper_state_dict(
    variables: Mapping[str, np.ndarray], dims: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """openai-whisper ``model_state_dict`` (float32) from CT2 Whisper variables (aliases resolved)."""
    sd: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        _require(variables, [name])
        used.add(name)
        value = variables[name]
        scale = variables.get(f"{name}_scale")
        if scale is not None:  # a CTranslate2-quantized weight: q = rint(w * scale)
            used.add(f"{name}_scale")
            scale = np.asarray(scale, dtype=np.float32)
            if scale.ndim == 1:
                scale = scale.reshape(-1, *([1] * (np.ndim(value) - 1)))
            return np.asarray(value, dtype=np.float32) / scale
        if np.asarray(value).dtype.kind in "iu" and np.ndim(value) >= 2:
            raise ConversionError(f"CT2 variable {name} is {np.asarray(value).dtype} without a {name}_scale; "
                                  "cannot dequantize it")
        return value

    def linear(dst: str, src: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = _tensor(get(f"{src}/weight"))
        if bias:
            sd[f"{dst}.bias"] = _tensor(get(f"{src}/bias"))

    def layer_norm(dst: str, src: str) -> None:
        for ct2_name, name in _LAYER_NORM.items():
            sd[f"{dst}.{name}"] = _tensor(get(f"{src}/{ct2_name}"))

    def fused(dst: str, src: str, parts: tuple[str, ...]) -> None:
        weights = np.split(get(f"{src}/weight"), len(parts), axis=0)
        biases = np.split(get(f"{src}/bias"), len(parts), axis=0)
        for part, w, b in zip(parts, weights, biases, strict=True):
            sd[f"{dst}.{part}.weight"] = _tensor(w)
            if part != "key":  # whisper's key projection has no bias
                sd[f"{dst}.{part}.bias"] = _tensor(b)

    def block(dst: str, src: str, cross: bool) -> None:
        fused(f"{dst}.attn", f"{src}/self_attention/linear_0", ("query", "key", "value"))
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        layer_norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        if cross:
            linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
            fused(f"{dst}.cross_attn", f"{src}/attention/linear_1", ("key", "value"))
            linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
            layer_norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        layer_norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")

    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    sd["encoder.positional_embedding"] = _tensor(get("encoder/position_encodings/encodings"))
    for i in range(dims["n_audio_layer"]):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    layer_norm("encoder.ln_post", "encoder/layer_norm")

    sd["decoder.token_embedding.weight"] = _tensor(get("decoder/embeddings/weight"))
    sd["decoder.positional_embedding"] = _tensor(get("decoder/position_encodings/encodings"))
    for i in range(dims["n_text_layer"]):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    layer_norm("decoder.ln", "decoder/layer_norm")

    projection = variables.get("decoder/projection/weight")
    if projection is not None and not np.array_equal(projection, variables["decoder/embeddings/weight"]):
        raise ConversionError("decoder/projection/weight differs from the token embedding; whisper ties them")
    if variables.get("decoder/scale_embeddings") is not None and int(np.asarray(
            variables["decoder/scale_embeddings"]).item()):
        raise ConversionError("decoder/scale_embeddings is set; whisper does not scale its embeddings")
    leftover = [n for n, v in variables.items() if n not in used and not n.startswith("decoder/projection/weight")
                and (np.asarray(v).ndim >= 2 or n.endswith("_scale"))]
    if leftover:
        raise ConversionError(f"CT2 variable {leftover[0]} has no openai-whisper counterpart "
                              f"({len(leftover)} unmapped weights); is this a Whisper model?")
    return sd


def _alignment_heads(config: Mapping | None, dims: Mapping[str, int]) -> list[list[int]] | None:
    heads = (config or {}).get("alignment_heads")
    if not heads:
        return None
    heads = [[int(layer), int(head)] for layer, head in heads]
    if any(not (0 <= lyr < dims["n_text_layer"] and 0 <= h < dims["n_text_head"]) for lyr, h in heads):
        return None
    return heads


def _read_config(config: PathLike | Mapping | None, near: Path | None) -> dict | None:
    """CT2's config.json as a dict: given, or found in the model's directory ``near``, or None."""
    if isinstance(config, Mapping):
        return dict(config)
    if config is None:
        if near is None or not (near / CONFIG_FILE).is_file():
            return None
        config = near / CONFIG_FILE
    with open(config, encoding="utf-8") as f:
        return json.load(f)


def _model_dir(source: ModelSource) -> Path:
    first = Path(source) if isinstance(source, (str, os.PathLike)) else Path(next(iter(source)))
    return first if first.is_dir() else first.parent


def ct2_to_whisper_checkpoint(
    source: ModelSource | Mapping[str, np.ndarray],
    config: PathLike | Mapping | None = None,
    n_audio_head: int | None = None,
    n_text_head: int | None = None,
) -> dict:
    """An openai-whisper checkpoint dict from CT2 Whisper variables or a model.bin (file, directory, parts).

    ``config`` (CT2's ``config.json``, found next to the model.bin when not given) supplies the alignment
    heads, stored under ``'alignment_heads'`` (``whisper.load_model`` ignores it; ``load_whisper`` uses it).
    """
    if isinstance(source, Mapping):
        variables, cfg = dict(source), _read_config(config, None)
    else:
        source = source if isinstance(source, (str, os.PathLike)) else list(source)
        model = read_model_bin(source)
        if model.spec != "WhisperSpec":
            raise ConversionError(f"{source}: a CTranslate2 {model.spec}, not a WhisperSpec model")
        variables, cfg = model.resolved(), _read_config(config, _model_dir(source))
    dims = whisper_dims(variables, n_audio_head, n_text_head)
    checkpoint = {"dims": dims, "model_state_dict": ct2_whisper_state_dict(variables, dims)}
    heads = _alignment_heads(cfg, dims)
    if heads is not None:
        checkpoint["alignment_heads"] = heads
    return checkpoint


def convert_ct2_whisper(
    source: ModelSource | Mapping[str, np.ndarray], output: PathLike, config: PathLike | Mapping | None = None
) -> Path:
    """Write the openai-whisper checkpoint of a CT2 Whisper model to ``output`` for ``whisper.load_model``."""
    output = Path(output)
    torch.save(ct2_to_whisper_checkpoint(source, config), output)
    return output


def is_ct2_model(path: PathLike) -> bool:
    """True for a CTranslate2 model directory or a file that starts like a model.bin."""
    path = Path(path)
    if path.is_dir():
        return (path / MODEL_FILE).is_file()
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(6)
    return len(head) == 6 and 1 <= int.from_bytes(head[:4], "little") <= 6 and head[4:6] != b"PK"


def _set_alignment_heads(model: torch.nn.Module, heads: list[list[int]]) -> None:
    dims = model.dims
    mask = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)


def load_whisper(path: ModelSource, device: str | torch.device = "cpu") -> Whisper:
    """A ``whisper.model.Whisper`` (eval mode) from an openai-whisper .pt or a CT2 model.bin (file/dir/parts).

    CT2 models are converted in memory (about a second for tiny.en). Nothing is downloaded: a model name such
    as ``"tiny.en"`` is refused; pass a local path (``make assets`` builds them under the cache).
    """
    from whisper.model import ModelDimensions, Whisper  # noqa: F811 - imported here: whisper is slow to import

    first = Path(path) if isinstance(path, (str, os.PathLike)) else None
    if first is not None and not first.exists():
        raise FileNotFoundError(f"{first}: no Whisper checkpoint or CTranslate2 model; run `make assets` "
                                "or pass an openai-whisper .pt / CTranslate2 model.bin path")
    if first is None or is_ct2_model(first):
        checkpoint = ct2_to_whisper_checkpoint(path)
    else:
        try:
            checkpoint = torch.load(first, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a foreign file
            raise ConversionError(f"{first}: not an openai-whisper checkpoint (torch.load: {type(e).__name__}); "
                                  "pass a whisper .pt or a CTranslate2 model.bin") from None
        if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= checkpoint.keys():
            raise ConversionError(
                f"{first}: not an openai-whisper checkpoint (needs 'dims' and 'model_state_dict')"
            )
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    if checkpoint.get("alignment_heads"):
        _set_alignment_heads(model, checkpoint["alignment_heads"])
    return model.to(device).eval()
