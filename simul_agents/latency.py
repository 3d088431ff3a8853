"""Latency metrics of one instance, computed from its delays (or ``elapsed``, for computation-aware values).

``delays[i]``: how much source had been read when target word i was written (speech: ms; text: words);
``source_length``: the whole source, in the same unit; ``reference_length``: words in the reference
(``len(reference.split(" "))``, as SimulEval counts). The formulas follow SimulEval 1.1.4 exactly (including
its choices: AL's and AP's target length is the reference's, DAL's the hypothesis', LAAL's the longer of the
two), so that the non-computation-aware numbers match its own to the last digit. Two more, from the ProactiveLLM
paper's description (its text gives no formula, so they are defined here):

- RCO, read-content overhead: the mean fraction of the source read when each target word is written,
  ``mean_i d_i / |X|`` (0 = everything written before reading, 1 = written after the whole source);
- AIL, average incremental lag: the mean lag of every hypothesis word behind a writer that spreads the
  hypothesis evenly over the source, ``mean_i (d_i - (i - 1) |X| / |Y|)`` with |Y| the hypothesis length,
  over all words (no cut-off at the end of the source as in AL, no reference length), in the delay unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import mean

SPEECH_SOURCE_TOKEN_MS = 300  # SimulEval's ATD: one source "word" per 300 ms of speech


def average_lagging(delays: Sequence[float], source_length: float, reference_length: int) -> float:
    """AL (STACL), with the reference length as |Y|."""
    if delays[0] > source_length:
        return delays[0]
    gamma = reference_length / source_length
    total, tau = 0.0, 0
    for i, d in enumerate(delays):
        total += d - i / gamma
        tau = i + 1
        if d >= source_length:
            break
    return total / tau


def length_adaptive_average_lagging(delays: Sequence[float], source_length: float, reference_length: int) -> float:
    """LAAL: AL with |Y| = max(hypothesis length, reference length), so over-generation is not rewarded."""
    return average_lagging(delays, source_length, max(len(delays), reference_length))


def differentiable_average_lagging(delays: Sequence[float], source_length: float) -> float:
    """DAL (Cherry and Foster), with the hypothesis length as |Y|."""
    gamma = len(delays) / source_length
    total, previous = 0.0, 0.0
    for i, d in enumerate(delays):
        current = d if i == 0 else max(d, previous + 1 / gamma)
        total += current - i / gamma
        previous = current
    return total / len(delays)


def average_proportion(delays: Sequence[float], source_length: float, reference_length: int) -> float:
    """AP, normalised by the reference length (SimulEval's choice)."""
    return sum(delays) / (source_length * reference_length)


def start_offset(delays: Sequence[float]) -> float:
    return delays[0]


def end_offset(delays: Sequence[float], source_length: float) -> float:
    return delays[-1] - source_length


def read_content_overhead(delays: Sequence[float], source_length: float) -> float:
    """RCO: mean fraction of the source read per target word."""
    return sum(d / source_length for d in delays) / len(delays)


def average_incremental_lag(delays: Sequence[float], source_length: float) -> float:
    """AIL: mean over all hypothesis words of d_i - (i - 1) |X| / |Y|."""
    step = source_length / len(delays)
    return sum(d - i * step for i, d in enumerate(delays)) / len(delays)


def average_token_delay(delays: Sequence[float], speech: bool, elapsed: Sequence[float] | None = None) -> float:
    """ATD (Kano et al.) for text output, as SimulEval 1.1.4 computes it.

    Source tokens: words for text, 300 ms pieces of each read chunk for speech; target words have length 1
    (text input) or 0 (speech input). With ``elapsed`` the computation time between writes is added (CA).
    """
    source_token, target_token = (SPEECH_SOURCE_TOKEN_MS, 0) if speech else (1, 1)
    delays = list(delays)
    if elapsed is not None and list(elapsed) != [0] * len(delays):
        compute_elapsed = [e - d for e, d in zip(elapsed, delays, strict=True)]
        compute_times = [c - p for c, p in zip(compute_elapsed, [0, *compute_elapsed[:-1]], strict=True)]
    else:
        compute_times = [0] * len(delays)

    chunk_sizes = {"src": [0], "tgt": [0]}
    token_to_chunk = {"src": [0], "tgt": [0]}
    token_to_time = {"src": [0], "tgt": [0]}
    unique_delays = sorted(set(delays), key=delays.index)

    previous = None
    for d in delays:
        if d != previous:
            chunk_sizes["tgt"].append(1)
        else:
            chunk_sizes["tgt"][-1] += 1
        previous = d
    for i, size in enumerate(chunk_sizes["tgt"][1:], 1):
        token_to_chunk["tgt"] += [i] * size

    steps = [d - p for d, p in zip(unique_delays, [0, *unique_delays[:-1]], strict=True)]
    for i, step in enumerate(steps, 1):
        if speech:
            whole, rest = divmod(step, source_token)
            lengths = int(whole) * [source_token] + ([rest] if rest != 0 else [])
        else:
            lengths = int(step) * [source_token]  # whole words: score.py refuses a fractional text delay
        chunk_sizes["src"].append(len(lengths))
        for length in lengths:
            token_to_time["src"].append(token_to_time["src"][-1] + length)
            token_to_chunk["src"].append(i)

    for d, compute in zip(delays, compute_times, strict=True):
        start = max(d, token_to_time["tgt"][-1])
        token_to_time["tgt"].append(start + target_token + compute)

    lags = []
    for t in range(1, len(token_to_chunk["tgt"])):
        chunk = token_to_chunk["tgt"][t]
        read_x = sum(chunk_sizes["src"][:chunk])
        read_y = sum(chunk_sizes["tgt"][:chunk])
        s = t - max(0, read_y - read_x)
        available = sum(chunk_sizes["src"][: chunk + 1])
        s = s if s < available else available
        lags.append(token_to_time["tgt"][t] - token_to_time["src"][s])
    return float(mean(lags))
