"""Align a new speech adapter to the LLM's token embeddings with CTC, before the translation steps.

A randomly initialised adapter hands the LLM inputs it cannot read, and the translation loss alone teaches it
to read them slowly: on the offline corpus, 100 MSLM + SPSD steps from the text model left the speech model
deaf (dev NLL under another utterance's audio as good as under its own). Here the adapter's outputs are
scored against the LLM's own frozen input-embedding matrix, restricted to the tokens of the training
transcripts, plus a learned blank, and trained with CTC on the English transcripts: no LLM forward at all,
a fraction of a second a step on cached encoder frames. The LLM then starts from inputs whose directions
already point at the words spoken.

Used by ``training.train`` when ``align_steps`` > 0 (a fresh speech run whose adapter is not given).
"""

from __future__ import annotations

import difflib
import logging
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from streaming_llm.model import SpeechLLM

from .data import Example, SourceUnits

log = logging.getLogger("training")
ALIGN_LR = 1e-3
ALIGN_WARMUP = 50
DEV_LIMIT = 64  # dev utterances scored at the end


def transcript_ids(model: SpeechLLM, examples: list[Example]) -> dict[str, list[int]]:
    """Example id -> the token ids of its English transcript (examples without one are left out)."""
    return {ex.id: model._ids(" " + ex.transcript) for ex in examples if ex.transcript}


def ctc_logits(model: SpeechLLM, frames: torch.Tensor, table: torch.Tensor, blank: torch.Tensor) -> torch.Tensor:
    """frames (n, n_state) -> (n / stack, 1 + V') scores: the blank, then each transcript token."""
    embeds = model.adapter(frames[None])[0]  # (n_embeds, d)
    return embeds @ torch.cat([blank[None], table]).T


def align_adapter(
    model: SpeechLLM,
    train: list[Example],
    dev: list[Example],
    units: SourceUnits,
    steps: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> dict:
    """Train ``model.adapter`` in place with CTC on the transcripts -> a summary (CTC loss, dev tokens missed)."""
    train_ids = transcript_ids(model, train)
    if not train_ids:
        raise ValueError(
            "align_steps > 0 needs English transcripts (the manifest's src_text column) and this training set "
            "has none; set align_steps=0"
        )
    chosen = [ex for ex in train if ex.transcript]
    dev_chosen = [ex for ex in dev[:DEV_LIMIT] if ex.transcript]
    dev_ids = transcript_ids(model, dev_chosen)
    vocab = sorted({t for ids in list(train_ids.values()) + list(dev_ids.values()) for t in ids})
    local = {t: k + 1 for k, t in enumerate(vocab)}  # 0 is the blank
    table = model.llm.get_input_embeddings().weight.detach()[vocab]  # (V', d)
    blank = torch.nn.Parameter(torch.zeros(table.shape[1], device=model.device))
    needed = chosen + dev_chosen
    with torch.no_grad():  # the encoder as it starts (a trained one's LoRA is still zero): computed once each
        bar = tqdm(needed, desc="align: frames", leave=False, disable=not progress)
        frames = {ex.id: units.frames(ex) for ex in bar}
    params = [*model.adapter.parameters(), blank]
    optimizer = torch.optim.AdamW(params, lr=ALIGN_LR, weight_decay=0.01)
    rng = random.Random(seed)

    def ctc_loss(batch: list[Example]) -> torch.Tensor:
        logits = [ctc_logits(model, frames[ex.id], table, blank) for ex in batch]
        n = max(x.shape[0] for x in logits)
        log_probs = torch.stack([F.pad(x, (0, 0, 0, n - x.shape[0])) for x in logits]).log_softmax(-1)
        targets = [torch.tensor([local[t] for t in train_ids[ex.id]]) for ex in batch]
        return F.ctc_loss(
            log_probs.transpose(0, 1), torch.cat(targets), [x.shape[0] for x in logits], [len(t) for t in targets],
            zero_infinity=True,  # an utterance with more tokens than embeddings adds nothing, not inf
        )  # fmt: skip

    started = time.time()
    recent: list[float] = []
    bar = tqdm(range(1, steps + 1), desc="align (CTC)", unit="step", dynamic_ncols=True, disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = ALIGN_LR * min(1.0, step / ALIGN_WARMUP)
        loss = ctc_loss(rng.sample(chosen, min(batch_size, len(chosen))))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        recent = (recent + [float(loss.detach())])[-50:]
        bar.set_postfix(ctc=f"{sum(recent) / len(recent):.3f}")
    summary = {"align_steps": steps, "align_ctc": round(sum(recent) / max(len(recent), 1), 4),
               "align_seconds": round(time.time() - started, 1), "align_vocab": len(vocab)}  # fmt: skip
    if dev_chosen:
        missed = missed_tokens(model, dev_chosen, dev_ids, local, frames, table, blank)
        summary["align_dev_missed"] = round(missed, 4)
    log.info("adapter aligned: %s", ", ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


def missed_tokens(model, dev, ids, local, frames, table, blank) -> float:
    """Greedy CTC decode of each dev utterance -> the share of reference tokens it does not recover, in order
    (insertions are not counted: a recall, not a WER)."""
    missed = total = 0
    with torch.no_grad():
        for ex in dev:
            best = ctc_logits(model, frames[ex.id], table, blank).argmax(-1).tolist()
            hyp = [t for j, t in enumerate(best) if t and (j == 0 or best[j - 1] != t)]
            ref = [local[t] for t in ids[ex.id]]
            matched = sum(m.size for m in difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False).get_matching_blocks())
            missed += len(ref) - matched
            total += len(ref)
    return missed / max(total, 1)
