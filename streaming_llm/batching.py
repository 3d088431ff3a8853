"""One LM forward for many streaming sessions at once: how an evaluation decodes many utterances in parallel.

A ``StreamingSession`` runs the LM through its ``lm_call``: by default ``forward_one`` (one session, its own
KV cache). Decoding one token of SmolLM2-135M reads all 540 MB of weights for a single row, so on a CPU it is
bound by memory bandwidth, not arithmetic: eight rows cost little more than one. ``LMBatcher`` exploits that.
Each session lives in its own thread (the policy code stays sequential); a session's ``lm_call`` hands its
request to the batcher and blocks; when every member thread is waiting, one thread runs all requests as one
padded forward and each session gets its own rows back, its cache extended by exactly its own entries.

Packing: the requests' cached entries are laid end to end, then all their new rows, under a block-diagonal
mask made of each request's own mask, so every row sees exactly what it would see alone (equal up to float
summation order) and the batch costs the rows it has, with no padding.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from transformers import DynamicCache, PreTrainedModel

from .lean import lean_forward, supports_lean
from .model import eager_attention, run_llm


def forward_one(
    llm: PreTrainedModel, x, positions, mask, cache: DynamicCache, attentions: bool = False, logits_to_keep=1
):
    """One session's forward: x (1, q, d), positions (1, q), mask (1, 1, q, past + q) -> the LM output.

    Logits of the last row only by default (a session reads no other): a many-row source feed does not pay the
    vocabulary projection per row. Without attention weights a Llama runs through ``lean.lean_forward``.
    """
    if not attentions and supports_lean(llm):
        return lean_forward(llm, x, positions, mask, cache, logits_to_keep)
    if attentions:
        with eager_attention(llm):
            return run_llm(llm, x, positions, mask, cache, attentions=True, logits_to_keep=logits_to_keep)
    return run_llm(llm, x, positions, mask, cache, logits_to_keep=logits_to_keep)


@dataclass(eq=False)
class _Request:
    x: torch.Tensor  # (1, q, d)
    positions: torch.Tensor  # (1, q)
    mask: torch.Tensor  # (1, 1, q, past + q) additive
    cache: DynamicCache
    attentions: bool
    out: object = None
    error: BaseException | None = None
    done: bool = field(default=False)


class LMBatcher:
    """Collects the LM forwards of the sessions of several threads and runs them as one batch.

    Usage: each worker thread wraps its work in ``with batcher.member():`` and gives its sessions
    ``lm_call=batcher``. A forward runs when every member is waiting on one, so a member must not block on
    anything else (another member, I/O of unbounded length) while it holds sessions. A call from a thread that
    is not a member joins the next batch: it runs once the members are all waiting on forwards too (at once when
    fewer than two are busy).
    """

    def __init__(self, llm: PreTrainedModel, runner: Executor | None = None):
        """``runner``: a one-thread executor on which every batched forward runs (the server's model thread, with
        its OpenMP pool), so that the member threads can run their own work single-threaded; None: the forward
        runs on the member thread that completes the batch."""
        self.llm = llm
        self.runner = runner
        self._cond = threading.Condition()
        self._members = 0
        self._waiting: list[_Request] = []
        self.n_forwards = 0  # batched forwards run, requests served, seconds in forwards (for benchmarks)
        self.n_requests = 0
        self.seconds = 0.0

    @contextlib.contextmanager
    def member(self) -> Iterator[None]:
        with self._cond:
            self._members += 1
        try:
            yield
        finally:
            with self._cond:
                self._members -= 1
                self._run_if_all_waiting()

    def __call__(self, llm: PreTrainedModel, x, positions, mask, cache: DynamicCache, attentions: bool = False):
        if llm is not self.llm:
            raise ValueError("LMBatcher: a session of another model called this batcher")
        request = _Request(x, positions, mask, cache, attentions)
        with self._cond:
            self._waiting.append(request)
            self._run_if_all_waiting()
            while not request.done:
                self._cond.wait()
        if request.error is not None:
            raise request.error
        return request.out

    def _run_if_all_waiting(self) -> None:
        """Under the lock: run the waiting requests if no member is still busy elsewhere."""
        if not self._waiting or len(self._waiting) < self._members:
            return
        batch, self._waiting = self._waiting, []
        start = time.perf_counter()
        if self.runner is None:
            self._forward(batch)
        else:  # the members are all waiting (and a new one waits for the lock): nothing else runs meanwhile
            self.runner.submit(self._forward, batch).result()
        self.seconds += time.perf_counter() - start
        self.n_forwards += 1
        self.n_requests += len(batch)
        for request in batch:
            request.done = True
        self._cond.notify_all()

    def _forward(self, batch: list[_Request]) -> None:
        """Run the batch; each request gets its output or its own error."""
        try:
            with torch.inference_mode():  # the last member leaving may run the batch outside its session's mode
                forward_batch(self.llm, batch)
        except Exception:  # one bad request must not fail the others: run each alone to find it
            for request in batch:
                try:
                    with torch.inference_mode():
                        request.out = forward_one(
                            self.llm, request.x, request.positions, request.mask, request.cache, request.attentions
                        )
                except Exception as e:
                    request.error = e


def forward_batch(llm: PreTrainedModel, requests: list[_Request]) -> None:
    """Run the requests as one packed forward; set each ``request.out`` and extend each request's cache.

    Packed, not padded: the requests' new rows are laid end to end in one sequence (R rows in all) after all
    their cached entries end to end (P entries), and the mask is block-diagonal, so the linear layers cost
    exactly R rows whatever the mix of one-token and many-token requests. Logits are computed for each
    request's last row only (the only one a session reads).
    """
    if len(requests) == 1:
        r = requests[0]
        r.out = forward_one(llm, r.x, r.positions, r.mask, r.cache, r.attentions)
        return
    n_layers = llm.config.num_hidden_layers
    pasts = [r.cache.get_seq_length() for r in requests]
    news = [r.x.shape[1] for r in requests]
    past_at = [sum(pasts[:i]) for i in range(len(requests))]  # where each request's cache starts
    new_at = [sum(news[:i]) for i in range(len(requests))]  # where its new rows start
    n_past, n_new = sum(pasts), sum(news)
    x = torch.cat([r.x for r in requests], dim=1)  # (1, R, d)
    positions = torch.cat([r.positions for r in requests], dim=1)  # (1, R)
    mask = torch.full((1, 1, n_new, n_past + n_new), float("-inf"), dtype=requests[0].mask.dtype, device=x.device)
    for r, p, n, pa, na in zip(requests, pasts, news, past_at, new_at, strict=True):
        mask[0, 0, na : na + n, pa : pa + p] = r.mask[0, 0, :, :p]
        mask[0, 0, na : na + n, n_past + na : n_past + na + n] = r.mask[0, 0, :, p:]
    cache = DynamicCache()
    if n_past:
        for layer in range(n_layers):
            stored = [r.cache.layers[layer] for r, p in zip(requests, pasts, strict=True) if p]
            keys, values = torch.cat([s.keys for s in stored], dim=2), torch.cat([s.values for s in stored], dim=2)
            cache.update(keys, values, layer)
    last = torch.tensor([na + n - 1 for n, na in zip(news, new_at, strict=True)], device=x.device)
    attentions = any(r.attentions for r in requests)
    out = forward_one(llm, x, positions, mask, cache, attentions, logits_to_keep=last)
    for i, (r, p, n, pa, na) in enumerate(zip(requests, pasts, news, past_at, new_at, strict=True)):
        new = slice(n_past + na, n_past + na + n)  # this request's own new entries
        for layer, stored in enumerate(cache.layers[:n_layers]):
            r.cache.update(stored.keys[:, :, new], stored.values[:, :, new], layer)
        own = None
        if r.attentions:
            columns = torch.cat([torch.arange(pa, pa + p), torch.arange(new.start, new.stop)]).to(x.device)
            own = tuple(a[:, :, na : na + n].index_select(-1, columns) for a in out.attentions)
        r.out = SimpleNamespace(
            logits=out.logits[:, i : i + 1],  # (1, 1, V): the last row's
            hidden_states=(out.hidden_states[-1][:, na : na + n],),
            attentions=own,
        )
