"""The WebSocket server (simul_agents.serve) with a tiny model: protocol, limits, errors, several clients."""

import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import soxr
from fixtures_models import offline_words, tone, untied_tiny
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from simul_agents import serve as serve_module
from simul_agents.live import Limits, LiveStream, SegmentedStream, audio_chunks
from simul_agents.serve import BackgroundServer, ServeConfig, Translator
from streaming_llm.checkpoint import save_checkpoint
from streaming_llm.heads import make_head

LIMITS = Limits(max_target_tokens=24)
CHUNK = 3200  # 200 ms at 16 kHz


def live_words(model, head, audio, chunk=CHUNK, stream=None) -> tuple[list[str], list[float]]:
    """What LiveStream (or ``stream``) writes for this audio pushed in these chunks: the server must send exactly
    this."""
    stream = stream or LiveStream(model, head, LIMITS)
    for piece, _ in audio_chunks(audio, chunk * 1000 // 16000):
        stream.push_audio(piece)
        stream.drain()
    stream.finish()
    stream.drain()
    return stream.words, stream.delays


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    speech, text = untied_tiny("speech"), untied_tiny("text")
    save_checkpoint(speech, root / "speech-ckpt")
    save_checkpoint(text, root / "text-ckpt")
    paths = {f"{name}-ckpt": str(root / f"{name}-ckpt") for name in ("speech", "text")}
    return {"speech": speech, "text": text, **paths}


def server(models, modality="speech", **config):
    translator = Translator(models[modality], models[f"{modality}-ckpt"], ServeConfig(limits=LIMITS, **config))
    return BackgroundServer(translator)


@pytest.fixture(scope="module")
def speech_server(models):
    with server(models) as s:
        yield s


def events_until_end(ws, timeout=30.0) -> list[dict]:
    events = []
    deadline = time.monotonic() + timeout
    while True:
        event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        events.append(event)
        if event["type"] == "end":
            return events


def stream_audio(ws, audio, start=None, dtype="float32", chunk=CHUNK) -> list[dict]:
    ws.send(json.dumps({"type": "start", **(start or {})}))
    started = json.loads(ws.recv(timeout=10))
    assert started["type"] == "started", started
    for i in range(0, len(audio), chunk):
        piece = audio[i : i + chunk]
        ws.send((piece * 32767).astype("<i2").tobytes() if dtype == "pcm16" else piece.astype("<f4").tobytes())
    ws.send(json.dumps({"type": "end"}))
    return events_until_end(ws)


def expect_error(ws, code: str) -> dict:
    event = json.loads(ws.recv(timeout=10))
    assert event["type"] == "error" and event["code"] == code, event
    assert event["message"]
    return event


def wait_for(condition, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ---- the protocol ----------------------------------------------------------------------------------------


def test_start_chunks_end_sends_reads_then_the_words_the_engine_writes(models, speech_server):
    audio = tone(1.0)
    head = {"head": "wait-k", "params": {"k": 2}}
    with connect(speech_server.url) as ws:
        events = stream_audio(ws, audio, head)
    words, delays = live_words(models["speech"], make_head("wait-k", k=2), audio)
    writes = [e for e in events if e["type"] == "write"]
    assert words and [e["text"] for e in writes] == words
    assert [e["delay_ms"] for e in writes] == delays
    assert [e["index"] for e in writes] == list(range(len(words)))
    assert all(e["elapsed_ms"] >= e["delay_ms"] for e in writes)
    assert sum(e["type"] == "read" for e in events) >= 1 and any(d < 1000 for d in delays), "words before the end"
    end = events[-1]
    assert end["text"] == " ".join(words) and end["source_ms"] == 1000.0 and end["unit"] == "ms"
    assert end["AL"] is not None and end["AL_CA"] >= end["AL"] and 0 < end["rtf"]


def test_the_end_events_latency_and_rtf_are_those_of_the_words_it_sent(speech_server):
    """AL and LAAL in ms from the writes' delay_ms against the source, the _CA pair from their elapsed_ms, and
    rtf = busy_ms / source_ms, the server's time on the stream per ms of it (above 1: it cannot keep up)."""
    from simul_agents.live import latency_summary

    with connect(speech_server.url) as ws:
        events = stream_audio(ws, tone(1.0), {"head": "wait-k", "params": {"k": 2}})
    writes, end = [e for e in events if e["type"] == "write"], events[-1]
    assert writes and end["source_ms"] == end["source_length"] == 1000.0
    expected = latency_summary([e["delay_ms"] for e in writes], [e["elapsed_ms"] for e in writes], 1000.0)
    assert {k: end[k] for k in expected} == pytest.approx(expected, abs=2e-3)
    assert end["busy_ms"] >= end["compute_ms"] > 0
    assert end["rtf"] == pytest.approx(end["busy_ms"] / end["source_ms"], abs=2e-4)


def test_offline_head_over_the_socket_equals_the_offline_decode(models, speech_server):
    audio = tone(1.3, shift=30)
    with connect(speech_server.url) as ws:
        events = stream_audio(ws, audio, {"head": "offline"})
    assert events[-1]["text"] == " ".join(offline_words(models["speech"], audio))


def test_pcm16_frames_are_scaled_like_int16_audio(models, speech_server):
    audio = tone(1.0)
    with connect(speech_server.url) as ws:
        events = stream_audio(ws, audio, {"head": "offline", "format": "pcm16"}, dtype="pcm16")
    pcm = (audio * 32767).astype(np.int16).astype(np.float32) / 32768
    assert events[-1]["text"] == " ".join(offline_words(models["speech"], pcm))


def test_pcm16_samples_reach_the_model_divided_by_32768(speech_server, monkeypatch):
    """The decode is nearly blind to a scale (the log-mel's range), so the samples the stream gets are checked."""
    pushed = []
    real_push = LiveStream.push_audio

    def push(stream, samples):
        pushed.append(np.array(samples))
        return real_push(stream, samples)

    monkeypatch.setattr(LiveStream, "push_audio", push)
    ints = np.tile(np.array([-32768, -16384, -1, 0, 1, 16384, 32767], dtype="<i2"), 1000)
    with connect(speech_server.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "offline", "format": "pcm16"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "started"
        ws.send(ints.tobytes())
        ws.send(json.dumps({"type": "end"}))
        assert events_until_end(ws)[-1]["source_ms"] == len(ints) / 16
    np.testing.assert_array_equal(np.concatenate(pushed), ints.astype(np.float32) / 32768)


def test_other_sample_rates_are_resampled_to_16k(models, speech_server):
    audio48 = tone(1.0, rate=48000)
    with connect(speech_server.url) as ws:
        events = stream_audio(ws, audio48, {"head": "offline", "sample_rate": 48000}, chunk=9600)
    assert events[-1]["source_ms"] == pytest.approx(1000.0, abs=1)
    assert events[-1]["text"] == " ".join(offline_words(models["speech"], soxr.resample(audio48, 48000, 16000)))


def test_elapsed_ms_counts_from_the_arrival_of_the_newest_frame_read(speech_server):
    """elapsed_ms - delay_ms is the time from the newest frame's arrival to the word going out: never more than the
    client saw between sending that frame and receiving the word (the server's clock is this process's)."""
    audio, lags = tone(1.0), []
    with connect(speech_server.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "offline"}))  # its words come at the end, after 5 frames
        assert json.loads(ws.recv(timeout=10))["type"] == "started"
        for i in range(0, len(audio), CHUNK):  # a frame, then its events up to its read: the next is sent later
            sent = time.perf_counter()
            ws.send(audio[i : i + CHUNK].tobytes())
            while (event := json.loads(ws.recv(timeout=10)))["type"] != "read":
                lags.append((event["elapsed_ms"] - event["delay_ms"], (time.perf_counter() - sent) * 1000))
        ws.send(json.dumps({"type": "end"}))  # the last frame stays the newest
        while (event := json.loads(ws.recv(timeout=10)))["type"] != "end":
            lags.append((event["elapsed_ms"] - event["delay_ms"], (time.perf_counter() - sent) * 1000))
    assert lags and all(0 <= lag <= seen + 0.01 for lag, seen in lags), lags


def test_a_connection_takes_several_streams_one_after_another(speech_server):
    with connect(speech_server.url) as ws:
        first = stream_audio(ws, tone(0.7), {"head": "offline"})
        second = stream_audio(ws, tone(0.7), {"head": "offline"})
    assert first[-1]["text"] == second[-1]["text"] and first[-1]["words"] > 0


def test_a_stream_ended_before_any_audio_gets_an_empty_end_and_the_connection_goes_on(speech_server):
    """A client may stop before its first frame (the page's Stop button): an end with no words, not a model error."""
    with connect(speech_server.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "offline"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "started"
        ws.send(json.dumps({"type": "end"}))
        (end,) = events_until_end(ws)
        assert end["words"] == 0 and end["text"] == "" and "dropped" not in end and end["source_ms"] == 0.0
        assert end["AL"] is None and end["rtf"] is None
        assert stream_audio(ws, tone(0.5), {"head": "offline"})[-1]["words"] > 0


def test_text_model_translates_word_messages(models):
    sentence = "I would like a cup of coffee .".split()
    with server(models, "text") as s, connect(s.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "wait-k", "params": {"k": 2}}))
        assert json.loads(ws.recv(timeout=10))["format"] == "text"
        ws.send(json.dumps({"type": "words", "words": sentence[:3]}))
        ws.send(json.dumps({"type": "words", "text": " ".join(sentence[3:])}))
        ws.send(json.dumps({"type": "end"}))
        events = events_until_end(ws)
    stream = LiveStream(models["text"], make_head("wait-k", k=2), LIMITS)
    for part in (sentence[:3], sentence[3:]):
        stream.push_words(part)
        stream.drain()
    stream.finish()
    stream.drain()
    writes = [e for e in events if e["type"] == "write"]
    assert [e["text"] for e in writes] == stream.words and [e["delay_words"] for e in writes] == stream.delays
    assert events[-1]["unit"] == "words" and events[-1]["AL"] is not None


def test_text_streams_time_writes_from_the_first_words_and_score_latency_in_words(models):
    """For text, delay_ms is the arrival of the newest words read (0 for the words the first message lets through),
    the end's source_ms the arrival of the last words, and AL and LAAL are in words, from delay_words."""
    from simul_agents.live import latency_summary

    sentence = "I would like a cup of coffee .".split()
    with server(models, "text") as s, connect(s.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "wait-k", "params": {"k": 1}}))
        assert json.loads(ws.recv(timeout=10))["type"] == "started"
        ws.send(json.dumps({"type": "words", "words": sentence[:5]}))
        ws.send(json.dumps({"type": "words", "words": sentence[5:]}))
        ws.send(json.dumps({"type": "end"}))
        events = events_until_end(ws)
    first = events[: [e["type"] for e in events].index("read")]
    assert first and all(e["type"] == "write" and e["delay_ms"] == 0.0 for e in first), events
    writes, reads = [e for e in events if e["type"] == "write"], [e for e in events if e["type"] == "read"]
    end = events[-1]
    assert all(w["delay_ms"] <= w["elapsed_ms"] for w in writes)
    assert end["source_ms"] == reads[-1]["source_ms"] and end["source_length"] == len(sentence)
    expected = latency_summary([e["delay_words"] for e in writes], None, float(len(sentence)))
    assert expected["AL"] is not None and {k: end[k] for k in expected} == pytest.approx(expected, abs=1e-3)


def test_page_and_stats_are_served_over_http_on_the_same_port(speech_server):
    base = speech_server.http_url
    with urllib.request.urlopen(base, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/html")
        assert b"<html" in response.read()
    with urllib.request.urlopen(base + "stats", timeout=5) as response:
        assert json.loads(response.read())["modality"] == "speech"
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(base + "nothing-here", timeout=5)
    assert error.value.code == 404


def test_read_events_report_the_source_units_read_so_far(models, speech_server):
    audio, stream = tone(1.0), LiveStream(models["speech"], make_head("offline"), LIMITS)
    expected = []
    for piece, _ in audio_chunks(audio, CHUNK * 1000 // 16000):
        stream.push_audio(piece)
        expected.append(stream.session.units_read)
    with connect(speech_server.url) as ws:
        events = stream_audio(ws, audio, {"head": "offline"})
    assert expected[-1] > 0 and [e["units"] for e in events if e["type"] == "read"] == expected


def test_a_websocket_from_another_origin_is_refused(speech_server):
    with pytest.raises(InvalidStatus) as refused:
        connect(speech_server.url, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    with connect(speech_server.url, origin=speech_server.http_url.rstrip("/")) as ws:  # the page's own origin
        ws.send(json.dumps({"type": "start"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "started"


# ---- malformed input: an error event, and the connection stays usable ------------------------------------


def test_bad_json_and_bad_messages_get_errors_and_the_connection_stays_usable(speech_server):
    with connect(speech_server.url) as ws:
        ws.send("{not json")
        expect_error(ws, "bad_json")
        ws.send(json.dumps([1, 2]))
        expect_error(ws, "bad_message")
        ws.send(json.dumps({"type": "hello"}))
        expect_error(ws, "bad_message")
        ws.send(tone(0.1).tobytes())
        expect_error(ws, "not_started")
        ws.send(json.dumps({"type": "end"}))
        expect_error(ws, "not_started")
        events = stream_audio(ws, tone(0.7), {"head": "offline"})
    assert events[-1]["words"] > 0


@pytest.mark.parametrize(
    "start, words",
    [
        ({"format": "mp3"}, "format 'mp3'"),
        ({"format": "text"}, "translates speech"),
        ({"sample_rate": "16k"}, "sample_rate '16k'"),
        ({"sample_rate": 4000}, "sample_rate 4000"),
        ({"head": "nope"}, "unknown head 'nope'"),
        ({"head": "oracle"}, "cannot run live"),
        ({"head": "wait-k", "params": {"k": 0}}, "k=0"),
        ({"threshold": "high"}, "threshold 'high'"),
        ({"treshold": 1.0}, "unknown field treshold"),
        ({"params": {"threshold": float("nan")}}, "threshold=nan is not a finite number"),  # JSON NaN
        ({"head": "entropy", "params": {"threshold": float("inf")}}, "threshold=inf is not a finite number"),
        ({"head": "wait-k", "params": {"k": True}}, "k=True is not a valid int"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_a_bad_start_names_the_problem_and_a_good_start_then_works(speech_server, start, words):
    with connect(speech_server.url) as ws:
        ws.send(json.dumps({"type": "start", **start}))
        assert words in expect_error(ws, "bad_start")["message"]
        ws.send(tone(0.1).tobytes())
        expect_error(ws, "not_started")  # the bad start opened no stream
        assert stream_audio(ws, tone(0.5), {"head": "offline"})[-1]["type"] == "end"


def test_wrong_sample_format_bytes_and_nan_audio_are_refused_frame_by_frame(speech_server):
    with connect(speech_server.url) as ws:
        ws.send(json.dumps({"type": "start", "format": "pcm16", "head": "offline"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "started"
        ws.send(b"\x00\x01\x02")  # 3 bytes: not whole pcm16 samples
        assert "3 bytes" in expect_error(ws, "bad_audio")["message"]
        ws.send(json.dumps({"type": "words", "words": ["hello"]}))
        expect_error(ws, "wrong_mode")
        ws.send(json.dumps({"type": "start"}))
        expect_error(ws, "bad_message")  # a stream is already open
        ws.send((tone(0.7) * 32767).astype("<i2").tobytes())
        ws.send(json.dumps({"type": "end"}))
        events = events_until_end(ws)
        assert events[-1]["source_ms"] == 700.0
        ws.send(json.dumps({"type": "start", "format": "float32"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "started"
        ws.send(np.array([0.1, np.nan], dtype="<f4").tobytes())
        assert "NaN" in expect_error(ws, "bad_audio")["message"]


def test_a_bad_frames_error_comes_after_the_events_of_the_frames_before_it(speech_server):
    """The reader refuses a bad frame at once, but its error waits its turn behind the frames queued before it
    (it used to overtake their read events, so a client could not tell which frame it was about)."""
    with connect(speech_server.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "offline"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "started"
        for _ in range(4):
            ws.send(tone(0.2).astype("<f4").tobytes())
        ws.send(b"\x00\x01\x02")  # not whole float32 samples
        ws.send(json.dumps({"type": "end"}))
        events = events_until_end(ws)
    assert [e["type"] for e in events if e["type"] != "write"] == ["read"] * 4 + ["error", "end"], events
    assert events[-1]["source_ms"] == 800.0


def test_an_oversized_frame_gets_an_error_and_the_connection_stays_usable(models):
    with server(models, max_frame_bytes=64_000) as s, connect(s.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "offline"}))
        json.loads(ws.recv(timeout=10))
        ws.send(np.zeros(20_000, dtype="<f4").tobytes())  # 80 000 bytes
        assert "80000-byte message" in expect_error(ws, "too_large")["message"]
        ws.send(tone(0.5).tobytes())
        ws.send(json.dumps({"type": "end"}))
        assert events_until_end(ws)[-1]["source_ms"] == 500.0  # the oversized frame was dropped


def test_a_frame_over_the_hard_limit_closes_only_that_connection(models):
    with server(models, max_frame_bytes=64_000) as s:
        limit = s.translator.config.hard_frame_bytes
        with connect(s.url, max_size=None) as ws:
            ws.send(json.dumps({"type": "start"}))
            json.loads(ws.recv(timeout=10))
            ws.send(np.zeros(limit // 4 + 1, dtype="<f4").tobytes())
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=10)
            assert closed.value.rcvd.code == 1009  # message too big
        with connect(s.url) as ws:
            assert stream_audio(ws, tone(0.5), {"head": "offline"})[-1]["type"] == "end"
        assert wait_for(lambda: s.translator.stats()["connections"] == 0 and s.translator.streams == 0)


def test_a_stream_longer_than_the_maximum_is_cut_with_an_error(models):
    with server(models, max_stream_s=0.6) as s, connect(s.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "offline"}))
        assert json.loads(ws.recv(timeout=10))["max_source"] == 0.6
        ws.send(tone(0.4).tobytes())
        ws.send(tone(0.4).tobytes())  # 0.8 s in all
        events = []
        while not events or events[-1]["type"] != "error":
            events.append(json.loads(ws.recv(timeout=10)))
        assert events[-1]["code"] == "too_long" and "over 0.60 s" in events[-1]["message"]
        ws.send(json.dumps({"type": "end"}))
        assert events_until_end(ws)[-1]["source_ms"] == 400.0



def test_a_stream_exactly_as_long_as_the_maximum_is_taken(models):
    with server(models, max_stream_s=0.6) as s, connect(s.url) as ws:
        events = stream_audio(ws, tone(0.6), {"head": "offline"}, chunk=4800)  # 0.3 s + 0.3 s
    assert [e for e in events if e["type"] == "error"] == [] and events[-1]["source_ms"] == 600.0


def test_a_stream_longer_than_one_utterance_is_cut_at_pauses_when_max_stream_allows_it():
    """A model that hears 0.64 s, a server that takes 2 s streams: 1.0 s of audio goes through SegmentedStream
    (two utterances), and the client gets exactly its words and delays."""
    model, audio, head = untied_tiny("speech", max_source_embeddings=8), tone(1.0), make_head("wait-k", k=1)
    expected = SegmentedStream(model, head, LIMITS)
    live_words(model, head, audio, stream=expected)
    assert expected.n_segments == 2 and expected.words
    translator = Translator(model, None, ServeConfig(limits=LIMITS, max_stream_s=2.0))
    with BackgroundServer(translator) as s, connect(s.url) as ws:
        events = stream_audio(ws, audio, {"head": "wait-k", "params": {"k": 1}})
    assert translator.max_source == 2.0 and translator.segmented
    writes = [e for e in events if e["type"] == "write"]
    assert [e["text"] for e in writes] == expected.words
    assert [e["delay_ms"] for e in writes] == expected.delays


def test_each_stream_on_a_connection_may_be_as_long_as_the_maximum(models):
    """The length limit is per stream: the audio of the streams before on the same connection does not count."""
    with server(models, max_stream_s=0.6) as s, connect(s.url) as ws:
        for _ in range(3):
            events = stream_audio(ws, tone(0.5), {"head": "offline"})
            assert [e for e in events if e["type"] == "error"] == [] and events[-1]["source_ms"] == 500.0


def test_text_words_past_the_models_context_in_tokens_are_too_long_and_the_stream_keeps_what_it_took():
    """The reader counts words; a word is one or more tokens, so the session's own check (in tokens) refuses the
    rest: a too_long error in the client's terms (it was bad_input, with advice for library users)."""
    translator = Translator(untied_tiny("text", max_source_embeddings=12), None, ServeConfig(limits=LIMITS))
    with BackgroundServer(translator) as s, connect(s.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "offline"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "started"
        ws.send(json.dumps({"type": "words", "words": ["coffee"]}))
        ws.send(json.dumps({"type": "words", "words": ["Donaudampfschifffahrtsgesellschaft"] * 2}))
        events = []
        while not events or events[-1]["type"] != "error":
            events.append(json.loads(ws.recv(timeout=10)))
        assert events[-1]["code"] == "too_long", events
        assert "past the model's context of 12 source tokens; it is dropped" in events[-1]["message"]
        ws.send(json.dumps({"type": "end"}))
        assert events_until_end(ws)[-1]["source_length"] == 1.0


def test_a_model_whose_source_capacity_exceeds_the_encoders_context_is_segmented_at_what_a_session_takes():
    """max_source_embeddings above the encoder's 1500 frames / stack: a session still takes 29.76 s. live and serve
    used to take the LLM's capacity alone (59.84 s): live streamed a 35 s file through one session and failed,
    serve took 35 s streams and refused every frame past 29.76 s."""
    from simul_agents.live import max_source
    from streaming_llm.engine import max_source_samples

    model = untied_tiny("speech", max_source_embeddings=750)
    assert max_source(model) == max_source_samples(model) / 16000 == 29.76
    translator = Translator(model, None, ServeConfig(limits=LIMITS, max_stream_s=35.0))
    assert translator.segmented  # 35 s is more than one session: cut at pauses


HUGE = "1" + "0" * 400  # a JSON integer: Python's int, beyond a float's range


@pytest.mark.parametrize("start, code, words", [
    (f'{{"type": "start", "threshold": {HUGE}}}', "bad_start", "threshold 1000"),
    (f'{{"type": "start", "params": {{"threshold": {HUGE}}}}}', "bad_start", "is not a finite number"),
    (f'{{"type": "start", "head": "wait-k", "params": {{"k": {HUGE}}}}}', "bad_start", "is not a finite number"),
    (f'{{"type": "start", "sample_rate": 1{"0" * 5000}}}', "bad_json", "not JSON"),
], ids=["threshold", "params-threshold", "params-k", "5000-digits"])  # fmt: skip
def test_a_start_with_a_huge_integer_gets_an_error_and_the_connection_stays_usable(speech_server, start, code, words):
    """It used to close the connection (1011) with an OverflowError, or json's ValueError past 4300 digits."""
    with connect(speech_server.url) as ws:
        ws.send(start)
        assert words in expect_error(ws, code)["message"]
        assert stream_audio(ws, tone(0.5), {"head": "offline"})[-1]["words"] > 0


def test_make_head_refuses_an_integer_beyond_a_floats_range_by_name():
    with pytest.raises(ValueError, match=r"head 'entropy': threshold=1000.*\.\.\. is not a finite number"):
        make_head("entropy", threshold=10**400)
    with pytest.raises(ValueError, match="head 'wait-k': k=.* is not a finite number"):
        make_head("wait-k", k=10**400)


@pytest.mark.parametrize("message", [
    '{"type": "words", "words": ["caf\\ud800"]}',
    '{"type": "words", "text": "lone \\udc00 surrogate"}',
], ids=["words", "text"])  # fmt: skip
def test_words_with_a_lone_surrogate_are_refused_and_the_stream_goes_on(models, message):
    """Valid JSON, not Unicode text: it used to reach the tokenizer (TypeError), a model_error that dropped the
    stream."""
    with server(models, "text") as s, connect(s.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "wait-k", "params": {"k": 1}}))
        assert json.loads(ws.recv(timeout=10))["type"] == "started"
        ws.send(message)
        assert "lone surrogate" in expect_error(ws, "bad_message")["message"]
        ws.send(json.dumps({"type": "words", "words": ["I", "would", "like", "coffee", "ünd", "世界"]}))
        ws.send(json.dumps({"type": "end"}))
        events = events_until_end(ws)
    assert not [e for e in events if e["type"] == "error"]
    assert events[-1]["source_length"] == 6.0 and events[-1]["words"] > 0 and "dropped" not in events[-1]


def test_huge_finite_floats_at_48k_are_clipped_and_the_audio_after_them_is_kept(speech_server):
    """As at 16 kHz. They used to overflow the stream's resampler to Inf: that frame and the clean one after it were
    refused as 'NaN or Inf samples', and 0.5 s of good audio was lost."""
    with connect(speech_server.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "offline", "sample_rate": 48000}))
        assert json.loads(ws.recv(timeout=10))["type"] == "started"
        ws.send(np.full(4800, 3e38, "<f4").tobytes())  # 100 ms, finite
        for _ in range(3):
            ws.send(tone(0.4, rate=48000).tobytes())
        ws.send(json.dumps({"type": "end"}))
        events = events_until_end(ws)
    assert [e for e in events if e["type"] == "error"] == []
    assert abs(events[-1]["source_ms"] - 1300.0) <= 1 and events[-1]["words"] > 0


@pytest.mark.parametrize("which, argv, problem", [
    ("no-probe", ["--head", "probe"], "probe head: this checkpoint has no probe"),
    ("speech", ["--head", "attention", "--head-param", "layers=40"], "attention head: layers [40] out of range"),
], ids=["probe-without-probe", "attention-layers"])  # fmt: skip
def test_serve_refuses_a_head_the_model_cannot_run_before_serving(tmp_path, monkeypatch, capsys, which, argv, problem):
    """It used to serve, and refuse every client start that names no head of its own."""
    checkpoint = str(tmp_path / which)
    save_checkpoint(untied_tiny("speech", probe_hidden=0 if which == "no-probe" else 64), checkpoint)
    served = []

    async def serve_forever(translator, host, port):
        served.append(translator)

    monkeypatch.setattr(serve_module, "serve_forever", serve_forever)
    work = []  # --int4's calibration and --compile take minutes: the head is refused before them
    monkeypatch.setattr(serve_module, "set_precision", lambda *a: work.append("--int4") or a[0])
    monkeypatch.setattr(serve_module, "compile_steps", lambda *a: work.append("--compile") or 0.0)
    assert serve_module.main(["--checkpoint", checkpoint, "--port", "0", "--int4", "--compile", *argv]) == 2
    assert not served and not work
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("serve: error: ") and problem in line, line


# ---- clients: several, vanishing, idle, too many ---------------------------------------------------------


def test_several_clients_at_once_each_get_their_own_stream_and_settings(models, speech_server):
    several_clients_at_once(models, speech_server)


def test_batched_clients_share_lm_forwards_and_get_the_words_they_get_alone(models):
    with server(models, batch=True) as s:
        several_clients_at_once(models, s)
        stats = s.translator.stats()
    assert stats["lm_requests"] > stats["lm_forwards"], stats  # the streams' forwards did meet


def test_unbatched_clients_take_turns_on_the_model_thread(models):
    with server(models, batch=False) as s:
        several_clients_at_once(models, s)
        assert s.translator.batcher is None and s.translator.workers is s.translator.executor
        assert "lm_forwards" not in s.translator.stats()


def several_clients_at_once(models, speech_server):
    jobs = [({"head": "wait-k", "params": {"k": 1}}, tone(1.0, shift=0)),
            ({"head": "wait-k", "params": {"k": 3}}, tone(1.0, shift=50)),
            ({"head": "offline"}, tone(1.0, shift=90)),
            ({"head": "entropy", "threshold": 2.0}, tone(1.0, shift=20))]  # fmt: skip
    results: dict[int, list] = {}

    def client(i, start, audio):
        with connect(speech_server.url) as ws:
            results[i] = stream_audio(ws, audio, start)

    threads = [threading.Thread(target=client, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = [live_words(models["speech"], make_head("wait-k", k=1), jobs[0][1])[0],
                live_words(models["speech"], make_head("wait-k", k=3), jobs[1][1])[0],
                offline_words(models["speech"], jobs[2][1]),
                live_words(models["speech"], make_head("entropy", threshold=2.0), jobs[3][1])[0]]  # fmt: skip
    assert [results[i][-1]["text"] for i in range(len(jobs))] == [" ".join(words) for words in expected]


def test_a_client_that_vanishes_mid_stream_frees_its_session_and_the_server_goes_on(models, speech_server):
    translator = speech_server.translator
    assert wait_for(lambda: translator.connections == 0)
    served = translator.served
    sock = socket.create_connection((speech_server.host, speech_server.port))
    with connect(speech_server.url, sock=sock) as ws:
        ws.send(json.dumps({"type": "start", "head": "offline"}))
        json.loads(ws.recv(timeout=10))
        for _ in range(3):
            ws.send(tone(0.2).tobytes())
        assert wait_for(lambda: translator.streams == 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, no closing handshake: the client is gone
    assert wait_for(lambda: translator.connections == 0 and translator.streams == 0)
    with connect(speech_server.url) as ws:
        assert stream_audio(ws, tone(0.5), {"head": "offline"})[-1]["type"] == "end"
    assert translator.served == served + 1


def test_an_idle_client_is_told_and_disconnected_after_the_timeout(models):
    with server(models, idle_timeout_s=0.5) as s, connect(s.url) as ws:
        ws.send(json.dumps({"type": "start"}))
        json.loads(ws.recv(timeout=10))
        start = time.monotonic()
        assert "no message for 0.5 s" in expect_error(ws, "idle")["message"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        assert 0.4 < time.monotonic() - start < 3
        assert wait_for(lambda: s.translator.streams == 0 and s.translator.connections == 0)


def test_a_client_waiting_on_a_busy_model_is_not_idle(models, monkeypatch):
    """The idle timeout counts silence from the client while the server owes it nothing: a client that has sent its
    frames and waits for a slow model keeps its connection."""
    real_push = serve_module._Stream.push_audio

    def slow_push(self, samples):
        time.sleep(0.05)
        real_push(self, samples)

    monkeypatch.setattr(serve_module._Stream, "push_audio", slow_push)
    with server(models, idle_timeout_s=0.3) as s, connect(s.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "offline"}))
        json.loads(ws.recv(timeout=10))
        for _ in range(12):  # 0.6 s of model work, twice the idle timeout, after the client's last message
            ws.send(tone(0.02).tobytes())
        ws.send(json.dumps({"type": "end"}))
        events = events_until_end(ws)
    assert [e for e in events if e["type"] == "error"] == [] and events[-1]["words"] > 0


def test_a_full_server_says_busy_and_closes_the_extra_connection(models):
    with server(models, max_clients=1) as s, connect(s.url) as first:
        first.send(json.dumps({"type": "start"}))
        json.loads(first.recv(timeout=10))
        with connect(s.url) as second:
            assert "full (1 clients)" in expect_error(second, "busy")["message"]
            with pytest.raises(ConnectionClosed) as closed:
                second.recv(timeout=5)
            assert closed.value.rcvd.code == 1013
        first.send(tone(0.5).tobytes())
        first.send(json.dumps({"type": "end"}))
        assert events_until_end(first)[-1]["type"] == "end"


def test_a_slow_model_makes_the_server_stop_reading_instead_of_queueing_without_bound(models, monkeypatch):
    real_push = serve_module._Stream.push_audio

    def slow_push(self, samples):
        time.sleep(0.05)
        real_push(self, samples)

    monkeypatch.setattr(serve_module._Stream, "push_audio", slow_push)
    frames = 40
    with server(models, queue_frames=2) as s, connect(s.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "offline"}))
        json.loads(ws.recv(timeout=10))
        for _ in range(frames):
            ws.send(tone(0.02).tobytes())  # far faster than the model takes them (50 ms each)
        ws.send(json.dumps({"type": "end"}))
        events = events_until_end(ws)
    assert sum(e["type"] == "read" for e in events) == frames  # nothing was dropped
    assert s.translator.peak_backlog <= 2 + 1  # read from the socket but not yet run: the queue, plus one running


def fail_second_push(monkeypatch) -> list:
    """The model fails inside the second audio frame of a stream -> the pushes made (one entry each)."""
    real_push = serve_module._Stream.push_audio
    calls = []

    def failing_push(self, samples):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure inside the model")
        real_push(self, samples)

    monkeypatch.setattr(serve_module._Stream, "push_audio", failing_push)
    return calls


def test_a_model_failure_drops_only_that_stream_and_the_connection_goes_on(models, monkeypatch):
    fail_second_push(monkeypatch)
    with server(models) as s, connect(s.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "offline"}))
        json.loads(ws.recv(timeout=10))
        for _ in range(3):
            ws.send(tone(0.2).tobytes())
        ws.send(json.dumps({"type": "end"}))
        events = events_until_end(ws)
        errors = [e for e in events if e["type"] == "error"]
        assert [e["code"] for e in errors] == ["model_error"] and "simulated failure" in errors[0]["message"]
        assert events[-1] == {"type": "end", "text": "", "words": 0, "dropped": True}
        assert stream_audio(ws, tone(0.5), {"head": "offline"})[-1]["words"] > 0
        assert s.translator.streams == 0


def test_frames_of_a_dropped_stream_are_ignored_up_to_its_end(models, monkeypatch):
    calls = fail_second_push(monkeypatch)
    with server(models) as s, connect(s.url) as ws:
        ws.send(json.dumps({"type": "start", "head": "wait-k", "params": {"k": 1}}))
        json.loads(ws.recv(timeout=10))
        for _ in range(4):
            ws.send(tone(0.2).tobytes())
        ws.send(json.dumps({"type": "end"}))
        events = events_until_end(ws)
    kinds = [e["type"] for e in events]
    after = kinds[kinds.index("error") + 1 :]
    assert after == ["end"] and events[-1]["dropped"], events  # no read or write for the frames after the failure
    assert len(calls) == 2  # the model never saw them


def test_main_loads_the_model_on_the_thread_that_serves_it(models, monkeypatch):
    """One OpenMP pool: loading on the main thread and stepping on the model thread made steps ~1.5x slower."""
    from streaming_llm import checkpoint

    seen = {}
    real_load = checkpoint.load_checkpoint

    def load(*args, **kwargs):
        seen["load"] = threading.current_thread()
        return real_load(*args, **kwargs)

    async def serve_forever(translator, host, port):
        seen["serve"] = translator.executor.submit(threading.current_thread).result()

    monkeypatch.setattr(checkpoint, "load_checkpoint", load)
    monkeypatch.setattr(serve_module, "serve_forever", serve_forever)
    assert serve_module.main(["--checkpoint", models["speech-ckpt"], "--port", "0"]) == 0
    assert seen["load"] is seen["serve"] and seen["load"] is not threading.main_thread()


@pytest.mark.parametrize("argv,problem", [
    (["--port", "99999"], "argument --port: 99999: must be 0..65535"),
    (["--port", "-1"], "argument --port: -1: must be 0..65535"),
    (["--threads", "-1"], "argument --threads: -1: must be 0 (torch's default) or a positive number"),
], ids=["port-too-big", "port-negative", "threads-negative"])  # fmt: skip
def test_serve_refuses_ports_outside_0_65535_and_negative_threads_before_loading(capsys, argv, problem):
    with pytest.raises(SystemExit) as caught:
        serve_module.main(["--checkpoint", "no-such-checkpoint", *argv])
    assert caught.value.code == 2
    assert problem in capsys.readouterr().err.splitlines()[-1]


def test_serve_takes_port_0_65535_and_threads_0():
    args = serve_module.parse_args(["--checkpoint", "c", "--port", "0", "--threads", "0"])
    assert (args.port, args.threads) == (0, 0)
    assert serve_module.parse_args(["--checkpoint", "c", "--port", "65535"]).port == 65535


def test_serve_passes_its_reencode_option_to_every_stream():
    args = serve_module.parse_args(["--checkpoint", "c", "--reencode", "read"])
    assert serve_module.config_from_args(args).reencode == "read"
    assert serve_module.config_from_args(serve_module.parse_args(["--checkpoint", "c"])).reencode == "never"


def test_serve_passes_its_word_caps_to_every_stream():
    args = serve_module.parse_args(["--checkpoint", "c", "--max-len-a", "0", "--max-len-b", "3",
                                    "--max-target-tokens", "40"])  # fmt: skip
    assert serve_module.config_from_args(args).limits == Limits(0.0, 3.0, 40)


def test_the_servers_head_settings_apply_when_a_start_names_no_other_head(models):
    args = serve_module.parse_args(["--checkpoint", "c", "--head", "wait-k", "--head-param", "k=3"])
    config = serve_module.config_from_args(args)
    assert (config.head, config.head_params) == ("wait-k", (("k", "3"),))
    with pytest.raises(ValueError, match="--threshold 1.0 and --head-param threshold=2 both set threshold"):
        serve_module.config_from_args(serve_module.parse_args(["--checkpoint", "c", "--threshold", "1",
                                                               "--head-param", "threshold=2"]))  # fmt: skip
    with server(models, head="wait-k", head_params=(("k", "3"),)) as s:
        for start, described in [({}, "wait-k(k=3)"), ({"params": {"k": 2}}, "wait-k(k=2)"),
                                 ({"head": "entropy"}, "entropy(threshold=")]:  # fmt: skip
            with connect(s.url) as ws:
                ws.send(json.dumps({"type": "start", **start}))
                assert json.loads(ws.recv(timeout=10))["head"].startswith(described)


@pytest.mark.parametrize("argv,problem", [
    (["--max-stream", "-5"], "--max-stream -5.0: give seconds >= 0"),
    (["--max-stream", "nan"], "--max-stream nan: give seconds >= 0"),
    (["--idle-timeout", "inf"], "--idle-timeout inf: give a number of seconds"),
    (["--head", "wait-k", "--head-param", "k=0"], "k=0"),
    (["--max-len-b", "-1"], "--max-len-a 2.0 --max-len-b -1.0: give finite numbers >= 0"),
    (["--max-target-tokens", "0"], "--max-target-tokens 0: at least 1"),
], ids=["max-stream-negative", "max-stream-nan", "idle-timeout-inf", "head-param", "max-len",
        "max-tokens"])  # fmt: skip
def test_serve_refuses_a_bad_limit_or_head_setting_before_loading(capsys, argv, problem):
    assert serve_module.main(["--checkpoint", "no-such-checkpoint", *argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("serve: error: ") and problem in line, line


def test_a_larger_max_frame_bytes_raises_the_hard_limit_with_it():
    """--max-frame-bytes over 2 MiB: a frame under it is taken, so the closing limit is 4 times it (8 MiB at least)."""
    config = serve_module.config_from_args(serve_module.parse_args(["--checkpoint", "c", "--max-frame-bytes",
                                                                    str(4 << 20)]))  # fmt: skip
    assert (config.max_frame_bytes, config.hard_frame_bytes) == (4 << 20, 16 << 20)
    default = serve_module.config_from_args(serve_module.parse_args(["--checkpoint", "c"]))
    assert default.hard_frame_bytes == 8 << 20 >= 4 * default.max_frame_bytes


def test_serve_help_describes_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        serve_module.parse_args(["--help"])
    options = {}  # option -> its help (each option's entry starts a line with "  --")
    for entry in capsys.readouterr().out.split("\n  --")[1:]:
        name, _, rest = entry.partition(" ")
        options[f"--{name}"] = " ".join(rest.split())
    for option, default in [("--max-clients", "16"), ("--max-frame-bytes", "1048576"), ("--queue-frames", "32"),
                            ("--idle-timeout", "30.0"), ("--max-stream", "0.0"), ("--head", "entropy"),
                            ("--port", "8765"), ("--reencode", "never")]:  # fmt: skip
        help_text = options[option].split(" ", 1)[1]  # after the metavar
        assert f"default: {default}" in help_text and len(help_text) > len(f"(default: {default})") + 10, help_text
