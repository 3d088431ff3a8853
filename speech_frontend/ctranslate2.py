"""Read and write CTranslate2 ``model.bin`` files (binary layout v6) without the CTranslate2 runtime.

Layout, all little-endian::

    u32 version | string spec name | u32 spec revision | u32 variable count
    per variable: string name | u8 rank | u32 dims[rank] | u8 dtype | u32 byte count | raw bytes
    u32 alias count | per alias: string alias | string target

A string is a u16 byte count followed by the bytes, NUL-terminated. dtype ids: 0 float32, 1 int8, 2 int16,
3 int32, 4 float16, 5 bfloat16. numpy has no bfloat16, so bfloat16 variables are widened to float32 on read
(exactly: a bfloat16 is the top half of a float32).

Errors are ``CT2FormatError`` (a ``ValueError``) with one line naming the file and what is wrong.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BINARY_VERSION = 6  # the layout this module writes; it reads versions 4..6 (same variable records)
MIN_READ_VERSION = 4  # before v4 a variable stored its item size instead of a dtype id
MODEL_FILE = "model.bin"

DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16 bits; widened to float32 after reading
}
BFLOAT16_ID = 5
DTYPE_IDS: dict[np.dtype, int] = {dt: i for i, dt in DTYPES.items() if i != BFLOAT16_ID}


class CT2FormatError(ValueError):
    """A file that is not a readable CTranslate2 model.bin; the message names it and the problem."""


@dataclass(frozen=True)
class CT2Model:
    """The content of one model.bin: spec name and revision, variables by name, aliases (alias -> target)."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    version: int = BINARY_VERSION

    def resolved(self) -> dict[str, np.ndarray]:
        """Variables plus every alias pointing at its target's array."""
        out = dict(self.variables)
        for alias, target in self.aliases.items():
            if target in self.variables:
                out[alias] = self.variables[target]
        return out


class _Reader:
    """A cursor over a byte buffer that reports truncation as a CT2FormatError naming the source."""

    def __init__(self, buf: bytearray, source: str) -> None:
        self.buf = buf
        self.view = memoryview(buf)
        self.pos = 0
        self.source = source

    def fail(self, what: str) -> CT2FormatError:
        return CT2FormatError(f"{self.source}: not a CTranslate2 model.bin ({what}, at byte {self.pos})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise CT2FormatError(
                f"{self.source}: truncated CTranslate2 model.bin ({what} needs {n} bytes at byte {self.pos}, "
                f"file has {len(self.buf)}); re-install or re-copy it"
            )
        chunk = self.view[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def string(self, what: str) -> str:
        raw = bytes(self.take(self.u16(what + " length"), what))
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None


def _read_bytes(paths: Iterable[str | os.PathLike]) -> tuple[bytearray, str]:
    """Concatenate the files (a model split into parts is read as one) into one writable buffer."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise CT2FormatError("no model.bin path given")
    name = " + ".join(str(p) for p in paths)
    for p in paths:
        if not p.is_file():
            raise CT2FormatError(f"{p}: no such file; expected a CTranslate2 {MODEL_FILE}")
    buf = bytearray(sum(p.stat().st_size for p in paths))
    pos = 0
    for p in paths:
        with open(p, "rb") as f:
            pos += f.readinto(memoryview(buf)[pos:])
    return buf, name


def _model_paths(path: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        return [p / MODEL_FILE if p.is_dir() else p]
    return [Path(p) for p in path]


def read_model_bin(path: str | os.PathLike | Iterable[str | os.PathLike]) -> CT2Model:
    """Read a model.bin (a file, a directory holding one, or a list of parts concatenated in order).

    Arrays share one buffer with the file content (writable, no copy); bfloat16 arrays are float32 copies.
    """
    buf, source = _read_bytes(_model_paths(path))
    r = _Reader(buf, source)
    if len(buf) < 4:
        raise r.fail(f"{len(buf)} bytes, too short for a header")
    version = r.u32("version")
    if not MIN_READ_VERSION <= version <= BINARY_VERSION:
        raise r.fail(f"binary version {version}, this reader knows {MIN_READ_VERSION}..{BINARY_VERSION}")
    spec = r.string("spec name")
    revision = r.u32("spec revision")
    count = r.u32("variable count")
    variables: dict[str, np.ndarray] = {}
    for i in range(count):
        name = r.string(f"name of variable {i}")
        rank = r.u8(f"rank of {name}")
        shape = struct.unpack(f"<{rank}I", r.take(4 * rank, f"shape of {name}"))
        dtype_id = r.u8(f"dtype of {name}")
        if dtype_id not in DTYPES:
            raise r.fail(f"variable {name} has unknown dtype id {dtype_id}")
        dtype = DTYPES[dtype_id]
        nbytes = r.u32(f"byte count of {name}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise r.fail(f"variable {name} of shape {shape}, {dtype} has {nbytes} bytes, not {expected}")
        start = r.pos
        r.take(nbytes, f"data of {name}")
        array = np.frombuffer(buf, dtype=dtype, count=expected // dtype.itemsize, offset=start).reshape(shape)
        if dtype_id == BFLOAT16_ID:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    aliases: dict[str, str] = {}
    n_aliases = r.u32("alias count")
    for _ in range(n_aliases):
        alias = r.string("alias name")
        aliases[alias] = r.string(f"target of alias {alias}")
    if r.pos != len(buf):
        raise r.fail(f"{len(buf) - r.pos} bytes left after the last alias")
    return CT2Model(spec=spec, revision=revision, variables=variables, aliases=aliases, version=version)


def load_variables(path: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, np.ndarray]:
    """name -> numpy array of a model.bin, aliases resolved (see ``read_model_bin`` for ``path``)."""
    return read_model_bin(path).resolved()


def _pack_string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _storable(path: Path, name: str, value) -> np.ndarray:
    """``value`` as a little-endian contiguous array of a dtype CTranslate2 stores (bool, float64, int64 narrowed)."""
    array = np.asarray(value)
    if array.dtype == np.bool_:
        array = array.astype(np.int8)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    elif array.dtype == np.int64:
        array = array.astype(np.int32)
    dtype = array.dtype.newbyteorder("<")
    if dtype not in DTYPE_IDS:
        raise ValueError(f"{path}: variable {name} has dtype {array.dtype}; CTranslate2 stores "
                         "float32, float16, int8, int16 or int32")
    return array.astype(dtype, copy=False)  # tobytes() writes C order; a scalar keeps its shape ()


def write_model_bin(
    path: str | os.PathLike,
    variables: Mapping[str, np.ndarray],
    spec: str = "WhisperSpec",
    revision: int = 3,
    aliases: Mapping[str, str] | None = None,
) -> Path:
    """Write variables (float32, float16, int8, int16 or int32 arrays) as a v6 model.bin; returns the path.

    A directory path gets ``model.bin`` inside it. Python scalars and bools become int8/float32 arrays.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    arrays = {name: _storable(path, name, value) for name, value in variables.items()}  # checked before writing
    with open(path, "wb") as f:
        f.write(struct.pack("<I", BINARY_VERSION) + _pack_string(spec))
        f.write(struct.pack("<II", revision, len(arrays)))
        for name, array in arrays.items():
            data = array.tobytes()
            f.write(_pack_string(name) + struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape))
            f.write(struct.pack("<BI", DTYPE_IDS[array.dtype], len(data)) + data)
        aliases = dict(aliases or {})
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            f.write(_pack_string(alias) + _pack_string(target))
    return path
