"""The training objective: full-view NLL + MSLM NLL + lambda * SPSD KL, and the probe head's loss.

Both views come out of ONE forward pass: each sequence holds one copy of prompt and source and two copies of
its target group (``layout.Layout(views=2)``), the first under the sampled stream mask, the second under the
full-source mask, so the shared prompt and source are computed once.

- ``full``: -log P(y_t | y_<t, whole source), the offline view;
- ``mslm``: -log P(y_t | y_<t, x_1..phi(t)), the stream view;
- ``spsd``: KL(P_full || P_stream) per target token over the teacher's top-k tokens (both renormalised over
  that set), with temperature tau (scaled by tau^2) and, by default, no gradient through the teacher;
- ``probe``: binary cross-entropy of the probe MLP on the stream view's (detached) hidden state, against
  labels the model makes itself: does the stream prediction already agree with the full view's?
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streaming_llm.model import SpeechLLM

PROBE_LABELS = ("top1", "kl")
PROBE_ROWS = ("all", "word_start")


@dataclass(frozen=True)
class LossConfig:
    w_full: float = 1.0
    w_mslm: float = 1.0
    spsd_lambda: float = 1.0
    spsd_topk: int = 100
    spsd_temperature: float = 1.0
    spsd_stop_grad: bool = True
    probe: bool = True  # train the probe jointly (on detached features)
    probe_label: str = "top1"  # "top1": argmax agreement; "kl": KL(full || stream) under probe_kl_bound
    probe_kl_bound: float = 0.1
    # the rows the probe learns from: "all" target rows (what the bench's models used), or "word_start": only the
    # rows that predict a word's first token, where the heads ask it (write_word decides once per word)
    probe_rows: str = "all"

    def __post_init__(self) -> None:
        if self.probe_label not in PROBE_LABELS:
            raise ValueError(f"probe_label {self.probe_label!r}: expected one of {PROBE_LABELS}")
        if self.probe_rows not in PROBE_ROWS:
            raise ValueError(f"probe_rows {self.probe_rows!r}: expected one of {PROBE_ROWS}")
        if self.spsd_topk < 1 or self.spsd_temperature <= 0:
            raise ValueError("spsd_topk must be >= 1 and spsd_temperature > 0")

    @property
    def needs_stream(self) -> bool:
        return self.w_mslm > 0 or self.spsd_lambda > 0 or self.probe

    @property
    def needs_full(self) -> bool:
        return self.w_full > 0 or self.spsd_lambda > 0 or self.probe


def spsd_kl(teacher: torch.Tensor, student: torch.Tensor, topk: int, temperature: float) -> torch.Tensor:
    """(N, V) teacher and student logits -> (N,) KL(P_teacher || P_student) over the teacher's top-k."""
    k = min(topk, teacher.shape[-1])
    top_t, idx = (teacher / temperature).topk(k, dim=-1)
    log_p = F.log_softmax(top_t, dim=-1)
    log_q = F.log_softmax((student / temperature).gather(-1, idx), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def streaming_losses(
    model: SpeechLLM,
    units: list[list[torch.Tensor]],
    targets: list[list[int]],
    phis: list[torch.Tensor],
    config: LossConfig,
    n_tokens: float | None = None,
) -> dict[str, torch.Tensor]:
    """Losses of one batch -> {"loss", "full", "mslm", "spsd", "probe", "probe_acc", "agree", "tokens"}.

    Each term is a sum over target tokens divided by ``n_tokens`` (default: this batch's count; the trainer
    passes the global count across gradient-accumulation steps and ranks, so the gradient is exact).
    """
    views = [name for name, needed in (("stream", config.needs_stream), ("full", config.needs_full)) if needed]
    per_view = view_outputs(model, units, targets, phis, views)
    labels = torch.tensor([y for ys in targets for y in ys], device=model.device)
    count = float(n_tokens if n_tokens is not None else labels.numel())
    zero = next(iter(per_view.values()))[0].new_zeros(())
    out = {"tokens": torch.tensor(float(labels.numel()))}
    stream_h, stream_logits = per_view.get("stream", (None, None))
    full_h, full_logits = per_view.get("full", (None, None))

    out["full"] = F.cross_entropy(full_logits, labels, reduction="sum") / count if full_logits is not None else zero
    out["mslm"] = F.cross_entropy(stream_logits, labels, reduction="sum") / count if stream_logits is not None else zero
    kl_tok = None
    if stream_logits is not None and full_logits is not None:
        teacher = full_logits.detach() if config.spsd_stop_grad else full_logits
        kl_tok = spsd_kl(teacher, stream_logits, config.spsd_topk, config.spsd_temperature)
    out["spsd"] = kl_tok.sum() / count if kl_tok is not None and config.spsd_lambda > 0 else zero
    loss = config.w_full * out["full"] + config.w_mslm * out["mslm"] + config.spsd_lambda * out["spsd"]

    out["probe"], out["probe_acc"], out["agree"] = zero, zero, zero
    if config.probe and model.probe is not None and kl_tok is not None:
        rows = probe_rows(model, targets, labels, config.probe_rows)
        target = probe_targets(stream_logits.detach(), full_logits.detach(), kl_tok.detach(), config)[rows]
        logit = model.probe_logit(stream_h.detach()[rows]).float()
        # over all target tokens, as every term: with probe_rows=word_start its rows (~40%) weigh in at that share
        out["probe"] = F.binary_cross_entropy_with_logits(logit, target, reduction="sum") / count
        out["probe_acc"] = ((logit > 0).float() == target).float().mean().detach()
        out["agree"] = target.mean()
        loss = loss + out["probe"]
    out["loss"] = loss
    return out


def view_outputs(
    model: SpeechLLM,
    units: list[list[torch.Tensor]],
    targets: list[list[int]],
    phis: list[torch.Tensor],
    views: list[str],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One forward pass over a batch in the named views ("stream": under each phi; "full": the whole source)
    -> {view: (hidden (N, d), logits (N, V) float32)} at the rows that predict each target token, N = all
    targets' tokens in order."""
    embeds, positions, layouts = model.assemble(units, targets, views=len(views))
    view_phis = [
        torch.stack([phi if name == "stream" else layout.full_phi() for name in views])
        for phi, layout in zip(phis, layouts, strict=True)
    ]
    hidden = model.hidden(embeds, positions, layouts, view_phis)
    b_idx = torch.cat([torch.full((layout.n_target,), b) for b, layout in enumerate(layouts)]).to(hidden.device)
    per_view = {}
    for v, name in enumerate(views):
        r_idx = torch.cat([layout.predictor_rows(v) for layout in layouts]).to(hidden.device)
        h = hidden[b_idx, r_idx]  # (N, d) the rows that predict y_t in this view
        per_view[name] = (h, model.lm_logits(h).float())
    return per_view


def probe_rows(model: SpeechLLM, targets: list[list[int]], labels: torch.Tensor, which: str) -> torch.Tensor:
    """(N,) bool over the target tokens: the rows the probe learns from. "word_start": the tokens that begin a
    word (each sequence's first token does), not the end of the sentence: the rows the heads ask before a word."""
    if which == "all":
        return torch.ones_like(labels, dtype=torch.bool)
    starts = model.word_start.to(labels.device)[labels]
    firsts = torch.tensor([i == 0 for ys in targets for i in range(len(ys))], device=labels.device)
    return (starts | firsts) & (labels != model.eos_id)


def probe_targets(
    stream_logits: torch.Tensor, full_logits: torch.Tensor, kl_tok: torch.Tensor, config: LossConfig
) -> torch.Tensor:
    """(N,) 1.0 where the stream view's prediction already agrees with the full view's, else 0.0."""
    agree = stream_logits.argmax(-1) == full_logits.argmax(-1)
    return probe_labels(agree, kl_tok, config.probe_label, config.probe_kl_bound)


def probe_labels(agree: torch.Tensor, kl_tok: torch.Tensor, label: str, kl_bound: float) -> torch.Tensor:
    """(N,) the probe's label: "top1" the two views' argmax agree, "kl" KL(full || stream) under ``kl_bound``."""
    return agree.float() if label == "top1" else (kl_tok < kl_bound).float()
