"""Batched LM forwards (streaming_llm/batching.py) and the batched SimulEval loop (simul_agents/batch_eval.py)."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import soundfile as sf
import torch
from fixtures_models import tone, untied_tiny
from transformers import DynamicCache

from simul_agents import evaluate_inprocess
from simul_agents.batch_eval import run as batch_eval
from simul_agents.proactive_agent import InstanceError, ProactiveAgent
from streaming_llm import batching
from streaming_llm.batching import LMBatcher, forward_batch, forward_one
from streaming_llm.checkpoint import save_checkpoint
from streaming_llm.engine import StreamingSession
from streaming_llm.lean import cxx_compiler, is_compiled

SENTENCES = [
    "I would like a cup of coffee .",
    "Where is the train station ?",
    "Thank you for your help .",
    "The weather is fine today and tomorrow it will rain .",
    "Yes .",
]
REFERENCES = ["Ich möchte Kaffee .", "Wo ist der Bahnhof ?", "Danke .", "Das Wetter ist schön .", "Ja ."]
LIMITS = ["--max-target-tokens", "24", "--no-progress-bar"]


def follow(session: StreamingSession, words: list[str], trace: list[torch.Tensor]) -> None:
    """Read a word, look at the next-token logits, write a word every other word; then finish and write out."""
    for i, word in enumerate(words):
        session.push_words([word])
        trace.append(session.next_logits().clone())
        if i % 2:
            session.write_word()
    session.finish_source()
    while session.write_word() is not None:
        trace.append(session.next_logits().clone())


def run_members(n: int, work, name: str = "member") -> None:
    """``work(i)`` for i < n, each on a thread of its own (named ``name-i``), all at once."""
    threads = [threading.Thread(target=work, args=(i,), name=f"{name}-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def assert_same_traces(alone: list[list[torch.Tensor]], batched: list[list[torch.Tensor]]) -> None:
    for one, many in zip(alone, batched, strict=True):
        assert len(one) == len(many)
        for a, b in zip(one, many, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("on_a_runner", [False, True])
def test_batched_forwards_equal_one_session_at_a_time(on_a_runner):
    model = untied_tiny("text", seed=1)
    sources = [s.split() for s in SENTENCES]
    alone = []
    for words in sources:
        trace: list[torch.Tensor] = []
        follow(StreamingSession(model, max_target_tokens=24), words, trace)
        alone.append(trace)

    runner = ThreadPoolExecutor(1, thread_name_prefix="runner") if on_a_runner else None
    batcher = LMBatcher(model.llm, runner=runner)
    batched = [[] for _ in sources]
    forward_threads = set()

    def work(i: int) -> None:
        with batcher.member():
            follow(StreamingSession(model, max_target_tokens=24, lm_call=batcher), sources[i], batched[i])

    def batch_on(llm, requests):
        forward_threads.add(threading.current_thread().name)
        return forward_batch(llm, requests)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batching, "forward_batch", batch_on)
        run_members(len(sources), work)
    assert_same_traces(alone, batched)
    assert batcher.n_requests > 2 * batcher.n_forwards, "sessions of different lengths did share forwards"
    if on_a_runner:  # every batched forward ran on the runner's one thread
        assert {name.split("_")[0] for name in forward_threads} == {"runner"}
        runner.shutdown()
    else:
        assert all(name.startswith("member-") for name in forward_threads)


def test_batched_hidden_states_are_each_sessions_own():
    """The probe head decides on ``signals().hidden``: batched, each session gets its own pending row's state."""
    model = untied_tiny("text", seed=1)
    sources = [s.split() for s in SENTENCES]

    def hidden_trace(session: StreamingSession, words: list[str], trace: list[torch.Tensor]) -> None:
        for i, word in enumerate(words):
            session.push_words([word])
            trace.append(session.signals().hidden.clone())
            if i % 2:
                session.write_word()

    alone = []
    for words in sources:
        alone.append([])
        hidden_trace(StreamingSession(model, max_target_tokens=24), words, alone[-1])
    batcher = LMBatcher(model.llm)
    batched: list[list[torch.Tensor]] = [[] for _ in sources]

    def work(i: int) -> None:
        with batcher.member():
            hidden_trace(StreamingSession(model, max_target_tokens=24, lm_call=batcher), sources[i], batched[i])

    run_members(len(sources), work)
    assert_same_traces(alone, batched)
    assert batcher.n_requests > batcher.n_forwards, "no forward was shared"


def test_batched_attention_weights_are_each_sessions_own():
    model = untied_tiny("text", seed=2)
    layers = list(range(model.llm.config.num_hidden_layers))
    batcher = LMBatcher(model.llm)
    got: dict[int, torch.Tensor] = {}

    def attention(words: list[str], lm_call) -> torch.Tensor:
        session = StreamingSession(model, attention_layers=layers, lm_call=lm_call)
        session.push_words(words)
        return session.signals().source_attention

    def work(i: int) -> None:
        with batcher.member():
            got[i] = attention(SENTENCES[i].split(), batcher)

    run_members(3, work)
    for i in range(3):
        alone = attention(SENTENCES[i].split(), forward_one)
        assert got[i].shape == (len(SENTENCES[i].split()),)
        torch.testing.assert_close(got[i], alone, atol=1e-5, rtol=1e-5)


# ---- batch_eval against SimulEval ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_eval")
    save_checkpoint(untied_tiny("text"), root / "text-ckpt")
    save_checkpoint(untied_tiny("speech"), root / "speech-ckpt")
    (root / "source.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    (root / "target.txt").write_text("\n".join(REFERENCES) + "\n", encoding="utf-8")
    wavs = []
    for i, seconds in enumerate((1.5, 1.25, 0.9, 2.1, 0.6)):
        sf.write(root / f"s{i}.wav", tone(seconds, shift=40 * i), 16000, subtype="FLOAT")
        wavs.append(str(root / f"s{i}.wav"))
    (root / "speech.txt").write_text("\n".join(wavs) + "\n", encoding="utf-8")
    return root


def instances(output) -> list[dict]:
    lines = (output / "instances.log").read_text(encoding="utf-8").splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda ins: ins["index"])


CASES = [
    ("text", ["--head", "entropy", "--threshold", "6"]),
    ("text", ["--head", "wait-k", "--k", "2"]),
    ("text", ["--head", "attention", "--threshold", "0.5"]),
    ("text", ["--head", "local-agreement", "--k", "2"]),
    ("text", ["--head", "oracle"]),
    ("speech", ["--head", "entropy", "--threshold", "6"]),
    ("speech", ["--head", "wait-k", "--k", "2"]),
]


@pytest.mark.parametrize(("modality", "head"), CASES, ids=lambda c: c if isinstance(c, str) else c[1])
def test_batch_eval_writes_what_simuleval_writes(data, tmp_path, modality, head):
    source = data / ("speech.txt" if modality == "speech" else "source.txt")
    argv = ["--checkpoint", data / f"{modality}-ckpt", "--source", source, "--target", data / "target.txt", *LIMITS]
    argv += ["--source-segment-size", "320"] if modality == "speech" else []
    argv += head
    evaluate_inprocess(ProactiveAgent, [*argv, "--output", tmp_path / "simuleval"])
    batch_eval(["--batch", "3", *argv, "--output", tmp_path / "batched"])
    want, got = instances(tmp_path / "simuleval"), instances(tmp_path / "batched")
    assert [ins["index"] for ins in got] == list(range(len(SENTENCES)))
    for a, b in zip(want, got, strict=True):
        assert (b["prediction"], b["delays"], b["source_length"]) == (a["prediction"], a["delays"], a["source_length"])
        assert b["elapsed"] == []
    assert (tmp_path / "batched" / "scores.tsv").is_file()


def test_batch_eval_runs_a_shard_and_refuses_computation_aware(data, tmp_path):
    argv = ["--checkpoint", data / "text-ckpt", "--source", data / "source.txt", "--target", data / "target.txt"]
    argv += [*LIMITS, "--head", "wait-k", "--k", "1", "--output", tmp_path / "shard"]
    batch_eval(["--batch", "4", *argv, "--start-index", "1", "--end-index", "4"])
    assert [ins["index"] for ins in instances(tmp_path / "shard")] == [1, 2, 3]
    with pytest.raises(SystemExit, match="computation-aware"):
        batch_eval(["--batch", "2", *argv, "--computation-aware"])
    with pytest.raises(SystemExit, match="--batch 'x'"):
        batch_eval(["--batch", "x", *argv])


def test_batch_eval_resumes_a_killed_run_keeping_its_finished_instances(data, tmp_path):
    argv = ["--checkpoint", data / "text-ckpt", "--source", data / "source.txt", "--target", data / "target.txt"]
    argv += [*LIMITS, "--head", "entropy", "--threshold", "6"]
    batch_eval(["--batch", "2", *argv, "--output", tmp_path / "whole"])
    whole = instances(tmp_path / "whole")
    killed = tmp_path / "killed"
    killed.mkdir()
    kept = [{**whole[3], "prediction": "KEPT"}, whole[1]]  # a marker: a kept instance is not run again
    lines = [json.dumps(ins) for ins in kept] + [json.dumps(whole[0])[:25]]  # the last line cut mid-write
    (killed / "instances.log").write_text("\n".join(lines), encoding="utf-8")
    batch_eval(["--batch", "2", *argv, "--output", killed, "--continue-unfinished"])
    got = instances(killed)
    assert [ins["index"] for ins in got] == list(range(len(SENTENCES)))
    assert got[3]["prediction"] == "KEPT"
    for a, b in zip(whole, got, strict=True):
        if a["index"] != 3:
            assert (b["prediction"], b["delays"]) == (a["prediction"], a["delays"])
    batch_eval(["--batch", "2", *argv, "--output", killed])  # without the flag: a fresh run, as SimulEval's
    assert [ins["prediction"] for ins in instances(killed)] == [ins["prediction"] for ins in whole]


def test_batch_eval_resumed_keeps_the_failures_of_its_finished_instances(tmp_path):
    """--skip-failed, killed, --continue-unfinished: a kept failed instance is not run again, so its line in
    failed.jsonl must stay (simul_agents.score counts n_failed from it)."""
    from simul_agents.score import score_output

    save_checkpoint(untied_tiny("text", max_source_embeddings=24), tmp_path / "ckpt")
    long = " ".join(["word"] * 40) + " ."  # more than the model's 24 source embeddings: instance 1 fails
    (tmp_path / "source.txt").write_text(f"{SENTENCES[0]}\n{long}\n{SENTENCES[2]}\n", encoding="utf-8")
    (tmp_path / "target.txt").write_text("\n".join(REFERENCES[:3]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--checkpoint", tmp_path / "ckpt", "--source", tmp_path / "source.txt", "--target",
            tmp_path / "target.txt", *LIMITS, "--head", "wait-k", "--k", "1", "--skip-failed", "--output", out]
    batch_eval(["--batch", "2", *argv])
    assert score_output(out, write=False)["n_failed"] == 1
    kept = [json.dumps(ins) for ins in instances(out)[:2]]  # killed before instance 2 was written
    (out / "instances.log").write_text("\n".join(kept) + "\n", encoding="utf-8")
    batch_eval(["--batch", "2", *argv, "--continue-unfinished"])
    assert [ins["index"] for ins in instances(out)] == [0, 1, 2]
    assert score_output(out, write=False)["n_failed"] == 1


def test_a_request_that_fails_fails_alone():
    model = untied_tiny("text", seed=3)
    batcher = LMBatcher(model.llm)
    results: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def good() -> None:
        with batcher.member():
            barrier.wait()
            session = StreamingSession(model, lm_call=batcher)
            session.push_words(SENTENCES[0].split())
            results["good"] = session.next_logits().clone()

    def bad() -> None:
        with batcher.member():
            barrier.wait()
            x = torch.zeros(1, 2, model.llm.config.hidden_size + 1)  # a wrong width: the LM raises
            mask = torch.zeros(1, 1, 2, 2)
            try:
                batcher(model.llm, x, torch.arange(2)[None], mask, DynamicCache())
            except Exception as e:
                results["bad"] = e

    threads = [threading.Thread(target=good), threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    session = StreamingSession(model)
    session.push_words(SENTENCES[0].split())
    torch.testing.assert_close(results["good"], session.next_logits(), atol=1e-5, rtol=1e-5)
    assert isinstance(results["bad"], Exception)


@pytest.mark.skipif(cxx_compiler() is None, reason="TorchInductor needs a C++ compiler (make setup installs g++)")
def test_batch_eval_with_compiled_steps_writes_what_simuleval_writes_eagerly(data, tmp_path):
    import torch._dynamo

    from simul_agents import proactive_agent

    argv = ["--checkpoint", data / "speech-ckpt", "--source", data / "speech.txt", "--target", data / "target.txt",
            *LIMITS, "--source-segment-size", "320", "--head", "entropy", "--threshold", "6"]  # fmt: skip
    evaluate_inprocess(ProactiveAgent, [*argv, "--output", tmp_path / "simuleval"])
    model = proactive_agent.load_model(str(data / "speech-ckpt"), "fp32", compiled=True)  # what --compile loads
    with torch._dynamo.config.patch(error_on_recompile=True):  # packed batches reach no shape the warm-up did not
        batch_eval(["--batch", "3", *argv, "--compile", "--output", tmp_path / "batched"])
    assert list(proactive_agent._MODELS.values()) == [model] and is_compiled(model.llm)
    want, got = instances(tmp_path / "simuleval"), instances(tmp_path / "batched")
    for a, b in zip(want, got, strict=True):
        assert (b["prediction"], b["delays"]) == (a["prediction"], a["delays"])


def test_sessions_waiting_at_once_share_one_forward():
    """Three members each ask for one forward: it runs once, for the three, when the last of them asks."""
    model = untied_tiny("text", seed=1)
    batcher = LMBatcher(model.llm)
    ready = threading.Barrier(3)
    logits: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        with batcher.member():
            ready.wait()  # all three are members before any asks
            session = StreamingSession(model, lm_call=batcher)
            session.push_words(SENTENCES[i].split())
            logits[i] = session.next_logits().clone()

    run_members(3, work)
    assert (batcher.n_forwards, batcher.n_requests) == (1, 3)
    for i in range(3):
        alone = StreamingSession(model)
        alone.push_words(SENTENCES[i].split())
        torch.testing.assert_close(logits[i], alone.next_logits(), atol=1e-5, rtol=1e-5)


def _causal(q: int, past: int) -> torch.Tensor:
    """(1, 1, q, past + q) additive mask: every past entry, and the new rows causally."""
    return torch.zeros(1, 1, q, past + q).masked_fill(torch.ones(q, past + q, dtype=torch.bool).triu(past + 1),
                                                      float("-inf"))  # fmt: skip


def _request(llm, seed: int, past: int, q: int, attentions: bool) -> batching._Request:
    """A request of q new rows over a cache of ``past`` entries, made alike for every call with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    d = llm.config.hidden_size
    cache = DynamicCache()
    if past:
        prefix = torch.randn(1, past, d, generator=generator)
        forward_one(llm, prefix, torch.arange(past)[None], _causal(past, 0), cache)
    x = torch.randn(1, q, d, generator=generator)
    return batching._Request(x, torch.arange(past, past + q)[None], _causal(q, past), cache, attentions)


def test_a_packed_batch_of_mixed_requests_gives_each_what_it_gets_alone():
    """Cached and fresh, one-row and many-row, with and without attention weights (sessions of different heads
    on one server): one packed forward, and each request's logits, hidden rows, attention weights (1, heads, q,
    past + q) and cache as its own forward gives them."""
    llm = untied_tiny("text", seed=2).llm
    shapes = [(5, 1, True), (0, 4, False), (3, 2, True), (6, 3, False)]  # (past, q, attentions)
    with torch.inference_mode():
        batch = [_request(llm, i, *shape) for i, shape in enumerate(shapes)]
        forward_batch(llm, batch)
        for i, (r, shape) in enumerate(zip(batch, shapes, strict=True)):
            alone = _request(llm, i, *shape)
            want = forward_one(llm, alone.x, alone.positions, alone.mask, alone.cache, alone.attentions)
            torch.testing.assert_close(r.out.logits, want.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(r.out.hidden_states[-1], want.hidden_states[-1], atol=1e-5, rtol=1e-5)
            if r.attentions:
                for got, expected in zip(r.out.attentions, want.attentions, strict=True):
                    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            for got, expected in zip(r.cache.layers, alone.cache.layers, strict=True):
                torch.testing.assert_close(got.keys, expected.keys, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got.values, expected.values, atol=1e-5, rtol=1e-5)


COPIED_AGENT = ["--agent", "simul_agents/proactive_agent.py"]


@pytest.mark.parametrize("argv", [["--batch=4", "--source", "s.txt"], ["--batch", "4", "--source", "s.txt"],
                                  [*COPIED_AGENT, "--batch=4", "--source", "s.txt"]])  # fmt: skip
def test_batch_eval_takes_its_batch_and_a_copied_agent_out_of_the_simuleval_line(argv: list[str]):
    from simul_agents.batch_eval import _pop_batch

    assert _pop_batch(argv) == (4, ["--source", "s.txt"])


@pytest.mark.parametrize("value", ["0", "-2"])
def test_batch_eval_refuses_fewer_than_one_instance_at_a_time(value: str):
    from simul_agents.batch_eval import _pop_batch

    with pytest.raises(SystemExit, match=f"--batch {value}: at least 1"):
        _pop_batch(["--batch", value])


def test_batch_eval_stops_on_a_failing_instance_and_names_it(data, tmp_path):
    """Without --skip-failed a failing instance (audio past the model's context) ends the run with its error, as
    SimulEval's does; it is not dropped with its worker while the run reports success."""
    sf.write(tmp_path / "long.wav", tone(31.0), 16000, subtype="FLOAT")
    (tmp_path / "speech.txt").write_text(f"{data / 's0.wav'}\n{tmp_path / 'long.wav'}\n", encoding="utf-8")
    (tmp_path / "target.txt").write_text("\n".join(REFERENCES[:2]) + "\n", encoding="utf-8")
    argv = ["--checkpoint", data / "speech-ckpt", "--source", tmp_path / "speech.txt", "--target",
            tmp_path / "target.txt", *LIMITS, "--source-segment-size", "320", "--long-audio", "off"]  # fmt: skip
    argv += ["--head", "wait-k", "--k", "2"]
    with pytest.raises(InstanceError, match=r"instance 1 .*SourceTooLong.*--skip-failed"):
        batch_eval(["--batch", "2", *argv, "--output", tmp_path / "out"])


def test_batch_eval_resumed_on_fewer_instances_keeps_only_those(data, tmp_path):
    """--continue-unfinished with a narrower --end-index: the log keeps the finished instances of the new range
    only, and the scores are of that range."""
    argv = ["--checkpoint", data / "text-ckpt", "--source", data / "source.txt", "--target", data / "target.txt"]
    argv += [*LIMITS, "--head", "wait-k", "--k", "1", "--output", tmp_path / "out"]
    batch_eval(["--batch", "2", *argv])
    batch_eval(["--batch", "2", *argv, "--end-index", "3", "--continue-unfinished"])
    assert [ins["index"] for ins in instances(tmp_path / "out")] == [0, 1, 2]
