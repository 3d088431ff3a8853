"""MuST-C, CoVoST 2 and user TSV readers on fixtures in their exact layouts, and every bad input."""

from __future__ import annotations

import pytest
import soundfile as sf
from fixtures_corpus import COVOST_HEADER, MUSTC_SEGMENTS, corrupt_mp3, tone, write_covost, write_mustc

from speech_frontend.audio import load_audio_spec
from training.corpus.__main__ import main
from training.corpus.covost import read_covost
from training.corpus.errors import BadInput, CorpusError
from training.corpus.manifest import read_manifest
from training.corpus.mustc import read_mustc
from training.corpus.user_tsv import read_user_tsv

# --- MuST-C ------------------------------------------------------------------------------------------------


def test_mustc_slices_in_the_wavs_own_samples(tmp_path):
    write_mustc(tmp_path)
    rows = read_mustc(tmp_path, "dev")
    assert [r.id for r in rows] == ["ted_1_0", "ted_1_1", "ted_2_0", "ted_2_1"]
    assert rows[0].audio.endswith("ted_1.wav:4000:16000") and rows[0].n_frames == 16000
    assert rows[3].audio.endswith("ted_2.wav:33075:44100")  # 44.1 kHz talk: its own samples
    assert rows[3].n_frames == 16000 and rows[3].speaker == "spk.2"
    assert (rows[1].src_text, rows[1].tgt_text) == MUSTC_SEGMENTS[1][4:]
    for row in rows:
        assert len(load_audio_spec(row.audio)) == row.n_frames


def test_mustc_cli_writes_a_manifest_per_split(tmp_path, capsys):
    write_mustc(tmp_path / "mustc", "dev")
    write_mustc(tmp_path / "mustc", "tst-COMMON")
    assert main(["mustc", str(tmp_path / "mustc"), "--out", str(tmp_path / "out"), "--splits", "dev",
                 "tst-COMMON"]) == 0
    assert len(read_manifest(tmp_path / "out" / "tst-COMMON.tsv")) == 4
    assert "no bad entries" in capsys.readouterr().out


def _mustc_txt(tmp_path):
    return write_mustc(tmp_path) / "txt"


def test_mustc_missing_wav(tmp_path):
    data = write_mustc(tmp_path)
    (data / "wav" / "ted_2.wav").unlink()
    with pytest.raises(CorpusError, match=r"dev\.yaml:3: segment 3: .*ted_2\.wav: no such file"):
        read_mustc(tmp_path, "dev")
    bad = BadInput(skip_bad=True)
    assert [r.id for r in read_mustc(tmp_path, "dev", bad=bad)] == ["ted_1_0", "ted_1_1"]
    assert len(bad.skipped) == 2 and bad.summary().startswith("skipped 2 bad entries")


def test_mustc_yaml_with_fewer_segments_than_text_lines(tmp_path):
    txt = _mustc_txt(tmp_path)
    yaml = txt / "dev.yaml"
    yaml.write_text("".join(yaml.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(CorpusError, match=r"dev\.yaml: dev\.yaml has 3 segments but dev\.en has 4 lines and dev\.de"):
        read_mustc(tmp_path, "dev", bad=BadInput(skip_bad=True))  # misaligned files are never skipped


def test_mustc_a_short_text_file_is_named_with_both_line_counts(tmp_path):
    txt = _mustc_txt(tmp_path)
    (txt / "dev.de").write_text("Vielen Dank.\nEs ist mir eine große Ehre.\nHallo.\n", encoding="utf-8")
    with pytest.raises(CorpusError) as caught:
        read_mustc(tmp_path, "dev")
    assert caught.value.path.endswith("dev.de") and caught.value.line is None
    assert caught.value.message.startswith("dev.de has 3 lines but dev.yaml has 4 segments and dev.en has 4 lines;")


def test_mustc_unknown_split_lists_the_splits_of_the_release(tmp_path):
    for split in ("train", "dev", "tst-COMMON", "tst-HE"):
        (tmp_path / "en-de" / "data" / split).mkdir(parents=True)
    with pytest.raises(CorpusError, match=r"no split 'test' here; it has train, dev, tst-COMMON, tst-HE"):
        read_mustc(tmp_path, "test")


@pytest.mark.parametrize("lang_pair", ["en-de", "en_de"])
def test_mustc_cli_takes_the_lang_pair_in_either_spelling(tmp_path, lang_pair):
    write_mustc(tmp_path / "m")
    argv = ["mustc", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--splits", "dev", "--lang-pair", lang_pair]
    assert main(argv) == 0
    assert len(read_manifest(tmp_path / "o" / "dev.tsv")) == 4


@pytest.mark.parametrize("command", ["mustc", "covost"])
def test_a_lang_pair_without_two_languages_is_refused_in_one_line(tmp_path, capsys, command):
    argv = ["mustc", str(tmp_path)] if command == "mustc" else ["covost", "--tsv-dir", ".", "--clips", "."]
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--out", str(tmp_path / "o"), "--lang-pair", "ende"])
    assert caught.value.code == 2
    assert "argument --lang-pair: 'ende': expected a source and a target language, e.g. en-de or en_de" in (
        capsys.readouterr().err.splitlines()[-1]
    )


def test_mustc_offset_beyond_the_end_of_the_wav(tmp_path):
    txt = _mustc_txt(tmp_path)
    yaml = txt / "dev.yaml"
    yaml.write_text(yaml.read_text().replace("offset: 1.5,", "offset: 3.5,"))
    with pytest.raises(CorpusError, match=r"dev\.yaml:2: offset 3\.5 s is beyond the end of ted_1\.wav"):
        read_mustc(tmp_path, "dev")
    yaml.write_text(yaml.read_text().replace("offset: 3.5,", "offset: 2.5,"))  # 2.5 + 1.25 > 3 s
    with pytest.raises(CorpusError, match=r"dev\.yaml:2: segment 2\.5\+1\.25 s ends after the end"):
        read_mustc(tmp_path, "dev")


def test_mustc_empty_text(tmp_path):
    txt = _mustc_txt(tmp_path)
    (txt / "dev.de").write_text("Vielen Dank.\n \nHallo.\nGuten Morgen.\n")
    with pytest.raises(CorpusError, match=r"dev\.de:2: empty translation"):
        read_mustc(tmp_path, "dev")
    bad = BadInput(skip_bad=True)
    assert [r.id for r in read_mustc(tmp_path, "dev", bad=bad)] == ["ted_1_0", "ted_2_0", "ted_2_1"]


def test_mustc_text_not_utf8(tmp_path):
    txt = _mustc_txt(tmp_path)
    (txt / "dev.de").write_bytes("Vielen Dank.\nEs ist mir eine große Ehre.\n".encode("latin-1") + b"Hallo.\nGuten.\n")
    with pytest.raises(CorpusError, match=r"dev\.de:2: not UTF-8"):
        read_mustc(tmp_path, "dev")


def test_mustc_text_files_with_a_byte_order_mark(tmp_path):
    """A BOM (a text file saved by a Windows editor) is not part of the first transcript or translation."""
    data = write_mustc(tmp_path)
    for lang in ("en", "de"):
        path = data / "txt" / f"dev.{lang}"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    rows = read_mustc(tmp_path, "dev")
    assert (rows[0].src_text, rows[0].tgt_text) == (MUSTC_SEGMENTS[0][4], MUSTC_SEGMENTS[0][5])


def test_mustc_pairs_the_nth_yaml_segment_with_the_nth_text_lines_in_the_files_order(tmp_path):
    """The yaml keeps the release's order (talks are not sorted by name): line n of dev.en and dev.de belongs to
    the n-th segment, and the rows come out in that order."""
    write_mustc(tmp_path, segments=MUSTC_SEGMENTS[2:] + MUSTC_SEGMENTS[:2])  # ted_2's segments before ted_1's
    rows = read_mustc(tmp_path, "dev")
    assert [(r.id, r.src_text, r.tgt_text) for r in rows] == [
        ("ted_2_0", "Hello.", "Hallo."),
        ("ted_2_1", "Good morning.", "Guten Morgen."),
        ("ted_1_0", "Thank you so much.", "Vielen Dank."),
        ("ted_1_1", "It is a great honour.", "Es ist mir eine große Ehre."),
    ]
    assert rows[2].audio.endswith("ted_1.wav:4000:16000") and rows[0].audio.endswith("ted_2.wav:0:22050")


def test_mustc_ids_count_every_segment_of_its_talk_a_skipped_one_included(tmp_path):
    """fairseq's <talk>_<n> numbers a talk's segments as the yaml lists them: skipping a bad segment must not
    renumber the others (their ids would then name other segments' references)."""
    data = write_mustc(tmp_path)
    (data / "txt" / "dev.en").write_text("\nIt is a great honour.\nHello.\nGood morning.\n", encoding="utf-8")
    rows = read_mustc(tmp_path, "dev", bad=BadInput(skip_bad=True))
    assert [r.id for r in rows] == ["ted_1_1", "ted_2_0", "ted_2_1"]
    assert rows[0].src_text == "It is a great honour." and rows[0].audio.endswith("ted_1.wav:24000:20000")


def test_mustc_cuts_a_segment_a_few_ms_past_its_talk_and_refuses_more(tmp_path):
    """MuST-C's yaml times are rounded: a segment up to 0.1 s past its talk's end is cut at the end, in the wav's
    own samples (ted_2 is 2 s at 44.1 kHz); more is a bad segment."""
    extra = ("ted_2", 1.5, 0.55, "spk.2", "The end.", "Das Ende.")  # 0.05 s past the end
    write_mustc(tmp_path, segments=MUSTC_SEGMENTS + [extra])
    last = read_mustc(tmp_path, "dev")[-1]
    assert last.id == "ted_2_2" and last.audio.endswith("ted_2.wav:66150:22050") and last.n_frames == 8000
    assert len(load_audio_spec(last.audio)) == last.n_frames
    write_mustc(tmp_path, segments=MUSTC_SEGMENTS + [(*extra[:2], 0.65, *extra[3:])])  # 0.15 s past the end
    with pytest.raises(CorpusError, match=r"dev\.yaml:5: segment 1\.5\+0\.65 s ends after the end of ted_2\.wav"):
        read_mustc(tmp_path, "dev")


@pytest.mark.parametrize(
    "offset,duration,message",
    [
        (1.9, 0.00002, r"is 1 sample\(s\) at 44100 Hz: no sample at 16 kHz"),  # ted_2 is 44.1 kHz
        ("nan", 0.5, r"offset 'nan' or duration '0.5' is not a number"),
        (0.5, "inf", r"offset '0.5' or duration 'inf' is not a number"),
    ],
)
def test_mustc_segments_that_give_no_audio_are_bad_entries_not_tracebacks(tmp_path, capsys, offset, duration,
                                                                           message):
    """They used to stop `mustc` with write_manifest's ValueError or round()'s Overflow/ValueError, even with
    --skip-bad, and no manifest was written."""
    write_mustc(tmp_path, segments=MUSTC_SEGMENTS + [("ted_2", offset, duration, "spk.2", "Hm.", "Hm.")])
    with pytest.raises(CorpusError, match=r"dev\.yaml:5: .*" + message):
        read_mustc(tmp_path, "dev")
    args = ["mustc", str(tmp_path), "--out", str(tmp_path / "out"), "--splits", "dev"]
    assert main(args) == 2
    assert main([*args, "--skip-bad"]) == 0 and len(read_manifest(tmp_path / "out" / "dev.tsv")) == 4


def test_mustc_wrong_folder(tmp_path):
    with pytest.raises(CorpusError, match="en-de/data/dev"):
        read_mustc(tmp_path, "dev")


def test_mustc_cli_skip_bad_prints_the_count(tmp_path, capsys, caplog):
    data = write_mustc(tmp_path / "m")
    (data / "txt" / "dev.en").write_text("Thank you so much.\n\nHello.\nGood morning.\n")
    out = tmp_path / "out"
    assert main(["mustc", str(tmp_path / "m"), "--out", str(out), "--splits", "dev"]) == 2
    assert "dev.en:2: empty transcript" in caplog.text
    assert main(["mustc", str(tmp_path / "m"), "--out", str(out), "--splits", "dev", "--skip-bad"]) == 0
    assert "skipped 1 bad entry" in capsys.readouterr().out
    assert len(read_manifest(out / "dev.tsv")) == 3


# --- CoVoST 2 ----------------------------------------------------------------------------------------------


def test_covost_decodes_mp3_clips(tmp_path):
    tsv, clips = write_covost(tmp_path)
    rows = read_covost(tsv, clips, progress=False)
    assert [r.id for r in rows] == ["common_voice_en_1", "common_voice_en_2", "common_voice_en_3"]
    assert rows[0].src_text == 'He said "yes".' and rows[0].tgt_text == "Er sagte „ja“."  # quotes kept as is
    assert rows[0].audio.endswith(".mp3") and rows[0].speaker == "client-a"
    for row in rows:
        assert len(load_audio_spec(row.audio)) == row.n_frames


def test_covost_to_flac_converts_once(tmp_path):
    tsv, clips = write_covost(tmp_path)
    flac = tmp_path / "flac"
    rows = read_covost(tsv, clips, to_flac=flac, progress=False)
    assert all(r.audio.endswith(".flac") and sf.info(r.audio).samplerate == 16000 for r in rows)
    for clip in clips.iterdir():
        clip.unlink()  # a second run reuses the FLAC files and needs no MP3
    assert read_covost(tsv, clips, to_flac=flac, progress=False) == rows


def test_covost_cli(tmp_path, capsys):
    write_covost(tmp_path, "dev")
    write_covost(tmp_path, "test")
    assert main(["covost", "--tsv-dir", str(tmp_path), "--clips", str(tmp_path / "cv" / "clips"),
                 "--out", str(tmp_path / "out"), "--splits", "dev", "test"]) == 0
    assert len(read_manifest(tmp_path / "out" / "test.tsv")) == 3
    assert main(["covost", "--tsv-dir", str(tmp_path), "--clips", str(tmp_path / "cv" / "clips"),
                 "--out", str(tmp_path / "dashed"), "--splits", "dev", "--lang-pair", "en-de"]) == 0  # as MuST-C
    assert len(read_manifest(tmp_path / "dashed" / "dev.tsv")) == 3


def test_covost_without_decoding_gives_n_frames_at_16k_from_the_48k_headers(tmp_path):
    """decode=False reads only the clips' headers (48 kHz): n_frames is still the length at 16 kHz."""
    tsv, clips = write_covost(tmp_path)
    rows = read_covost(tsv, clips, decode=False, progress=False)
    assert [r.n_frames for r in rows] == [len(load_audio_spec(r.audio)) for r in rows] == [16000, 20000, 24000]


def test_covost_undoes_the_escapes_get_covost_splits_writes(tmp_path):
    # get_covost_splits.py: pandas to_csv(sep="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
    tsv, clips = write_covost(tmp_path)
    tsv.write_bytes(
        b"path\tsentence\ttranslation\tclient_id\n"
        b'common_voice_en_1.mp3\tHe said \\"hi\\".\tEr sagte \\"hallo\\".\tclient-a\n'
        b"common_voice_en_2.mp3\tA back\\\\slash and a\\\ttab.\tEin Rueck\\\\strich.\tclient-b\n"
        b"common_voice_en_3.mp3\tTwo\\\nlines.\tZwei Zeilen.\tclient-a\n"
    )
    rows = read_covost(tsv, clips, decode=False, progress=False)
    assert [(r.src_text, r.tgt_text) for r in rows] == [
        ('He said "hi".', 'Er sagte "hallo".'),
        ("A back\\slash and a tab.", "Ein Rueck\\strich."),  # the escaped tab is text (cleaned to a space)
        ("Two lines.", "Zwei Zeilen."),  # an escaped newline continues the record
    ]
    assert rows[2].id == "common_voice_en_3" and rows[2].speaker == "client-a"


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", r"\.tsv:3: clip .*common_voice_en_2\.mp3: no such file"),
        ("undecodable", r"\.tsv:3: clip .*common_voice_en_2\.mp3: cannot be decoded as audio"),
        ("empty", r"\.tsv:3: empty translation"),
        ("latin1", r"\.tsv:3: not UTF-8"),
        ("fields", r"\.tsv:3: 3 tab-separated fields, the header has 4"),
        ("duplicate", r"\.tsv:3: clip common_voice_en_1\.mp3 is also on line 2"),
    ],
)
def test_covost_bad_lines(tmp_path, caplog, damage, message):
    tsv, clips = write_covost(tmp_path)
    lines = tsv.read_bytes().split(b"\n")
    if damage == "missing":
        (clips / "common_voice_en_2.mp3").unlink()
    elif damage == "undecodable":
        corrupt_mp3(clips / "common_voice_en_2.mp3")
    elif damage == "empty":
        lines[2] = b"common_voice_en_2.mp3\tThe weather is fine.\t \tclient-b"
    elif damage == "latin1":
        lines[2] = "common_voice_en_2.mp3\tThe weather is fine.\tDas Wetter ist schön.\tc".encode("latin-1")
    elif damage == "fields":
        lines[2] = b"common_voice_en_2.mp3\tThe weather is fine.\tDas Wetter ist gut."
    elif damage == "duplicate":  # the CLI used to stop with write_manifest's traceback, even with --skip-bad
        lines[2] = lines[1]
    tsv.write_bytes(b"\n".join(lines))
    with pytest.raises(CorpusError, match=message):
        read_covost(tsv, clips, progress=False)
    bad = BadInput(skip_bad=True)
    rows = read_covost(tsv, clips, bad=bad, progress=False)
    assert [r.id for r in rows] == ["common_voice_en_1", "common_voice_en_3"] and len(bad.skipped) == 1
    assert "skipped" in caplog.text


def test_covost_missing_column(tmp_path):
    tsv, clips = write_covost(tmp_path)
    tsv.write_text(tsv.read_text().replace(COVOST_HEADER, "path\tsentence\ttranslation\tspeaker"))
    with pytest.raises(CorpusError, match=r"\.tsv:1: missing column\(s\) client_id"):
        read_covost(tsv, clips, progress=False)


# --- a user's TSV ------------------------------------------------------------------------------------------


def test_user_tsv_with_named_columns(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.0, 22050), 22050)
    sf.write(tmp_path / "long.flac", tone(3.0), 16000)
    (tmp_path / "mine.tsv").write_text(
        "utt\twav\ten\tde\n"
        "u1\ta.wav\tHello.\tHallo.\n"
        "u2\tlong.flac:16000:8000\tA slice.\tEin Stück.\n", encoding="utf-8")
    rows = read_user_tsv(tmp_path / "mine.tsv", audio_column="wav", src_column="en", tgt_column="de",
                         id_column="utt")
    assert [(r.id, r.n_frames) for r in rows] == [("u1", 16000), ("u2", 8000)]
    assert rows[1].audio == f"{tmp_path / 'long.flac'}:16000:8000"
    text = read_user_tsv(tmp_path / "mine.tsv", audio_column=None, src_column="en", tgt_column="de")
    assert text[0].id == "mine-2" and text[0].is_text


def test_user_tsv_whose_header_starts_with_a_byte_order_mark(tmp_path):
    """A TSV saved by a Windows editor or a spreadsheet starts with a BOM: it is not part of the first column's
    name."""
    (tmp_path / "mine.tsv").write_bytes("\ufeffen\tde\nHello.\tHallo.\n".encode())
    (row,) = read_user_tsv(tmp_path / "mine.tsv", audio_column=None, src_column="en", tgt_column="de")
    assert (row.id, row.src_text, row.tgt_text) == ("mine-2", "Hello.", "Hallo.")


def test_user_tsv_bad_lines(tmp_path):
    (tmp_path / "mine.tsv").write_text("audio\tsrc_text\ttgt_text\nnope.wav\tHi.\tHallo.\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"mine\.tsv:2: .*nope\.wav: no such file"):
        read_user_tsv(tmp_path / "mine.tsv")
    sf.write(tmp_path / "short.wav", tone(0.5), 16000)
    (tmp_path / "mine.tsv").write_text("audio\tsrc_text\ttgt_text\nshort.wav:9000:10\tHi.\tHallo.\n")
    with pytest.raises(CorpusError, match=r"mine\.tsv:2: .*offset 9000 is beyond the end"):
        read_user_tsv(tmp_path / "mine.tsv")


def test_user_tsv_cuts_a_slice_a_few_ms_past_its_talk_as_mustc_does_and_refuses_more(tmp_path):
    """fairseq's MuST-C TSVs hold slices that overrun their talk by rounding; `mustc` cuts them (0.1 s at most)."""
    sf.write(tmp_path / "talk.wav", tone(3.0, 44100), 44100)  # 132300 samples
    (tmp_path / "fs.tsv").write_text("id\taudio\tsrc_text\ttgt_text\n"
                                     "a\ttalk.wav:110250:22138\tThe end.\tDas Ende.\n", encoding="utf-8")  # +88
    (row,) = read_user_tsv(tmp_path / "fs.tsv", id_column="id")
    assert row.audio == f"{tmp_path / 'talk.wav'}:110250:22050" and row.n_frames == 8000
    # the tolerance is 0.1 s in the file's own samples: +3969 (0.09 s at 44.1 kHz, more than 0.1 s at 16 kHz) is cut
    (tmp_path / "fs.tsv").write_text("id\taudio\tsrc_text\ttgt_text\n"
                                     "a\ttalk.wav:110250:26019\tThe end.\tDas Ende.\n", encoding="utf-8")
    (row,) = read_user_tsv(tmp_path / "fs.tsv", id_column="id")
    assert row.audio == f"{tmp_path / 'talk.wav'}:110250:22050" and row.n_frames == 8000
    (tmp_path / "fs.tsv").write_text("id\taudio\tsrc_text\ttgt_text\n"
                                     "a\ttalk.wav:110250:30000\tThe end.\tDas Ende.\n", encoding="utf-8")  # +0.18 s
    with pytest.raises(CorpusError, match=r"fs\.tsv:2: .*slice 110250\+30000 runs past the end"):
        read_user_tsv(tmp_path / "fs.tsv", id_column="id")


def test_user_tsv_default_ids_from_a_file_name_with_spaces(tmp_path):
    """The default id is <tsv name>-<line>; a name with spaces (my corpus.tsv) used to make every row's id
    invalid, so the command refused the first row (and --skip-bad wrote an empty manifest)."""
    (tmp_path / "my corpus.tsv").write_text("src\ttgt\nHi there.\tHallo.\nBye.\tTschüss.\n", encoding="utf-8")
    rows = read_user_tsv(tmp_path / "my corpus.tsv", audio_column=None, src_column="src", tgt_column="tgt")
    assert [r.id for r in rows] == ["my_corpus-2", "my_corpus-3"]
    assert main(["tsv", str(tmp_path / "my corpus.tsv"), "--out", str(tmp_path / "m.tsv"), "--audio-column", "",
                 "--src-column", "src", "--tgt-column", "tgt"]) == 0
    assert len(read_manifest(tmp_path / "m.tsv")) == 2


def test_user_tsv_cli(tmp_path, capsys):
    (tmp_path / "mine.tsv").write_text("src\ttgt\nHi there.\tHallo.\n\t\n", encoding="utf-8")
    args = ["tsv", str(tmp_path / "mine.tsv"), "--out", str(tmp_path / "m.tsv"), "--audio-column", "",
            "--src-column", "src", "--tgt-column", "tgt"]
    assert main(args) == 2
    assert main([*args, "--skip-bad"]) == 0
    assert len(read_manifest(tmp_path / "m.tsv")) == 1
