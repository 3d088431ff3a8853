"""Live translation in the terminal (simul_agents.live) on tiny models: the stream, the clock, the command."""

import builtins
import io
import re
import time

import numpy as np
import pytest
import soundfile as sf
from fixtures_models import offline_words, tone, untied_tiny

from simul_agents import live
from simul_agents.live import Display, LiveStream, Result, build_head, latency_summary, run_stream
from streaming_llm.checkpoint import load_checkpoint, save_checkpoint
from streaming_llm.heads import make_head
from streaming_llm.lean import cxx_compiler
from streaming_llm.long_stream import LongStream

SENTENCE = "I would like a cup of coffee ."


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    speech, text = untied_tiny("speech"), untied_tiny("text")
    save_checkpoint(speech, root / "speech-ckpt")
    save_checkpoint(text, root / "text-ckpt")
    save_checkpoint(untied_tiny("speech", max_source_embeddings=8), root / "short-ckpt")  # 2 blocks: 0.64 s
    sf.write(root / "tone.wav", tone(1.0), 16000, subtype="FLOAT")
    (root / "sentences.txt").write_text(f"{SENTENCE}\nWhere is the train station ?\n", encoding="utf-8")
    return {"root": root, "speech": speech, "text": text}


LIMITS = live.Limits(max_target_tokens=24)


def test_offline_head_streamed_in_chunks_writes_the_offline_decode(data):
    model = data["speech"]
    audio = tone(1.0)
    stream = LiveStream(model, make_head("offline"), LIMITS)
    for chunk, _ in live.audio_chunks(audio, 160):
        stream.push_audio(chunk)
        assert stream.drain() == []  # the offline head reads until the source is finished
    stream.finish()
    stream.drain()
    expected = offline_words(model, audio)
    assert expected and stream.words == expected
    assert stream.delays == [1000.0] * len(expected)  # every word after the whole second of audio
    assert stream.done


def test_wait_k_writes_at_most_units_minus_k_plus_one_words_before_the_end(data):
    words = SENTENCE.split()
    stream = LiveStream(data["text"], make_head("wait-k", k=2), LIMITS)
    for word in words:
        stream.push_words([word])
        stream.drain()
        units = stream.session.units_read
        assert len(stream.session.words) <= max(0, units - 2 + 1)
    stream.finish()
    stream.drain()
    assert stream.delays == sorted(stream.delays) and stream.delays[0] >= 2
    assert any(d < len(words) for d in stream.delays), "wait-2 writes before the source ends"


@pytest.mark.parametrize("mode", ["end", "read"])
def test_a_live_stream_re_reads_its_words_as_a_session_with_the_same_option_does(data, mode):
    """``--reencode`` in live: the stream writes what a ``StreamingSession`` with that option writes on the same
    schedule (wait-2), and not what it writes without it."""
    from streaming_llm.engine import StreamingSession

    model, words = data["text"], SENTENCE.split()

    def session_words(reencode):
        session = StreamingSession(model, max_target_tokens=64, reencode=reencode)
        for i, word in enumerate(words):
            session.push_words([word])
            if i >= 2:
                session.write_word()
        session.finish_source()
        while session.write_word() is not None:
            pass
        return session.words

    stream = LiveStream(model, make_head("wait-k", k=3), live.Limits(max_target_tokens=64), reencode=mode)
    for word in words:
        stream.push_words([word])
        stream.drain()
    stream.finish()
    stream.drain()
    assert stream.session.words == session_words(mode) != session_words("never")  # raw words (the display cleans)


def test_oracle_head_is_refused_live_with_the_heads_that_work(data):
    with pytest.raises(ValueError, match="cannot run live; use one of entropy"):
        build_head(None, "oracle")


def test_latency_summary_matches_simuleval_formulas_and_defaults_to_hypothesis_length():
    scores = latency_summary([500.0, 1000.0, 1000.0], [600.0, 1200.0, 1300.0], 1000.0)
    # AL with |Y| = 3: gamma = 3/1000; terms 500 - 0, 1000 - 333.3 (the first delay at the source end stops it)
    assert scores["AL"] == pytest.approx((500 + (1000 - 1000 / 3)) / 2)
    assert scores["LAAL"] == scores["AL"]
    assert scores["AL_CA"] == pytest.approx((600 + (1200 - 1000 / 3)) / 2)
    assert latency_summary([], None, 1000.0)["AL"] is None


class FakeStream:
    """A stream whose pushes take a known compute time on a fake clock; it writes one word after each push."""

    speech, unit = True, "ms"

    def __init__(self, clock, compute_s):
        self.clock, self.compute_s = clock, compute_s
        self.received, self.words, self.delays, self.pending = 0, [], [], False

    @property
    def source(self):
        return self.received / 16

    def push_audio(self, chunk):
        self.clock.now += self.compute_s
        self.received += len(chunk)
        self.pending = True

    def finish(self):
        pass

    def step(self):
        if not self.pending:
            return None
        self.pending = False
        self.words.append(f"w{len(self.words)}")
        self.delays.append(self.source)
        return self.words[-1]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


@pytest.mark.parametrize("compute_s, expected", [(0.5, [820.0, 1320.0, 1820.0]), (0.1, [420.0, 740.0, 1060.0])])
def test_fast_mode_elapsed_is_the_simulated_real_time_clock(compute_s, expected):
    clock = FakeClock()
    stream = FakeStream(clock, compute_s)
    chunks = [(np.zeros(5120, np.float32), ready) for ready in (320.0, 640.0, 960.0)]
    result = run_stream(stream, chunks, pace=False, wall_clock=False, clock=clock, sleep=clock.sleep)
    # each chunk is ready at its end; the model is busy compute_s per chunk: max(busy, ready) + compute
    assert result.elapsed == pytest.approx(expected)
    assert result.delays == [320.0, 640.0, 960.0]


def test_a_chunk_is_ready_when_its_last_sample_or_word_has_arrived():
    """The ready time paces the file and starts the simulated clock of --fast: a word cannot be out before the
    source it was written on has arrived."""
    readies = [ready for _, ready in live.audio_chunks(np.zeros(16000, np.float32), 320)]
    assert readies == [320.0, 640.0, 960.0, 1000.0]
    assert [ready for _, ready in live.word_chunks(["a", "b", "c"], 400)] == [400, 800, 1200]


def test_paced_mode_waits_for_each_chunk_and_elapsed_is_the_wall_clock():
    clock = FakeClock()
    stream = FakeStream(clock, 0.1)
    chunks = [(np.zeros(5120, np.float32), ready) for ready in (320.0, 640.0)]
    result = run_stream(stream, chunks, pace=True, wall_clock=True, clock=clock, sleep=clock.sleep)
    assert result.elapsed == pytest.approx([420.0, 740.0])  # slept to 320 ms, 100 ms of compute; then 640 + 100


def test_command_fast_prints_decisions_words_and_latency(data, capsys):
    out = io.StringIO()
    root = data["root"]
    code = live.main([str(root / "tone.wav"), "--checkpoint", str(root / "speech-ckpt"), "--head", "wait-k",
                      "--head-param", "k=2", "--fast", "--max-target-tokens", "24"], out=out)  # fmt: skip
    text = out.getvalue()
    assert code == 0, capsys.readouterr().err
    assert "READ" in text and "WRITE" in text and "(delay 0.64 s" in text
    summary = text.strip().splitlines()[-1]
    assert summary.startswith("source 1.00 s") and "AL " in summary and "computation-aware: AL" in summary


def test_fast_runs_speech_and_text_unpaced_on_the_simulated_clock(data, monkeypatch):
    """--fast: no waiting for the source's real time, and elapsed simulated from the compute time."""
    calls = []
    real_run_stream = live.run_stream

    def spy(stream, chunks, **options):
        calls.append((options["pace"], options["wall_clock"]))
        return real_run_stream(stream, chunks, **options)

    monkeypatch.setattr(live, "run_stream", spy)
    root = data["root"]
    for source, checkpoint in (("tone.wav", "speech-ckpt"), ("sentences.txt", "text-ckpt")):
        assert live.main([str(root / source), "--checkpoint", str(root / checkpoint), "--head", "wait-k", "--fast",
                          "--max-target-tokens", "24"], out=io.StringIO()) == 0  # fmt: skip
    assert calls == [(False, False)] * 3  # the speech file, then the two lines of text


def test_command_runs_the_llm_in_fp16_and_refuses_fp16_with_int8(data, capsys):
    root = data["root"]
    argv = [str(root / "tone.wav"), "--checkpoint", str(root / "speech-ckpt"), "--head", "wait-k",
            "--head-param", "k=2", "--fast", "--max-target-tokens", "24"]  # fmt: skip
    out = io.StringIO()
    assert live.main([*argv, "--fp16"], out=out) == 0, capsys.readouterr().err
    assert "WRITE" in out.getvalue()
    assert live.main([*argv, "--fp16", "--int8"], out=io.StringIO()) == 2
    assert "--int8 and --fp16 both given" in capsys.readouterr().err


def test_command_at_real_time_pace_takes_the_audio_duration(data):
    root = data["root"]
    out = io.StringIO()
    start = time.perf_counter()
    code = live.main([str(root / "tone.wav"), "--checkpoint", str(root / "speech-ckpt"), "--head", "offline",
                      "--max-target-tokens", "24"], out=out)  # fmt: skip
    assert code == 0
    assert time.perf_counter() - start >= 1.0 - 0.32  # the last chunk is pushed at 1.0 s; loading came first
    translation = [line for line in out.getvalue().splitlines() if line.startswith("translation: ")]
    assert translation == ["translation: " + live.printable(" ".join(offline_words(data["speech"], tone(1.0))))]


def test_a_text_line_longer_than_the_models_context_is_named_before_any_is_translated(data, tmp_path, capsys):
    (tmp_path / "talk.txt").write_text(f"{SENTENCE}\n\n{' '.join(['Donaudampfschifffahrt'] * 200)}\n")
    out = io.StringIO()
    code = live.main([str(tmp_path / "talk.txt"), "--checkpoint", str(data["root"] / "text-ckpt"), "--fast"], out=out)
    assert code == 2 and "translation:" not in out.getvalue()
    assert "talk.txt line 3: 200 words make" in capsys.readouterr().err


def test_command_translates_a_text_file_line_by_line(data):
    root = data["root"]
    out = io.StringIO()
    code = live.main([str(root / "sentences.txt"), "--checkpoint", str(root / "text-ckpt"), "--head", "offline",
                      "--fast", "--max-target-tokens", "24"], out=out)  # fmt: skip
    assert code == 0
    lines = out.getvalue().splitlines()
    translations = [line.removeprefix("translation: ") for line in lines if line.startswith("translation: ")]
    sources = [SENTENCE.split(), "Where is the train station ?".split()]
    assert translations == [live.printable(" ".join(offline_words(data["text"], source))) for source in sources]
    assert sum("words | AL" in line for line in lines) == 2


def test_reencode_reaches_the_streams_of_a_text_file(data, tmp_path):
    """--reencode read on a text file: each line is translated as a LiveStream with that option translates it."""
    (tmp_path / "one.txt").write_text(SENTENCE + "\n", encoding="utf-8")
    expected = LiveStream(data["text"], make_head("wait-k", k=3), live.Limits(max_target_tokens=64), reencode="read")
    run_stream(expected, live.word_chunks(SENTENCE.split(), 1), pace=False, wall_clock=False)
    out = io.StringIO()
    assert live.main([str(tmp_path / "one.txt"), "--checkpoint", str(data["root"] / "text-ckpt"), "--fast", "--head",
                      "wait-k", "--head-param", "k=3", "--max-target-tokens", "64", "--reencode", "read"],
                     out=out) == 0  # fmt: skip
    assert f"translation: {live.printable(' '.join(expected.words))}\n" in out.getvalue()


def test_a_file_longer_than_the_context_is_cut_into_segments_as_the_agent_cuts_it(data):
    """1.0 s of tone through a model that hears 0.64 s: two segments (a hard cut, no pause), each translated on its
    own, the words LongStream (the agent's --long-audio) writes for the same audio, their delays the whole file's."""
    root = data["root"]
    model = load_checkpoint(root / "short-ckpt")
    audio = tone(1.0)
    # this untrained model writes words of MAX_WORD_TOKENS (24) tokens: a cap of 25 lets a segment write one such
    # word and a one-token word (24, the other tests' cap, used to as well: the cap let one token past it)
    long, expected = LongStream(model, make_head("wait-k", k=1), max_target_tokens=25), []
    for chunk, _ in live.audio_chunks(audio, 320):  # live's chunks, so that both decide at the same times
        expected += long.push_audio(chunk)
    expected += long.finish()
    assert long.n_segments == 2 and expected
    out = io.StringIO()
    code = live.main([str(root / "tone.wav"), "--checkpoint", str(root / "short-ckpt"), "--fast", "--head", "wait-k",
                      "--head-param", "k=1", "--max-target-tokens", "25"], out=out)  # fmt: skip
    text = out.getvalue()
    assert code == 0 and "is 1.0 s, longer than one utterance (0.6 s" in text
    assert f"translation: {live.printable(' '.join(expected))}" in text
    stream = live.SegmentedStream(model, make_head("wait-k", k=1), live.Limits(max_target_tokens=25))
    run_stream(stream, live.audio_chunks(audio, 320), pace=False, wall_clock=False)
    assert stream.words == expected and stream.n_segments == 2
    assert stream.delays == [320.0, 640.0, 960.0, 1000.0]  # a word after each 320 ms block; a cut at 640 ms


def test_command_refuses_negative_threads_and_no_target_tokens(data, capsys):
    argv = [str(data["root"] / "tone.wav"), "--checkpoint", str(data["root"] / "speech-ckpt"), "--fast"]
    assert live.main([*argv, "--threads", "-1"]) == 2
    assert "--threads -1: give a number of threads" in capsys.readouterr().err
    assert live.main([*argv, "--max-target-tokens", "0"]) == 2
    assert "--max-target-tokens 0: at least 1" in capsys.readouterr().err
    assert live.main([*argv, "--max-len-a", "-1"]) == 2
    assert "--max-len-a -1.0 --max-len-b 10.0: give finite numbers >= 0" in capsys.readouterr().err


def test_the_word_cap_options_reach_the_stream(data):
    out = io.StringIO()
    root = data["root"]
    assert live.main([str(root / "tone.wav"), "--checkpoint", str(root / "speech-ckpt"), "--fast", "--head", "offline",
                      "--max-len-a", "0", "--max-len-b", "2"], out=out) == 0  # fmt: skip
    (line,) = [line for line in out.getvalue().splitlines() if line.startswith("translation: ")]
    assert 1 <= len(line.removeprefix("translation: ").split()) <= 2


@pytest.mark.parametrize("options,problem", [
    (["--head", "entropy", "--threshold", "nan"], "head 'entropy': threshold=nan is not a finite number"),
    (["--head", "attention", "--head-param", "threshold=inf"], "head 'attention': threshold='inf' is not a finite"),
    (["--threshold", "1", "--head-param", "threshold=3"], "--threshold 1.0 and --head-param threshold=3 both set"),
    (["--head-param", "threshold=3", "--threshold", "1"], "--threshold 1.0 and --head-param threshold=3 both set"),
    (["--head", "offline", "--threshold", "1"], "does not apply to the 'offline' head; it takes no parameters"),
], ids=["nan", "inf-param", "flag-first", "param-first", "offline"])  # fmt: skip
def test_command_refuses_a_non_finite_or_doubly_given_threshold_in_one_line(data, capsys, options, problem):
    argv = [str(data["root"] / "tone.wav"), "--checkpoint", str(data["root"] / "speech-ckpt"), "--fast"]
    assert live.main([*argv, *options]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("live: error: ") and problem in line, line
    assert not captured.out  # refused before the model is loaded


def test_mic_without_sounddevice_or_portaudio_says_what_to_install(data, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_portaudio(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_portaudio)
    code = live.main(["--mic", "--checkpoint", str(data["root"] / "speech-ckpt")])
    assert code == 2 and "apt-get install libportaudio2" in capsys.readouterr().err


@pytest.mark.parametrize("checkpoint, source, problem", [
    ("text-ckpt", "tone.wav", "not UTF-8 text"),
    ("text-ckpt", "--mic", "--mic needs a speech checkpoint"),
    ("speech-ckpt", "sentences.txt", "this checkpoint translates speech: give it an audio file"),
    ("text-ckpt", "long.txt", "long.txt line 1: 200 words make"),
])  # fmt: skip
def test_a_source_the_model_cannot_take_is_refused_before_quantizing_or_compiling(
    data, capsys, monkeypatch, checkpoint, source, problem
):
    root = data["root"]
    (root / "long.txt").write_text(" ".join(["Donaudampfschifffahrt"] * 200) + "\n", encoding="utf-8")
    work = []
    monkeypatch.setattr(live, "set_precision", lambda *a: work.append("--int4") or pytest.fail("quantized first"))
    monkeypatch.setattr(live, "compile_steps", lambda *a: work.append("--compile") or pytest.fail("compiled first"))
    given = ["--mic"] if source == "--mic" else [str(root / source)]
    code = live.main([*given, "--checkpoint", str(root / checkpoint), "--int4", "--compile"], out=io.StringIO())
    assert code == 2 and not work
    assert problem in capsys.readouterr().err


def test_ctrl_c_outside_a_recording_exits_130_and_says_interrupted(data, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(live, "run_speech", interrupted)
    code = live.main([str(data["root"] / "tone.wav"), "--checkpoint", str(data["root"] / "speech-ckpt"), "--fast"],
                     out=io.StringIO())  # fmt: skip
    assert code == 130 and capsys.readouterr().err.strip() == "live: interrupted"


def test_mic_with_no_input_device_says_so(data, capsys):
    try:
        sd = live.import_sounddevice()
        sd.query_devices(kind="input")
        pytest.skip("this machine has a microphone")
    except live.LiveError:
        pytest.skip("PortAudio is not installed here (the message is tested above)")
    except Exception:
        pass
    code = live.main(["--mic", "--checkpoint", str(data["root"] / "speech-ckpt")])
    assert code == 2 and "no microphone found" in capsys.readouterr().err


def test_terminal_display_redraws_in_place(data):
    out = io.StringIO()
    stream = LiveStream(data["text"], make_head("wait-k", k=1), LIMITS)
    display = Display(out, "words", 3.0, tty=True)
    for word in "I would like".split():
        stream.push_words([word])
        while (w := stream.step()) is not None:
            display.word(stream, w, 0.0)
        display.chunk_done(stream)
    pieces = out.getvalue().split("\r\033[J")[1:]  # each frame, then the cursor-up that the next one starts with
    assert len(pieces) >= 3
    for piece, following in zip(pieces, pieces[1:], strict=False):
        lines = piece.count("\n") + 1
        assert following and piece.endswith(f"\033[{lines - 1}A" if lines > 1 else ""), "the next frame overwrites"
    last = pieces[-1]
    assert last.startswith("source 3 w / 3 w") and "\033[2m[1 w]" in last
    ours = re.sub(r"\033\[(2m|0m|\d+A)", "", last)  # the display's own codes: dim, reset, cursor up
    assert all(c.isprintable() or c == "\n" for c in ours), "model output cannot drive the terminal"


def test_the_translation_line_shows_control_characters_as_replacements(data, monkeypatch):
    """A model can write an escape code; the WRITE lines showed it as U+FFFD, the final translation line printed it
    raw (ESC, BEL: they drove the terminal)."""

    def step(stream):  # one word holding an escape code and a bell
        if stream.words:
            return None
        stream.words.append("a\x1b[2Jb\x07")
        stream.delays.append(stream.source)
        return stream.words[-1]

    monkeypatch.setattr(LiveStream, "step", step)
    out = io.StringIO()
    assert live.main([str(data["root"] / "tone.wav"), "--checkpoint", str(data["root"] / "speech-ckpt"), "--fast"],
                     out=out) == 0  # fmt: skip
    assert "translation: a\ufffd[2Jb\ufffd\n" in out.getvalue() and "\x1b" not in out.getvalue()


def test_the_summary_line_shows_the_results_latency_and_real_time_factor():
    """AL against the reference's length (LAAL: the longer of it and the hypothesis), the _CA pair from elapsed,
    and the real-time factor compute / source."""
    result = Result(["a", "b"], [500.0, 1000.0], [700.0, 1400.0], 1000.0, "ms", 0.25)
    scores = latency_summary(result.delays, result.elapsed, 1000.0, 1)
    assert len({round(v) for v in scores.values()}) == 4  # the four numbers differ: each is where it belongs
    line = live.summary_line(result, "one")
    assert line == (f"source 1.00 s, 2 words | AL {scores['AL']:.0f} ms, LAAL {scores['LAAL']:.0f} ms | "
                    f"computation-aware: AL {scores['AL_CA']:.0f} ms, LAAL {scores['LAAL_CA']:.0f} ms | "
                    "compute 0.25 s (real-time factor 0.25)")  # fmt: skip


def test_result_text_joins_words():
    assert Result(["a", "b"], [1.0, 2.0], [1.0, 2.0], 2.0, "words", 0.0).text == "a b"


def test_the_text_summary_line_gives_computation_aware_latency_in_source_words():
    """elapsed (ms) over the interval between source words: a word out 1.5 intervals in lags as 1.5 words."""
    result = Result(["a", "b"], [1.0, 2.0], [600.0, 1000.0], 2.0, "words", 0.1)
    scores = latency_summary([1.0, 2.0], [1.5, 2.5], 2.0)
    line = live.text_summary_line(result, 400, None)
    assert line.endswith(f" | computation-aware: AL {scores['AL_CA']:.2f} words, LAAL {scores['LAAL_CA']:.2f} words")
    assert line.startswith(f"source 2 words, 2 words | AL {scores['AL']:.2f} words")


@pytest.mark.skipif(cxx_compiler() is None, reason="TorchInductor needs a C++ compiler (make setup installs g++)")
def test_command_with_compiled_steps_writes_what_it_writes_eagerly_and_refuses_them_in_fp16(data, capsys):
    root = data["root"]
    argv = [str(root / "tone.wav"), "--checkpoint", str(root / "speech-ckpt"), "--head", "wait-k",
            "--head-param", "k=2", "--fast", "--max-target-tokens", "24"]  # fmt: skip
    eager, compiled = io.StringIO(), io.StringIO()
    assert live.main(argv, out=eager) == 0 and live.main([*argv, "--compile"], out=compiled) == 0
    def writes(out: io.StringIO) -> list[str]:  # the WRITE lines, but their elapsed wall clock
        return [re.sub(r", elapsed [0-9.]+ s", "", line) for line in out.getvalue().splitlines() if "WRITE" in line]


    assert writes(eager) and writes(eager) == writes(compiled)
    capsys.readouterr()
    assert live.main([*argv, "--compile", "--fp16"], out=io.StringIO()) == 2
    assert "compiled steps need a float32" in capsys.readouterr().err


class FakeMicrophone:
    """sounddevice's surface that microphone_chunks uses: a device at 16 kHz whose stream, once opened, delivers
    ``audio`` in blocks through the callback, as PortAudio's thread would."""

    PortAudioError = RuntimeError

    def __init__(self, audio: np.ndarray):
        self.audio = audio

    def query_devices(self, device=None, kind=None):
        return {"default_samplerate": 16000}

    def check_input_settings(self, **settings):
        pass

    def InputStream(self, samplerate, blocksize, callback, **settings):  # noqa: N802 - sounddevice's name
        audio = self.audio

        class Stream:
            def __enter__(self):
                for start in range(0, len(audio), blocksize):
                    callback(audio[start : start + blocksize, None], blocksize, None, None)
                return self

            def __exit__(self, *exc):
                return False

        return Stream()


def test_the_microphone_records_exactly_seconds_of_audio(monkeypatch):
    """--seconds 1.0 with 320 ms blocks: the last block is cut, so the source is 1.00 s, not 1.28 s."""
    audio = tone(2.0)
    monkeypatch.setattr(live, "import_sounddevice", lambda: FakeMicrophone(audio))
    chunks = list(live.microphone_chunks(320, 1.0))
    assert [ready for _, ready in chunks] == [320.0, 640.0, 960.0, 1000.0]
    np.testing.assert_array_equal(np.concatenate([chunk for chunk, _ in chunks]), audio[:16000])


def test_the_microphone_records_past_one_utterance_cutting_at_pauses(data, monkeypatch):
    root = data["root"]
    monkeypatch.setattr(live, "import_sounddevice", lambda: FakeMicrophone(tone(2.0)))
    out = io.StringIO()
    code = live.main(["--mic", "--seconds", "1.0", "--checkpoint", str(root / "short-ckpt"), "--head", "wait-k",
                      "--head-param", "k=1", "--max-target-tokens", "24"], out=out)  # fmt: skip
    text = out.getvalue()
    assert code == 0 and "recording up to 1.0 s (one utterance: 0.6 s; longer speech is cut at pauses)" in text
    model = load_checkpoint(root / "short-ckpt")
    stream = live.SegmentedStream(model, make_head("wait-k", k=1), LIMITS)
    run_stream(stream, live.audio_chunks(tone(1.0), 320), pace=False, wall_clock=False)
    translation = live.printable(" ".join(stream.words))
    assert f"translation: {translation}" in text  # 1.0 s of the 2.0 s recorded, in two segments


def test_a_second_ctrl_c_while_recording_interrupts():
    """The first Ctrl-C ends the recording (its translation is still finished); a second one stops the program."""
    import signal
    import threading

    stop = threading.Event()
    with live.ctrl_c_ends_recording(stop):
        signal.raise_signal(signal.SIGINT)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_mic_seconds_must_be_a_positive_length(data, capsys):
    code = live.main(["--mic", "--seconds", "0", "--checkpoint", str(data["root"] / "speech-ckpt")])
    assert code == 2 and "--seconds 0.0: give how long to record" in capsys.readouterr().err


def test_mic_elapsed_counts_from_the_start_of_the_recording(data, monkeypatch):
    """The microphone clock starts when the recording did, not when the first chunk is translated: every word is
    out after the first 320 ms block was recorded (here the blocks arrive at once, so no later bound holds)."""
    monkeypatch.setattr(live, "import_sounddevice", lambda: FakeMicrophone(tone(1.0)))
    out = io.StringIO()
    code = live.main(["--mic", "--seconds", "1.0", "--checkpoint", str(data["root"] / "speech-ckpt"), "--head",
                      "wait-k", "--head-param", "k=1", "--max-target-tokens", "24"], out=out)  # fmt: skip
    times = re.findall(r"\(delay ([0-9.]+) s, elapsed ([0-9.]+) s\)", out.getvalue())
    assert code == 0 and times
    assert all(float(elapsed) >= 0.32 for _, elapsed in times), times


def test_ctrl_c_while_a_mic_chunk_is_translated_ends_the_recording_and_prints_the_translation(data, monkeypatch):
    """Ctrl-C is how a recording ends. Landing while the model worked on a chunk (not while waiting for the next),
    it used to raise there: 'live: interrupted', exit 130, and no translation or summary."""
    import signal

    pushed = []
    real_push = LiveStream.push_audio

    def push(stream, samples):
        pushed.append(samples.shape[0])
        if len(pushed) == 3:
            signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C while the third chunk is translated
        return real_push(stream, samples)

    monkeypatch.setattr(LiveStream, "push_audio", push)
    monkeypatch.setattr(live, "import_sounddevice", lambda: FakeMicrophone(tone(3.0)))
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under nohup
    out = io.StringIO()
    code = live.main(["--mic", "--seconds", "0.6", "--checkpoint", str(data["root"] / "short-ckpt"), "--head",
                      "wait-k", "--head-param", "k=1", "--max-target-tokens", "24", "--chunk-ms", "100"],
                     out=out)  # fmt: skip
    assert code == 0 and len(pushed) == 3  # the chunk being translated was finished; no chunk after it
    assert "translation: " in out.getvalue() and "source 0.30 s" in out.getvalue()
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C does what it did before, afterwards
