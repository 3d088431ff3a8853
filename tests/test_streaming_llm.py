"""The invariant of DESIGN.md section 3 and the engine's behaviour, on tiny random models."""

import json

import numpy as np
import pytest
import torch

from streaming_llm import engine
from streaming_llm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from streaming_llm.engine import StreamingSession, ends_sentence
from streaming_llm.layout import Layout, attention_mask
from streaming_llm.tiny import tiny_model

SOURCE_WORDS = "I would like a cup of coffee in the garden .".split()
TARGET_TEXT = "Ich möchte eine Tasse Kaffee im Garten."


def random_phi(n_units: int, n_target: int, gen: torch.Generator) -> torch.Tensor:
    """A monotonic read schedule ending at M (the training sampler has its own tests)."""
    phi = torch.sort(torch.randint(0, n_units + 1, (n_target,), generator=gen)).values
    phi[-1] = n_units
    return phi


def full_forward_logits(model, units, targets, phi) -> torch.Tensor:
    """Logits of the rows that predict y_1..y_L in one masked forward."""
    embeds, positions, layouts = model.assemble([units], [targets])
    with torch.no_grad():
        logits, _ = model(embeds, positions, layouts, [phi])
    return logits[0, layouts[0].predictor_rows()]


def streamed_logits(session: StreamingSession, targets, phi, read_unit) -> torch.Tensor:
    """Follow phi with a session: read until phi(t) units are in, then take the logits and write y_t."""
    steps = []
    for t, y in enumerate(targets):
        while session.units_read < int(phi[t]):
            read_unit(session)
        steps.append(session.next_logits().clone())
        session.force_target([y])
    return torch.stack(steps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_text_logits_equal_masked_full_forward(seed):
    model = tiny_model("text", seed=seed)
    targets = model.target_ids(TARGET_TEXT)
    m = len(SOURCE_WORDS)
    phi = random_phi(m, len(targets), torch.Generator().manual_seed(seed))
    words = iter(SOURCE_WORDS)

    def read_unit(session):
        session.push_words([next(words)])
        if session.units_read == m:
            session.finish_source()

    session = StreamingSession(model)
    streamed = streamed_logits(session, targets, phi, read_unit)
    full = full_forward_logits(model, model.text_units(SOURCE_WORDS), targets, phi)
    torch.testing.assert_close(streamed, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed,block_ms", [(0, 320), (1, 640)])
def test_incremental_speech_logits_equal_masked_full_forward(seed, block_ms):
    model = tiny_model("speech", seed=seed, block_ms=block_ms)
    rng = np.random.default_rng(seed)
    audio = (0.1 * rng.standard_normal(int(16000 * 2.3))).astype(np.float32)  # 2.3 s: last block partial
    n_block = model.block_samples
    m = -(-audio.shape[0] // n_block)
    targets = model.target_ids(TARGET_TEXT)
    phi = random_phi(m, len(targets), torch.Generator().manual_seed(seed))
    state = {"at": 0}

    def read_unit(session):
        if session.units_read == m - 1:  # the last, partial block arrives with the end of the source
            session.push_audio(audio[state["at"] :])
            session.finish_source()
            return
        session.push_audio(audio[state["at"] : state["at"] + n_block])
        state["at"] += n_block

    session = StreamingSession(model)
    streamed = streamed_logits(session, targets, phi, read_unit)
    units = model.speech_units(model.encode_speech(audio))
    assert len(units) == m
    full = full_forward_logits(model, units, targets, phi)
    torch.testing.assert_close(streamed, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("modality", ["text", "speech"])
def test_reencoding_at_the_end_gives_the_full_view_for_the_rest(modality):
    """With ``reencode="end"`` the target written under a prefix is re-read under the whole source when the
    source ends: from there on the logits are those of the full view (phi = M for every row), where without it
    the rows written early keep what they saw."""
    model = tiny_model(modality, seed=3)
    targets = model.target_ids(TARGET_TEXT)
    if modality == "text":
        units = model.text_units(SOURCE_WORDS)
        pieces = [[w] for w in SOURCE_WORDS]
    else:
        audio = (0.1 * np.random.default_rng(3).standard_normal(6 * model.block_samples)).astype(np.float32)
        units = model.speech_units(model.encode_speech(audio))
        pieces = np.split(audio, 6)  # one block each
    m, n_early = len(units), 3
    full_phi = torch.full((len(targets),), m)
    full = full_forward_logits(model, units, targets, full_phi)
    stale_phi = full_phi.clone()
    stale_phi[:n_early] = 1  # the first words written after one unit
    stale = full_forward_logits(model, units, targets, stale_phi)

    def stream(reencode):
        session = StreamingSession(model, reencode=reencode)
        push = session.push_words if modality == "text" else session.push_audio
        push(pieces[0])
        session.force_target(targets[:n_early])
        for piece in pieces[1:]:
            push(piece)
        session.finish_source()
        rest = []
        for y in targets[n_early:]:
            rest.append(session.next_logits().clone())
            session.force_target([y])
        return torch.stack(rest)

    torch.testing.assert_close(stream("end"), full[n_early:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stream("never"), stale[n_early:], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(full[n_early:], stale[n_early:], atol=1e-3)


def test_reencoding_at_the_end_changes_nothing_until_the_source_ends():
    """Before ``finish_source`` a session with ``reencode="end"`` decodes as one with ``"never"``: the words written
    so far keep the view they were written under (reads between the writes re-read nothing)."""
    model = tiny_model("text", seed=4)
    targets = model.target_ids(TARGET_TEXT)
    phi = torch.linspace(1, len(SOURCE_WORDS) - 1, len(targets)).long()  # reads between writes, never the end

    def follow(reencode: str) -> torch.Tensor:
        words = iter(SOURCE_WORDS)
        session = StreamingSession(model, reencode=reencode)
        return streamed_logits(session, targets, phi, lambda s: s.push_words([next(words)]))

    torch.testing.assert_close(follow("end"), follow("never"), atol=1e-6, rtol=0)
    assert not torch.allclose(follow("read"), follow("never"), atol=1e-3)


def test_reencoding_at_every_read_lets_every_written_row_see_what_is_read():
    """With ``reencode="read"`` the logits for y_t, read to phi(t), are the masked forward's where every row sees
    phi(t) units: the words written earlier are re-read under the newer source."""
    model = tiny_model("text", seed=4)
    targets = model.target_ids(TARGET_TEXT)
    m = len(SOURCE_WORDS)
    phi = random_phi(m, len(targets), torch.Generator().manual_seed(4))
    words = iter(SOURCE_WORDS)

    def read_unit(session):
        session.push_words([next(words)])
        if session.units_read == m:
            session.finish_source()

    streamed = streamed_logits(StreamingSession(model, reencode="read"), targets, phi, read_unit)
    units = model.text_units(SOURCE_WORDS)
    for t in range(len(targets)):
        seen = torch.full((len(targets),), int(phi[t]))
        expected = full_forward_logits(model, units, targets, seen)[t]
        torch.testing.assert_close(streamed[t], expected, atol=1e-4, rtol=1e-4)


def test_an_unknown_reencode_mode_is_refused():
    with pytest.raises(ValueError, match="reencode='always'; one of never, end, read"):
        StreamingSession(tiny_model("text"), reencode="always")


def test_speech_units_do_not_depend_on_chunking():
    model = tiny_model("speech")
    audio = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    finals = []
    for chunks in ([audio], np.array_split(audio, 7), np.array_split(audio, 100)):
        session = StreamingSession(model)
        for chunk in chunks:
            session.push_audio(chunk)
        session.finish_source()
        finals.append(session.next_logits())
    torch.testing.assert_close(finals[0], finals[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(finals[0], finals[2], atol=1e-5, rtol=1e-5)


def test_stream_mask_hides_unread_units_and_marker_until_the_end():
    layout = Layout(n_prompt=2, unit_sizes=(2, 1), n_prefix=1, n_target=3, target_offset=10)
    phi = torch.tensor([0, 1, 2])
    mask = attention_mask([layout], [phi], layout.length + 1)[0, 0]
    visible = mask == 0
    rows = layout.predictor_rows()  # rows predicting y_1, y_2, y_3
    units = layout.key_units()
    marker = layout.target_start - 1
    for row, seen in zip(rows.tolist(), phi.tolist(), strict=True):
        assert visible[row, :2].all()  # the prompt
        for key in range(2, marker):
            assert bool(visible[row, key]) == (int(units[key]) <= seen)
        assert bool(visible[row, marker]) == (seen == layout.n_units)
    assert visible[layout.length, layout.length]  # padding row sees itself only
    assert not visible[layout.length, : layout.length].any()
    assert layout.positions()[layout.target_start] == 10


def test_target_positions_do_not_depend_on_source_length():
    model = tiny_model("text")
    short = model.layout([1, 1], 4).positions()
    long = model.layout([1, 1, 2, 3], 4).positions()
    assert torch.equal(short[-5:], long[-5:])


def test_write_word_returns_whole_words_and_stops_at_the_cap():
    model = tiny_model("text")
    session = StreamingSession(model, max_target_tokens=12)
    session.push_words(SOURCE_WORDS)
    session.finish_source()
    words = []
    while (word := session.write_word()) is not None:
        words.append(word)
        assert word and " " not in word
    assert session.finished
    assert len(session.written) <= 13
    assert session.write_word() is None


def test_the_sentence_cannot_end_before_the_source_does():
    model = tiny_model("text")
    session = StreamingSession(model)
    session.push_words(SOURCE_WORDS[:2])
    with torch.no_grad():  # make the end-of-sentence token the greedy choice
        model.llm.lm_head.weight[model.eos_id] += 100.0 * session.signals().hidden
    try:
        session = StreamingSession(model)
        session.push_words(SOURCE_WORDS[:2])
        assert session.signals().ends_sentence
        word = session.write_word()  # the best token other than the end of the sentence
        assert word and not session.finished and model.eos_id not in session.written
    finally:
        model.llm.lm_head.weight.data[model.eos_id] -= 100.0 * session.signals().hidden


@pytest.mark.parametrize(
    ("word", "closes"),
    [("gefällig.", True), ("kommt?\u201c", True), ("Hilfe!", True), ("so...", True), ("(Ende.)", True),
     ("Haus,", False), ("z.B", False), ("3.5", False), (".:", False)],
)
def test_a_word_closes_a_sentence_when_it_ends_in_a_full_stop_question_or_exclamation(word, closes):
    assert ends_sentence(word) is closes


def wait_1(model, hold_end: bool) -> tuple[list[tuple[str, int]], StreamingSession]:
    """Wait-k k=1 over SOURCE_WORDS: (word, units read when it was written) for every word, and the session."""
    session = StreamingSession(model, max_target_tokens=40, hold_end=hold_end)
    written = []
    for i, word in enumerate(SOURCE_WORDS):
        session.push_words([word])
        if i == len(SOURCE_WORDS) - 1:
            session.finish_source()
        while (word := session.write_word()) is not None:
            written.append((word, session.units_read))
            if not session.source_finished:
                break
    return written, session


def test_holding_the_sentence_end_waits_for_the_source_and_otherwise_changes_nothing(monkeypatch):
    model = tiny_model("text", seed=1)
    free, free_session = wait_1(model, hold_end=False)
    monkeypatch.setattr(engine, "ends_sentence", lambda word: False)  # a word that stands is the fork's, taken over
    kept, kept_session = wait_1(model, hold_end=True)
    assert kept == free
    torch.testing.assert_close(kept_session.next_logits(), free_session.next_logits(), rtol=0, atol=0)

    first = free[0][0]  # let the first word close the sentence: it waits until the source has ended
    monkeypatch.setattr(engine, "ends_sentence", lambda word: word == first)
    held, _ = wait_1(model, hold_end=True)
    assert held[0][1] > 1 and all(units == len(SOURCE_WORDS) for word, units in held if word == first)

    monkeypatch.setattr(engine, "ends_sentence", lambda word: True)
    waiting = StreamingSession(model, max_target_tokens=40, hold_end=True)
    waiting.push_words(SOURCE_WORDS[:3])
    before = waiting.next_logits().clone()
    assert waiting.write_word() is None  # held: nothing written, the session exactly as it was
    assert waiting.words == [] and waiting.written == [] and not waiting.finished
    torch.testing.assert_close(waiting.next_logits(), before, rtol=0, atol=0)
    waiting.push_words(SOURCE_WORDS[3:])  # it reads on, and once the source has ended it writes
    waiting.finish_source()
    assert waiting.write_word() is not None


def test_signals_report_entropy_attention_and_units():
    model = tiny_model("text")
    session = StreamingSession(model, attention_layers=[])
    session.push_words(SOURCE_WORDS[:3])
    sig = session.signals()
    assert sig.units_read == 3 and not sig.source_finished
    assert 0 <= sig.entropy <= np.log(model.vocab_size) + 1e-4
    assert sig.source_attention.shape == (3,)
    assert 0 < float(sig.source_attention.sum()) <= 1 + 1e-5
    assert sig.hidden.shape == (model.hidden_size,)


def test_attention_signal_does_not_change_the_logits():
    model = tiny_model("text")
    plain, watched = StreamingSession(model), StreamingSession(model, attention_layers=[1])
    for s in (plain, watched):
        s.push_words(SOURCE_WORDS[:4])
    torch.testing.assert_close(plain.next_logits(), watched.next_logits(), atol=1e-5, rtol=1e-5)


def test_bad_source_is_refused_with_a_clear_error():
    speech = tiny_model("speech")
    session = StreamingSession(speech)
    with pytest.raises(ValueError, match="NaN"):
        session.push_audio(np.array([0.0, np.nan, 0.1], dtype=np.float32))
    with pytest.raises(ValueError, match="no audio"):
        session.finish_source()
    with pytest.raises(ValueError, match="text model|speech model"):
        session.push_words(["hello"])
    too_long = np.zeros(16000 * 31, dtype=np.float32)
    with pytest.raises(ValueError, match="context"):
        StreamingSession(speech).push_audio(too_long)
    text = StreamingSession(tiny_model("text"))
    with pytest.raises(ValueError, match="no source"):
        text.finish_source()


def test_checkpoint_round_trip_keeps_the_logits(tmp_path):
    model = tiny_model("speech", seed=3)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    audio = (0.1 * np.random.default_rng(1).standard_normal(8000)).astype(np.float32)
    logits = []
    for m in (model, loaded):
        session = StreamingSession(m)
        session.push_audio(audio)
        session.finish_source()
        logits.append(session.next_logits())
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)


def test_mismatched_or_foreign_checkpoint_is_refused(tmp_path):
    save_checkpoint(tiny_model("text"), tmp_path / "ckpt")
    config = (tmp_path / "ckpt" / "config.json").read_text()
    (tmp_path / "ckpt" / "config.json").write_text(
        config.replace('"adapter_hidden": 64', '"adapter_hidden": 64,\n"probe_hidden": 8').replace(
            '"probe_hidden": 16,', ""
        )
    )
    with pytest.raises(CheckpointError, match="probe"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match="not a proactive-simulst checkpoint"):
        load_checkpoint(tmp_path / "other")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing")
    from streaming_llm.checkpoint import VERSION

    save_checkpoint(tiny_model("text"), tmp_path / "newer")
    meta_path = tmp_path / "newer" / "checkpoint.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta_path.write_text(json.dumps({**meta, "version": VERSION + 1}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=f"checkpoint version {VERSION + 1} is newer than this toolkit's"):
        load_checkpoint(tmp_path / "newer")


def test_lazy_source_feeding_matches_block_by_block_and_saves_forwards():
    from streaming_llm.batching import forward_one

    model = tiny_model("speech", seed=3)
    audio = np.random.default_rng(3).standard_normal(model.block_samples * 6).astype(np.float32) * 0.1
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return forward_one(*args, **kwargs)

    def follow(flush_each_block: bool) -> tuple[torch.Tensor, int]:
        calls.clear()
        session = StreamingSession(model, lm_call=counting)
        logits = []
        for k in range(6):
            session.push_audio(audio[k * model.block_samples : (k + 1) * model.block_samples])
            if flush_each_block:
                session.flush()
            if k % 3 == 2:  # a word every third block, as a fixed schedule would
                logits.append(session.next_logits().clone())
                session.force_target([int(logits[-1].argmax())])
        session.finish_source()
        logits.append(session.next_logits().clone())
        return torch.stack(logits), len(calls)

    eager, eager_forwards = follow(True)
    lazy, lazy_forwards = follow(False)
    torch.testing.assert_close(lazy, eager, atol=1e-5, rtol=1e-5)
    # feeds, words, end (prompt and prefix come from the model's shared start state)
    assert (eager_forwards, lazy_forwards) == (6 + 2 + 1, 2 + 2 + 1)


def _logits_after(session: StreamingSession, words: list[str]) -> torch.Tensor:
    session.push_words(words)
    return session.next_logits().clone()


def test_later_sessions_start_from_the_shared_state_without_an_lm_forward():
    from streaming_llm.batching import forward_one

    model = tiny_model("text", seed=5)
    first = StreamingSession(model)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return forward_one(*args, **kwargs)

    second = StreamingSession(model, lm_call=counting)
    assert calls == []  # prompt and target prefix came from the shared start state
    assert second.kinds == first.kinds and second.target_group == first.target_group
    words = "the cat sat on the mat".split()
    torch.testing.assert_close(_logits_after(second, words), _logits_after(first, words), atol=0, rtol=0)
    assert calls  # the source went through the session's own lm_call


def test_changed_weights_give_a_new_start_state():
    from streaming_llm import engine

    model = tiny_model("text", seed=6)
    words = "a dog runs".split()
    before = _logits_after(StreamingSession(model), words)
    with torch.no_grad():
        model.llm.get_input_embeddings().weight.add_(0.05)  # in place, as an optimiser step does
    after = _logits_after(StreamingSession(model), words)
    engine._STARTS.pop(model, None)
    fresh = _logits_after(StreamingSession(model), words)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, fresh, atol=0, rtol=0)


@pytest.mark.parametrize("cap", [engine.MAX_WORD_TOKENS, 2 * engine.MAX_WORD_TOKENS])
def test_the_token_cap_holds_when_it_falls_on_a_word_cut(cap):
    """A word cut at MAX_WORD_TOKENS on the very token that reaches max_target_tokens used to leave the session
    unfinished, so the next write_word wrote one token past the cap."""
    model = tiny_model("text")  # tied: one endless word of ':' tokens
    session = StreamingSession(model, max_target_tokens=cap)
    session.push_words(SOURCE_WORDS)
    session.finish_source()
    while session.write_word() is not None:
        pass
    assert session.finished and len(session.written) == cap


def test_attention_by_layer_covers_the_units_pushed_since_the_last_forward():
    """Source is fed lazily: right after a push, attention_by_layer used to return the previous forward's
    attention padded with zeros for the new units (units_read had moved on, the LM output had not)."""
    model = tiny_model("text", seed=5)
    lazy = StreamingSession(model, attention_layers=[0, 1])
    eager = StreamingSession(model, attention_layers=[0, 1])
    for session in (lazy, eager):
        session.push_words(SOURCE_WORDS[:2])
        session.force_target(model.target_ids("Ich")[:-1])
        session.push_words(SOURCE_WORDS[2:5])
    eager.signals()  # reads the LM, feeding the three new words
    torch.testing.assert_close(lazy.attention_by_layer(), eager.attention_by_layer())
    assert lazy.attention_by_layer()[:, 2:].sum() > 0


def test_a_fork_that_writes_with_hold_end_still_refuses_source(monkeypatch):
    """write_word with hold_end takes over its own fork's state; on a fork it used to clear the fork's flag, and
    the fork then took audio into the mel and encoder cache it shares with its parent."""
    monkeypatch.setattr(engine, "ends_sentence", lambda word: False)
    model = tiny_model("speech", seed=1)
    audio = (0.1 * np.random.default_rng(0).standard_normal(3 * model.block_samples)).astype(np.float32)
    session = StreamingSession(model, hold_end=True, max_target_tokens=30)
    session.push_audio(audio[: 2 * model.block_samples])
    ahead = session.fork()
    assert ahead.write_word() is not None
    with pytest.raises(ValueError, match="on a fork"):
        ahead.push_audio(audio[2 * model.block_samples :])
    session.push_audio(audio[2 * model.block_samples :])  # the parent's own write_word keeps it a parent
    assert session.write_word() is not None and not session._forked


def test_push_words_refuses_a_string_which_would_be_read_letter_by_letter():
    session = StreamingSession(tiny_model("text"))
    with pytest.raises(ValueError, match="push_words takes a list of words, not the string 'Hello'"):
        session.push_words("Hello")
    assert session.units_read == 0


def test_a_delta_checkpoint_finds_its_base_model_in_this_machines_asset_cache(tmp_path, monkeypatch):
    """The bench's checkpoints name their base models by absolute paths (/root/.cache/...); another user, or
    another $PROACTIVE_CACHE, holds the same assets elsewhere."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from streaming_llm.checkpoint import build_model
    from streaming_llm.tiny import tiny_config, tiny_tokenizer

    base = tmp_path / "their-cache" / "tiny-llm"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig.from_dict(tiny_config("text").llm_config)).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model = build_model(tiny_config("text").replace(llm_path=str(base)), tiny_tokenizer(), from_paths=True)
    for p in model.llm.parameters():
        p.requires_grad_(False)  # the delta keeps what was trained: not the base LLM
    folder = save_checkpoint(model, tmp_path / "ckpt", delta=True)
    shutil.move(tmp_path / "their-cache", tmp_path / "my-cache")
    monkeypatch.setenv("PROACTIVE_CACHE", str(tmp_path / "my-cache"))
    moved = load_checkpoint(folder)
    assert moved.config.llm_path == str(tmp_path / "my-cache" / "tiny-llm")
    for a, b in zip(model.llm.parameters(), moved.llm.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    monkeypatch.setenv("PROACTIVE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match=r"its base model \(llm_path\) .*their-cache/tiny-llm is not on this"):
        load_checkpoint(folder)


def test_a_base_model_file_is_found_in_this_machines_cache_by_its_asset_folder_and_name(tmp_path, monkeypatch):
    """A Whisper base is a file inside its asset's folder (whisper-tiny.en/model.pt): its file name alone names
    no asset, so it is found in this machine's cache by its last two path parts."""
    from streaming_llm.checkpoint import find_base

    mine = tmp_path / "my-cache" / "whisper-tiny.en" / "model.pt"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"weights")
    monkeypatch.setenv("PROACTIVE_CACHE", str(tmp_path / "my-cache"))
    theirs = str(tmp_path / "their-cache" / "whisper-tiny.en" / "model.pt")
    assert find_base(tmp_path / "ckpt", "whisper_path", theirs) == str(mine)


def test_a_word_that_never_ends_is_cut_at_max_word_tokens():
    """A degenerate model that never starts a new word writes words of exactly MAX_WORD_TOKENS tokens each."""
    model = tiny_model("text")  # tied: one endless word of ':' tokens
    session = StreamingSession(model, max_target_tokens=4 * engine.MAX_WORD_TOKENS)
    session.push_words(SOURCE_WORDS)
    session.finish_source()
    for n_words in (1, 2):
        assert session.write_word() is not None
        assert len(session.written) == n_words * engine.MAX_WORD_TOKENS and not session.finished


def test_attention_by_layer_counts_every_source_entry_and_the_end_marker_on_the_last_unit():
    """The per-unit attention covers all the source's mass: each unit's tokens, and the end-of-source marker on
    unit M (as ``Layout.key_units`` counts it), so nothing the pending row gives the source is dropped."""
    model = tiny_model("text", seed=5)
    session = StreamingSession(model, attention_layers=[0, 1])
    session.push_words(SOURCE_WORDS[:4])
    session.force_target(model.target_ids("Ich")[:-1])
    session.finish_source()
    by_layer = session.attention_by_layer()
    rows = torch.stack([a[0, :, -1].float().mean(0) for a in session._out.attentions])
    source = torch.tensor([kind == engine.SOURCE for kind in session.kinds])
    marker = len(session.kinds) - 1 - session.kinds[::-1].index(engine.SOURCE)  # the last source entry
    assert by_layer.shape == (2, 4)
    torch.testing.assert_close(by_layer.sum(1), rows[:, source].sum(1))
    assert (by_layer[:, -1] >= rows[:, marker]).all()


def test_a_text_source_fills_the_context_to_the_last_token_and_not_one_more():
    """Source tokens up to exactly ``source_capacity`` are taken, counting the words pushed but not yet fed to
    the LM; the push that would pass it is refused whole and the session stays usable."""
    model = tiny_model("text", max_source_embeddings=8)
    session = StreamingSession(model)
    assert session.push_words(["I", "would", "like"]) == 3  # 1 + 3 + 2 tokens, waiting unfed
    assert session.push_words(["a"]) == 1
    assert session.push_words(["of"]) == 1  # the 8th token: the context is full
    with pytest.raises(engine.SourceTooLong, match="8 source tokens"):
        session.push_words(["in"])
    assert session.units_read == 5
    session.finish_source()
    assert session.write_word() is not None and session.n_source_embeddings == 9  # 8 tokens and the marker


def test_signals_count_the_words_written_not_their_tokens():
    """``n_words`` (what wait-k, fixed-chunk and LocalAgreement compare) counts words, however many tokens each."""
    model = tiny_model("text")  # tied: words of MAX_WORD_TOKENS tokens
    session = StreamingSession(model)
    session.push_words(SOURCE_WORDS[:3])
    session.write_word()
    assert len(session.written) > 1 and session.signals().n_words == len(session.words) == 1


def scripted_lm(model, script):
    """An ``lm_call`` whose greedy target tokens are ``script``: entry j (a token, or (best, second best)) is the
    argmax of the row that predicts the j-th written token; rows past the script keep the model's logits."""

    def call(llm, x, positions, mask, cache, attentions=False):
        out = engine.forward_one(llm, x, positions, mask, cache, attentions)
        j = int(positions[0, -1]) - model.target_offset - len(model.prefix_ids) + 1
        if 0 <= j < len(script):
            best, second = script[j] if isinstance(script[j], tuple) else (script[j], None)
            logits = torch.zeros_like(out.logits)
            logits[0, -1, best] = 10.0
            if second is not None:
                logits[0, -1, second] = 5.0
            out.logits = logits
        return out

    return call


SPACE = 222  # the tiny tokenizer's ' ' (a word-start piece); ' Haus' is [308 'ĠH', 337 'au', 84 's']


def test_a_space_then_the_end_of_sentence_is_no_word_the_session_goes_on_or_ends():
    """Whitespace joins the next word, so the end of the sentence right after a lone space does not end a word:
    before the source ends the best other token carries the word on ("Haus"), and once it has ended the
    session ends (write_word None and finished), rather than returning an empty word that leaves it open."""
    model = tiny_model("text")
    script = [SPACE, (model.eos_id, 308), 337, 84, 308]
    open_source = StreamingSession(model, lm_call=scripted_lm(model, script))
    open_source.push_words(SOURCE_WORDS[:2])
    assert open_source.write_word() == "Haus" and open_source.written == [SPACE, 308, 337, 84]
    ended = StreamingSession(model, lm_call=scripted_lm(model, script))
    ended.push_words(SOURCE_WORDS)
    ended.finish_source()
    assert ended.write_word() is None
    assert ended.finished and ended.written == [SPACE, model.eos_id] and ended.words == []


def test_a_source_that_fills_the_capacity_leaves_every_entry_its_own_position():
    """The target group starts one past the last source position and the end-of-source marker: with the source
    full to ``source_capacity``, the marker and the first target-prefix token must not share a position (the
    training layout and the session both lay it out so)."""
    model = tiny_model("text", max_source_embeddings=8)
    words = ["I", "would", "like", "a", "of"]  # 1 + 3 + 2 + 1 + 1 = 8 tokens: the context is full
    cached: list[int] = []  # the position of every entry in the session's cache, in cache order

    def recording(llm, x, positions, mask, cache, attentions=False):
        past = cache.get_seq_length()
        del cached[past:]  # pending rows cropped to be fed again
        cached.extend(range(len(cached), past))  # the shared start state (the prompt), fed before this session
        cached.extend(positions[0].tolist())
        return engine.forward_one(llm, x, positions, mask, cache, attentions)

    session = StreamingSession(model, max_target_tokens=6, lm_call=recording)
    session.push_words(words)
    session.finish_source()
    while session.write_word() is not None:
        pass
    cached.extend(range(len(cached), session.cache.get_seq_length()))
    assert session.n_source_embeddings == 9 and len(cached) == session.cache.get_seq_length()
    assert len(set(cached)) == len(cached), sorted(cached)
    units = [len(model.word_ids(w)) for w in words]
    layout = model.layout(units, len(session.target_group) - len(model.prefix_ids))
    assert len(set(layout.positions().tolist())) == layout.length


def test_a_space_then_a_word_start_token_make_one_word():
    """A whitespace-only token is not a word of its own: the word-start token after it begins the same word."""
    model = tiny_model("text")
    session = StreamingSession(model, lm_call=scripted_lm(model, [SPACE, 308, 337, 84, 308, 337, 84, model.eos_id]))
    session.push_words(SOURCE_WORDS)
    session.finish_source()
    assert session.write_word() == "Haus" and session.written == [SPACE, 308, 337, 84]
    assert session.write_word() == "Haus" and session.write_word() is None
    assert session.finished and session.words == ["Haus", "Haus"]


def test_the_hidden_state_a_probe_sees_is_the_last_layers_of_the_masked_full_forward():
    """``signals().hidden`` (d,): the pending row's last hidden state, as the masked training forward gives it
    (what ``training.probe`` fits the probe on), at every step of a schedule."""
    model = tiny_model("text", seed=1)
    targets = model.target_ids(TARGET_TEXT)
    phi = random_phi(len(SOURCE_WORDS), len(targets), torch.Generator().manual_seed(1))
    session, hidden = StreamingSession(model), []
    for t, y in enumerate(targets):
        while session.units_read < int(phi[t]):
            session.push_words([SOURCE_WORDS[session.units_read]])
            if session.units_read == len(SOURCE_WORDS):
                session.finish_source()
        hidden.append(session.signals().hidden.clone())
        session.force_target([y])
    embeds, positions, layouts = model.assemble([model.text_units(SOURCE_WORDS)], [targets])
    with torch.no_grad():
        _, full = model(embeds, positions, layouts, [phi])
    torch.testing.assert_close(torch.stack(hidden), full[0, layouts[0].predictor_rows()], atol=1e-4, rtol=1e-4)


def test_the_attention_signal_averages_the_chosen_layers_of_attention_by_layer():
    """``source_attention`` (units_read,): the mean over the session's ``attention_layers`` of
    ``attention_by_layer()`` rows (L, units_read): a head's ``layers`` picks which layers count."""
    model = tiny_model("text", seed=5)
    for layers in ([0], [1], [0, 1]):
        session = StreamingSession(model, attention_layers=layers)
        session.push_words(SOURCE_WORDS[:4])
        by_layer = session.attention_by_layer()  # (2, 4)
        assert not torch.allclose(by_layer[0], by_layer[1])  # the layers differ, so the choice shows
        torch.testing.assert_close(session.signals().source_attention, by_layer[layers].mean(0))


def test_attention_per_unit_does_not_depend_on_how_many_units_a_push_brings():
    """Four words pushed at once or one by one: each keeps its own attention mass (a speech segment of several
    blocks likewise), so the attention head's frontier is the newest unit, not all of the push on its first."""
    model = tiny_model("text", seed=5)
    together, apart = StreamingSession(model, attention_layers=[0, 1]), StreamingSession(model, attention_layers=[0, 1])
    together.push_words(SOURCE_WORDS[:4])
    for word in SOURCE_WORDS[:4]:
        apart.push_words([word])
    by_layer = together.attention_by_layer()  # (2, 4)
    torch.testing.assert_close(by_layer, apart.attention_by_layer())
    assert (by_layer > 0).all()


def test_a_speech_session_holds_no_more_than_the_encoders_context_whatever_the_llms_capacity():
    """An LLM source group larger than Whisper's 1500 frames (max_source_embeddings=500, stack 4: 2000 frames):
    the session still takes at most 93 blocks of 320 ms, and refuses more audio before encoding any of it."""
    model = tiny_model("speech", max_source_embeddings=500)
    assert model.config.source_capacity == 500
    assert engine.max_source_samples(model) == 93 * model.block_samples
    session = StreamingSession(model)
    with pytest.raises(engine.SourceTooLong):
        session.push_audio(np.zeros(93 * model.block_samples + 1, dtype=np.float32))
    assert session.units_read == 0 and session.samples_in == 0


def test_blank_source_words_are_no_units():
    """A blank or whitespace word (an empty SimulEval segment, a double space split badly) adds no source unit:
    the session reads and decodes as if it were not there."""
    model = tiny_model("text")
    with_blanks, plain = StreamingSession(model), StreamingSession(model)
    assert with_blanks.push_words(["I", "", " ", "would"]) == 2 and with_blanks.push_words(["\t"]) == 0
    plain.push_words(["I", "would"])
    assert with_blanks.units_read == 2
    torch.testing.assert_close(with_blanks.next_logits(), plain.next_logits(), rtol=0, atol=0)
