"""The incremental engine: feed source as it arrives, decode the next target word on request.

Invariant (DESIGN.md section 3): the logits a ``StreamingSession`` produces step by step equal those of one
masked full-sequence forward (``SpeechLLM.forward``) with the phi the session followed.

How the caches stay valid:

- the encoder encodes each block once (``BlockCausalEncoder.encode_block`` keeps per-layer K/V), and a
  block is handed to the LLM only when it is complete, so no cached key ever goes stale;
- source entries never attend to target entries (mask), and target positions are a fixed group
  (``layout``), so the LLM's KV cache of both stays valid when more source arrives;
- the row that predicts the *next* target token must see everything read so far: that entry (the last
  target-group token; before the first write, the whole target prefix: the "pending" rows) is dropped
  from the cache and re-fed after new source. Everything else is fed exactly once.

New source is fed lazily: a pushed block is encoded at once (the encoder cache), but its units wait in
``_unfed`` until something needs the LM's output (``signals``, ``next_logits``, ``write_word``,
``force_target``, ``flush``); then every waiting unit and the pending rows go through the LM in one forward.
A policy that decides from counts alone (wait-k, fixed-chunk) thus pays one LM forward per write, not one
per block. The cache ends up the same as feeding block by block (same entries, same masks).

Every session of a model starts from the same state (the prompt, then the target prefix as the pending rows),
so that state is computed once, by ``forward_one`` alone, and shared read-only by later sessions (``_start``);
it is recomputed when the model's weights change in place or are replaced.
"""

from __future__ import annotations

import copy
import math
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from speech_frontend.audio import SAMPLE_RATE, to_mono_16k
from speech_frontend.mel import StreamingMel

from .batching import forward_one
from .config import ENCODER_FRAME_MS, SPEECH, TEXT
from .model import SpeechLLM

PROMPT, SOURCE, TARGET = 0, 1, 2  # kinds of cache entries
LMCall = Callable[..., Any]  # (llm, x, positions, mask, cache, attentions) -> LM output; see batching.py
REENCODE = ("never", "end", "read")  # when written target rows are fed again under more source (``flush``)
MAX_WORD_TOKENS = 24  # a "word" longer than this is cut: a degenerate model cannot loop inside one word
SENTENCE_END = re.compile(r"[.!?…][\"'»«“”„)\]]*$")  # "gefällig." "kommt?“" close a sentence


class SourceTooLong(ValueError):
    """A push beyond the model's context; ``limit``: that context in words a user reads ("512 source tokens")."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit


def ends_sentence(word: str) -> bool:
    """Whether a written word closes a sentence (it ends in . ! ? or an ellipsis, quotes and brackets after)."""
    return bool(SENTENCE_END.search(word))


@dataclass
class StepSignals:
    """What a decision head sees before each target word (all under the source read so far)."""

    entropy: float  # entropy of the next-token distribution, in nats
    top_prob: float  # probability of the greedy next token
    next_token: int  # the greedy next token id
    ends_sentence: bool  # the greedy next token is the end-of-sentence token
    hidden: torch.Tensor  # (d_model,) last-layer hidden state of the pending target row
    source_attention: torch.Tensor | None  # (units_read,) attention mass per source unit, or None if not asked
    units_read: int
    source_finished: bool
    n_words: int  # target words written so far


@dataclass(frozen=True)
class _Start:
    """A session's state after the prompt and the pending target prefix (read-only, shared)."""

    key: tuple
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per LM layer: keys, values (1, heads, n, head_dim)
    kinds: tuple[int, ...]
    entry_units: tuple[int, ...]
    target_group: tuple[int, ...]
    n_pending: int
    out: Any  # the LM output of the pending rows


_STARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {attentions: _Start}
_START_LOCK = threading.Lock()


def _weights_key(model: SpeechLLM) -> tuple:
    """Changes when a parameter is modified in place (its version), replaced, or moved (its storage)."""
    return tuple((id(p), p._version, p.data_ptr()) for p in model.parameters())


class StreamingSession:
    """One utterance, streamed. Not thread-safe; one session per stream, one model shared by many.

    Speech: ``push_audio`` (16 kHz mono float32 samples, any chunking) then ``finish_source``.
    Text: ``push_words`` then ``finish_source``. Between pushes: ``signals()`` and ``write_word()``.
    """

    def __init__(
        self,
        model: SpeechLLM,
        *,
        attention_layers: Sequence[int] | None = None,
        max_target_tokens: int = 256,
        lm_call: LMCall = forward_one,
        reencode: str = "never",
        hold_end: bool = False,
    ):
        if reencode not in REENCODE:
            raise ValueError(f"reencode={reencode!r}; one of {', '.join(REENCODE)} (see StreamingSession.flush)")
        self.model = model
        self.reencode = reencode  # when the written target is re-read under the source read so far (``flush``)
        self.hold_end = hold_end  # a word closing the sentence waits for the source's end (``write_word``)
        self.lm_call = lm_call  # runs the LM: alone (forward_one) or batched with other sessions (LMBatcher)
        self.config = model.config
        self.attention_layers = None if attention_layers is None else list(attention_layers)
        self.max_target_tokens = max_target_tokens
        self.cache = DynamicCache()
        self.kinds: list[int] = []  # kind of each cache entry, in cache order
        self.entry_units: list[int] = []  # source unit (1..M) of each cache entry; 0 for others
        self.n_source_embeddings = 0
        self.units_read = 0
        self.source_finished = False
        self.finished = False
        self.target_group: list[int] = []  # prefix ids then written target ids; the last is the pending row
        self.words: list[str] = []
        self._out = None  # the LM output of the last pending-row forward
        self._unfed: list[tuple[torch.Tensor, list[int]]] = []  # source (embeds (q, d), unit per entry) not yet fed
        self._forked = False  # a fork (``fork``) decodes ahead and takes no source
        if self.config.modality == SPEECH:
            self.mel = StreamingMel(model.encoder.n_mels)
            self.encoder_cache = model.encoder.new_cache()
            self._mel_buffer = torch.zeros(model.encoder.n_mels, 0)
            self.samples_in = 0
        with torch.inference_mode():
            self._start()

    def _start(self) -> None:
        """The prompt, then the target prefix as the pending rows (it sees what y_1 sees): from the model's
        shared start state, made here by the first session (alone, with ``forward_one``) when missing or stale."""
        model = self.model
        key = (_weights_key(model), self.attention_layers is not None)
        start = _STARTS.get(model, {}).get(key[1])
        if start is None or start.key != key:
            with _START_LOCK:
                start = _STARTS.get(model, {}).get(key[1])  # another thread may have made it meanwhile
                if start is None or start.key != key:
                    _STARTS.setdefault(model, {})[key[1]] = self._make_start(key)
                    return
        for i, (keys, values) in enumerate(start.layers):  # shared: a cache only ever makes new tensors from them
            self.cache.update(keys, values, i)
        self.kinds, self.entry_units = list(start.kinds), list(start.entry_units)
        self.target_group, self._n_pending, self._out = list(start.target_group), start.n_pending, start.out

    def _make_start(self, key: tuple) -> _Start:
        lm_call, self.lm_call = self.lm_call, forward_one  # the same state whoever batches with whom
        try:
            self._feed([(self.model.embed_ids(self.model.prompt_ids), PROMPT, 0)])
            self._feed_target(self.model.prefix_ids)
        finally:
            self.lm_call = lm_call
        layers = tuple((layer.keys, layer.values) for layer in self.cache.layers)
        return _Start(key, layers, tuple(self.kinds), tuple(self.entry_units), tuple(self.target_group),
                      self._n_pending, self._out)  # fmt: skip

    # ---- source ------------------------------------------------------------------------------------

    def push_audio(self, samples: np.ndarray, sample_rate: int = 16000, *, channels_last: bool | None = None) -> int:
        """Append audio (any rate/channels/dtype: converted) -> number of new source units read.

        ``channels_last``: the layout of 2-D samples, (n, channels) or (channels, n); None guesses it (see
        ``to_mono``), which a chunk of fewer samples than channels gets wrong: pass it for multichannel chunks.

        Audio that would take the source past ``max_source_samples`` is refused with a ``ValueError`` before
        anything changes: the session stays usable (``finish_source`` and write out what it holds; a new
        session takes the rest, as ``streaming_llm.long_stream`` does).
        """
        self._require(SPEECH, "push_audio")
        self._refuse_source_on_fork("push_audio")
        if self.source_finished:
            raise ValueError("push_audio after finish_source; start a new session for a new utterance")
        if np.asarray(samples).size == 0:
            return 0
        audio = to_mono_16k(samples, sample_rate, name="pushed audio", channels_last=channels_last)
        if self.samples_in + audio.shape[0] > self.max_source_samples:
            limit = f"{self.max_source_samples / SAMPLE_RATE:.2f} s"
            raise SourceTooLong(self._too_long(limit), limit)
        self.samples_in += audio.shape[0]
        return self._push_mel(self.mel.push(audio))

    @property
    def max_source_samples(self) -> int:
        """Speech: the most 16 kHz samples this session takes (``max_source_samples(model)``)."""
        self._require(SPEECH, "max_source_samples")
        return max_source_samples(self.model)

    @property
    def remaining_samples(self) -> int:
        """Speech: how many more 16 kHz samples ``push_audio`` accepts."""
        return self.max_source_samples - self.samples_in

    def push_words(self, words: Sequence[str]) -> int:
        """Append source words (text modality) -> number of new units read."""
        self._require(TEXT, "push_words")
        if isinstance(words, str):  # a str is a Sequence[str] of letters
            raise ValueError(f"push_words takes a list of words, not the string {words[:40]!r}; split it first")
        self._refuse_source_on_fork("push_words")
        if self.source_finished:
            raise ValueError("push_words after finish_source; start a new session for a new sentence")
        words = [w for w in words if w.strip()]
        if not words:
            return 0
        with torch.inference_mode():
            self._feed_source(self.model.text_units(words))
        return len(words)

    def finish_source(self) -> None:
        """The source is complete: flush a partial block (zero-padded) and append the end-of-source marker."""
        if self.source_finished:
            return
        self._refuse_source_on_fork("finish_source")
        if self.config.modality == SPEECH:
            short = (-self.samples_in) % self.model.block_samples
            if self.samples_in == 0:
                raise ValueError("finish_source with no audio; a speech source needs at least one sample")
            if short:
                self.samples_in += short
                self._push_mel(self.mel.push(np.zeros(short, dtype=np.float32)))
            assert self._mel_buffer.shape[1] == 0, "audio padded to a whole block leaves no mel frames behind"
        if self.units_read == 0:
            raise ValueError("finish_source with no source units; push audio or words first")
        self.source_finished = True
        self._unfed.append((self.model.end_of_source[None].detach(), [self.units_read]))

    def _push_mel(self, mel: torch.Tensor) -> int:
        """Buffer new mel frames (n_mels, k); encode every complete block; feed its units to the LM."""
        self._mel_buffer = torch.cat([self._mel_buffer, mel], dim=1)
        per_block = self.model.encoder.mel_per_block
        n_blocks = self._mel_buffer.shape[1] // per_block
        if n_blocks == 0:
            return 0
        self._check_capacity(n_blocks * self.config.embeddings_per_block)  # before any encoder work
        model = self.model
        with torch.inference_mode():
            blocks = []
            for _ in range(n_blocks):
                mel_block = self._mel_buffer[:, :per_block]
                self._mel_buffer = self._mel_buffer[:, per_block:]
                frames = model.encoder.encode_block(
                    mel_block[None].to(model.device, model.end_of_source.dtype), self.encoder_cache
                )
                blocks.append(frames[0])
            self._feed_source(model.speech_units(torch.cat(blocks)))
        return n_blocks

    def _check_capacity(self, n_new: int) -> None:
        """Refuse source beyond the model's context, saying how long a source may be."""
        capacity = self.config.source_capacity
        if self.n_source_embeddings + sum(e.shape[0] for e, _ in self._unfed) + n_new <= capacity:
            return
        if self.config.modality == SPEECH:
            limit = f"{capacity * self.config.stack * ENCODER_FRAME_MS / 1000:.1f} s"
        else:
            limit = f"{capacity} source tokens"
        raise SourceTooLong(self._too_long(limit), limit)

    @staticmethod
    def _too_long(limit: str) -> str:
        return (
            f"the source is longer than the model's context of {limit}; nothing of this push was taken (the "
            "session is unchanged: finish_source() it and write out what it holds); segment long input (e.g. at "
            "pauses or sentence ends) into utterances of at most that length, or stream it with "
            "streaming_llm.long_stream"
        )

    def _feed_source(self, units: list[torch.Tensor]) -> None:
        self._check_capacity(sum(u.shape[0] for u in units))
        unit_ids = [self.units_read + 1 + i for i, u in enumerate(units) for _ in range(u.shape[0])]
        self.units_read += len(units)
        self._unfed.append((torch.cat(units), unit_ids))

    def flush(self) -> None:
        """Feed the source waiting in ``_unfed`` (and the pending rows again) to the LM, in one forward.

        ``reencode`` (the session's option) says when this forward feeds every target row again, not only the
        pending ones. Each word written was encoded under the source read when it was written, and keeps that
        view (``never``: the masked training forward of DESIGN.md section 3, phi as followed). ``end``: the flush
        that takes the end of the source re-reads the written words under the whole source, the full view of
        training, so the rest of the sentence is decoded as the offline decode would continue that prefix (one
        forward over the target rows per utterance). ``read``: every flush re-reads them under all the source
        read so far (each written row then sees phi = units read, a monotonic phi too); on a CPU the extra rows
        ride along in the forward that takes the new source."""
        if not self._unfed:
            return
        embeds = torch.cat([e for e, _ in self._unfed])
        units = [u for _, ids in self._unfed for u in ids]
        self._unfed = []
        with torch.inference_mode():
            if self.reencode == "read" or (self.reencode == "end" and self.source_finished):
                self._pend_every_target_row()
            self._feed_source_and_pending(embeds, units)

    # ---- target ------------------------------------------------------------------------------------

    def signals(self) -> StepSignals:
        """The decision head's view of the current step."""
        self.flush()
        logits = self._out.logits[0, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        top = int(logp.argmax())
        entropy = float(-(logp.exp() * logp).sum())
        return StepSignals(
            entropy=entropy if math.isfinite(entropy) else float("inf"),
            top_prob=float(logp[top].exp()),
            next_token=top,
            ends_sentence=top == self.model.eos_id,
            hidden=self._out.hidden_states[-1][0, -1],
            source_attention=self._source_attention(),
            units_read=self.units_read,
            source_finished=self.source_finished,
            n_words=len(self.words),
        )

    def next_logits(self) -> torch.Tensor:
        """(V,) logits for the next target token under the source read so far."""
        self.flush()
        return self._out.logits[0, -1]

    def write_word(self) -> str | None:
        """Greedily decode the next target word (tokens up to the next word boundary).

        Before the source is finished the sentence cannot end: if the end-of-sentence token is the greedy
        choice, the best other token is written (a policy that wants to wait on it reads
        ``signals().ends_sentence`` first). With ``hold_end`` a word that closes the sentence (``ends_sentence``:
        "gefällig.") waits too: it is decoded on a ``fork``, and if it closes the sentence before the source
        has ended, nothing is written and None is returned (read more source, then try again); a source of one
        sentence then cannot be followed by a second, invented one. Otherwise returns None only when the source
        is finished and the model ends the sentence (the session is then finished) or the token cap is reached.
        """
        if self.finished:
            return None
        if not self.hold_end or self.source_finished:
            return self._write_word()
        ahead = self.fork()  # (a fork flushes its parent first)
        word = ahead._write_word()
        if word is not None and ends_sentence(word):
            return None
        forked = self._forked  # a fork writing with hold_end (LocalAgreement's hypotheses) stays a fork
        vars(self).update(vars(ahead))  # the word stands: take the fork's state (its cache, words, target)
        self._forked = forked
        return word

    def _write_word(self) -> str | None:
        self.flush()
        tokens: list[int] = []
        with torch.inference_mode():
            while True:
                logits = self._out.logits[0, -1]
                nxt = int(logits.argmax())
                blank = not self.model.tokenizer.decode(tokens).strip()  # whitespace joins the next word
                if nxt == self.model.eos_id:
                    if tokens and not blank:
                        break
                    if self.source_finished:
                        self._feed_target([nxt])
                        self.finished = True
                        break
                    nxt = int(logits.topk(2).indices[1])  # the sentence cannot end before the source does
                if tokens and not blank and bool(self.model.word_start[nxt]):
                    break
                tokens.append(nxt)
                self._feed_target([nxt])
                if len(self.written) >= self.max_target_tokens:  # before the word cut: both may land on one token
                    self.finished = True
                    break
                if len(tokens) >= MAX_WORD_TOKENS:
                    break
        word = self.model.tokenizer.decode(tokens).strip()
        if not word:
            return None
        self.words.append(word)
        return word

    def force_target(self, ids: Sequence[int]) -> None:
        """Write the given target tokens (teacher forcing), one step each; for tests and analysis."""
        self.flush()
        with torch.inference_mode():
            for i in ids:
                self._feed_target([int(i)])
                if int(i) == self.model.eos_id:
                    self.finished = True

    def fork(self) -> StreamingSession:
        """A copy of this session that decodes ahead on its own: writing on either leaves the other as it was.

        Cheap: the copy shares the cached key/value tensors, which a cache never changes in place (it only
        makes new ones: ``torch.cat`` on update, views on crop). A fork is for decoding ahead (LocalAgreement's
        hypotheses): it takes no more source.
        """
        self.flush()
        twin = copy.copy(self)
        for key, value in vars(self).items():
            if isinstance(value, list):
                setattr(twin, key, list(value))
        twin.cache = DynamicCache()
        for i, layer in enumerate(self.cache.layers):
            twin.cache.update(layer.keys, layer.values, i)
        twin._forked = True
        return twin

    # ---- the cache ---------------------------------------------------------------------------------

    @property
    def written(self) -> list[int]:
        """Target token ids written so far (the prefix excluded)."""
        return self.target_group[len(self.model.prefix_ids) :]

    def _feed_target(self, ids: list[int]) -> None:
        """Append target-group tokens: the rows fed before them are final, these are now the pending rows."""
        self._feed([(self.model.embed_ids(ids), TARGET, 0)])
        self.target_group += ids
        self._n_pending = len(ids)

    def _pend_every_target_row(self) -> None:
        """Make every target row pending, to be fed again after the new source: the target entries move to the
        cache's end (each group keeps its order; which entry attends to which is set by the mask, not the order).
        Target positions are a fixed group, so the rows come back at the same positions; only what they see
        changes."""
        order = [i for i, kind in enumerate(self.kinds) if kind != TARGET]
        order += [i for i, kind in enumerate(self.kinds) if kind == TARGET]
        index = torch.tensor(order, device=self.model.device)
        cache, self.cache = self.cache, DynamicCache()
        for i, layer in enumerate(cache.layers):
            self.cache.update(layer.keys.index_select(2, index), layer.values.index_select(2, index), i)
        self.kinds = [self.kinds[i] for i in order]
        self.entry_units = [self.entry_units[i] for i in order]
        self._n_pending = len(self.target_group)

    def _feed_source_and_pending(self, embeds: torch.Tensor, units: int | list[int]) -> None:
        """New source entries, then the pending rows again (taken out of the cache first), in one forward."""
        n = self._n_pending
        self.cache.crop(-n)
        del self.kinds[-n:], self.entry_units[-n:]
        pending = self.target_group[-n:]
        del self.target_group[-n:]
        self._feed([(embeds, SOURCE, units), (self.model.embed_ids(pending), TARGET, 0)])
        self.target_group += pending

    def _feed(self, segments: list[tuple[torch.Tensor, int, int | list[int]]]) -> None:
        """Run the LM once over new entries, appending them to the cache.

        ``segments``: (embeds (q, d), kind, unit) in order, where ``unit`` is the source unit of every entry
        (a list) or one for all of them. Source and prompt rows never see target entries; target rows see
        everything before them.
        """
        model = self.model
        past = len(self.kinds)
        n_source, n_target = self.n_source_embeddings, len(self.target_group)
        embeds, positions, kinds, units = [], [], [], []
        for seg, kind, unit in segments:
            q = seg.shape[0]
            if kind == TARGET:
                start, n_target = model.target_offset + n_target, n_target + q
            elif kind == SOURCE:
                start, n_source = len(model.prompt_ids) + n_source, n_source + q
            else:
                start = 0
            embeds.append(seg)
            positions.append(torch.arange(start, start + q))
            kinds += [kind] * q
            units += unit if isinstance(unit, list) else [unit] * q
        self.n_source_embeddings = n_source
        q = len(kinds)
        every = torch.tensor(self.kinds + kinds)
        new = torch.tensor(kinds)
        allowed = torch.ones(q, past + q, dtype=torch.bool).tril(diagonal=past)
        allowed &= ~((new[:, None] != TARGET) & (every[None, :] == TARGET))
        dtype = model.lm_dtype  # the adapter's units and the end-of-source marker are float32 (quantize.py)
        mask = torch.zeros(1, 1, q, past + q, dtype=dtype)
        mask.masked_fill_(~allowed[None, None], float("-inf"))
        x = torch.cat(embeds).to(dtype)[None]
        pos = torch.cat(positions)[None].to(model.device)
        attentions = kinds[-1] == TARGET and self.attention_layers is not None
        out = self.lm_call(model.llm, x, pos, mask.to(model.device), self.cache, attentions)
        self.kinds += kinds
        self.entry_units += units
        if kinds[-1] == TARGET:
            self._out = out

    def _source_attention(self) -> torch.Tensor | None:
        """(units_read,) attention of the pending row per source unit, averaged over heads and chosen layers."""
        if self.attention_layers is None or not self._out.attentions:
            return None
        by_layer = self.attention_by_layer()
        chosen = by_layer[self.attention_layers] if self.attention_layers else by_layer
        return chosen.mean(0)

    def attention_by_layer(self) -> torch.Tensor:
        """(n_layers, units_read): the pending row's attention mass on each source unit, averaged over heads,
        as a share of all its attention (prompt and target entries take the rest). Needs a session made with
        ``attention_layers`` (any list: every layer's weights come back)."""
        self.flush()  # units pushed since the last forward are counted in units_read: give them their attention
        if self._out is None or not getattr(self._out, "attentions", None):
            raise ValueError("no attention weights: make the session with attention_layers=[...] and read a unit")
        rows = torch.stack([a[0, :, -1].float().mean(0) for a in self._out.attentions])  # (L, kv)
        units = torch.tensor(self.entry_units, device=rows.device)
        mass = torch.zeros(rows.shape[0], self.units_read + 1, device=rows.device).index_add_(1, units, rows)
        return mass[:, 1:]

    def _refuse_source_on_fork(self, what: str) -> None:
        if self._forked:  # its speech front end (mel, encoder cache) is its parent's
            raise ValueError(f"{what} on a fork: a fork only decodes ahead; give the source to its parent session")

    def _require(self, modality: str, what: str) -> None:
        if self.config.modality != modality:
            raise ValueError(f"{what} is for a {modality} model; this model's source is {self.config.modality}")


def max_source_samples(model: SpeechLLM) -> int:
    """Speech: the most 16 kHz samples one session takes: whole blocks within the LLM's source capacity and the
    encoder's context (``finish_source`` pads the last block, so it must fit too). Whisper's 1500 frames and a
    stack of 4 with 320 ms blocks: 93 blocks, 29.76 s."""
    config = model.config
    if config.modality != SPEECH:
        raise ValueError(f"max_source_samples is for a speech model; this model's source is {config.modality}")
    blocks = min(config.source_capacity // config.embeddings_per_block, model.encoder.n_ctx // config.block_frames)
    return blocks * model.block_samples


def translate_offline(model: SpeechLLM, source: np.ndarray | Sequence[str], max_target_tokens: int = 200) -> str:
    """The full-source (offline) greedy translation: read everything, then write until the end."""
    session = StreamingSession(model, max_target_tokens=max_target_tokens)
    if model.config.modality == SPEECH:
        session.push_audio(source)
    else:
        session.push_words(list(source))
    session.finish_source()
    while session.write_word() is not None:
        pass
    return " ".join(session.words)
