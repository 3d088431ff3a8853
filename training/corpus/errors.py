"""Bad input: one error type that names the file and line, and the ``--skip-bad`` policy.

Every reader reports a problem it finds in a user's data as a ``CorpusError``. With ``skip_bad`` off (the
default) the first one stops the run; with it on, each is logged as a warning and counted, and the count is
printed at the end, so nothing is ever dropped silently.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger("training.corpus")


class CorpusError(ValueError):
    """A problem in a corpus file; ``str()`` reads ``file:line: what is wrong; what to do``."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass
class BadInput:
    """Raise each ``CorpusError`` (default) or, with ``skip_bad``, log it, count it and go on."""

    skip_bad: bool = False
    skipped: list[CorpusError] = field(default_factory=list)

    def __call__(self, error: CorpusError) -> None:
        if not self.skip_bad:
            raise error
        self.skipped.append(error)
        log.warning("skipped %s", error)

    def summary(self) -> str:
        if not self.skipped:
            return "no bad entries"
        return f"skipped {len(self.skipped)} bad entr{'y' if len(self.skipped) == 1 else 'ies'} (see warnings above)"
