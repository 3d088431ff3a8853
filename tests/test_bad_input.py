"""Bad input at every public entry point: the documented behaviour of each case of docs/robustness.md.

Entry points: the audio front end (``load_audio``), the corpus builder (``python -m training.corpus tsv`` and
``build``), the manifest checker (``python -m training.corpus check``), the trainer (``python -m training.train``),
``StreamingSession``, both SimulEval agents (in process, through ``simuleval.cli``) and the scorer
(``python -m simul_agents.score``). Behaviour is either the right result after conversion, or one line that names
the file and the problem, raised at the boundary (never a traceback from inside torch or libsndfile).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from simul_agents import evaluate_inprocess
from simul_agents.proactive_agent import InstanceError, ProactiveAgent
from simul_agents.score import ScoreError, score_output
from simul_agents.score import main as score_main
from speech_frontend.audio import AudioError, load_audio, to_mono_16k
from streaming_llm.checkpoint import build_model, save_checkpoint
from streaming_llm.engine import StreamingSession
from streaming_llm.heads import make_head
from streaming_llm.long_stream import LongStream
from streaming_llm.tiny import tiny_config, tiny_tokenizer
from training.corpus.__main__ import main as corpus_main
from training.corpus.manifest import MANIFEST_COLUMNS
from training.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TINY_SPEECH = ROOT / "training" / "configs" / "tiny_speech.yaml"
TINY_TEXT = ROOT / "training" / "configs" / "tiny_text.yaml"
RATE = 16000
TEN_MINUTES = 600.0


def tone(seconds: float, rate: int = RATE) -> np.ndarray:
    """Band-limited (< 3 kHz) test audio: it survives 8 kHz."""
    t = np.arange(round(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 1300 * t + 1)
            + 0.1 * np.sin(2 * np.pi * 2900 * t)).astype(np.float32)  # fmt: skip


def talk(seconds: float) -> np.ndarray:
    """Speech-like: 3 s of tone, 0.8 s of silence, again and again."""
    audio = tone(seconds)
    period = round(3.8 * RATE)
    audio[(np.arange(audio.shape[0]) % period) >= 3 * RATE] = 0.0
    return audio


def untied_tiny(modality: str, **overrides):
    """A tiny random model whose greedy output is several short words (a tied one repeats its last token)."""
    config = tiny_config(modality, **overrides)
    config = config.replace(llm_config={**config.llm_config, "tie_word_embeddings": False})
    torch.manual_seed(0)
    return build_model(config, tiny_tokenizer()).eval()


# ---- the audio cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioCase:
    """One kind of audio file: how to write it and what converting it gives."""

    name: str
    write: Callable[[Path], None]
    error: str | None = None  # the AudioError's problem (a regex), or None: it converts
    expect: np.ndarray | None = None  # the 16 kHz mono result it must match (None: only its length is known)
    atol: float = 1e-4  # on the middle of the signal (resampling edges excepted)
    n_samples: int | None = None  # 16 kHz samples after conversion


def _sf(samples, rate=RATE, **kwargs) -> Callable[[Path], None]:
    return lambda path: sf.write(path, samples, rate, **kwargs)


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _with_bad_value(value: float) -> np.ndarray:
    audio = tone(1.0)
    audio[12000] = value  # in the third 320 ms chunk
    return audio


def _truncated_header() -> bytes:
    import io

    buffer = io.BytesIO()
    sf.write(buffer, tone(1.0), RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()[:30]  # the RIFF header is cut inside the fmt chunk


NOISE = np.clip(np.random.default_rng(0).standard_normal(RATE) * 4.0, -1.0, 1.0)  # clipped full-scale noise
ONE_SECOND = tone(1.0)

AUDIO_CASES = [
    AudioCase("empty-file", _bytes(b""), error=r"empty file \(0 bytes\)"),
    AudioCase("zero-length", _sf(np.zeros(0, np.float32)), error=r"holds no audio \(0 samples\)"),
    AudioCase("one-sample", _sf(np.array([0.25], np.float32), subtype="FLOAT"), expect=np.array([0.25], np.float32)),
    AudioCase("one-sample-48k", _sf(np.array([0.25], np.float32), 48000, subtype="FLOAT"),
              error=r"too short to resample from 48000 Hz to 16000 Hz"),  # fmt: skip
    AudioCase("all-silence", _sf(np.zeros(RATE, np.float32)), expect=np.zeros(RATE, np.float32)),
    AudioCase("nan-samples", _sf(_with_bad_value(np.nan), subtype="FLOAT"), error=r"1 NaN or Inf samples"),
    AudioCase("inf-samples", _sf(_with_bad_value(np.inf), subtype="FLOAT"), error=r"1 NaN or Inf samples"),
    AudioCase("clipped-full-scale-noise", _sf(NOISE, subtype="PCM_16"), expect=NOISE.astype(np.float32), atol=1e-4),
    *[AudioCase(f"rate-{rate}", _sf(tone(1.0, rate), rate, subtype="FLOAT"), expect=ONE_SECOND, atol=0.02)
      for rate in (8000, 22050, 44100, 48000)],  # fmt: skip
    AudioCase("stereo", _sf(np.stack([ONE_SECOND, -ONE_SECOND / 2], axis=1), subtype="FLOAT"), expect=ONE_SECOND / 4,
              atol=1e-6),  # fmt: skip
    AudioCase("six-channel", _sf(np.stack([ONE_SECOND] * 6, axis=1), subtype="FLOAT"), expect=ONE_SECOND, atol=1e-6),
    AudioCase("int16-pcm", _sf(ONE_SECOND, subtype="PCM_16"), expect=ONE_SECOND, atol=1e-4),
    AudioCase("int32-pcm", _sf(ONE_SECOND, subtype="PCM_32"), expect=ONE_SECOND, atol=1e-6),
    AudioCase("24-bit-pcm", _sf(ONE_SECOND, subtype="PCM_24"), expect=ONE_SECOND, atol=1e-6),
    AudioCase("float64-pcm", _sf(ONE_SECOND.astype(np.float64), subtype="DOUBLE"), expect=ONE_SECOND, atol=1e-7),
    AudioCase("flac", _sf(ONE_SECOND, format="FLAC"), expect=ONE_SECOND, atol=1e-4),
    AudioCase("ogg-vorbis", _sf(ONE_SECOND, format="OGG"), n_samples=RATE),
    AudioCase("mp3", _sf(ONE_SECOND, format="MP3"), n_samples=RATE),
    AudioCase("truncated-wav-header", _bytes(_truncated_header()), error=r"cannot be decoded as audio"),
    AudioCase("text-renamed-wav", _bytes(b"id\taudio\nnot audio at all\n" * 20), error=r"cannot be decoded as audio"),
    AudioCase("ten-minutes", lambda path: sf.write(path, talk(TEN_MINUTES), RATE, subtype="PCM_16"),
              n_samples=round(TEN_MINUTES * RATE)),  # fmt: skip  (made when written, not at import)
]
BY_NAME = {case.name: case for case in AUDIO_CASES}
SUFFIX = {"flac": ".flac", "ogg-vorbis": ".ogg", "mp3": ".mp3"}
GOOD = [c.name for c in AUDIO_CASES if c.error is None and c.name != "ten-minutes"]
BAD = [c.name for c in AUDIO_CASES if c.error is not None]
UNDECODABLE = ["empty-file", "zero-length", "truncated-wav-header", "text-renamed-wav"]  # the header says so
NOTHING_AT_16K = "one-sample-48k"  # a valid file whose one sample is a third of a 16 kHz sample


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audio")
    paths = {}
    for case in AUDIO_CASES:
        path = root / f"{case.name}{SUFFIX.get(case.name, '.wav')}"
        case.write(path)
        paths[case.name] = path
    return paths


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    return lines[0]


# ---- the audio front end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [c.name for c in AUDIO_CASES])
def test_load_audio_converts_or_names_the_file_and_the_problem(files, name):
    case, path = BY_NAME[name], files[name]
    if case.error is not None:
        with pytest.raises(AudioError) as caught:
            load_audio(path)
        assert one_line(str(caught.value)).startswith(f"{path}: ")
        assert re.search(case.error, str(caught.value)), str(caught.value)
        return
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all()
    assert np.abs(audio).max() <= 1.0
    expected_n = case.n_samples if case.n_samples is not None else case.expect.shape[0]
    assert abs(audio.shape[0] - expected_n) <= 1
    if case.expect is not None:
        edge = 64 if case.expect.shape[0] > 256 else 0  # resampling filters ring at the ends
        n = min(audio.shape[0], case.expect.shape[0])
        np.testing.assert_allclose(audio[edge : n - edge], case.expect[edge : n - edge], atol=case.atol)
    elif name in ("ogg-vorbis", "mp3"):  # lossy: the level survives
        rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
        assert abs(rms - float(np.sqrt(np.mean(ONE_SECOND.astype(np.float64) ** 2)))) < 0.05 * rms


def test_mp3_is_written_and_read_by_this_libsndfile():
    """libsndfile >= 1.1 encodes MP3 (LAME) and decodes it (mpg123): the MP3 case is a real MP3 file."""
    assert "MP3" in sf.available_formats(), f"libsndfile {sf.__libsndfile_version__} has no MP3"


def test_samples_in_either_channel_layout_and_any_pcm_dtype_become_the_same_mono_signal():
    """An application's arrays as its libraries hold them: (channels, n) (librosa, torchaudio) or (n, channels)
    (soundfile), channels averaged; integers scaled by their full range, unsigned 8-bit centred on 128."""
    stereo = np.stack([ONE_SECOND, -ONE_SECOND / 2])  # (2, n)
    for samples, layout in ((stereo, None), (stereo, False), (stereo.T, None), (stereo.T, True)):
        mono = to_mono_16k(samples, RATE, channels_last=layout)
        np.testing.assert_allclose(mono, ONE_SECOND / 4, atol=1e-6, err_msg=f"{samples.shape} {layout}")
    quarters = np.array([-1.0, -0.5, 0.0, 0.5])
    for pcm in (np.array([0, 64, 128, 192], np.uint8), np.array([-128, -64, 0, 64], np.int8),
                np.array([-32768, -16384, 0, 16384], np.int16), np.array([-(2**31), -(2**30), 0, 2**30], np.int32)):
        np.testing.assert_allclose(to_mono_16k(pcm, RATE), quarters, atol=1e-7, err_msg=str(pcm.dtype))


# ---- the corpus builder and the manifest checker ----------------------------------------------------------


def _user_tsv(path: Path, rows: list[tuple[str, str, str]], header=("audio", "src_text", "tgt_text")) -> Path:
    lines = ["\t".join(header)] + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name", [c.name for c in AUDIO_CASES])
def test_corpus_builder_and_checker_take_good_audio_and_name_bad_files(files, tmp_path, name, caplog, capsys):
    case, path = BY_NAME[name], files[name]
    tsv = _user_tsv(tmp_path / "mine.tsv", [(str(path), "Hello there .", "Hallo .")])
    manifest = tmp_path / "manifest.tsv"
    with caplog.at_level(logging.ERROR, logger="training.corpus"):
        rc = corpus_main(["tsv", str(tsv), "--out", str(manifest)])
    if name in (*UNDECODABLE, NOTHING_AT_16K):
        assert rc == 2
        message = one_line(caplog.text.split("ERROR", 1)[1])
        assert f"{tsv}:2: {path}: " in message, message  # the TSV line and the audio file
        return
    assert rc == 0, caplog.text
    row = manifest.read_text(encoding="utf-8").splitlines()[1].split("\t")
    capsys.readouterr()
    rc = corpus_main(["check", str(manifest), "--decode"])
    report = capsys.readouterr().out
    if case.error is not None:  # NaN, Inf: the header is fine, the samples are not: only --decode finds it
        assert rc == 1 and f"{path}: 1 NaN or Inf samples" in report, report
        assert corpus_main(["check", str(manifest)]) == 0, "without --decode only headers are read"
        return
    assert int(row[2]) == len(load_audio(path))  # n_frames: the length at 16 kHz mono
    assert rc == 0 and "no problems found" in report, report


@pytest.mark.parametrize("name", UNDECODABLE)
def test_checker_names_an_unreadable_file_in_a_manifest(files, tmp_path, name, capsys):
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("\t".join(MANIFEST_COLUMNS) + f"\nu1\t{files[name]}\t16000\tHello .\tHallo .\t\n")
    assert corpus_main(["check", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert f"{manifest}: u1: {files[name]}: " in out, out


NON_UTF8 = "Gr\xfc\xdfe .".encode("latin-1")


def _text_rows(tmp_path: Path) -> dict[str, Path]:
    """User TSVs and manifests with the text cases: non-UTF-8 target, empty target, a missing column."""
    good = "\t".join(MANIFEST_COLUMNS) + "\np1\t\t0\tHello there .\tHallo .\t\n"
    out = {}
    for kind, header, row in [
        ("manifest", "\t".join(MANIFEST_COLUMNS), b"p2\t\t0\tGreat .\t" + NON_UTF8 + b"\t"),
        ("tsv", "src_text\ttgt_text", b"Great .\t" + NON_UTF8),
    ]:
        start = good if kind == "manifest" else "src_text\ttgt_text\nHello there .\tHallo .\n"
        (tmp_path / f"latin1.{kind}").write_bytes(start.encode() + row + b"\n")
        empty = b"p2\t\t0\tGreat .\t\t" if kind == "manifest" else b"Great .\t"
        (tmp_path / f"empty-target.{kind}").write_bytes(start.encode() + empty + b"\n")
        missing = header.replace("\ttgt_text", "")
        (tmp_path / f"missing-column.{kind}").write_text(f"{missing}\n" + (
            "p1\t\t0\tHello there .\t\n" if kind == "manifest" else "Hello there .\n"), encoding="utf-8")  # fmt: skip
        for case in ("latin1", "empty-target", "missing-column"):
            out[f"{case}.{kind}"] = tmp_path / f"{case}.{kind}"
    return out


TEXT_PROBLEMS = {
    "latin1": r":3: not UTF-8 \(byte 0xfc at column \d+\); re-encode the file as UTF-8",
    "empty-target": r":3: empty tgt_text",
    "missing-column": r":1: missing column\(s\) tgt_text",
}


@pytest.mark.parametrize("case", list(TEXT_PROBLEMS))
def test_corpus_builder_and_checker_name_the_line_of_bad_target_text(tmp_path, case, caplog, capsys):
    paths = _text_rows(tmp_path)
    tsv = paths[f"{case}.tsv"]
    with caplog.at_level(logging.ERROR, logger="training.corpus"):
        assert corpus_main(["tsv", str(tsv), "--out", str(tmp_path / "m.tsv"), "--audio-column", ""]) == 2
    assert re.search(re.escape(str(tsv)) + TEXT_PROBLEMS[case], caplog.text), caplog.text
    manifest = paths[f"{case}.manifest"]
    assert corpus_main(["check", str(manifest)]) == 1
    assert re.search(re.escape(str(manifest)) + TEXT_PROBLEMS[case], capsys.readouterr().out)


@pytest.mark.parametrize("content,problem", [(b"", "empty file"), (b"Haus {n} :: house\n\xff :: x\n", ":2: not UTF-8"),
                                             (b"no dictionary here\n", "no sentence pairs")],
                         ids=["empty", "non-utf8", "not-ding"])  # fmt: skip
def test_offline_corpus_build_names_a_bad_ding_file(tmp_path, content, problem, caplog):
    ding = tmp_path / "de-en.txt"
    ding.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="training.corpus"):
        rc = corpus_main(["build", "--text-only", "--ding", str(ding), "--out", str(tmp_path / "out")])
    assert rc == 2 and f"{ding}" in caplog.text and problem in caplog.text, caplog.text
    assert not (tmp_path / "out" / "train.tsv").exists()


# ---- the trainer -------------------------------------------------------------------------------------------


def _speech_manifest(path: Path, audio: list[tuple[str, Path, int]]) -> Path:
    lines = ["\t".join(MANIFEST_COLUMNS)]
    lines += [f"{uid}\t{wav}\t{n}\tHello there .\tHallo .\t" for uid, wav, n in audio]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _train(tmp_path: Path, manifest: Path, config: Path = TINY_SPEECH, *extra: str) -> int:
    return train_main(["--config", str(config), f"out_dir={tmp_path / 'run'}", f"train_manifest={manifest}",
                       "dev_manifest=", "max_steps=1", "encoder_cache=none", *extra])  # fmt: skip


def test_trainer_trains_on_every_good_audio_case(files, tmp_path):
    rows = [(name, files[name], len(load_audio(files[name]))) for name in GOOD]
    manifest = _speech_manifest(tmp_path / "good.tsv", rows)
    assert _train(tmp_path, manifest, TINY_SPEECH, f"batch_size={len(rows)}") == 0  # one step sees every row
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(log[0]["loss"])


@pytest.mark.parametrize("name", BAD + ["ten-minutes"])
def test_trainer_stops_with_one_line_naming_a_bad_audio_file(files, tmp_path, name, capsys):
    case, path = BY_NAME[name], files[name]
    n_frames = round(TEN_MINUTES * RATE) if name == "ten-minutes" else RATE
    manifest = _speech_manifest(tmp_path / "bad.tsv", [("u1", path, n_frames)])
    assert _train(tmp_path, manifest) == 1
    message = one_line("\n".join(line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")))
    if name == "ten-minutes":  # longer than one session holds: refused before training, or skipped with skip_bad
        assert f"{manifest}:2 (id u1): 600.0 s of audio, more than max_source_seconds=29.76" in message
        return
    assert f"example u1: {path}: " in message and re.search(case.error, message), message


@pytest.mark.parametrize("case", list(TEXT_PROBLEMS))
def test_trainer_names_the_line_of_bad_target_text(tmp_path, case, capsys):
    manifest = _text_rows(tmp_path)[f"{case}.manifest"]
    assert _train(tmp_path, manifest, TINY_TEXT) == 1
    err = one_line("\n".join(line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")))
    assert re.search(re.escape(str(manifest)) + TEXT_PROBLEMS[case], err), err


# ---- StreamingSession ------------------------------------------------------------------------------------


def test_a_slice_past_the_end_of_its_file_reads_what_is_there_and_says_so_once_beyond_rounding(tmp_path, caplog):
    path = tmp_path / "talk.wav"
    sf.write(path, np.full(8000, 0.1, dtype=np.float32), 8000)  # 1 s at 8 kHz
    with caplog.at_level(logging.WARNING, logger="speech_frontend.audio"):
        assert load_audio(path, 4000, 4040).shape[0] == 8000  # 40 samples over at 8 kHz (5 ms): rounding
        assert not caplog.records
        assert load_audio(path, 4000, 16000).shape[0] == 8000  # a 16 kHz slice of an 8 kHz file: 1.5 s over
        assert load_audio(path, 0, 16000).shape[0] == 16000
    assert len(caplog.records) == 1, caplog.text  # once per file
    assert "talk.wav: the slice 4000:16000 runs 1.50 s past the end of the file (8000 samples at 8000 Hz)" in (
        caplog.text
    )


@pytest.fixture(scope="module")
def speech_model():
    return untied_tiny("speech")


def _native(path: Path) -> tuple[np.ndarray, int]:
    """The samples as an application holds them: the file's own dtype, rate and channels."""
    info = sf.info(str(path))
    dtype = {"PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32", "DOUBLE": "float64"}.get(info.subtype, "float32")
    samples, rate = sf.read(str(path), dtype=dtype)
    return samples, rate


@pytest.mark.parametrize("name", GOOD + ["nan-samples", "inf-samples"])
def test_session_streams_any_samples_or_refuses_them_before_any_change(files, speech_model, name):
    case = BY_NAME[name]
    samples, rate = _native(files[name])
    session = StreamingSession(speech_model, max_target_tokens=16)
    step = max(1, round(0.32 * rate))
    if case.error is not None:
        with pytest.raises(AudioError, match=f"pushed audio: {case.error}"):
            for start in range(0, len(samples), step):
                session.push_audio(samples[start : start + step], rate)
        assert session.samples_in < len(samples)  # the bad chunk was not taken; the session goes on
        session.finish_source()
    else:
        for start in range(0, len(samples), step):
            session.push_audio(samples[start : start + step], rate)
        assert abs(session.samples_in - len(load_audio(files[name]))) <= 2
        session.finish_source()
    while session.write_word() is not None:
        pass
    assert session.finished


def test_session_without_audio_cannot_finish_and_says_why(speech_model):
    session = StreamingSession(speech_model)
    assert session.push_audio(np.zeros(0, np.float32)) == 0
    with pytest.raises(ValueError, match="finish_source with no audio"):
        session.finish_source()


def test_session_refuses_audio_past_its_context_and_stays_usable(files, speech_model):
    """A 10-minute file: the push that would pass 29.76 s is refused whole; the session keeps what it had."""
    audio = load_audio(files["ten-minutes"])
    session = StreamingSession(speech_model, max_target_tokens=16)
    chunk = 5120
    taken = 0
    with pytest.raises(ValueError, match=r"longer than the model's context of 29\.76 s; nothing of this push"):
        for start in range(0, audio.shape[0], chunk):
            session.push_audio(audio[start : start + chunk])
            taken += chunk
    assert session.samples_in == taken == session.max_source_samples
    session.finish_source()  # usable: it finishes and writes
    while session.write_word() is not None:
        pass
    assert session.finished and session.units_read == 93


@pytest.mark.slow
def test_long_stream_translates_the_ten_minute_file(files, speech_model):
    audio = load_audio(files["ten-minutes"])
    stream = LongStream(speech_model, make_head("wait-k", k=2), max_target_tokens=16)
    words = []
    for start in range(0, audio.shape[0], 5120 * 8):
        words += stream.push_audio(audio[start : start + 5120 * 8])
    words += stream.finish()
    assert stream.samples_in == audio.shape[0]
    assert stream.n_segments >= TEN_MINUTES / 29.76  # one session each
    assert words and stream.n_words == len(words)


# ---- the SimulEval agents ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(untied_tiny("speech"), root / "speech")
    save_checkpoint(untied_tiny("speech", block_ms=640), root / "speech640")
    save_checkpoint(untied_tiny("text"), root / "text")
    return root


def simuleval(checkpoint: Path, source: Path, target: Path, output: Path, *extra) -> list[dict]:
    argv = ["--checkpoint", checkpoint, "--source", source, "--target", target, "--output", output,
            "--max-target-tokens", "16", "--no-progress-bar", *extra]  # fmt: skip
    evaluate_inprocess(ProactiveAgent, argv)
    return [json.loads(line) for line in (output / "instances.log").read_text(encoding="utf-8").splitlines()]


def _lists(tmp_path: Path, paths: list[Path], name: str = "speech") -> tuple[Path, Path]:
    source, target = tmp_path / f"{name}.txt", tmp_path / f"{name}-target.txt"
    source.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
    target.write_text("Hallo .\n" * len(paths), encoding="utf-8")
    return source, target


@pytest.fixture(scope="module")
def good_speech_run(files, checkpoints, tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("speech-run")
    source, target = _lists(root, [files[name] for name in GOOD])
    out = root / "out"
    return out, simuleval(checkpoints / "speech", source, target, out, "--source-segment-size", "320",
                          "--head", "wait-k", "--k", "1")  # fmt: skip


def test_speech_agent_translates_every_good_audio_case(good_speech_run, files):
    _, instances = good_speech_run
    assert [ins["index"] for ins in instances] == list(range(len(GOOD)))
    for ins, name in zip(instances, GOOD, strict=True):
        seconds = sf.info(str(files[name])).duration
        assert ins["source_length"] == pytest.approx(seconds * 1000, abs=0.1), name
        assert ins["prediction"].strip(), f"{name}: nothing written"
        assert ins["delays"] == sorted(ins["delays"]) and ins["delays"][-1] <= ins["source_length"] + 1e-6


@pytest.mark.parametrize("name", UNDECODABLE)
def test_speech_agent_names_an_unreadable_file_before_the_first_instance(files, checkpoints, tmp_path, name):
    source, target = _lists(tmp_path, [files["all-silence"], files[name]])
    with pytest.raises(SystemExit) as caught:
        simuleval(checkpoints / "speech", source, target, tmp_path / "out", "--source-segment-size", "320")
    message = one_line(str(caught.value))
    assert f"line 2 (instance 1): {files[name]}" in message, message
    assert not (tmp_path / "out" / "instances.log").exists()


@pytest.mark.parametrize("name", ["nan-samples", "inf-samples"])
@pytest.mark.parametrize("skip", [[], ["--skip-failed"]], ids=["strict", "skip-failed"])
def test_speech_agent_names_a_float_file_holding_nan_or_inf_before_the_first_instance(files, checkpoints, tmp_path,
                                                                                       name, skip):  # fmt: skip
    source, target = _lists(tmp_path, [files["all-silence"], files[name], files["one-sample"]])
    with pytest.raises(SystemExit) as caught:
        simuleval(checkpoints / "speech", source, target, tmp_path / "out", "--source-segment-size", "320", *skip)
    message = one_line(str(caught.value))
    assert f"line 2 (instance 1): {files[name]} holds 1 NaN or Inf samples" in message, message
    assert not (tmp_path / "out" / "instances.log").exists()


def test_batch_eval_shares_the_agents_check_of_nan_audio(files, checkpoints, tmp_path):
    from simul_agents.batch_eval import run as batch_eval

    source, target = _lists(tmp_path, [files["all-silence"], files["nan-samples"]])
    with pytest.raises(SystemExit, match=rf"line 2 \(instance 1\): {files['nan-samples']} holds 1 NaN"):
        batch_eval(["--batch", "2", "--checkpoint", checkpoints / "speech", "--source", source, "--target", target,
                    "--output", tmp_path / "out", "--source-segment-size", "320", "--no-progress-bar"])  # fmt: skip
    assert not (tmp_path / "out" / "instances.log").exists()


def test_speech_agent_stops_on_a_failing_instance_in_one_line_or_skips_it(checkpoints, tmp_path, capsys):
    """A source past the model's context with --long-audio off fails inside the model: without --skip-failed the
    run stops on an error naming the instance and its file; with it the instance is logged, the run goes on, and
    the scorer prints the count."""
    too_long = tmp_path / "too-long.wav"
    sf.write(too_long, tone(31.0), RATE, subtype="PCM_16")
    silence = tmp_path / "silence.wav"
    sf.write(silence, np.zeros(RATE, np.float32), RATE)
    source, target = _lists(tmp_path, [silence, too_long, silence])
    args = (checkpoints / "speech", source, target)
    run = ("--source-segment-size", "320", "--long-audio", "off", "--head", "wait-k", "--k", "1")
    with pytest.raises(InstanceError) as caught:
        simuleval(*args, tmp_path / "strict", *run)
    message = one_line(str(caught.value))
    assert re.match(rf"instance 1 \({too_long}\): SourceTooLong: the source is longer than the model", message), message
    instances = simuleval(*args, tmp_path / "lenient", *run, "--skip-failed")
    assert [ins["index"] for ins in instances] == [0, 1, 2]
    failed = [json.loads(line) for line in (tmp_path / "lenient" / "failed.jsonl").read_text().splitlines()]
    assert [f["index"] for f in failed] == [1]
    assert score_output(tmp_path / "lenient")["n_failed"] == 1
    capsys.readouterr()
    assert score_main([str(tmp_path / "lenient")]) == 0
    assert "n_failed 1 (failed.jsonl" in capsys.readouterr().out


def test_speech_agent_gives_an_empty_prediction_for_a_file_with_nothing_at_16k(files, checkpoints, tmp_path, caplog):
    source, target = _lists(tmp_path, [files[NOTHING_AT_16K], files["one-sample"]])
    with caplog.at_level(logging.WARNING, logger="simul_agents.proactive_agent"):
        instances = simuleval(checkpoints / "speech", source, target, tmp_path / "out", "--source-segment-size", "320")
    assert instances[0]["prediction"] == "" and instances[1]["prediction"].strip()
    assert "instance 0: the source is empty; writing nothing" in caplog.text


@pytest.mark.slow
def test_speech_agent_streams_a_ten_minute_file_in_segments(files, checkpoints, tmp_path):
    """--long-audio auto (the default): a source longer than the model's 30 s goes through LongStream."""
    source, target = _lists(tmp_path, [files["ten-minutes"]])
    args = (checkpoints / "speech640", source, target)
    with pytest.raises(InstanceError, match=rf"instance 0 \({files['ten-minutes']}\): SourceTooLong: the source is "
                                            r"longer than the model's context of 29\.44 s"):  # fmt: skip
        simuleval(*args, tmp_path / "off", "--source-segment-size", "640", "--long-audio", "off")
    (instance,) = simuleval(*args, tmp_path / "auto", "--source-segment-size", "640", "--head", "wait-k", "--k", "1")
    assert instance["source_length"] == pytest.approx(TEN_MINUTES * 1000)
    words = instance["prediction"].split()
    assert len(words) > 20 and len(instance["delays"]) == len(words)
    assert instance["delays"] == sorted(instance["delays"])
    assert instance["delays"][-1] > 0.9 * TEN_MINUTES * 1000  # the last segment is translated at its end


def _text_lists(tmp_path: Path, pairs: list[tuple[str, str]]) -> tuple[Path, Path]:
    """source.txt and target.txt, one sentence and its reference per line."""
    source, target = tmp_path / "source.txt", tmp_path / "target.txt"
    source.write_text("".join(f"{s}\n" for s, _ in pairs), encoding="utf-8")
    target.write_text("".join(f"{t}\n" for _, t in pairs), encoding="utf-8")
    return source, target


TWO_PAIRS = [("Hello there .", "Hallo ."), ("Thank you .", "Danke .")]


def test_text_agent_names_non_utf8_and_empty_sources_and_targets(checkpoints, tmp_path):
    good, target = _text_lists(tmp_path, TWO_PAIRS)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"Hallo .\n" + NON_UTF8 + b"\n")
    empty_line = tmp_path / "empty-line.txt"
    empty_line.write_text("Hallo .\n\n", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    cases = [
        (latin, target, r"--source .*latin1.txt: not UTF-8 text"),
        (good, latin, r"--target .*latin1.txt: not UTF-8 text .*re-encode it as UTF-8"),
        (empty_line, target, r"--source .*empty-line.txt line 2 \(instance 1\) is empty"),
        (good, empty_line, r"--target .*empty-line.txt line 2 \(instance 1\) is empty; every line needs a reference"),
        (empty, target, r"--source .*empty.txt: empty file"),
    ]
    out = tmp_path / "out"
    refused_before_the_first_instance(checkpoints / "text", [(src, tgt, out, (), why) for src, tgt, why in cases])
    assert not (tmp_path / "out" / "instances.log").exists()


def refused_before_the_first_instance(checkpoint: Path, cases: list[tuple]) -> None:
    """Each (source, target, output, extra args, problem): the run stops with one line matching ``problem``."""
    for source, target, output, extra, problem in cases:
        with pytest.raises(SystemExit, match=problem) as caught:
            simuleval(checkpoint, source, target, output, *extra)
        one_line(str(caught.value))


def test_text_agent_refuses_bad_run_options_before_the_first_instance(checkpoints, tmp_path):
    source, target = _text_lists(tmp_path, TWO_PAIRS)
    a_file = tmp_path / "a_file"
    a_file.write_text("", encoding="utf-8")
    out = tmp_path / "out"
    refused_before_the_first_instance(checkpoints / "text", [
        (source, target, out, ("--threads", "-2"), r"--threads -2: give a number of threads"),
        (source, target, a_file, (), r"--output .*a_file: a file, not a folder"),
        (source, target, out, ("--start-index", "5"), r"--start-index 5 is past the 2 lines of --source"),
        (source, target, out, ("--end-index", "0"), r"--end-index 0 is not after --start-index 0"),
    ])  # fmt: skip
    assert not (out / "instances.log").exists()


def test_text_agent_continues_a_run_killed_while_writing_its_log(checkpoints, tmp_path):
    source, target = _text_lists(tmp_path, [*TWO_PAIRS, ("Good night .", "Gute Nacht .")])
    whole = simuleval(checkpoints / "text", source, target, tmp_path / "whole", "--head", "wait-k", "--k", "1")
    killed = tmp_path / "killed"
    killed.mkdir()
    lines = (tmp_path / "whole" / "instances.log").read_text(encoding="utf-8").splitlines()
    (killed / "instances.log").write_text(lines[0] + "\n" + lines[1][:40], encoding="utf-8")  # cut in line 2
    resumed = simuleval(checkpoints / "text", source, target, killed, "--head", "wait-k", "--k", "1",
                        "--continue-unfinished")  # fmt: skip
    assert [r["index"] for r in resumed] == [0, 1, 2]
    assert [r["prediction"] for r in resumed] == [r["prediction"] for r in whole]
    (killed / "instances.log").write_text("not json\n" + lines[0] + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"instances.log line 1 is not JSON"):
        simuleval(checkpoints / "text", source, target, killed, "--continue-unfinished")


# ---- the scorer --------------------------------------------------------------------------------------------


def test_scorer_scores_the_good_run_and_an_empty_reference(good_speech_run, tmp_path):
    out, instances = good_speech_run
    scores = score_output(out, write=False)
    assert scores["n_instances"] == len(GOOD) and scores["source_type"] == "speech"
    log = tmp_path / "empty-reference"
    log.mkdir()
    rows = [{**instances[0], "reference": ""}, instances[1]]
    (log / "instances.log").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    scores = score_output(log, write=False)
    assert scores["n_instances"] == 2 and np.isfinite(scores["BLEU"]) and np.isfinite(scores["AL"])


@pytest.mark.parametrize("content,problem", [
    (None, r"instances.log: no such file; run simuleval with --output"),
    (b"", r"instances.log: no instances"),
    (b'{"index": 0, "prediction": "a", "reference": "b", "source_length": 3}\n{"index": 1, "predic',
     r"instances.log line 2: not JSON .*was the run interrupted\?"),
    (b'{"index": 0, "prediction": "Gr\xfc\xdfe", "reference": "b", "source_length": 3}\n',
     r"instances.log: not UTF-8"),
    (b'{"index": 0, "reference": "b", "source_length": 3}\n', r"instances.log line 1: no 'prediction' field"),
    (b'[1, 2]\n', r"instances.log line 1: a JSON list, not an object"),
    (b'{"index": 0, "prediction": "a", "reference": "b", "source_length": 3, "delays": "soon"}\n',
     r"line 1: 'delays' is not a list of numbers"),
], ids=["missing", "empty", "truncated-json", "non-utf8", "missing-field", "not-an-object", "bad-delays"])  # fmt: skip
def test_scorer_names_a_bad_log_in_one_line(tmp_path, content, problem, capsys):
    out = tmp_path / "out"
    out.mkdir()
    if content is not None:
        (out / "instances.log").write_bytes(content)
    with pytest.raises(ScoreError, match=problem):
        score_output(out)
    assert score_main([str(out)]) == 2
    assert one_line(capsys.readouterr().err).startswith("error: ")
