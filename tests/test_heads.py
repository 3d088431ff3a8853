"""Decision heads: the shared rules, each head's rule, decoding ahead without committing, the oracle."""

import dataclasses

import pytest
import torch

from streaming_llm.checkpoint import build_model
from streaming_llm.engine import StepSignals, StreamingSession
from streaming_llm.heads import (
    READ,
    WRITE,
    AttentionHead,
    EntropyHead,
    FixedChunkHead,
    LocalAgreementHead,
    OfflineHead,
    OracleHead,
    WaitKHead,
    decide,
    make_head,
    parse_head_params,
    peek_words,
)
from streaming_llm.tiny import tiny_config, tiny_tokenizer

WORDS = "I would like a cup of coffee in the garden .".split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two fighting
    yield
    torch.set_num_threads(threads)


def untied_tiny(modality="text", seed=0, **overrides):
    """A tiny random model whose greedy output is several short words (a tied one repeats its last token)."""
    config = tiny_config(modality, **overrides)
    config = config.replace(llm_config={**config.llm_config, "tie_word_embeddings": False})
    torch.manual_seed(seed)
    return build_model(config, tiny_tokenizer()).eval()


@pytest.fixture(scope="module")
def model():
    return untied_tiny("text")


def signals(**changes) -> StepSignals:
    fields = dict(
        entropy=1.0, top_prob=0.5, next_token=5, ends_sentence=False, hidden=torch.zeros(64),
        source_attention=None, units_read=3, source_finished=False, n_words=0,
    )  # fmt: skip
    return StepSignals(**{**fields, **changes})


class FakeSession:
    """The parts of StreamingSession that decide() reads: its counts, and signals()."""

    def __init__(self, step: StepSignals):
        self.step = step
        self.source_finished = step.source_finished
        self.units_read = step.units_read
        self.words = ["w"] * step.n_words

    def signals(self):
        return self.step


class AlwaysWrite(OfflineHead):
    fixed_schedule = False  # decides from the step's signals

    def decide(self, signals, session, memory):
        return WRITE


def test_shared_rules_come_before_the_head():
    assert decide(OfflineHead(), FakeSession(signals(source_finished=True)), {}) is WRITE  # flush
    assert decide(AlwaysWrite(), FakeSession(signals(ends_sentence=True)), {}) is READ
    assert decide(AlwaysWrite(), FakeSession(signals(units_read=0)), {}) is READ
    assert decide(AlwaysWrite(), FakeSession(signals()), {}) is WRITE
    assert decide(AlwaysWrite(), FakeSession(signals(ends_sentence=True, source_finished=True)), {}) is WRITE


def test_entropy_head():
    head = EntropyHead(threshold=0.6)
    assert head.decide(signals(entropy=0.5), None, {}) is WRITE
    assert head.decide(signals(entropy=0.6), None, {}) is READ
    assert head.decide(signals(entropy=float("inf")), None, {}) is READ


class CountingSession(FakeSession):
    def signals(self):
        self.asked = True
        return self.step


@pytest.mark.parametrize("min_lag", [1, 2, 3])
def test_a_lag_floor_reads_until_min_lag_units_are_read_beyond_the_words_written(min_lag):
    sure = EntropyHead(threshold=10.0, min_lag=min_lag)  # the entropy alone would always write
    for units in range(1, 8):
        for n_words in range(8):
            session = CountingSession(signals(units_read=units, n_words=n_words, entropy=0.1))
            decision = decide(sure, session, {})
            assert decision is (WRITE if units - n_words >= min_lag else READ)
            assert hasattr(session, "asked") is (decision is WRITE)  # under the floor the LM is not run
    # with the floor the entropy still decides: an unsure step reads
    assert decide(EntropyHead(threshold=0.5, min_lag=1), FakeSession(signals(entropy=2.0, units_read=5)), {}) is READ
    assert decide(EntropyHead(threshold=0.5), FakeSession(signals(entropy=0.1, units_read=1, n_words=4)), {}) is WRITE
    with pytest.raises(ValueError, match="min_lag=-1"):
        make_head("probe", min_lag=-1)
    with pytest.raises(ValueError, match="max_lag=2 is under min_lag=3"):
        make_head("entropy", min_lag=3, max_lag=2)


@pytest.mark.parametrize("max_lag", [1, 3])
def test_a_lag_ceiling_writes_without_asking_the_lm_once_the_lag_reaches_max_lag(max_lag):
    unsure = EntropyHead(threshold=0.0, min_lag=1, max_lag=max_lag)  # the entropy alone would never write
    for units in range(1, 8):
        for n_words in range(8):
            session = CountingSession(signals(units_read=units, n_words=n_words, entropy=3.0))
            decision = decide(unsure, session, {})
            assert decision is (WRITE if units - n_words >= max_lag else READ)
            assert not hasattr(session, "asked") or decision is READ  # a forced WRITE needs no LM output
    # a ceiling equal to the floor is wait-k
    same = EntropyHead(threshold=0.0, min_lag=3, max_lag=3)
    for units in range(1, 8):
        for n_words in range(8):
            state = signals(units_read=units, n_words=n_words)
            assert decide(same, FakeSession(state), {}) is WaitKHead(k=3).decide(state, None, {})


def test_a_lag_floor_delays_every_word_on_a_real_session(model):
    """Word i (from 0) is written after at least i + min_lag source words, until the source ends."""
    for min_lag in (0, 2):
        session = StreamingSession(model, max_target_tokens=40)
        head, delays = EntropyHead(threshold=100.0, min_lag=min_lag), []
        for units, word in enumerate(WORDS, start=1):
            session.push_words([word])
            while decide(head, session, {}) is WRITE and session.write_word() is not None:
                delays.append(units)
        assert delays, "the tiny model wrote nothing before the source ended"
        if min_lag == 0:
            assert delays[0] == 1 and len(delays) > delays[-1]  # a sure head writes at once, and runs ahead
        else:
            assert all(d >= i + min_lag for i, d in enumerate(delays))
            assert any(d == i + min_lag for i, d in enumerate(delays))  # and as soon as the floor allows


@pytest.mark.parametrize(
    ("name", "threshold", "problem"),
    [("entropy", -1.0, "at least 0 nats"), ("probe", 1.5, "a probability"), ("attention", -0.1, "a share"),
     ("entropy", 0.0, "never write"), ("probe", 1.0, "never write"), ("attention", 1.0, "never write")],
)
def test_a_threshold_the_head_could_never_cross_is_refused(name, threshold, problem):
    with pytest.raises(ValueError, match=problem):
        make_head(name, threshold=threshold)


@pytest.mark.parametrize("name", ["entropy", "attention", "probe"])
@pytest.mark.parametrize("value", [float("nan"), "nan", float("inf"), "-inf"], ids=str)
def test_a_non_finite_threshold_is_refused_by_every_head_that_has_one(name, value):
    with pytest.raises(ValueError, match=f"head '{name}': threshold=.* is not a finite number"):
        make_head(name, threshold=value)


@pytest.mark.parametrize(("name", "params"), [("wait-k", {"k": True}), ("entropy", {"threshold": False}),
                                              ("entropy", {"max_lag": float("inf")}), ("wait-k", {"k": "nan"})])
def test_a_boolean_or_non_finite_number_is_not_taken_as_a_head_parameter(name, params):
    (key,) = params
    with pytest.raises(ValueError, match=f"head '{name}': {key}=.* is not a (valid|finite)"):
        make_head(name, **params)


def test_describe_lists_the_lag_bounds_only_when_they_are_set():
    assert EntropyHead(threshold=0.6).describe() == "entropy(threshold=0.6)"
    assert EntropyHead(threshold=0.6, max_lag=4).describe() == "entropy(threshold=0.6, max_lag=4)"
    assert WaitKHead(k=3).describe() == "wait-k(k=3)"


@pytest.mark.parametrize("k", [1, 2, 4])
def test_wait_k_schedule(k):
    head = WaitKHead(k=k)
    for units in range(1, 9):
        written = [n for n in range(12) if head.decide(signals(units_read=units, n_words=n), None, {}) is WRITE]
        assert written == list(range(max(0, units - k + 1)))  # words 1..units-k+1 may be out


def test_fixed_chunk_schedule():
    head = FixedChunkHead(chunk=2, words=3)
    allowed = {units: sum(head.decide(signals(units_read=units, n_words=n), None, {}) is WRITE for n in range(20))
               for units in range(1, 7)}  # fmt: skip
    assert allowed == {1: 0, 2: 3, 3: 3, 4: 6, 5: 6, 6: 9}


def test_the_offline_head_feeds_the_source_to_the_lm_once_at_the_end(model):
    from streaming_llm.batching import forward_one

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1].shape[1])  # rows fed
        return forward_one(*args, **kwargs)

    session = StreamingSession(model, max_target_tokens=40, lm_call=counting)
    head = OfflineHead()
    for word in WORDS:
        session.push_words([word])
        assert decide(head, session, {}) is READ
    assert calls == []  # reading costs no LM forward
    session.finish_source()
    assert decide(head, session, {}) is WRITE
    session.write_word()
    assert calls[0] > len(WORDS)  # the whole source (every word's tokens) in one forward
    assert calls[1:] and all(rows == 1 for rows in calls[1:])  # then one target token at a time


def test_attention_head_frontier_and_normalisation():
    attention = torch.tensor([0.1, 0.1, 0.05, 0.05])  # 0.3 of all attention on the source, 0.05 on the frontier
    head = AttentionHead(threshold=0.2, frontier=1, normalise="source", write_when="low")
    assert head.frontier_share(attention) == pytest.approx(0.05 / 0.3)
    assert head.decide(signals(source_attention=attention), None, {}) is WRITE
    low = AttentionHead(threshold=0.2, frontier=2, normalise="source", write_when="low")
    assert low.decide(signals(source_attention=attention), None, {}) is READ
    high = AttentionHead(threshold=0.2, frontier=2, normalise="source")  # the default rule: a high share writes
    assert high.decide(signals(source_attention=attention), None, {}) is WRITE
    raw = AttentionHead(threshold=0.1)  # default normalise="all"
    assert raw.frontier_share(attention) == pytest.approx(0.05)
    assert raw.decide(signals(source_attention=attention), None, {}) is READ
    with pytest.raises(ValueError, match="write_when"):
        AttentionHead(write_when="sometimes")
    with pytest.raises(ValueError, match="session_options"):
        head.decide(signals(source_attention=None), None, {})


def test_attention_layers_spec():
    assert AttentionHead().layer_indices(8) == [4, 5, 6, 7]
    assert AttentionHead(layers="all").layer_indices(3) == [0, 1, 2]
    assert AttentionHead(layers="last").layer_indices(3) == [2]
    assert AttentionHead(layers="0,-1").layer_indices(4) == [0, 3]
    with pytest.raises(ValueError, match="out of range"):
        AttentionHead(layers="7").layer_indices(4)
    with pytest.raises(ValueError, match="expected"):
        AttentionHead(layers="top").layer_indices(4)


def test_attention_head_on_a_session(model):
    head = AttentionHead(threshold=0.5)
    session = StreamingSession(model, max_target_tokens=20, **head.session_options(model))
    session.push_words(WORDS[:4])
    step = session.signals()
    assert step.source_attention.shape == (4,)
    expected = WRITE if head.frontier_share(step.source_attention) > 0.5 else READ
    assert head.decide(step, session, {}) is expected


def test_probe_head(model):
    session = StreamingSession(model)
    session.push_words(WORDS[:3])
    step = session.signals()
    with torch.inference_mode():
        p = torch.sigmoid(model.probe_logit(step.hidden)).item()
    assert make_head("probe", threshold=p - 1e-4).decide(step, session, {}) is WRITE
    assert make_head("probe", threshold=p + 1e-4).decide(step, session, {}) is READ
    without = untied_tiny("text", probe_hidden=0)
    with pytest.raises(ValueError, match="no probe"):
        make_head("probe").session_options(without)


def test_make_head_converts_and_names_its_errors():
    assert make_head("waitk", k="3") == WaitKHead(k=3)
    assert make_head("LA", n="3") == LocalAgreementHead(n=3)
    assert make_head("entropy", threshold="0.6").threshold == 0.6
    with pytest.raises(ValueError, match="no parameter frontier.*threshold"):
        make_head("entropy", frontier=2)
    with pytest.raises(ValueError, match="unknown head 'greedy'"):
        make_head("greedy")
    with pytest.raises(ValueError, match="not a valid int"):
        make_head("wait-k", k="2.5")
    with pytest.raises(ValueError, match="at least 1"):
        make_head("wait-k", k=0)
    assert parse_head_params(["k=3", "layers=4,5 frontier=2"]) == {"k": "3", "layers": "4,5", "frontier": "2"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_head_params(["threshold"])
    with pytest.raises(ValueError, match="k given twice"):
        parse_head_params(["k=1", "k=2"])
    assert parse_head_params(["k=1", "k=1"]) == {"k": "1"}


def common_prefix(sequences):
    """Longest common prefix of word lists."""
    prefix = []
    for column in zip(*sequences, strict=False):
        if any(word != column[0] for word in column[1:]):
            break
        prefix.append(column[0])
    return prefix


def test_common_prefix():
    assert common_prefix([["a", "b", "c"], ["a", "b", "d"], ["a", "b"]]) == ["a", "b"]
    assert common_prefix([["a"], ["b"]]) == []
    assert common_prefix([]) == []


def greedy_words(session):
    out = []
    while (word := session.write_word()) is not None:
        out.append(word)
    return out


def test_peek_words_leaves_the_session_as_it_was(model):
    plain, peeked = StreamingSession(model, max_target_tokens=30), StreamingSession(model, max_target_tokens=30)
    for word in WORDS:
        plain.push_words([word])
        peeked.push_words([word])
        before = peeked.next_logits().clone()
        ahead = peek_words(peeked, 3)
        torch.testing.assert_close(peeked.next_logits(), before, rtol=0, atol=0)
        assert peeked.words == [] and len(peeked.written) == 0
        if ahead:
            assert peek_words(peeked, 1) == ahead[:1]
    plain.finish_source()
    peeked.finish_source()
    assert greedy_words(peeked) == greedy_words(plain)
    assert peeked.written == plain.written


@dataclasses.dataclass(frozen=True)
class EagerLocalAgreement(LocalAgreementHead):
    """LocalAgreement by its definition: every hypothesis decoded whole, then their longest common prefix."""

    def decide(self, signals, session, memory):
        history = memory.setdefault("eager", [])
        if not history or history[-1][0] != signals.units_read:
            history.append((signals.units_read, list(session.words) + peek_words(session, self.horizon)))
            del history[: -self.n]
        if len(history) < self.n:
            return READ
        return WRITE if len(common_prefix([words for _, words in history])) > signals.n_words else READ


def run_text(model, head, words=WORDS):
    """(words written, units read at each write) of a whole sentence under ``head``."""
    session, memory, delays = StreamingSession(model, max_target_tokens=40), {}, []
    for i, word in enumerate(words):
        session.push_words([word])
        if i == len(words) - 1:
            session.finish_source()
        while decide(head, session, memory) is WRITE:
            if session.write_word() is None:
                break
            delays.append(session.units_read)
    return session.words, delays


@pytest.mark.parametrize(("n", "horizon"), [(2, 6), (2, 32), (3, 4)])
def test_local_agreement_writes_what_whole_hypotheses_agree_on(model, n, horizon):
    """Hypotheses decoded lazily, on forks, as far as the comparison reads them: the same words, the same delays."""
    for words in (WORDS, WORDS[::-1], WORDS[2:7]):
        lazy = run_text(model, LocalAgreementHead(n=n, horizon=horizon), words)
        assert lazy == run_text(model, EagerLocalAgreement(n=n, horizon=horizon), words)
        assert len(lazy[0]) > 0


def test_a_fork_decodes_ahead_and_leaves_its_parent_as_it_was(model):
    parent = StreamingSession(model, max_target_tokens=30)
    parent.push_words(WORDS[:4])
    before = parent.next_logits().clone()
    twin = parent.fork()
    ahead = [twin.write_word() for _ in range(3)]
    torch.testing.assert_close(parent.next_logits(), before, rtol=0, atol=0)
    assert parent.words == [] and len(parent.written) == 0 and len(twin.written) > 0
    assert peek_words(parent, 3) == ahead
    parent.push_words(WORDS[4:5])  # the parent reads on; the fork's words stay its own
    assert twin.words == ahead
    with pytest.raises(ValueError, match="on a fork"):
        twin.push_words(["more"])


def test_oracle_writes_the_offline_translation_no_later(model):
    """The oracle only writes words that the full-source model writes after the same prefix: same output."""
    offline = StreamingSession(model, max_target_tokens=40)
    offline.push_words(WORDS)
    offline.finish_source()
    reference = greedy_words(offline)

    head = OracleHead()
    session, memory = StreamingSession(model, max_target_tokens=40), {"full_source": WORDS}
    units_at_write = []
    for i, word in enumerate(WORDS):
        session.push_words([word])
        if i == len(WORDS) - 1:
            session.finish_source()
        while decide(head, session, memory) is WRITE:
            if session.write_word() is None:
                break
            units_at_write.append(session.units_read)
    assert session.words == reference
    assert len(units_at_write) == len(reference)
    assert all(u <= len(WORDS) for u in units_at_write)


def test_the_probe_head_writes_only_above_its_threshold(model):
    """A probability equal to the threshold is not above it: READ."""
    session = StreamingSession(model)
    session.push_words(WORDS[:3])
    step = session.signals()
    with torch.inference_mode():
        p = torch.sigmoid(model.probe_logit(step.hidden).float()).item()
    assert make_head("probe", threshold=p).decide(step, session, {}) is READ


@pytest.mark.parametrize("write_when", ["high", "low"])
def test_an_attention_share_equal_to_the_threshold_is_neither_above_nor_below_it(write_when):
    """``high`` writes when the frontier share is above the threshold, ``low`` when it is below: at it, READ."""
    attention = torch.tensor([0.5, 0.25, 0.25])  # raw mass on the frontier unit: 0.25
    head = AttentionHead(threshold=0.25, write_when=write_when)
    assert head.decide(signals(source_attention=attention), None, {}) is READ
    step = signals(source_attention=attention)
    assert AttentionHead(threshold=0.2, write_when="high").decide(step, None, {}) is WRITE
    assert AttentionHead(threshold=0.3, write_when="low").decide(step, None, {}) is WRITE


def test_the_oracle_compares_with_the_full_views_next_word_after_the_written_prefix(model):
    """After every word written the oracle's target is the offline decode's next word (the full-source session
    is advanced by the new words only), so it never waits for the end of the source on a stale target."""
    offline = StreamingSession(model, max_target_tokens=40)
    source = WORDS[1:]  # the tiny model's oracle writes three words before this source ends
    offline.push_words(source)
    offline.finish_source()
    reference = greedy_words(offline)
    head = OracleHead()
    session, memory = StreamingSession(model, max_target_tokens=40), {"full_source": source}
    for word in source[:-1]:
        session.push_words([word])
        while decide(head, session, memory) is WRITE:
            session.write_word()
        assert memory["oracle_target"] == reference[len(session.words) : len(session.words) + 1]
    assert len(session.words) >= 2  # a target after a prefix of two words or more was checked


def test_a_probe_threshold_of_one_is_taken_with_a_lag_ceiling_which_then_sets_the_schedule():
    """As entropy's threshold 0: the probe alone would never write, but with ``max_lag`` the ceiling writes, so
    ``--head probe --threshold 1 --head-param max_lag=3`` is a wait-3 schedule, not an error."""
    head = make_head("probe", threshold=1.0, min_lag=3, max_lag=3)
    for units in range(1, 8):
        for n_words in range(8):
            state = signals(units_read=units, n_words=n_words)
            assert decide(head, FakeSession(state), {}) is WaitKHead(k=3).decide(state, None, {})


def test_the_attention_heads_layers_reach_the_session_as_lm_layer_indices(model):
    """``layers`` names the LM's layers: on this 2-layer LM "last" and "upper" are layer 1, "all" is both."""
    for layers, expected in [("last", [1]), ("upper", [1]), ("all", [0, 1]), ("-1", [1]), ("0", [0])]:
        assert AttentionHead(layers=layers).session_options(model) == {"attention_layers": expected}


def test_a_head_parameter_may_be_spelt_with_a_hyphen():
    """``--head-param min-lag=2`` is ``min_lag=2``, as command-line flags are spelt."""
    assert parse_head_params(["min-lag=2 max-lag=4"]) == {"min_lag": "2", "max_lag": "4"}
    assert make_head("entropy", **parse_head_params(["min-lag=2"])).min_lag == 2


@pytest.mark.parametrize("cap", [4, 8])
def test_under_a_token_cap_the_oracle_compares_with_the_full_view_cut_at_the_same_cap(model, cap):
    """``max_target_tokens`` cuts the last word ("Kaf" of "Kaffee"): the oracle's full-source session has the same
    cap, so that cut word matches and is written when the full view's is, not only once the source has ended."""
    offline = StreamingSession(model, max_target_tokens=cap)
    offline.push_words(WORDS)
    offline.finish_source()
    reference = greedy_words(offline)
    session, memory, delays = StreamingSession(model, max_target_tokens=cap), {"full_source": WORDS}, []
    for i, word in enumerate(WORDS):
        session.push_words([word])
        if i == len(WORDS) - 1:
            session.finish_source()
        while decide(OracleHead(), session, memory) is WRITE and session.write_word() is not None:
            delays.append(session.units_read)
    assert session.words == reference and session.finished
    assert delays[-1] < len(WORDS)  # the tiny model's oracle writes the cut word before the last source word
