"""Decision heads: before each target word, READ more source or WRITE the word.

A head is a small frozen dataclass with ``decide(signals, session, memory) -> Decision``. ``signals`` is the
step's ``StepSignals``; ``session`` the ``StreamingSession`` (for heads that need more than the signals);
``memory`` a dict owned by the caller, one per utterance, where a stateful head (LocalAgreement, oracle)
keeps what it remembers: a head object itself never holds per-utterance state, so one head serves many
streams. Use ``decide(head, session, memory)``: it applies the rules every head shares, then the head.

Shared rules, in order:
- the source is finished: WRITE (flush; ``write_word`` returns None once the model ends the sentence);
- the greedy next token ends the sentence while the source is not finished: READ (adaptive heads only; the
  fixed schedules, wait-k and fixed-chunk, write the best other token, as ``write_word`` does);
- nothing has been read yet: READ;
- lag bounds (entropy and probe; the lag is units read - words written; 0 turns a bound off), checked before
  the LM runs, as in Zheng et al. 2020's adaptive policy between wait-k schedules: a lag under ``min_lag``:
  READ; a lag of ``max_lag`` or more: WRITE (the best token other than the sentence end, as wait-k does).
Under every head, a session made with ``hold_end`` (``--hold-sentence-end``) also keeps a word that would close
the sentence ("gefällig.") until the source has ended: its ``write_word`` returns None, and the caller reads.

Heads (``make_head(name, **params)``; parameters from the command line or a checkpoint's
``checkpoint.json`` ``extra.heads.<name>``):

==================  ==========================================================================================
``entropy``         WRITE when the next-token entropy (nats) < ``threshold`` (the paper's head), between the
                    lag bounds ``min_lag`` and ``max_lag`` (0, the default: no bound)
``attention``       WRITE when the pending target row's attention share on the newest ``frontier`` source units
                    is above ``threshold`` (``write_when="low"``: below it, the textbook rule)
``wait-k``          WRITE while words written < units read - ``k`` + 1 (a unit: one encoder block for speech,
                    ``config.block_ms`` long, e.g. 320 or 640 ms; one word for text)
``fixed-chunk``     WRITE while words written < ``words`` * (units read // ``chunk``)
``local-agreement`` LocalAgreement-``n``: WRITE the longest common prefix of the greedy continuations decoded
                    after each of the last ``n`` source prefixes, beyond what is written
``probe``           WRITE when sigmoid(model.probe_logit(hidden)) > ``threshold``; lag bounds as entropy's
``oracle``          ANALYSIS ONLY, needs the whole source: WRITE when the greedy next word under the prefix
                    equals the word the full-source model would write next after the same target prefix
``offline``         READ until the source is finished (the full-source decode, the top line of a sweep)
==================  ==========================================================================================

Attention head defaults (``layers="upper"``, ``normalise="all"``, ``frontier=1``, ``write_when="high"``,
``threshold=0.05``) are measured, not assumed (``benchmarks/attention_head.py``, README "Which attention
signal?"): along the oracle's path on the trained text model, "the next word is ready" went with *more*
attention on the newest source word in the upper layers (ROC AUC 0.70), while the textbook rule, write once the
attention has moved away from the frontier, scored 0.34-0.56 (0.5: no signal). Speech uses the same defaults;
there no attention setting carried much signal (AUC 0.47-0.57; entropy 0.69).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .config import SPEECH
from .engine import StepSignals, StreamingSession


class Decision(enum.Enum):
    READ = "READ"
    WRITE = "WRITE"


READ, WRITE = Decision.READ, Decision.WRITE
LAG_BOUNDS = ("min_lag", "max_lag")  # the adaptive heads' optional bounds (0: off)


@dataclass(frozen=True)
class Head:
    """Base class: a head's parameters are its dataclass fields; the per-utterance state lives in ``memory``."""

    name: ClassVar[str] = ""
    needs_full_source: ClassVar[bool] = False  # the caller puts the whole source in memory["full_source"]
    fixed_schedule: ClassVar[bool] = False  # timing set by the source length alone (wait-k, fixed-chunk)

    def session_options(self, model) -> dict[str, Any]:
        """Keyword arguments for ``StreamingSession(model, ...)``; also checks the head fits the model."""
        return {}

    def decide(self, signals: StepSignals, session: StreamingSession, memory: dict) -> Decision:
        raise NotImplementedError

    def schedule(self, units_read: int, n_words: int) -> Decision:
        """Fixed-schedule heads: the decision from the counts alone (no LM output needed to READ)."""
        raise NotImplementedError

    def describe(self) -> str:
        """'entropy(threshold=0.6)'; a lag bound left off (0) is not listed."""
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
            if not (f.name in LAG_BOUNDS and getattr(self, f.name) == 0)
        )
        return f"{self.name}({fields})"


def decide(head: Head, session: StreamingSession, memory: dict) -> Decision:
    """The shared rules (flush a finished source, never write the sentence end early), then the head.

    A fixed-schedule head decides from the counts alone, so the session's waiting source is not fed to the LM
    for a READ (it is when the word is written)."""
    if session.source_finished:
        return WRITE
    if session.units_read == 0:
        return READ
    if head.fixed_schedule:
        return head.schedule(session.units_read, len(session.words))
    lag = session.units_read - len(session.words)
    if getattr(head, "min_lag", 0) and lag < head.min_lag:  # 0: no floor (a head may run ahead of the source)
        return READ
    if getattr(head, "max_lag", 0) and lag >= head.max_lag:
        return WRITE
    signals = session.signals()
    return READ if signals.ends_sentence else head.decide(signals, session, memory)


# ---- heads -----------------------------------------------------------------------------------------


def check_share(head: Head, what: str) -> None:
    """A threshold on a quantity between 0 and 1: outside that range the head would always or never write."""
    if not 0 <= head.threshold <= 1:
        raise ValueError(f"{head.name} head: threshold={head.threshold}; it is {what}, between 0 and 1")


def check_lag_bounds(head: Head) -> None:
    """``min_lag`` and ``max_lag``: source units read beyond the words written; 0 turns a bound off."""
    if head.min_lag < 0 or head.max_lag < 0:
        raise ValueError(f"{head.name}: min_lag={head.min_lag}, max_lag={head.max_lag}; each counts source units "
                         "read beyond the words written: 0 (no bound) or more")  # fmt: skip
    if head.max_lag and head.max_lag < head.min_lag:
        raise ValueError(f"{head.name}: max_lag={head.max_lag} is under min_lag={head.min_lag}; the head would have "
                         "no room to decide: give max_lag >= min_lag, or 0 for no ceiling")  # fmt: skip


@dataclass(frozen=True)
class EntropyHead(Head):
    threshold: float = 1.0  # nats
    min_lag: int = 0  # READ while units read - words written < min_lag (0: no floor; ``decide`` applies both)
    max_lag: int = 0  # WRITE once units read - words written >= max_lag (0: no ceiling)

    name: ClassVar[str] = "entropy"

    def __post_init__(self):
        if self.threshold < 0 or (self.threshold == 0 and not self.max_lag):  # WRITE needs an entropy under it
            raise ValueError(f"entropy head: threshold={self.threshold}; an entropy is at least 0 nats, so it would "
                             "never write before the source ends (that is --head offline)")  # fmt: skip
        check_lag_bounds(self)

    def decide(self, signals, session, memory):
        return WRITE if signals.entropy < self.threshold else READ


@dataclass(frozen=True)
class AttentionHead(Head):
    """Decide from where the pending target row attends among the source units read.

    The frontier share is the attention on the newest ``frontier`` units, over all its attention
    (``normalise="all"``) or over its attention on the source (``"source"``). The defaults are measured
    (``benchmarks/attention_head.py``, README): on the trained text model, "the next word is ready" went with
    *more* attention on the newest word (ROC AUC 0.70 for upper layers, raw mass, frontier 1), so the head
    writes when the share is high. The opposite rule, write once the attention has moved away from the
    frontier (``write_when="low"``), scored AUC 0.30-0.38 there: worse than chance.
    """

    threshold: float = 0.05  # frontier share that separates READ from WRITE
    frontier: int = 1  # the last `frontier` source units read count as the frontier
    layers: str = "upper"  # "upper" (upper half), "all", "last", or indices "4,5,-1"
    normalise: str = "all"  # "all": share of all attention (raw mass); "source": of the attention on the source
    write_when: str = "high"  # "high": WRITE when the share > threshold; "low": WRITE when it is < threshold

    name: ClassVar[str] = "attention"

    def __post_init__(self):
        check_share(self, "a share of attention")
        if (self.write_when, self.threshold) in (("high", 1), ("low", 0)):
            raise ValueError(f"attention head: threshold={self.threshold} with write_when={self.write_when}; no share "
                             "of attention is beyond it, so it would never write before the source ends")  # fmt: skip
        if self.frontier < 1:
            raise ValueError(f"attention head: frontier={self.frontier}; it must be at least 1 unit")
        if self.normalise not in ("source", "all"):
            raise ValueError(f"attention head: normalise={self.normalise!r}; expected 'source' or 'all'")
        if self.write_when not in ("high", "low"):
            raise ValueError(f"attention head: write_when={self.write_when!r}; expected 'high' or 'low'")

    def layer_indices(self, n_layers: int) -> list[int]:
        spec = self.layers.strip().lower()
        if spec == "upper":
            return list(range(n_layers // 2, n_layers))
        if spec == "all":
            return list(range(n_layers))
        if spec == "last":
            return [n_layers - 1]
        try:
            picked = [int(x) for x in spec.replace(";", ",").split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"attention head: layers={self.layers!r}; expected 'upper', 'all', 'last' or indices like '4,5,-1'"
            ) from None
        bad = [i for i in picked if not -n_layers <= i < n_layers]
        if not picked or bad:
            raise ValueError(f"attention head: layers {bad or self.layers!r} out of range for a {n_layers}-layer LM")
        return sorted({i % n_layers for i in picked})

    def session_options(self, model):
        return {"attention_layers": self.layer_indices(model.llm.config.num_hidden_layers)}

    def frontier_share(self, attention: torch.Tensor) -> float:
        """attention: (units_read,) mass per source unit -> share of the frontier."""
        frontier = float(attention[-self.frontier :].sum())
        total = float(attention.sum()) if self.normalise == "source" else 1.0
        return frontier / total if total > 0 else 1.0

    def decide(self, signals, session, memory):
        if signals.source_attention is None:
            raise ValueError(
                "attention head: the session returns no attention; make it with "
                "StreamingSession(model, **head.session_options(model))"
            )
        share = self.frontier_share(signals.source_attention)
        beyond = share > self.threshold if self.write_when == "high" else share < self.threshold
        return WRITE if beyond else READ


@dataclass(frozen=True)
class WaitKHead(Head):
    k: int = 3  # units of lag (speech: encoder blocks of config.block_ms; text: words)

    name: ClassVar[str] = "wait-k"
    fixed_schedule: ClassVar[bool] = True

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"wait-k: k={self.k}; k counts source units read before the first word, at least 1")

    def decide(self, signals, session, memory):
        return self.schedule(signals.units_read, signals.n_words)

    def schedule(self, units_read, n_words):
        return WRITE if n_words < units_read - self.k + 1 else READ


@dataclass(frozen=True)
class FixedChunkHead(Head):
    chunk: int = 1  # source units per chunk
    words: int = 1  # target words written after each chunk

    name: ClassVar[str] = "fixed-chunk"
    fixed_schedule: ClassVar[bool] = True

    def __post_init__(self):
        if self.chunk < 1 or self.words < 1:
            raise ValueError(f"fixed-chunk: chunk={self.chunk}, words={self.words}; both must be at least 1")

    def decide(self, signals, session, memory):
        return self.schedule(signals.units_read, signals.n_words)

    def schedule(self, units_read, n_words):
        return WRITE if n_words < self.words * (units_read // self.chunk) else READ


@dataclass(frozen=True)
class LocalAgreementHead(Head):
    n: int = 2  # agree over the hypotheses of the last n source prefixes
    horizon: int = 32  # words decoded ahead for each hypothesis

    name: ClassVar[str] = "local-agreement"

    def __post_init__(self):
        if self.n < 1 or self.horizon < 1:
            raise ValueError(f"local-agreement: n={self.n}, horizon={self.horizon}; both must be at least 1")

    def decide(self, signals, session, memory):
        history = memory.setdefault("local_agreement", [])  # [(units_read, Hypothesis)], newest last
        if not history or history[-1][0] != signals.units_read:
            history.append((signals.units_read, Hypothesis(session, self.horizon)))
            del history[: -self.n]
        if len(history) < self.n:
            return READ
        return WRITE if agreed_length([h for _, h in history]) > signals.n_words else READ


class Hypothesis:
    """The words written so far, then the greedy continuation of the session as it was when this was made, up to
    ``horizon`` more words (fewer only once the source has ended and the model ends the sentence: before that the
    sentence end is never written, as in ``write_word``) (``list(session.words) + peek_words(session, horizon)``), but
    decoded only as far as someone reads it (``word(i)``), on a fork of the session.

    LocalAgreement compares each new hypothesis with the previous ones only up to where they part, so most of a
    hypothesis is never read: decoding it lazily gives the same agreed prefix for a fraction of the forwards.
    """

    def __init__(self, session: StreamingSession, horizon: int):
        self.words = list(session.words)
        self.limit = len(self.words) + horizon
        self._ahead: StreamingSession | None = session.fork()

    def word(self, i: int) -> str | None:
        """The i-th word, decoded now if need be; None past the hypothesis's end."""
        while len(self.words) <= i and self._ahead is not None:
            ahead = self._ahead
            word = None if ahead.finished or len(self.words) >= self.limit else ahead.write_word()
            if word is None:
                self._ahead = None  # ended: the sentence, the horizon or the token cap
                break
            self.words.append(word)
            if ahead.finished:
                self._ahead = None
        return self.words[i] if i < len(self.words) else None


def agreed_length(hypotheses: Sequence[Hypothesis]) -> int:
    """How many leading words all the hypotheses share (decoding each only as far as that takes)."""
    k = 0
    while True:
        words = [h.word(k) for h in hypotheses]
        if words[0] is None or any(w != words[0] for w in words[1:]):
            return k
        k += 1


@dataclass(frozen=True)
class ProbeHead(Head):
    threshold: float = 0.5  # WRITE when P(stream prediction already equals the full view's) > threshold
    min_lag: int = 0  # lag bounds, as EntropyHead's
    max_lag: int = 0

    name: ClassVar[str] = "probe"

    def __post_init__(self):
        check_share(self, "a probability")
        if self.threshold == 1 and not self.max_lag:  # WRITE needs a probability above it
            raise ValueError("probe head: threshold=1.0; no probability is above it, so it would never write before "
                             "the source ends (that is --head offline)")  # fmt: skip
        check_lag_bounds(self)

    def session_options(self, model):
        if getattr(model, "probe", None) is None:
            raise ValueError(
                "probe head: this checkpoint has no probe (probe_hidden=0, or trained with probe=false); "
                "give it one with python -m training.probe CHECKPOINT --out DIR, or pick another head"
            )
        return {}

    def decide(self, signals, session, memory):
        with torch.inference_mode():
            logit = session.model.probe_logit(signals.hidden.to(session.model.device, torch.float32))
        return WRITE if torch.sigmoid(logit.float()).item() > self.threshold else READ


@dataclass(frozen=True)
class OracleHead(Head):
    """ANALYSIS ONLY: it reads the whole source (``memory["full_source"]``), so it is not a policy.

    READ until the greedy next word under the source read so far equals the word that a session over the
    full source writes next after the same target prefix: the latency floor for this model's own output.
    """

    name: ClassVar[str] = "oracle"
    needs_full_source: ClassVar[bool] = True

    def decide(self, signals, session, memory):
        full = memory.get("oracle_session")
        if full is None:
            if "full_source" not in memory:
                raise ValueError("oracle head: memory['full_source'] is missing; the caller must put the source there")
            full = StreamingSession(session.model, max_target_tokens=session.max_target_tokens, lm_call=session.lm_call)
            source = memory["full_source"]
            if session.config.modality == SPEECH:
                full.push_audio(np.asarray(source, dtype=np.float32))
            else:
                full.push_words(list(source))
            full.finish_source()
            memory["oracle_session"], memory["oracle_synced"] = full, 0
        written = session.written
        synced = memory["oracle_synced"]
        if len(written) > synced or "oracle_target" not in memory:  # the full view's word after this prefix
            full.force_target(written[synced:])
            memory["oracle_synced"] = len(written)
            memory["oracle_target"] = peek_words(full, 1)  # unchanged until a word is written: READs reuse it
        target = memory["oracle_target"]
        return WRITE if target and peek_words(session, 1) == target else READ


@dataclass(frozen=True)
class OfflineHead(Head):
    """READ until the source is finished: the full-source (offline) decode of the same model."""

    name: ClassVar[str] = "offline"
    fixed_schedule: ClassVar[bool] = True  # no LM output is needed to READ: the source is fed once, at the end

    def decide(self, signals, session, memory):
        return READ

    def schedule(self, units_read, n_words):
        return READ


HEADS: dict[str, type[Head]] = {
    cls.name: cls
    for cls in (
        EntropyHead, AttentionHead, WaitKHead, FixedChunkHead, LocalAgreementHead, ProbeHead, OracleHead, OfflineHead
    )
}  # fmt: skip
ALIASES = {"waitk": "wait-k", "wait_k": "wait-k", "fixed_chunk": "fixed-chunk", "la": "local-agreement",
           "local_agreement": "local-agreement", "localagreement": "local-agreement"}  # fmt: skip


def head_name(name: str) -> str:
    """Canonical head name ('waitk' -> 'wait-k'); raises with the list of heads if unknown."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    return key


def make_head(name: str, **params) -> Head:
    """A head by name; parameters may be strings (from a command line): they are converted to the field type."""
    cls = HEADS[head_name(name)]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        allowed = ", ".join(fields) or "none"
        raise ValueError(f"head {cls.name!r} has no parameter {', '.join(unknown)}; its parameters: {allowed}")
    values = {}
    for key, value in params.items():
        kind = type(fields[key].default)
        try:
            values[key] = _convert(value, kind)
        except (ValueError, TypeError):  # TypeError: None (an empty YAML value), a list where a number goes
            raise ValueError(f"head {cls.name!r}: {key}={value!r} is not a valid {kind.__name__}") from None
        except OverflowError:  # float() of an integer beyond a float's range
            values[key] = math.inf
        if kind in (int, float) and not finite(values[key]):
            raise ValueError(f"head {cls.name!r}: {key}={shown(value)} is not a finite number; give a number")
    return cls(**values)


def finite(number: int | float) -> bool:
    """math.isfinite, False for an integer beyond a float's range (a JSON or YAML 10**400, on which it raises)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def shown(value) -> str:
    """A user's value for an error message: its repr, cut at 40 characters (a 400-digit number is not echoed)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}..."


def _convert(value, kind: type):
    """``value`` as a ``kind``; a bool is not a number here (``true`` would silently be 1)."""
    if kind in (int, float) and isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    if kind is int:
        number = float(value)
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    return kind(value)


def check_given_once(flag: str, value, key: str, head_params: dict) -> None:
    """A flag (``--threshold``, ``--k``) and ``--head-param`` setting the same parameter: refused, whatever the
    order (the agent, live and serve all take both)."""
    if key in head_params:
        raise ValueError(f"{flag} {value} and --head-param {key}={head_params[key]} both set {key}; give one of them")


def parse_head_params(items: Sequence[str]) -> dict[str, str]:
    """['k=3', 'layers=4,5'] -> {'k': '3', 'layers': '4,5'} (also accepts one comma-free 'a=1 b=2' string); a key
    given twice with two values is refused."""
    params: dict[str, str] = {}
    for item in items:
        for part in str(item).split():
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise ValueError(f"head parameter {part!r}: expected KEY=VALUE, e.g. threshold=0.6")
            key = key.strip().replace("-", "_")
            if key in params and params[key] != value.strip():
                raise ValueError(f"head parameter {key} given twice ({params[key]} and {value.strip()}); give it once")
            params[key] = value.strip()
    return params


# ---- decoding ahead without committing -----------------------------------------------------------------


def peek_words(session: StreamingSession, n: int) -> list[str]:
    """Greedily decode up to ``n`` words ahead of the session, which stays as it was (the words are decoded on a
    ``fork``). Stops early only when the source has ended and the model ends the sentence."""
    ahead = Hypothesis(session, n)
    start = len(ahead.words)
    if n > 0:
        ahead.word(start + n - 1)  # decodes up to n words, fewer if the finished source's sentence ends first
    return ahead.words[start:]
