"""Stable train/dev/test splits and a stable selection order, both from a hash of the normalised source.

A sentence's split depends on that sentence alone, so adding lines to the source file never moves an existing
sentence to another split. The selection order is a second, independent hash: taking the first N sentences
of that order gives a subset that grows with N (a bigger N is a superset) and is proportional across splits
in expectation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

HASH_SPAN = float(1 << 64)


def _unit(salt: str, key: str) -> float:
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / HASH_SPAN


@dataclass(frozen=True)
class SplitShares:
    """Fractions of sentences in dev and test; the rest is train."""

    dev: float = 0.03
    test: float = 0.07

    def __post_init__(self) -> None:
        if not (0 <= self.dev and 0 <= self.test and self.dev + self.test < 1):
            raise ValueError(f"split shares dev={self.dev}, test={self.test}: each >= 0 and together < 1")


def split_of(key: str, shares: SplitShares = SplitShares()) -> str:
    """'train', 'dev' or 'test' for a normalised sentence key."""
    u = _unit("split", key)
    if u < shares.test:
        return "test"
    if u < shares.test + shares.dev:
        return "dev"
    return "train"


def selection_rank(key: str) -> float:
    """Position in the stable selection order, in [0, 1); smaller is taken first."""
    return _unit("order", key)


def stable_id(prefix: str, key: str, length: int = 12) -> str:
    """A short id that depends only on the key, e.g. ``ding-3f9a0c1d2e4b``."""
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:length]}"
