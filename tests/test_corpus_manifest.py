"""The manifest format: round trip, relative paths, the n_frames convention, and errors naming file and line."""

from __future__ import annotations

import pytest
import soundfile as sf
from fixtures_corpus import tone

from speech_frontend.audio import load_audio_spec
from training.corpus.audio_files import frames_at_16k, probe_spec, write_audio
from training.corpus.errors import BadInput, CorpusError
from training.corpus.manifest import MANIFEST_COLUMNS, Row, read_manifest, read_numbered_manifest, write_manifest

HEADER = "\t".join(MANIFEST_COLUMNS)


def test_round_trip_with_relative_and_absolute_paths(tmp_path):
    (tmp_path / "audio").mkdir()
    write_audio(tmp_path / "audio" / "a.flac", tone(0.5), "flac")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-other.wav"
    sf.write(elsewhere, tone(1.0, 8000), 8000)
    rows = [
        Row("a", str(tmp_path / "audio" / "a.flac"), 8000, "Hello  there.", "Hallo\tda.", "spk"),
        Row("b", f"{elsewhere}:800:4000", frames_at_16k(4000, 8000), "A slice.", "Ein Stück."),
        Row("c", "", 0, "Text only.", "Nur Text."),
    ]
    manifest = tmp_path / "m.tsv"
    assert write_manifest(manifest, rows) == 3
    lines = manifest.read_text(encoding="utf-8").splitlines()
    assert lines[0] == HEADER
    assert lines[1].split("\t")[1] == "audio/a.flac"  # under the manifest's folder: relative
    assert lines[2].split("\t")[1] == f"{elsewhere}:800:4000"  # elsewhere: absolute
    back = read_manifest(manifest)
    assert back[0].audio == str(tmp_path / "audio" / "a.flac")
    assert back[0].src_text == "Hello there." and back[0].tgt_text == "Hallo da."  # whitespace cleaned
    assert back[2].is_text and back[2].n_frames == 0
    # n_frames is the 16 kHz length of what load_audio_spec returns, slices in the file's own samples
    for row in back[:2]:
        assert len(load_audio_spec(row.audio)) == row.n_frames == probe_spec(row.audio)[1]


@pytest.mark.parametrize("rate", [8000, 22050, 32000, 44100, 48000])
def test_frames_at_16k_matches_the_resampler(tmp_path, rate):
    path = tmp_path / "x.wav"
    sf.write(path, tone(1.0, rate), rate)
    for frames in (3, 5, 101, 4410):
        assert len(load_audio_spec(f"{path}:7:{frames}")) == frames_at_16k(frames, rate)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"id\taudio\tn_frames\tsrc_text\ttgt_text\n", r"m.tsv:1: missing column\(s\) speaker"),
        (f"{HEADER}\nx\t\t0\tHi.\tHallo.\n".encode(), r"m.tsv:2: 5 tab-separated fields, the header has 6"),
        (f"{HEADER}\nx\t\t0\tHi.\tHallo.\t\n".encode() + b"y\t\t0\tGr\xfc\xdfe.\tHallo.\t\n", r"m.tsv:3: not UTF-8"),
        (f"{HEADER}\nx\t\t0\t \tHallo.\t\n".encode(), r"m.tsv:2: empty src_text"),
        (f"{HEADER}\nx\t\t0\tHi.\t\t\n".encode(), r"m.tsv:2: empty tgt_text"),
        (f"{HEADER}\nx\t\tmany\tHi.\tHallo.\t\n".encode(), r"m.tsv:2: n_frames 'many' is not an integer"),
        (f"{HEADER}\nx\ta.wav\t0\tHi.\tHallo.\t\n".encode(), r"m.tsv:2: n_frames is 0 for a row with audio"),
        (f"{HEADER}\nx\ta.wav\t-1\tHi.\tHallo.\t\n".encode(), r"m.tsv:2: n_frames -1 is negative"),
        (f"{HEADER}\nx\t\t16000\tHi.\tHallo.\t\n".encode(), r"m.tsv:2: n_frames 16000 for a text-to-text row"),
        (b"", r"m.tsv:1: empty file"),
    ],
)
def test_errors_name_file_and_line(tmp_path, content, message):
    manifest = tmp_path / "m.tsv"
    manifest.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        read_manifest(manifest)


def test_bad_lines_can_be_collected_or_skipped(tmp_path, caplog):
    manifest = tmp_path / "m.tsv"
    manifest.write_bytes(f"{HEADER}\nx\t\t0\tHi.\tHallo.\t\ny\t\t0\t\tHallo.\t\nz\t\t0\tYo.\tJo.\t\n".encode())
    errors: list[CorpusError] = []
    assert [r.id for r in read_manifest(manifest, on_error=errors.append)] == ["x", "z"]
    assert [e.line for e in errors] == [3]
    bad = BadInput(skip_bad=True)
    assert len(read_manifest(manifest, on_error=bad)) == 2
    assert "skipped 1 bad entry" in bad.summary() and "m.tsv:3: empty src_text" in caplog.text


def test_write_refuses_invalid_rows(tmp_path):
    with pytest.raises(ValueError, match="empty tgt_text"):
        write_manifest(tmp_path / "m.tsv", [Row("x", "", 0, "Hi.", " ")])
    with pytest.raises(ValueError, match="whitespace"):
        write_manifest(tmp_path / "m.tsv", [Row("x y", "", 0, "Hi.", "Hallo.")])


def test_relative_row_audio_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "audio").mkdir(parents=True)
    write_audio(tmp_path / "out" / "audio" / "a.wav", tone(0.5), "wav")
    write_manifest("out/m.tsv", [Row("a", "out/audio/a.wav", 8000, "Hi.", "Hallo.")])
    assert (tmp_path / "out" / "m.tsv").read_text().splitlines()[1].split("\t")[1] == "audio/a.wav"
    assert read_manifest("out/m.tsv")[0].audio == str(tmp_path / "out" / "audio" / "a.wav")


def test_blank_lines_are_skipped_and_line_numbers_stay_the_files(tmp_path):
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"{HEADER}\nu1\t\t0\tA.\tA.\t\n\nu2\t\t0\t\tB.\t\nu3\t\t0\tC.\tC.\t\n\n", encoding="utf-8")
    errors: list[CorpusError] = []
    assert [(n, r.id) for n, r in read_numbered_manifest(manifest, on_error=errors.append)] == [(2, "u1"), (5, "u3")]
    assert [(e.line, e.message) for e in errors] == [(4, "empty src_text")]  # header = line 1, blank line 3


def test_a_repeated_id_is_refused_naming_both_lines(tmp_path):
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"{HEADER}\na\t\t0\tA.\tA.\t\nb\t\t0\tB.\tB.\t\na\t\t0\tC.\tC.\t\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"m\.tsv:4: id a is also on line 2; ids must be unique"):
        read_manifest(manifest)
    bad = BadInput(skip_bad=True)
    assert [r.src_text for r in read_manifest(manifest, on_error=bad)] == ["A.", "B."] and len(bad.skipped) == 1


def test_a_missing_manifest_names_the_command_that_builds_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CorpusError) as caught:
        read_manifest("data/offline_text/train.tsv")
    assert "`python -m training.corpus build --out data/offline_text --text-only`" in str(caught.value)


def test_the_writer_refuses_a_repeated_id_that_the_reader_would_refuse(tmp_path):
    rows = [Row("a", "", 0, "Hello.", "Hallo."), Row("a", "", 0, "Bye.", "Tschüss.")]
    with pytest.raises(ValueError, match="row 'a': that id is already used by another row"):
        write_manifest(tmp_path / "m.tsv", rows)
    assert not (tmp_path / "m.tsv").exists()


def test_columns_are_read_by_name_in_any_order_and_others_ignored(tmp_path):
    """A fairseq S2T TSV has tgt_text before speaker and src_text last, and may hold more columns."""
    write_audio(tmp_path / "a.wav", tone(0.5), "wav")
    manifest = tmp_path / "m.tsv"
    manifest.write_text("id\taudio\tn_frames\ttgt_text\tspeaker\tsrc_text\ttgt_lang\n"
                        "a\ta.wav\t8000\tHallo.\tspk\tHello.\tde\n", encoding="utf-8")
    assert read_manifest(manifest) == [Row("a", str(tmp_path / "a.wav"), 8000, "Hello.", "Hallo.", "spk")]


def test_a_slice_of_a_file_in_a_folder_whose_name_holds_colons(tmp_path):
    """``path:offset:frames`` is split at its last two colons: a folder named after a time keeps its colons."""
    folder = tmp_path / "run 2024-01-01T10:00"
    folder.mkdir()
    write_audio(folder / "talk.wav", tone(1.0), "wav")
    manifest = tmp_path / "m.tsv"
    write_manifest(manifest, [Row("a", f"{folder / 'talk.wav'}:4000:8000", 8000, "Hi.", "Hallo.")])
    stored = manifest.read_text(encoding="utf-8").splitlines()[1].split("\t")[1]
    assert stored == "run 2024-01-01T10:00/talk.wav:4000:8000"  # relative to the manifest, still a slice
    (row,) = read_manifest(manifest)
    assert row.audio == f"{folder / 'talk.wav'}:4000:8000"
    assert len(load_audio_spec(row.audio)) == probe_spec(row.audio)[1] == 8000


def test_a_slice_may_end_at_its_files_last_sample_and_not_one_past_it(tmp_path):
    from speech_frontend.audio import AudioError

    sf.write(tmp_path / "a.wav", tone(0.5), 16000)  # 8000 samples
    assert probe_spec(f"{tmp_path / 'a.wav'}:7000:1000")[1] == 1000
    for spec in (f"{tmp_path / 'a.wav'}:7000:1001", f"{tmp_path / 'a.wav'}:8000:0"):
        with pytest.raises(AudioError, match="past the end|beyond the end"):
            probe_spec(spec)


def test_write_audio_refuses_no_samples_and_leaves_no_file(tmp_path):
    from speech_frontend.audio import AudioError

    with pytest.raises(AudioError, match="refusing to write"):
        write_audio(tmp_path / "x.flac", tone(0.0), "flac")
    assert list(tmp_path.iterdir()) == []
