"""The check and simuleval commands, and build through the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
from fixtures_corpus import DING_LINES, tone, write_ding, write_mustc

from training.corpus.__main__ import main
from training.corpus.check import check_manifest
from training.corpus.manifest import Row, read_manifest, write_manifest
from training.corpus.mustc import read_mustc
from training.corpus.simuleval_files import choose_rows, write_simuleval_files


def _good_manifest(tmp_path):
    write_mustc(tmp_path / "mustc")
    manifest = tmp_path / "dev.tsv"
    write_manifest(manifest, read_mustc(tmp_path / "mustc", "dev"))
    return manifest


def test_check_passes_a_good_manifest(tmp_path, capsys):
    manifest = _good_manifest(tmp_path)
    report = check_manifest(manifest, decode=True, progress=False)
    assert report.ok and report.rows == report.speech_rows == 4
    assert report.sample_rates == {16000: 1, 44100: 1}
    assert abs(report.hours * 3600 - 3.75) < 1e-6
    assert main(["check", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "4 rows (4 speech, 0 text)" in out and "44100 Hz: 1" in out and "no problems found" in out


def test_check_fails_on_bad_manifests(tmp_path, capsys):
    manifest = _good_manifest(tmp_path)
    rows = read_manifest(manifest)
    sf.write(tmp_path / "short.wav", tone(0.5), 16000)
    broken = [
        rows[0],
        Row("gone", str(tmp_path / "gone.wav"), 100, "Missing.", "Fehlt."),
        Row("past", f"{tmp_path / 'short.wav'}:7000:5000", 5000, "Too long.", "Zu lang."),
        Row("wrong", str(tmp_path / "short.wav"), 123, "Wrong length.", "Falsche Länge."),
    ]
    bad = tmp_path / "bad.tsv"
    write_manifest(bad, broken)
    lines = bad.read_bytes().splitlines(keepends=True)
    bad.write_bytes(b"".join([*lines[:2], lines[1], *lines[2:]]))  # line 3 repeats line 2's id (the writer would not)
    with bad.open("ab") as f:
        f.write(b"latin\t\t0\tGr\xfc\xdfe.\tHallo.\t\n" + b"empty\t\t0\tHi.\t\t\n")
    report = check_manifest(bad, progress=False)
    assert not report.ok
    text = "\n".join(report.problems)
    for expected in ("bad.tsv:7: not UTF-8", "bad.tsv:8: empty tgt_text", "bad.tsv:3: id ted_1_0 is also on line 2",
                     "gone.wav: no such file", "runs past the end", "n_frames 123, but the audio has 8000"):
        assert expected in text
    assert main(["check", str(bad)]) == 1
    assert "6 problem(s)" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "nothing.tsv")]) == 1


def test_simuleval_files_cut_slices_to_16k_wavs(tmp_path):
    manifest = _good_manifest(tmp_path)
    files = write_simuleval_files(manifest, tmp_path / "se", progress=False)
    sources = files.source.read_text().splitlines()
    targets = files.target.read_text().splitlines()
    rows = read_manifest(manifest)
    assert len(sources) == len(targets) == files.count == 4
    assert targets == [r.tgt_text for r in rows] and files.ids.read_text().split() == [r.id for r in rows]
    for source, row in zip(sources, rows, strict=True):
        info = sf.info(source)
        assert source.startswith("/") and info.samplerate == 16000 and info.frames == row.n_frames


def test_simuleval_whole_16k_files_are_used_in_place(tmp_path):
    sf.write(tmp_path / "a.flac", tone(1.0), 16000)
    manifest = tmp_path / "m.tsv"
    write_manifest(manifest, [Row("a", str(tmp_path / "a.flac"), 16000, "Hi.", "Hallo.")])
    files = write_simuleval_files(manifest, tmp_path / "se", progress=False)
    assert files.source.read_text() == f"{tmp_path / 'a.flac'}\n"


def test_simuleval_converts_a_whole_file_that_is_not_16k_mono(tmp_path):
    """SimulEval hands the file to an agent that hears 16 kHz mono: a 44.1 kHz or a stereo file is converted."""
    sf.write(tmp_path / "cd.wav", tone(1.0, 44100), 44100)
    sf.write(tmp_path / "stereo.flac", tone(1.0).repeat(2).reshape(-1, 2), 16000)
    manifest = tmp_path / "m.tsv"
    write_manifest(manifest, [Row("cd", str(tmp_path / "cd.wav"), 16000, "Hi.", "Hallo."),
                              Row("stereo", str(tmp_path / "stereo.flac"), 16000, "Yo.", "Jo.")])
    files = write_simuleval_files(manifest, tmp_path / "se", progress=False)
    sources = files.source.read_text().splitlines()
    assert sources == [str(tmp_path / "se" / "wav" / "cd.wav"), str(tmp_path / "se" / "wav" / "stereo.wav")]
    assert all((sf.info(s).samplerate, sf.info(s).channels, sf.info(s).frames) == (16000, 1, 16000) for s in sources)


def test_simuleval_text_and_seeded_subset(tmp_path, capsys):
    rows = [Row(f"s{i}", "", 0, f"Sentence {i}.", f"Satz {i}.") for i in range(20)]
    manifest = tmp_path / "text.tsv"
    write_manifest(manifest, rows)
    assert main(["simuleval", str(manifest), "--out", str(tmp_path / "a"), "--text", "--max-utterances", "5",
                 "--seed", "3"]) == 0
    a = (tmp_path / "a" / "source.txt").read_text().splitlines()
    main(["simuleval", str(manifest), "--out", str(tmp_path / "b"), "--text", "--max-utterances", "5", "--seed", "3"])
    assert a == (tmp_path / "b" / "source.txt").read_text().splitlines() and len(a) == 5
    assert a == sorted(a, key=lambda s: int(s.split()[1][:-1]))  # manifest order kept
    assert [r.id for r in choose_rows(rows, 3)] == ["s0", "s1", "s2"]
    # speech files for text rows: refused with a hint
    assert main(["simuleval", str(manifest), "--out", str(tmp_path / "c")]) == 2


def test_build_text_only_through_the_cli(tmp_path, capsys):
    ding = write_ding(tmp_path / "de-en", DING_LINES)
    assert main(["build", "--out", str(tmp_path / "t"), "--ding", str(ding), "--text-only"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and sum(len(read_manifest(tmp_path / "t" / f"{s}.tsv")) for s in
                                  ("train", "dev", "test")) == 8


def test_simuleval_names_the_manifest_line_and_id_of_a_missing_or_empty_audio_file(tmp_path, caplog):
    sf.write(tmp_path / "a.wav", tone(0.5), 16000)
    (tmp_path / "empty.wav").write_bytes(b"")
    good = Row("a", str(tmp_path / "a.wav"), 8000, "Hi.", "Hallo.")
    for name, bad in [("gone", Row("gone", str(tmp_path / "gone.wav"), 8000, "Gone.", "Weg.")),
                      ("empty", Row("empty", str(tmp_path / "empty.wav"), 8000, "Empty.", "Leer."))]:  # fmt: skip
        manifest = tmp_path / f"{name}.tsv"
        write_manifest(manifest, [good, bad])
        caplog.clear()
        assert main(["simuleval", str(manifest), "--out", str(tmp_path / name)]) == 2
        (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert message.startswith(f"{manifest}:3: id {name}: {tmp_path / f'{name}.wav'}: ") and "\n" not in message
        assert not (tmp_path / name / "source.txt").exists()


def test_simuleval_writes_every_slice_inside_out_wav_whatever_its_id(tmp_path):
    """Ids from a user's id column may hold '/' (spk1/utt1) or '..': each slice still gets its own file under
    OUT/wav (it used to fail with a libsndfile traceback, or write, and overwrite, files outside OUT)."""
    sf.write(tmp_path / "talk.wav", tone(1.0, 44100), 44100)
    ids = ["spk1/utt1", "../../talk", "spk1_utt1", ".hidden", "plain-id_1"]
    rows = [Row(i, f"{tmp_path / 'talk.wav'}:{100 * n}:4410", 1600, "Hi.", "Hallo.") for n, i in enumerate(ids)]
    manifest = tmp_path / "m.tsv"
    write_manifest(manifest, rows)
    before = (tmp_path / "talk.wav").read_bytes()
    assert main(["simuleval", str(manifest), "--out", str(tmp_path / "se")]) == 0
    sources = (tmp_path / "se" / "source.txt").read_text().splitlines()
    assert len(set(sources)) == len(ids) and sources[-1] == str(tmp_path / "se" / "wav" / "plain-id_1.wav")
    assert all(Path(s).parent == tmp_path / "se" / "wav" and sf.info(s).frames == 1600 for s in sources)
    assert (tmp_path / "talk.wav").read_bytes() == before


@pytest.mark.parametrize("argv,problem", [
    (["build", "--dev-share", "2"], "argument --dev-share: 2: a fraction of the sentences"),
    (["build", "--dev-share", "0.6", "--test-share", "0.5"], "--dev-share 0.6 + --test-share 0.5: must be below 1"),
    (["build", "--dev-share", "0.5", "--test-share", "0.5"], "--dev-share 0.5 + --test-share 0.5: must be below 1"),
    (["build", "--max-utterances", "-5"], "argument --max-utterances: -5: must be at least 1"),
    (["build", "--max-utterances", "0"], "argument --max-utterances: 0: must be at least 1"),
    (["build", "--max-train", "-1"], "argument --max-train: -1: must be at least 0"),
    (["build", "--workers", "0"], "argument --workers: 0: must be at least 1"),
    (["simuleval", "M.tsv", "--max-utterances", "-1", "--seed", "1"], "--max-utterances: -1: must be at least 1"),
    (["simuleval", "M.tsv", "--max-utterances", "0"], "argument --max-utterances: 0: must be at least 1"),
], ids=["share", "sum", "sum-one", "max-negative", "max-zero", "cap-negative", "workers", "seeded-negative",
        "zero"])  # fmt: skip
def test_cli_refuses_counts_and_shares_out_of_range_in_one_line(tmp_path, capsys, argv, problem):
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--out", str(tmp_path / "out")])
    assert caught.value.code == 2
    assert problem in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_cli_out_is_refused_when_a_file_stands_for_a_folder_or_a_folder_for_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "afolder").mkdir()
    cases = [
        (["simuleval", "M.tsv", "--out", str(tmp_path / "afile")], "afile: is a file, not a folder"),
        (["build", "--out", str(tmp_path / "afile" / "sub")], "afile is a file, not a folder"),
        (["tsv", "u.tsv", "--out", str(tmp_path / "afolder"), "--audio-column", ""], "afolder: is a folder; give"),
    ]
    for argv, problem in cases:
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2 and problem in capsys.readouterr().err, argv


def test_cli_out_is_refused_in_one_line_when_its_folder_cannot_be_written(tmp_path, capsys, monkeypatch):
    import os

    locked = tmp_path / "readonly"  # a read-only mount: os.access says no (chmod would not stop root)
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    cases = [
        ["build", "--out", str(locked), "--text-only"],
        ["build", "--out", str(locked / "new" / "corpus"), "--text-only"],
        ["tsv", "u.tsv", "--out", str(locked / "m.tsv"), "--audio-column", ""],
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as caught:
            main(argv)
        err = capsys.readouterr().err.splitlines()[-1]
        assert caught.value.code == 2 and f"{locked} cannot be written (read-only)" in err, argv
    assert list(locked.iterdir()) == []


def test_choose_rows_refuses_fewer_than_one_utterance():
    rows = [Row(f"s{i}", "", 0, f"Sentence {i}.", f"Satz {i}.") for i in range(3)]
    for bad in (0, -1):
        with pytest.raises(ValueError, match="at least 1"):
            choose_rows(rows, bad, seed=1)


def test_check_fails_on_a_manifest_with_only_its_header(tmp_path, capsys):
    manifest = tmp_path / "empty.tsv"
    write_manifest(manifest, [])
    assert main(["check", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "no rows, only the header" in out and "no problems found" not in out


def test_build_warns_when_a_split_comes_out_empty_and_names_the_options_that_fill_it(tmp_path, capsys, caplog):
    ding = write_ding(tmp_path / "de-en", [f"Satz Nummer {i}. :: This is sentence number {i}." for i in range(60)])
    argv = ["build", "--out", str(tmp_path / "t"), "--ding", str(ding), "--text-only", "--max-utterances", "20"]
    assert main(argv) == 0
    assert "dev 0" in capsys.readouterr().out
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"{tmp_path / 't' / 'dev.tsv'} has no rows: dev takes about 3% of the sentences")
    assert "pass e.g. --max-utterances 334 --max-train 19" in warning
    caplog.clear()
    assert main([*argv, "--max-dev", "0"]) == 0  # asked for no dev: nothing to warn about
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_text_only_build_into_a_speech_corpus_is_refused_in_one_line(tmp_path, caplog):
    from fixtures_corpus import fake_synthesizer

    from training.corpus.offline import build_offline_corpus

    ding = write_ding(tmp_path / "de-en", DING_LINES)
    build_offline_corpus(tmp_path / "s", ding=ding, voice="espeak", synthesize=fake_synthesizer(), progress=False)
    before = (tmp_path / "s" / "train.tsv").read_bytes()
    assert main(["build", "--out", str(tmp_path / "s"), "--ding", str(ding), "--text-only"]) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "this folder holds a speech corpus (voice espeak, format flac), not a text-only corpus" in message
    assert "drop --text-only or pass a new --out" in message and "\n" not in message
    assert (tmp_path / "s" / "train.tsv").read_bytes() == before


def test_text_only_build_into_another_commands_speech_manifests_is_refused(tmp_path, caplog):
    sf.write(tmp_path / "a.wav", tone(0.5), 16000)
    rows = [Row("ted_1_0", str(tmp_path / "a.wav"), 8000, "Hello.", "Hallo.")]
    write_manifest(tmp_path / "mustc" / "train.tsv", rows)  # as `corpus mustc` leaves it: no corpus.json
    before = (tmp_path / "mustc" / "train.tsv").read_bytes()
    ding = write_ding(tmp_path / "de-en", DING_LINES)
    assert main(["build", "--out", str(tmp_path / "mustc"), "--ding", str(ding), "--text-only"]) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "train.tsv: holds speech rows" in message and "pass a new --out" in message
    assert (tmp_path / "mustc" / "train.tsv").read_bytes() == before


@pytest.mark.parametrize("command, shown", [
    ("build", ["(default: piper)", "(default: flac)", "(default: 0.03)", "(default: 0.07)", "(default: 3)",
               "(default: 30)"]),
    ("mustc", ["(default: train dev tst-COMMON)", "en-de or en_de (default: en-de)"]),
    ("covost", ["(default: train dev test)", "en-de or en_de (default: en_de)"]),
    ("tsv", ["audio<TAB>src_text<TAB>tgt_text", "(default: audio)", "(default: src_text)", "(default: tgt_text)"]),
])  # fmt: skip
def test_help_shows_the_defaults_and_the_tsv_columns(capsys, command, shown):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    for text in shown:
        assert "".join(text.split()) in out, text


def test_corpus_readme_documents_covost_tsv_and_the_text_only_build():
    readme = (Path(__file__).resolve().parents[1] / "training" / "corpus" / "README.md").read_text(encoding="utf-8")
    commands = ("build --out data/offline_text --text-only", "covost --tsv-dir", "tsv mine.tsv --out")
    for command in commands:
        assert f"python -m training.corpus {command}" in readme
    for section in ("**`build --text-only`**", "**`covost`**", "**`tsv`**"):
        assert section in readme


def test_cli_out_is_refused_when_empty_not_taken_as_the_working_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `--out "$OUT"` with OUT unset: nothing may land in the working folder
    with pytest.raises(SystemExit) as caught:
        main(["build", "--out", "", "--text-only"])
    assert caught.value.code == 2 and "argument --out: an empty path; give a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_check_histograms_count_each_edge_in_the_bin_it_opens_and_words_of_the_source(tmp_path):
    from training.corpus.check import BAR_WIDTH, format_report

    sf.write(tmp_path / "one.wav", tone(1.0), 16000)
    sf.write(tmp_path / "half.wav", tone(0.5), 16000)
    rows = [Row("one", str(tmp_path / "one.wav"), 16000, "One two three.", "Eins zwei drei vier fünf."),
            Row("half", str(tmp_path / "half.wav"), 8000, "Two words.", "Zwei Wörter sind es hier."),
            Row("text", "", 0, "Just two.", "Nur zwei Wörter hier und mehr.")]  # fmt: skip
    write_manifest(tmp_path / "m.tsv", rows)
    report = check_manifest(tmp_path / "m.tsv", progress=False)
    assert report.ok and report.duration_histogram["< 1 s"] == 1 and report.duration_histogram["1-2 s"] == 1
    assert report.word_histogram["< 3 words"] == 2 and report.word_histogram["3-5 words"] == 1
    bars = format_report(report).splitlines()
    assert any(line.endswith(" 2 " + "#" * BAR_WIDTH) for line in bars)  # the fullest bin: a full-width bar


def test_check_decode_compares_the_length_of_an_mp3_that_its_header_only_estimates(tmp_path):
    from fixtures_corpus import write_covost

    _, clips = write_covost(tmp_path)
    clip = clips / "common_voice_en_1.mp3"  # 1 s at 48 kHz: 16000 samples at 16 kHz
    write_manifest(tmp_path / "m.tsv", [Row("c", str(clip), 12345, "He said yes.", "Er sagte ja.")])
    assert check_manifest(tmp_path / "m.tsv", progress=False).ok  # without --decode: an estimate, not compared
    report = check_manifest(tmp_path / "m.tsv", decode=True, progress=False)
    assert len(report.problems) == 1 and "n_frames 12345, but the audio has" in report.problems[0]


def test_check_report_shows_the_first_problems_and_counts_the_rest():
    from training.corpus.check import CheckReport, format_report

    def report(n: int) -> str:
        problems = [f"problem {i}" for i in range(n)]
        return format_report(CheckReport("m.tsv", 0, 0, 0, 0.0, {}, {}, {}, problems), max_problems=3)

    three = report(3)
    assert "  problem 2" in three and "more" not in three
    four = report(4)
    assert "  problem 2" in four and "problem 3" not in four and four.endswith("  ... and 1 more")


def test_build_exits_1_and_says_so_when_a_sentence_could_not_be_synthesised(tmp_path, capsys, monkeypatch):
    from fixtures_corpus import fake_synthesizer

    from training.corpus import offline

    def flaky(text):
        if "laughing" in text:
            raise RuntimeError("voice crashed")
        return fake_synthesizer()(text)

    monkeypatch.setattr(offline, "check_voice", lambda voice: None)
    monkeypatch.setattr(offline, "make_synthesizer", lambda voice, threads=1: flaky)
    ding = write_ding(tmp_path / "de-en", DING_LINES)
    argv = ["build", "--out", str(tmp_path / "s"), "--ding", str(ding), "--voice", "espeak", "--workers", "1"]
    assert main(argv) == 1
    assert "1 sentence(s) could not be synthesised (see warnings); rerun to retry them" in capsys.readouterr().out


def test_build_warns_of_an_empty_split_of_the_whole_ding_file_or_of_a_zero_share(tmp_path, caplog):
    ding = write_ding(tmp_path / "de-en", DING_LINES)  # 8 sentences: none of them falls in dev
    assert main(["build", "--out", str(tmp_path / "a"), "--ding", str(ding), "--text-only"]) == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.endswith("dev.tsv has no rows: the Ding file gives dev none of its sentences; "
                            "pass a larger --dev-share")
    caplog.clear()
    argv = ["build", "--out", str(tmp_path / "b"), "--ding", str(ding), "--text-only", "--test-share", "0"]
    assert main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.endswith("test.tsv has no rows: --test-share is 0; pass e.g. --test-share 0.05") for w in warnings)


def test_build_max_split_0_leaves_that_split_empty(tmp_path):
    ding = write_ding(tmp_path / "de-en", [f"Satz Nummer {i}. :: This is sentence number {i}." for i in range(60)])
    argv = ["build", "--ding", str(ding), "--text-only"]
    assert main([*argv, "--out", str(tmp_path / "all")]) == 0
    assert read_manifest(tmp_path / "all" / "test.tsv")  # uncapped: test has rows
    assert main([*argv, "--out", str(tmp_path / "none"), "--max-test", "0"]) == 0
    assert read_manifest(tmp_path / "none" / "test.tsv") == []


def test_build_without_a_ding_file_is_one_line_saying_what_to_install(tmp_path, caplog, monkeypatch):
    from training.corpus import offline
    from training.corpus.sources import AssetMissing

    def missing():
        raise AssetMissing("no Ding dictionary: run `make assets` or `apt-get install trans-de-en`")

    monkeypatch.setattr(offline, "ding_file", missing)
    assert main(["build", "--out", str(tmp_path / "o"), "--text-only"]) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "apt-get install trans-de-en" in message


def test_check_fails_when_any_of_several_manifests_is_bad_not_only_the_last(tmp_path, capsys):
    good = _good_manifest(tmp_path)
    bad = tmp_path / "bad.tsv"
    write_manifest(bad, [Row("gone", str(tmp_path / "gone.wav"), 100, "Missing.", "Fehlt.")])
    assert main(["check", str(bad), str(good)]) == 1
    assert main(["check", str(good), str(bad)]) == 1
