"""The SimulEval agents end to end on tiny models, in process (``simuleval.cli.evaluate``)."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from fixtures_models import untied_tiny

from simul_agents import evaluate_inprocess
from simul_agents.proactive_agent import (
    AudioInput,
    ProactiveAgent,
    ProactiveSpeechAgent,
    ProactiveTextAgent,
)
from streaming_llm.checkpoint import save_checkpoint
from streaming_llm.lean import cxx_compiler

SENTENCES = ["I would like a cup of coffee .", "Where is the train station ?", "Thank you for your help ."]
REFERENCES = ["Ich möchte eine Tasse Kaffee .", "Wo ist der Bahnhof ?", "Danke für Ihre Hilfe ."]
LIMITS = ["--max-target-tokens", "24", "--no-progress-bar"]


def tone(seconds: float, rate: int = 16000, shift: float = 0.0) -> np.ndarray:
    """Band-limited (< 3 kHz) test audio: it survives 8 kHz resampling."""
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * (220 + shift) * t) + 0.2 * np.sin(2 * np.pi * 1300 * t + 1)
            + 0.1 * np.sin(2 * np.pi * 2900 * t)).astype(np.float32)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("agents")
    save_checkpoint(untied_tiny("text"), root / "text-ckpt")
    save_checkpoint(untied_tiny("speech"), root / "speech-ckpt")
    save_checkpoint(untied_tiny("speech", block_ms=640), root / "speech640-ckpt")
    save_checkpoint(untied_tiny("text", max_source_embeddings=24), root / "small-text-ckpt")
    (root / "source.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    (root / "target.txt").write_text("\n".join(REFERENCES) + "\n", encoding="utf-8")
    wavs = []
    for i, seconds in enumerate((1.5, 1.25, 0.9)):
        sf.write(root / f"s{i}.wav", tone(seconds, shift=40 * i), 16000, subtype="FLOAT")
        wavs.append(str(root / f"s{i}.wav"))
    (root / "speech.txt").write_text("\n".join(wavs) + "\n", encoding="utf-8")
    return root


def simuleval(agent, checkpoint, source, target, output, *extra) -> list[dict]:
    argv = ["--checkpoint", checkpoint, "--source", source, "--target", target, "--output", output, *LIMITS, *extra]
    evaluate_inprocess(agent, argv)
    lines = (output / "instances.log").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def text_run(data, tmp_path, *extra, agent=ProactiveAgent, checkpoint="text-ckpt", name="out"):
    return simuleval(agent, data / checkpoint, data / "source.txt", data / "target.txt", tmp_path / name, *extra)


def speech_run(data, tmp_path, *extra, source="speech.txt", checkpoint="speech-ckpt", name="out", segment=320):
    return simuleval(ProactiveAgent, data / checkpoint, data / source, data / "target.txt", tmp_path / name,
                     "--source-segment-size", str(segment), *extra)  # fmt: skip


# ---- end to end -------------------------------------------------------------------------------------------

HEADS = [
    ["--head", "entropy", "--threshold", "6"],
    ["--head", "attention", "--threshold", "0.5"],
    ["--head", "wait-k", "--k", "2"],
    ["--head", "fixed-chunk", "--head-param", "chunk=2", "--head-param", "words=2"],
    ["--head", "local-agreement", "--k", "2"],
    ["--head", "probe", "--threshold", "0.5"],
    ["--head", "oracle"],
    ["--head", "offline"],
]


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h[1])
def test_text_agent_end_to_end(data, tmp_path, head):
    instances = text_run(data, tmp_path, *head)
    assert [ins["index"] for ins in instances] == [0, 1, 2]
    for ins, sentence in zip(instances, SENTENCES, strict=True):
        assert ins["source_length"] == len(sentence.split())
        assert ins["prediction"].strip(), "every instance writes something"
        delays = ins["delays"]
        assert delays == sorted(delays) and 1 <= delays[0] and delays[-1] <= len(sentence.split())
    assert (tmp_path / "out" / "scores.tsv").is_file()


@pytest.mark.parametrize("head", [HEADS[0], HEADS[1], HEADS[4]], ids=lambda h: h[1])
def test_speech_agent_end_to_end(data, tmp_path, head):
    instances = speech_run(data, tmp_path, *head)
    assert [ins["source_length"] for ins in instances] == pytest.approx([1500, 1250, 900])
    for ins in instances:
        assert ins["prediction"].strip()
        assert ins["delays"] == sorted(ins["delays"]) and ins["delays"][-1] <= ins["source_length"]


def test_entrypoint_dispatches_by_checkpoint_modality(data):
    class Args:  # what SimulEval's parser gives the agent
        checkpoint, head, threshold, k, head_param = str(data / "text-ckpt"), "wait-k", None, 2, None
        max_len_a, max_len_b, max_target_tokens, skip_failed, threads = 2.0, 10.0, 24, False, 0
        source, target, start_index, end_index, output = str(data / "source.txt"), None, 0, -1, None
        source_segment_size = 1

    assert type(ProactiveAgent.from_args(Args)) is ProactiveTextAgent
    Args.checkpoint = str(data / "speech-ckpt")
    Args.source_segment_size, Args.source = 320, str(data / "speech.txt")
    assert type(ProactiveAgent.from_args(Args)) is ProactiveSpeechAgent
    with pytest.raises(SystemExit, match="ProactiveTextAgent needs a text checkpoint"):
        ProactiveTextAgent.from_args(Args)


# ---- wait-k: exact delays --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_wait_k_text_delays(data, tmp_path, k):
    instances = text_run(data, tmp_path, "--head", "wait-k", "--k", str(k), "--max-len-a", "3")
    for ins in instances:
        m = ins["source_length"]
        assert ins["delays"] == [min(i + k - 1, m) for i in range(1, len(ins["delays"]) + 1)]


@pytest.mark.parametrize("checkpoint,segment,k", [("speech-ckpt", 320, 2), ("speech-ckpt", 160, 1),
                                                  ("speech640-ckpt", 320, 1)])  # fmt: skip
def test_wait_k_speech_delays_count_model_blocks(data, tmp_path, checkpoint, segment, k):
    """A unit is one encoder block (320 or 640 ms), whatever the segment size."""
    block = 640 if checkpoint == "speech640-ckpt" else 320
    instances = speech_run(data, tmp_path, "--head", "wait-k", "--k", str(k), "--max-len-a", "3",
                           checkpoint=checkpoint, segment=segment)  # fmt: skip
    for ins in instances:
        length = ins["source_length"]
        full_blocks = int(length // block)  # complete blocks arrive before the source ends
        expected = [(i + k - 1) * block if i + k - 1 <= full_blocks and (i + k - 1) * block < length else length
                    for i in range(1, len(ins["delays"]) + 1)]  # fmt: skip
        assert ins["delays"] == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["end", "read"])
def test_reencoding_changes_what_wait_k_writes_not_when(data, tmp_path, mode):
    """``--reencode`` reaches every instance's session: the words after a re-read differ (what the re-read words
    see changed), wait-k's delays stay its schedule (``test_streaming_llm`` proves what the rows see)."""
    room = ["--head", "wait-k", "--k", "4", "--max-target-tokens", "64"]  # words left to write after the end
    plain = text_run(data, tmp_path, *room, name="plain")
    again = text_run(data, tmp_path, *room, "--reencode", mode, name="again")
    for ins in again:
        assert ins["delays"] == [min(i + 3, ins["source_length"]) for i in range(1, len(ins["delays"]) + 1)]
    assert [a["prediction"] for a in plain] != [b["prediction"] for b in again]
    with pytest.raises(SystemExit):
        text_run(data, tmp_path, "--head", "wait-k", "--k", "2", "--reencode", "always", name="bad")


def test_holding_the_sentence_end_reaches_every_instance(data, tmp_path, monkeypatch):
    """``--hold-sentence-end``: a word closing the sentence waits for the source's end (every word, here)."""
    from streaming_llm import engine

    monkeypatch.setattr(engine, "ends_sentence", lambda word: True)
    for ins in text_run(data, tmp_path, "--head", "wait-k", "--k", "1", "--hold-sentence-end"):
        assert ins["delays"] and set(ins["delays"]) == {ins["source_length"]}


@pytest.mark.parametrize("mode", ["auto", "segment"])
def test_holding_the_sentence_end_reaches_long_audio_mode(data, tmp_path, monkeypatch, mode):
    """``--hold-sentence-end`` holds under ``--long-audio segment`` too (each segment's own end; one segment here),
    so the three long-audio modes still agree on utterances that fit."""
    from streaming_llm import engine

    monkeypatch.setattr(engine, "ends_sentence", lambda word: True)
    for ins in speech_run(data, tmp_path, "--head", "wait-k", "--k", "1", "--hold-sentence-end",
                          "--long-audio", mode, name=mode):  # fmt: skip
        assert ins["delays"] and set(ins["delays"]) == {ins["source_length"]}


# ---- state ----------------------------------------------------------------------------------------------


def test_targets_do_not_carry_over_between_instances(data, tmp_path):
    together = text_run(data, tmp_path, "--head", "entropy", "--threshold", "6", name="all")
    for i in (1, 2):
        alone = text_run(data, tmp_path, "--head", "entropy", "--threshold", "6", "--start-index", str(i),
                         "--end-index", str(i + 1), name=f"only{i}")  # fmt: skip
        assert [ins["index"] for ins in alone] == [i]
        assert alone[0]["prediction"] == together[i]["prediction"]
        assert alone[0]["delays"] == together[i]["delays"]
    speech = speech_run(data, tmp_path, "--head", "wait-k", "--k", "1", name="speech-all")
    alone = speech_run(data, tmp_path, "--head", "wait-k", "--k", "1", "--start-index", "2", name="speech-2")
    assert alone[0]["prediction"] == speech[2]["prediction"]


def test_max_len_caps_the_output(data, tmp_path):
    instances = text_run(data, tmp_path, "--head", "offline", "--max-len-a", "0", "--max-len-b", "2",
                         "--max-target-tokens", "200")  # fmt: skip
    assert all(1 <= len(ins["prediction"].split()) <= 2 for ins in instances)


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (0.5, 1.0)])
def test_the_max_len_cap_binds_at_a_times_the_words_read_plus_b(data, tmp_path, a, b):
    """--max-len-a/b: after reading u source words the agent has written at most floor(a * u + b) words. A head
    that always writes (entropy under 1000 nats) meets the cap at every read: its j-th word waits for the first
    u at which floor(a * u + b) >= j, and the instance ends with floor(a * m + b) words for m source words."""
    instances = text_run(data, tmp_path, "--head", "entropy", "--threshold", "1000", "--max-len-a", str(a),
                         "--max-len-b", str(b), "--max-target-tokens", "200")  # fmt: skip
    for ins in instances:
        m = ins["source_length"]
        n = math.floor(a * m + b)
        first_read = [max(1, next(u for u in range(m + 1) if math.floor(a * u + b) >= j)) for j in range(1, n + 1)]
        assert ins["delays"] == first_read
        assert len(ins["prediction"].split()) == n


# ---- input audio ----------------------------------------------------------------------------------------


def test_resampled_and_stereo_audio_give_the_16k_mono_answer(data, tmp_path):
    audio = tone(1.5)
    variants = {"mono16k": (audio, 16000), "stereo": (np.stack([audio, audio], axis=1), 16000)}
    for rate in (8000, 44100):
        variants[f"rate{rate}"] = (soxr.resample(audio, 16000, rate, quality="HQ"), rate)
    paths = []
    for name, (samples, rate) in variants.items():
        sf.write(tmp_path / f"{name}.wav", samples, rate, subtype="FLOAT")
        paths.append(str(tmp_path / f"{name}.wav"))
    (tmp_path / "source.txt").write_text("\n".join(paths) + "\n", encoding="utf-8")
    (tmp_path / "target.txt").write_text("Ich .\n" * len(paths), encoding="utf-8")
    for head in (["--head", "wait-k", "--k", "2"], ["--head", "entropy", "--threshold", "6"]):
        instances = simuleval(ProactiveAgent, data / "speech-ckpt", tmp_path / "source.txt", tmp_path / "target.txt",
                              tmp_path / f"out-{head[1]}", "--source-segment-size", "320", *head)  # fmt: skip
        first = instances[0]
        for ins in instances[1:]:
            assert ins["prediction"] == first["prediction"]
            assert ins["delays"] == pytest.approx(first["delays"], abs=1.0)
            assert ins["source_length"] == pytest.approx(first["source_length"], abs=1.0)


def test_audio_input_resamples_incrementally():
    audio = tone(1.0)
    for rate in (8000, 22050, 44100):
        resampled = soxr.resample(audio, 16000, rate, quality="HQ")
        stream, pieces = AudioInput(), []
        step = int(np.ceil(0.32 * rate))
        for start in range(0, len(resampled), step):
            pieces.append(stream.push(resampled[start : start + step].tolist(), rate))
        out = np.concatenate(pieces)
        assert abs(len(out) - len(audio)) <= 1
        n = min(len(out), len(audio))
        assert np.abs(out[100 : n - 100] - audio[100 : n - 100]).mean() < 0.01


# ---- errors ---------------------------------------------------------------------------------------------


def test_missing_or_foreign_checkpoint_is_a_clear_error_before_the_first_instance(data, tmp_path):
    with pytest.raises(SystemExit, match="no such checkpoint directory"):
        simuleval(ProactiveAgent, tmp_path / "nope", data / "source.txt", data / "target.txt", tmp_path / "out")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a proactive-simulst checkpoint"):
        simuleval(ProactiveAgent, tmp_path / "foreign", data / "source.txt", data / "target.txt", tmp_path / "out")
    assert not (tmp_path / "out" / "instances.log").exists()


def test_a_checkpoint_without_its_tokenizer_is_named_with_the_missing_file(data, tmp_path):
    import shutil

    shutil.copytree(data / "text-ckpt", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").unlink()
    with pytest.raises(SystemExit, match=rf"error: {tmp_path / 'ckpt'}: no tokenizer.json \(the tokenizer\)") as caught:
        simuleval(ProactiveAgent, tmp_path / "ckpt", data / "source.txt", data / "target.txt", tmp_path / "out")
    assert "\n" not in str(caught.value) and "sentencepiece" not in str(caught.value)
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"ckpt/tokenizer.json: unreadable tokenizer"):
        simuleval(ProactiveAgent, tmp_path / "ckpt", data / "source.txt", data / "target.txt", tmp_path / "out")
    assert not (tmp_path / "out" / "instances.log").exists()


def test_bad_sources_are_clear_errors_before_the_first_instance(data, tmp_path):
    (tmp_path / "gap.txt").write_text("One two .\n\nThree .\n", encoding="utf-8")
    (tmp_path / "three.txt").write_text("a\nb\nc\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"line 2 \(instance 1\) is empty"):
        simuleval(ProactiveAgent, data / "text-ckpt", tmp_path / "gap.txt", tmp_path / "three.txt", tmp_path / "o")
    (tmp_path / "two.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="--source has 3 lines but --target has 2"):
        simuleval(ProactiveAgent, data / "text-ckpt", data / "source.txt", tmp_path / "two.txt", tmp_path / "o")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "speech.txt").write_text(f"{data / 's0.wav'}\n{tmp_path / 'empty.wav'}\n{tmp_path / 'x.wav'}\n")
    with pytest.raises(SystemExit, match=r"instance 1\): .*empty.wav cannot be read as audio"):
        simuleval(ProactiveAgent, data / "speech-ckpt", tmp_path / "speech.txt", tmp_path / "three.txt",
                  tmp_path / "o", "--source-segment-size", "320")  # fmt: skip
    with pytest.raises(SystemExit, match="x.wav does not exist"):
        simuleval(ProactiveAgent, data / "speech-ckpt", tmp_path / "speech.txt", tmp_path / "three.txt",
                  tmp_path / "o", "--source-segment-size", "320", "--start-index", "2")  # fmt: skip
    with pytest.raises(SystemExit, match="--source-segment-size is 1 ms"):
        simuleval(ProactiveAgent, data / "speech-ckpt", data / "speech.txt", data / "target.txt", tmp_path / "o")
    with pytest.raises(SystemExit, match="--threshold does not apply to the 'wait-k' head"):
        text_run(data, tmp_path, "--head", "wait-k", "--threshold", "0.5")
    assert not (tmp_path / "o" / "instances.log").exists()


def test_a_text_checkpoint_refuses_a_source_of_audio_files_before_the_first_instance(data, tmp_path):
    (tmp_path / "paths.txt").write_text("clips/a.flac\nclips/b.FLAC\nclips/c.wav\n", encoding="utf-8")  # not there
    for source in (data / "speech.txt", tmp_path / "paths.txt"):  # existing files; audio names
        problem = r"its lines are audio files .*is a text model: give a text source \(one sentence per line\) or a"
        with pytest.raises(SystemExit, match=problem + " speech checkpoint") as caught:
            simuleval(ProactiveAgent, data / "text-ckpt", source, data / "target.txt", tmp_path / "o",
                      "--head", "wait-k", "--k", "2")  # fmt: skip
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "o" / "instances.log").exists()
    long = " ".join(["word"] * 80) + "."  # longer than a file name may be: still a sentence, and no OSError
    (tmp_path / "mixed.txt").write_text(f"{long}\nclips/a.wav\nI am done .\n", encoding="utf-8")
    instances = simuleval(ProactiveAgent, data / "text-ckpt", tmp_path / "mixed.txt", data / "target.txt",
                          tmp_path / "mixed", "--head", "wait-k", "--k", "2")  # fmt: skip
    assert len(instances) == 3  # a sentence that mentions a file is still a sentence


NON_FINITE = [["--head", "entropy", "--threshold", "nan"], ["--head", "probe", "--threshold", "inf"],
              ["--head", "entropy", "--head-param", "threshold=nan"]]  # fmt: skip


@pytest.mark.parametrize("head", NON_FINITE, ids=lambda h: h[-1])
def test_a_non_finite_threshold_is_refused_before_the_first_instance(data, tmp_path, head):
    with pytest.raises(SystemExit, match=r"proactive_agent: error: head '\w+': threshold=.* is not a finite number"):
        text_run(data, tmp_path, *head)
    assert not (tmp_path / "out" / "instances.log").exists()


@pytest.mark.parametrize("options", [["--threshold", "1", "--head-param", "threshold=3"],
                                     ["--head-param", "threshold=3", "--threshold", "1"]],
                         ids=["flag-first", "param-first"])  # fmt: skip
def test_a_threshold_given_twice_is_refused_whatever_the_order(data, tmp_path, options):
    with pytest.raises(SystemExit, match=r"--threshold 1.0 and --head-param threshold=3 both set threshold; give one"):
        text_run(data, tmp_path, "--head", "entropy", *options)
    with pytest.raises(SystemExit, match=r"--k 2 and --head-param k=4 both set k"):
        text_run(data, tmp_path, "--head", "wait-k", "--k", "2", "--head-param", "k=4")


@pytest.mark.parametrize("flag", [["--k", "3"], ["--threshold", "0.5"]], ids=lambda f: f[0])
def test_the_offline_head_says_it_takes_no_parameters(data, tmp_path, flag):
    with pytest.raises(SystemExit, match=rf"{flag[0]} does not apply to the 'offline' head: it takes no parameters"):
        text_run(data, tmp_path, "--head", "offline", *flag)


def test_help_shows_the_defaults_of_the_agents_options():
    from argparse import ArgumentParser

    parser = ArgumentParser()
    ProactiveAgent.add_args(parser)
    options = {}  # option -> its help, from the help text (each option's entry starts a line with "  --")
    for entry in parser.format_help().split("\n  --")[1:]:
        name, _, rest = entry.partition(" ")
        options[f"--{name}"] = " ".join(rest.split())
    for option, default in [("--head", "entropy"), ("--max-len-a", "2.0"), ("--max-len-b", "10.0"),
                            ("--max-target-tokens", "256"), ("--reencode", "never"), ("--long-audio", "auto"),
                            ("--segment-min-seconds", "10.0"), ("--segment-max-seconds", "0.0"),
                            ("--pause-seconds", "0.5"), ("--silence-db", "-40.0")]:  # fmt: skip
        assert f"default: {default})" in options[option], (option, options[option])
    assert "default: the checkpoint's, else the head's own: entropy 1.0" in options["--threshold"]


def test_an_instance_that_fails_names_its_index_and_skip_failed_goes_on(data, tmp_path):
    long = " ".join(["word"] * 40) + " ."  # more than the model's 24 source embeddings
    (tmp_path / "source.txt").write_text(f"{SENTENCES[0]}\n{long}\n{SENTENCES[2]}\n", encoding="utf-8")
    (tmp_path / "target.txt").write_text("\n".join(REFERENCES) + "\n", encoding="utf-8")
    args = (ProactiveAgent, data / "small-text-ckpt", tmp_path / "source.txt", tmp_path / "target.txt")
    with pytest.raises(SystemExit, match=r"source.txt line 2 \(instance 1\): 41 words make \d+ source tokens, more "
                       "than the model's context of 24; split the sentence, or pass --skip-failed"):
        simuleval(*args, tmp_path / "strict", "--head", "wait-k", "--k", "1")  # refused before the first instance
    assert not (tmp_path / "strict" / "instances.log").exists()
    instances = simuleval(*args, tmp_path / "lenient", "--head", "wait-k", "--k", "1", "--skip-failed")
    assert [ins["index"] for ins in instances] == [0, 1, 2]
    failed = [json.loads(line) for line in (tmp_path / "lenient" / "failed.jsonl").read_text().splitlines()]
    assert [f["index"] for f in failed] == [1] and "longer than the model" in failed[0]["error"]
    alone = simuleval(*args, tmp_path / "alone", "--head", "wait-k", "--k", "1", "--start-index", "2")
    assert alone[0]["prediction"] == instances[2]["prediction"]  # nothing of the failure leaks


def test_the_instance_after_a_skipped_failure_is_decoded_with_its_own_source(data, tmp_path):
    """The oracle head reads the whole source of the instance the agent counts itself on: after --skip-failed
    passes over a failure, the next instance's must be its own, and it writes what it writes run alone."""
    long = " ".join(["word"] * 40) + " ."  # more than the model's 24 source embeddings
    (tmp_path / "source.txt").write_text(f"{SENTENCES[0]}\n{long}\n{SENTENCES[2]}\n", encoding="utf-8")
    (tmp_path / "target.txt").write_text("\n".join(REFERENCES) + "\n", encoding="utf-8")
    args = (ProactiveAgent, data / "small-text-ckpt", tmp_path / "source.txt", tmp_path / "target.txt")
    instances = simuleval(*args, tmp_path / "lenient", "--head", "oracle", "--skip-failed")
    alone = simuleval(*args, tmp_path / "alone", "--head", "oracle", "--start-index", "2")
    assert instances[2]["prediction"] and instances[2]["prediction"] == alone[0]["prediction"]
    assert instances[2]["delays"] == alone[0]["delays"]


@pytest.mark.parametrize("kept", [1, 2])
def test_an_oracle_run_continued_after_a_kill_writes_the_uninterrupted_runs_log(data, tmp_path, kept):
    """--continue-unfinished: the agent counts itself on from the instance after the last one logged, so a head
    that reads the whole source of the instance it counts itself on (oracle) decides with that instance's own.
    Sources on which the tiny model's oracle writes before the end, so that its delays show which source it read."""
    sources = [SENTENCES[0], "yes yes yes yes yes", "We are going home now .", SENTENCES[2]]
    (tmp_path / "source.txt").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (tmp_path / "target.txt").write_text("\n".join([*REFERENCES, "Gut ."]) + "\n", encoding="utf-8")
    args = (ProactiveAgent, data / "text-ckpt", tmp_path / "source.txt", tmp_path / "target.txt")
    whole = simuleval(*args, tmp_path / "whole", "--head", "oracle")
    assert any(ins["delays"][0] < ins["source_length"] for ins in whole[kept:])  # an early write to compare
    killed = tmp_path / "killed"
    killed.mkdir()
    lines = (tmp_path / "whole" / "instances.log").read_text(encoding="utf-8").splitlines(keepends=True)
    (killed / "instances.log").write_text("".join(lines[:kept]), encoding="utf-8")  # killed after `kept` instances
    continued = simuleval(*args, killed, "--head", "oracle", "--continue-unfinished")
    assert [ins["index"] for ins in continued] == [0, 1, 2, 3]
    assert [ins["delays"] for ins in continued] == [ins["delays"] for ins in whole]
    assert [ins["prediction"] for ins in continued] == [ins["prediction"] for ins in whole]


def test_head_parameters_come_from_the_checkpoint_unless_given(tmp_path):
    from argparse import Namespace

    from simul_agents.proactive_agent import build_head

    save_checkpoint(untied_tiny("text"), tmp_path / "ckpt", extra={"heads": {"entropy": {"threshold": 0.25}}})
    args = Namespace(checkpoint=str(tmp_path / "ckpt"), head="entropy", threshold=None, k=None, head_param=None)
    assert build_head(args).threshold == 0.25
    args.threshold = 0.7
    assert build_head(args).threshold == 0.7
    args.head, args.threshold, args.head_param = "wait-k", None, ["k=4"]
    assert build_head(args).k == 4


def test_fp16_agent_puts_only_the_llm_in_half_precision_and_keeps_the_schedule(data, tmp_path):
    plain = speech_run(data, tmp_path, "--head", "wait-k", "--k", "2", name="fp32")
    half = speech_run(data, tmp_path, "--head", "wait-k", "--k", "2", "--fp16", name="fp16")  # SimulEval's flag
    from simul_agents import proactive_agent

    (model,) = proactive_agent._MODELS.values()  # the one model of the last run: the fp16 one
    assert model.lm_dtype == torch.float16 and model.end_of_source.dtype == torch.float32
    assert {p.dtype for p in model.encoder.parameters()} == {torch.float32}
    for a, b in zip(plain, half, strict=True):
        n = min(len(a["delays"]), len(b["delays"]))
        assert a["delays"][:n] == b["delays"][:n]
        assert b["prediction"].strip()


def test_fp16_and_int8_together_are_refused_before_the_first_instance(data, tmp_path):
    with pytest.raises(SystemExit, match="--int8 and --fp16 both given"):
        speech_run(data, tmp_path, "--head", "wait-k", "--k", "2", "--fp16", "--int8")


def test_int8_agent_writes_the_float32_agents_wait_k_schedule(data, tmp_path):
    plain = speech_run(data, tmp_path, "--head", "wait-k", "--k", "2", name="fp32")
    int8 = speech_run(data, tmp_path, "--head", "wait-k", "--k", "2", "--int8", name="int8")
    from simul_agents import proactive_agent
    from streaming_llm.quantize import Int8Linear

    (model,) = proactive_agent._MODELS.values()  # the one model of the last run: the int8 one
    assert any(isinstance(m, Int8Linear) for m in model.llm.modules())
    for a, b in zip(plain, int8, strict=True):
        n = min(len(a["delays"]), len(b["delays"]))
        assert a["delays"][:n] == b["delays"][:n]  # the schedule is the head's, whatever the weights
        assert b["prediction"].strip()


def test_int4_agent_runs_on_weights_calibrated_for_its_checkpoint(data, tmp_path):
    import shutil

    from simul_agents import proactive_agent
    from streaming_llm import gptq

    ckpt = tmp_path / "text-ckpt"
    shutil.copytree(data / "text-ckpt", ckpt)
    with pytest.raises(SystemExit, match=r"streaming_llm.gptq .*--calibration TSV"):
        text_run(tmp_path, tmp_path, "--head", "wait-k", "--k", "2", "--int4")  # no training manifest recorded
    manifest = tmp_path / "train.tsv"
    pairs = enumerate(zip(SENTENCES, REFERENCES, strict=True))
    manifest.write_text("id\taudio\tn_frames\tsrc_text\ttgt_text\tspeaker\n"
                        + "".join(f"s{i}\t\t0\t{s}\t{r}\tx\n" for i, (s, r) in pairs), encoding="utf-8")  # fmt: skip
    assert gptq.main([str(ckpt), "--calibration", str(manifest)]) == 0
    for name in ("source.txt", "target.txt"):
        shutil.copy(data / name, tmp_path / name)
    instances = text_run(tmp_path, tmp_path, "--head", "wait-k", "--k", "2", "--int4", name="int4")
    (model,) = proactive_agent._MODELS.values()
    assert any(isinstance(m, gptq.Int4Linear) for m in model.llm.modules())
    assert [ins["index"] for ins in instances] == [0, 1, 2] and all(ins["prediction"].strip() for ins in instances)


@pytest.mark.skipif(cxx_compiler() is None, reason="TorchInductor needs a C++ compiler (make setup installs g++)")
def test_compiled_agent_writes_what_the_eager_agent_writes_and_compiles_nothing_during_instances(data, tmp_path):
    import torch._dynamo

    from simul_agents import proactive_agent
    from streaming_llm.lean import is_compiled

    head = ["--head", "entropy", "--threshold", "6"]
    # words written before the source ends, re-read at every read: forwards of the source and every written row
    # (a cap above one word of MAX_WORD_TOKENS tokens: this untrained model writes such words)
    reread = ["--head", "wait-k", "--k", "1", "--reencode", "read", "--max-target-tokens", "48"]
    eager = speech_run(data, tmp_path, *head, name="eager")
    eager_reread = speech_run(data, tmp_path, *reread, name="eager-reread")
    model = proactive_agent.load_model(str(data / "speech-ckpt"), "fp32", compiled=True)  # what --compile loads
    assert is_compiled(model.llm)
    with torch._dynamo.config.patch(error_on_recompile=True):  # the warm-up met every shape already
        compiled = speech_run(data, tmp_path, *head, "--compile", name="compiled")
        compiled_reread = speech_run(data, tmp_path, *reread, "--compile", name="compiled-reread")
    assert proactive_agent._MODELS and next(iter(proactive_agent._MODELS.values())) is model
    for a, b in [*zip(eager, compiled, strict=True), *zip(eager_reread, compiled_reread, strict=True)]:
        assert a["prediction"] == b["prediction"] and a["delays"] == b["delays"]
    assert any(len(a["delays"]) > 1 and a["delays"][0] < a["source_length"] for a in eager_reread)  # words to re-read


@pytest.mark.parametrize("mode", ["auto", "segment"])
def test_the_speech_max_len_cap_counts_encoder_blocks_read(data, tmp_path, mode):
    """--max-len-a 1 --max-len-b 0 on speech: after u blocks of 320 ms at most u words, in one session and under
    --long-audio segment alike; a head that always writes (entropy under 1000 nats) meets the cap at every block."""
    cap = ["--max-len-a", "1", "--max-len-b", "0", "--max-target-tokens", "200"]
    instances = speech_run(data, tmp_path, "--head", "entropy", "--threshold", "1000", *cap, "--long-audio", mode,
                           name=mode)  # fmt: skip
    for ins in instances:
        length, delays = ins["source_length"], ins["delays"]
        assert len(delays) >= 2 and len(delays) <= math.ceil(length / 320)  # the last, partial block is a unit too
        assert all(delay >= min(320 * j, length) for j, delay in enumerate(delays, start=1)), delays


@pytest.mark.parametrize(("head", "field"), [("wait-k", "k"), ("fixed-chunk", "chunk"), ("local-agreement", "n")])
def test_the_k_flag_sets_each_heads_documented_parameter(data, head, field):
    """--k: wait-k's k, fixed-chunk's chunk (source units per chunk, not the words written after it),
    LocalAgreement's n; the other parameters keep their defaults."""
    from argparse import Namespace

    from simul_agents.proactive_agent import build_head
    from streaming_llm.heads import make_head

    args = Namespace(checkpoint=str(data / "text-ckpt"), head=head, threshold=None, k=3, head_param=None)
    assert build_head(args) == make_head(head, **{field: 3})


def test_a_speech_source_shorter_than_one_block_is_translated_not_dropped_as_empty(data, tmp_path):
    """0.2 s of audio (under one 320 ms block) reads no unit before the source ends; finishing it pads the block,
    so the instance writes the offline translation of that audio (not the warning for an empty source)."""
    from fixtures_models import offline_words

    from streaming_llm.checkpoint import load_checkpoint

    audio = tone(0.2)
    sf.write(tmp_path / "short.wav", audio, 16000, subtype="FLOAT")
    (tmp_path / "source.txt").write_text(f"{tmp_path / 'short.wav'}\n", encoding="utf-8")
    (tmp_path / "target.txt").write_text("Ich .\n", encoding="utf-8")
    (ins,) = simuleval(ProactiveAgent, data / "speech-ckpt", tmp_path / "source.txt", tmp_path / "target.txt",
                       tmp_path / "out", "--source-segment-size", "320", "--head", "wait-k", "--k", "1")  # fmt: skip
    expected = offline_words(load_checkpoint(data / "speech-ckpt"), audio, max_target_tokens=24)
    assert expected and ins["prediction"].split() == expected


def test_auto_long_audio_measures_a_files_length_at_its_own_sample_rate(data, tmp_path):
    """31 s at 8 kHz is 248 000 samples on disk, under one session's 476 160, but 31 s is over its 29.76 s:
    --long-audio auto streams it in segments (a one-session run would fail the instance as too long)."""
    sf.write(tmp_path / "long8k.wav", tone(31.0, rate=8000), 8000, subtype="FLOAT")
    (tmp_path / "source.txt").write_text(f"{tmp_path / 'long8k.wav'}\n", encoding="utf-8")
    (tmp_path / "target.txt").write_text("Ich .\n", encoding="utf-8")
    (ins,) = simuleval(ProactiveAgent, data / "speech-ckpt", tmp_path / "source.txt", tmp_path / "target.txt",
                       tmp_path / "out", "--source-segment-size", "320", "--head", "wait-k", "--k", "1")  # fmt: skip
    assert ins["prediction"].strip() and ins["source_length"] == pytest.approx(31000, abs=1)


def test_a_speech_instance_skipped_mid_utterance_reads_to_its_end_before_finishing(data, tmp_path):
    """--long-audio off --skip-failed: 31 s of speech fails at the session's 29.76 s. The agent reads the rest
    before it finishes: an early finish made SimulEval reset it and feed the rest as if new (words written after
    the failure, and every later instance counted one too far, so the second failure was logged as instance 2)."""
    sf.write(tmp_path / "long.wav", tone(31.0), 16000, subtype="FLOAT")
    lines = [tmp_path / "long.wav", tmp_path / "long.wav", data / "s2.wav"]
    (tmp_path / "source.txt").write_text("".join(f"{p}\n" for p in lines), encoding="utf-8")
    (tmp_path / "target.txt").write_text("Ich .\n" * 3, encoding="utf-8")
    args = (ProactiveAgent, data / "speech-ckpt", tmp_path / "source.txt", tmp_path / "target.txt")
    options = ("--source-segment-size", "320", "--head", "wait-k", "--k", "1", "--long-audio", "off")
    instances = simuleval(*args, tmp_path / "out", *options, "--skip-failed")
    failed = [json.loads(line) for line in (tmp_path / "out" / "failed.jsonl").read_text().splitlines()]
    assert [f["index"] for f in failed] == [0, 1]
    assert all(delay <= 29760 for ins in instances[:2] for delay in ins["delays"])  # nothing after the failure
    alone = simuleval(*args, tmp_path / "alone", *options, "--start-index", "2")
    assert instances[2]["prediction"] == alone[0]["prediction"] and instances[2]["delays"] == alone[0]["delays"]
