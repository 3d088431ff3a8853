"""The offline corpus builder: manifests, resumability, a superset for bigger N, and the real Piper voice."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import soundfile as sf
from fixtures_corpus import fake_synthesizer, tone, write_ding

from speech_frontend.audio import SAMPLE_RATE
from training.corpus.errors import CorpusError
from training.corpus.manifest import SPLITS, read_manifest
from training.corpus.offline import AUDIO_DIR, build_offline_corpus
from training.corpus.splits import SplitShares

SHARES = SplitShares(dev=0.2, test=0.3)  # a fixture of 60 sentences needs big shares to fill every split


def _ding(tmp_path, n: int = 60):
    lines = [f"Satz Nummer {i}. :: This is sentence number {i}." for i in range(n)]
    return write_ding(tmp_path / "de-en", lines)


def _all_rows(out):
    return {r.id: r for s in SPLITS for r in read_manifest(out / f"{s}.tsv")}


def test_build_writes_16k_audio_and_manifests(tmp_path):
    out, calls = tmp_path / "corpus", []
    report = build_offline_corpus(out, ding=_ding(tmp_path), voice="espeak", shares=SHARES,
                                  synthesize=fake_synthesizer(calls), progress=False)
    rows = _all_rows(out)
    assert report.made == len(calls) == len(rows) == 60 and report.reused == 0
    assert all(report.counts[s] > 0 for s in SPLITS) and sum(report.counts.values()) == 60
    row = next(iter(rows.values()))
    info = sf.info(row.audio)
    assert info.samplerate == SAMPLE_RATE and info.channels == 1 and info.format == "FLAC"
    assert info.frames == row.n_frames and row.speaker == "espeak-en-us"
    assert row.src_text.startswith("This is sentence") and row.tgt_text.startswith("Satz Nummer")
    assert (out / "train.tsv").read_text().splitlines()[1].split("\t")[1].startswith(f"{AUDIO_DIR}/")


def test_build_is_resumable_and_a_bigger_n_is_a_superset(tmp_path):
    out, ding = tmp_path / "corpus", _ding(tmp_path)
    first: list[str] = []
    build_offline_corpus(out, ding=ding, max_utterances=20, shares=SHARES, audio_format="wav",
                         synthesize=fake_synthesizer(first), progress=False)
    small = _all_rows(out)
    assert len(small) == len(first) == 20

    # an interrupted run: one file lost, one half-written temp file left behind
    lost = next(iter(small.values()))
    (out / AUDIO_DIR / "ding-000000000000.wav.part").write_bytes(b"junk")
    os.unlink(lost.audio)
    again: list[str] = []
    report = build_offline_corpus(out, ding=ding, max_utterances=20, shares=SHARES, audio_format="wav",
                                  synthesize=fake_synthesizer(again), progress=False)
    assert again == [lost.src_text] and report.reused == 19 and report.made == 1
    assert not list((out / AUDIO_DIR).glob("*.part"))

    more: list[str] = []
    build_offline_corpus(out, ding=ding, max_utterances=35, shares=SHARES, audio_format="wav",
                         synthesize=fake_synthesizer(more), progress=False)
    big = _all_rows(out)
    assert len(more) == 15 and set(small) < set(big)
    assert all(big[i].audio == small[i].audio for i in small)


def test_corpus_json_records_the_selection_of_the_last_run(tmp_path):
    import json

    out, ding = tmp_path / "corpus", _ding(tmp_path, 20)
    build_offline_corpus(out, ding=ding, text_only=True, max_utterances=12, split_caps={"train": 5}, progress=False)
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["max_utterances"] == 12 and meta["split_caps"] == {"train": 5}
    build_offline_corpus(out, ding=ding, text_only=True, progress=False)  # uncapped: every sentence
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["max_utterances"] is None and meta["split_caps"] == {}


def test_a_half_written_corpus_json_is_named_not_a_traceback(tmp_path):
    out, ding = tmp_path / "corpus", _ding(tmp_path, 20)
    build_offline_corpus(out, ding=ding, text_only=True, progress=False)
    assert not list(out.glob("*.tmp"))  # written whole, by a rename
    (out / "corpus.json").write_text('{"text_only": tr', encoding="utf-8")  # as a kill mid-write would have left it
    with pytest.raises(CorpusError, match=r"corpus\.json: unreadable \(.*\); remove it to build this folder again"):
        build_offline_corpus(out, ding=ding, text_only=True, progress=False)


def test_failed_synthesis_is_reported_not_dropped_silently(tmp_path, caplog):
    def flaky(text):
        if "number 7." in text:
            raise RuntimeError("voice crashed")
        return fake_synthesizer()(text)

    out = tmp_path / "corpus"
    report = build_offline_corpus(out, ding=_ding(tmp_path, 10), synthesize=flaky, progress=False)
    assert len(report.failed) == 1 and sum(report.counts.values()) == 9
    assert "voice crashed" in caplog.text and "This is sentence number 7." in caplog.text


def test_resuming_with_another_voice_is_refused(tmp_path):
    out, ding = tmp_path / "corpus", _ding(tmp_path, 5)
    build_offline_corpus(out, ding=ding, voice="espeak", synthesize=fake_synthesizer(), progress=False)
    with pytest.raises(CorpusError, match="built with voice 'espeak'"):
        build_offline_corpus(out, ding=ding, voice="piper", synthesize=fake_synthesizer(), progress=False)


def test_a_speech_build_and_a_text_only_build_never_replace_each_other(tmp_path):
    ding = _ding(tmp_path, 5)
    speech, text = tmp_path / "speech", tmp_path / "text"
    build_offline_corpus(speech, ding=ding, synthesize=fake_synthesizer(), progress=False)
    before = {s: (speech / f"{s}.tsv").read_bytes() for s in SPLITS}
    with pytest.raises(CorpusError, match="holds a speech corpus .*, not a text-only corpus; drop --text-only"):
        build_offline_corpus(speech, ding=ding, max_utterances=2, text_only=True, progress=False)
    assert {s: (speech / f"{s}.tsv").read_bytes() for s in SPLITS} == before

    build_offline_corpus(text, ding=ding, text_only=True, progress=False)
    build_offline_corpus(text, ding=ding, text_only=True, progress=False)  # a rerun of the same kind is fine
    with pytest.raises(CorpusError, match="holds a text-only corpus, not a speech corpus .*; pass --text-only"):
        build_offline_corpus(text, ding=ding, synthesize=fake_synthesizer(), progress=False)
    (text / "corpus.json").unlink()  # a text-only corpus built before corpus.json was written for one
    with pytest.raises(CorpusError, match="holds manifests but no corpus.json"):
        build_offline_corpus(text, ding=ding, synthesize=fake_synthesizer(), progress=False)
    assert not (text / AUDIO_DIR).exists() and all(r.is_text for r in _all_rows(text).values())


def test_text_only_build(tmp_path):
    out = tmp_path / "text"
    report = build_offline_corpus(out, ding=_ding(tmp_path), shares=SHARES, text_only=True, progress=False)
    rows = _all_rows(out)
    assert len(rows) == 60 and report.made == 0 and all(r.is_text for r in rows.values())
    assert not (out / AUDIO_DIR).exists()


@pytest.mark.real
def test_real_piper_voice(tmp_path):
    pytest.importorskip("piper", reason="piper-tts is not installed")
    from training.corpus.sources import AssetMissing, piper_voice_files

    try:
        piper_voice_files()
    except AssetMissing as e:
        pytest.skip(str(e))
    lines = ["Ich musste lachen. :: I couldn't help laughing.", "Karl wartete in der Nähe. :: Karl waited nearby."]
    out = tmp_path / "corpus"
    report = build_offline_corpus(out, ding=write_ding(tmp_path / "de-en", lines), voice="piper", progress=False)
    rows = _all_rows(out)
    assert report.made == 2 and len(rows) == 2
    for row in rows.values():
        assert row.speaker == "piper-joe" and 0.7 < row.duration_s < 4.0
        assert sf.info(row.audio).samplerate == SAMPLE_RATE


def test_relative_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_offline_corpus("data/offline", ding=_ding(tmp_path, 5), synthesize=fake_synthesizer(), progress=False)
    for row in _all_rows(tmp_path / "data" / "offline").values():
        assert sf.info(row.audio).frames == row.n_frames


def test_a_missing_voice_stops_before_any_worker_starts(tmp_path, monkeypatch):
    from training.corpus import synth

    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    with pytest.raises(synth.SynthesisError, match="apt-get install espeak-ng"):
        build_offline_corpus(tmp_path / "c", ding=_ding(tmp_path, 5), voice="espeak", workers=2, progress=False)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_worker_pool_with_espeak(tmp_path):
    out = tmp_path / "corpus"
    report = build_offline_corpus(out, ding=_ding(tmp_path, 6), voice="espeak", workers=2, progress=False)
    rows = _all_rows(out)
    assert report.made == 6 and len(rows) == 6 and not report.failed
    assert all(r.speaker == "espeak-en-us" and 0.5 < r.duration_s < 5 for r in rows.values())


def test_split_caps_take_the_first_n_of_each_split_and_grow_as_supersets(tmp_path):
    ding = _ding(tmp_path)
    full = build_offline_corpus(tmp_path / "all", ding=ding, shares=SHARES, text_only=True, progress=False)
    assert full.counts["train"] > 3 and full.counts["test"] > 3
    small = build_offline_corpus(
        tmp_path / "s", ding=ding, shares=SHARES, text_only=True, progress=False, split_caps={"train": 3}
    )
    assert small.counts == {**full.counts, "train": 3}
    build_offline_corpus(
        tmp_path / "b", ding=ding, shares=SHARES, text_only=True, progress=False, split_caps={"train": 5}
    )
    small_ids = {r.id for r in read_manifest(tmp_path / "s" / "train.tsv")}
    bigger_ids = {r.id for r in read_manifest(tmp_path / "b" / "train.tsv")}
    assert len(bigger_ids) == 5 and small_ids < bigger_ids
    with pytest.raises(ValueError, match="split cap"):
        build_offline_corpus(tmp_path / "x", ding=ding, text_only=True, progress=False, split_caps={"tset": 1})


def test_a_rerun_makes_again_an_audio_file_whose_header_cannot_be_read(tmp_path, caplog):
    out, ding = tmp_path / "corpus", _ding(tmp_path, 10)
    build_offline_corpus(out, ding=ding, synthesize=fake_synthesizer(), progress=False)
    empty, junk = sorted((out / AUDIO_DIR).glob("*.flac"))[:2]
    empty.write_bytes(b"")  # what a crash between rename and flush can leave
    junk.write_bytes(b"not audio")
    again: list[str] = []
    report = build_offline_corpus(out, ding=ding, synthesize=fake_synthesizer(again), progress=False)
    assert report.made == len(again) == 2 and report.reused == 8 and sum(report.counts.values()) == 10
    assert sf.info(str(empty)).frames > 0 and sf.info(str(junk)).frames > 0
    assert "empty file (0 bytes); removing it and synthesising it again" in caplog.text


def test_each_audio_file_is_16_bit_16k_and_as_long_as_the_voice_said_and_the_report_sums_the_hours(tmp_path):
    """The fake voice speaks 20 ms a character at 22,050 Hz: each file, resampled, keeps that duration."""
    out = tmp_path / "corpus"
    report = build_offline_corpus(out, ding=_ding(tmp_path, 6), synthesize=fake_synthesizer(), progress=False)
    rows = _all_rows(out).values()
    for row in rows:
        assert abs(row.duration_s - 0.02 * len(row.src_text)) < 0.001
        assert sf.info(row.audio).subtype == "PCM_16"
    assert abs(report.audio_hours * 3600 - sum(r.duration_s for r in rows)) < 1e-6


def test_negative_caps_are_refused_not_taken_as_counting_from_the_end(tmp_path):
    ding = _ding(tmp_path, 10)
    with pytest.raises(ValueError, match="max_utterances -3 is negative"):
        build_offline_corpus(tmp_path / "a", ding=ding, max_utterances=-3, text_only=True, progress=False)
    with pytest.raises(ValueError, match="split cap test=-1"):
        build_offline_corpus(tmp_path / "b", ding=ding, split_caps={"test": -1}, text_only=True, progress=False)


def test_an_unreadable_file_whose_synthesis_fails_again_is_reported_as_failed_not_a_traceback(tmp_path):
    out, ding = tmp_path / "corpus", _ding(tmp_path, 5)
    build_offline_corpus(out, ding=ding, synthesize=fake_synthesizer(), progress=False)
    broken = sorted((out / AUDIO_DIR).glob("*.flac"))[0]
    broken.write_bytes(b"not audio")

    def crashing(text):
        raise RuntimeError("voice crashed")

    report = build_offline_corpus(out, ding=ding, synthesize=crashing, progress=False)
    assert report.failed == [broken.stem] and report.made == 0 and report.reused == 4
    assert sum(report.counts.values()) == 4 and not broken.exists()


def test_a_file_with_a_header_but_no_samples_is_made_again(tmp_path):
    out, ding = tmp_path / "corpus", _ding(tmp_path, 5)
    build_offline_corpus(out, ding=ding, audio_format="wav", synthesize=fake_synthesizer(), progress=False)
    hollow = sorted((out / AUDIO_DIR).glob("*.wav"))[0]
    sf.write(hollow, tone(0.0), SAMPLE_RATE, subtype="PCM_16")  # a valid WAV header, 0 samples
    again: list[str] = []
    report = build_offline_corpus(out, ding=ding, audio_format="wav", synthesize=fake_synthesizer(again),
                                  progress=False)
    assert report.made == len(again) == 1 and sum(report.counts.values()) == 5
    assert sf.info(hollow).frames > 0


def test_a_voice_that_returns_no_samples_is_a_reported_failure(tmp_path):
    def silent(text):
        if "number 2." in text:
            return np.zeros(0, dtype=np.float32), 22050
        return fake_synthesizer()(text)

    report = build_offline_corpus(tmp_path / "c", ding=_ding(tmp_path, 5), synthesize=silent, progress=False)
    assert len(report.failed) == 1 and report.made == 4 and sum(report.counts.values()) == 4


def test_an_audio_file_that_is_not_16k_mono_is_refused_naming_it(tmp_path):
    out, ding = tmp_path / "corpus", _ding(tmp_path, 5)
    build_offline_corpus(out, ding=ding, synthesize=fake_synthesizer(), progress=False)
    foreign = sorted((out / AUDIO_DIR).glob("*.flac"))[0]
    sf.write(foreign, tone(0.5, 22050), 22050, format="FLAC")  # put there by another tool
    with pytest.raises(CorpusError, match=rf"{foreign.name}: 22050 Hz, 1 channels; expected 16 kHz mono"):
        build_offline_corpus(out, ding=ding, synthesize=fake_synthesizer(), progress=False)


def test_resuming_with_another_audio_format_is_refused(tmp_path):
    out, ding = tmp_path / "corpus", _ding(tmp_path, 5)
    build_offline_corpus(out, ding=ding, synthesize=fake_synthesizer(), progress=False)
    with pytest.raises(CorpusError, match="built with format 'flac', not 'wav'; pass --format flac"):
        build_offline_corpus(out, ding=ding, audio_format="wav", synthesize=fake_synthesizer(), progress=False)
    assert not list((out / AUDIO_DIR).glob("*.wav"))


def test_a_text_only_corpus_made_before_corpus_json_can_be_rebuilt_text_only(tmp_path):
    out, ding = tmp_path / "text", _ding(tmp_path, 5)
    build_offline_corpus(out, ding=ding, text_only=True, progress=False)
    (out / "corpus.json").unlink()  # as a build before corpus.json existed left it
    report = build_offline_corpus(out, ding=ding, text_only=True, progress=False)
    assert sum(report.counts.values()) == 5 and (out / "corpus.json").is_file()
