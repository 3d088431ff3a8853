"""SimulEval agents for a proactive streaming LLM: speech-to-text and text-to-text, one file.

    simuleval --agent simul_agents/proactive_agent.py --checkpoint CKPT --head entropy --threshold 0.6 \\
        --source-segment-size 320 --source source.txt --target target.txt --output OUT

SimulEval imports this file and evaluates the one class marked ``@entrypoint``: ``ProactiveAgent``, whose
``from_args`` loads the checkpoint and returns a ``ProactiveSpeechAgent`` or a ``ProactiveTextAgent`` by the
checkpoint's modality (the evaluator then picks its dataloader from that instance's source type). Both
classes can also be used directly (``simuleval.cli.evaluate(ProactiveTextAgent, config)``).

SimulEval 1.1.4's loop, and what the agent does about it:

- ``policy()`` is called once per source segment, even after a write: every word decided at that moment
  goes out in one ``WriteAction``, joined by spaces;
- when the source is finished (speech: the last segment; text: the last word or the empty final segment) the
  agent flushes everything in one ``WriteAction(..., finished=True)``: it always finishes, so ``reset()``
  (called only on finish) always runs and nothing leaks into the next utterance. It never finishes earlier
  (for speech an early finish would reset the agent mid-utterance);
- at most ``floor(max_len_a * units + max_len_b)`` target words (units read so far) and
  ``max_target_tokens`` tokens, so a degenerate model cannot loop;
- a speech source longer than one session holds (about 30 s: Whisper's context) is streamed by
  ``streaming_llm.long_stream.LongStream`` (``--long-audio auto``, the default: only such sources; ``segment``:
  every source; ``off``: never, and a too-long source fails its instance): segments cut at pauses by an energy
  VAD, a fresh session per segment, the same head, bounded memory. Sources that fit go through one session
  exactly as before.

Errors: a missing or foreign checkpoint, an empty or unreadable source (audio: also a float file holding NaN
or Inf; audio paths for a text checkpoint), mismatched source/target files, conflicting or non-finite head
parameters stop the run before the first instance with one line naming the problem (``SystemExit``). An
exception inside the model raises ``InstanceError`` naming the instance index (its traceback kept); with
``--skip-failed`` the instance is logged
(warning, and a line in ``OUTPUT/failed.jsonl``), it gets whatever was written before the failure (often an
empty prediction, which SimulEval's latency scorers skip and BLEU counts), and the run continues.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from argparse import ArgumentParser, Namespace
from pathlib import Path

import numpy as np
import soundfile
import torch
from simuleval.agents import ReadAction, SpeechToTextAgent, TextToTextAgent, WriteAction
from simuleval.agents.agent import GenericAgent
from simuleval.agents.states import AgentStates
from simuleval.utils import entrypoint

from speech_frontend.audio import SAMPLE_RATE, AudioError, extrapolate, to_mono_16k
from streaming_llm.batching import forward_one
from streaming_llm.checkpoint import CheckpointError, load_checkpoint, read_meta
from streaming_llm.config import SPEECH, TEXT
from streaming_llm.engine import REENCODE, StreamingSession, max_source_samples
from streaming_llm.heads import HEADS, READ, Head, check_given_once, decide, head_name, make_head, parse_head_params
from streaming_llm.long_stream import LongStream, SegmentConfig
from streaming_llm.quantize import add_precision_args

logger = logging.getLogger("simul_agents.proactive_agent")

MIN_SEGMENT_MS = 20  # below this a speech run is almost surely SimulEval's 1 ms default by mistake
_MODELS: dict[tuple[str, float], object] = {}  # loaded checkpoints, so an in-process sweep loads each once


class InstanceError(RuntimeError):
    """An instance failed inside the model; the message names its index. Its traceback is kept: input a user
    can get wrong is checked before the first instance, so a failure here is the model's, or ours, to debug."""


class SetupError(ValueError):
    """Arguments, checkpoint or data that cannot work; raised before the first instance."""


# ---- setup -----------------------------------------------------------------------------------------------


def load_model(checkpoint: str, precision: str = "fp32", compiled: bool = False):
    """Load a checkpoint once per process (keyed by path, modification time, the LLM's precision and whether its
    steps are compiled: ``--compile``, ``streaming_llm.lean.compile_steps``, before the first instance)."""
    from streaming_llm.lean import compile_steps
    from streaming_llm.quantize import set_precision

    path = Path(checkpoint)
    meta_file = path / "checkpoint.json"
    key = (str(path.resolve()), meta_file.stat().st_mtime if meta_file.exists() else 0.0, precision, compiled)
    if key not in _MODELS:
        _MODELS.clear()
        model = load_checkpoint(path, merge_lora=True)  # in eval mode
        model = set_precision(model, precision, checkpoint=path)
        if compiled:
            logger.info("compiling the LLM's streaming steps (--compile; once per process, untimed)")
            try:
                seconds = compile_steps(model.llm)
            except ValueError as e:
                raise SetupError(f"--compile: {e}") from None
            logger.info("compiled in %.0f s", seconds)
        _MODELS[key] = model
    return _MODELS[key]


def precision_of(args: Namespace) -> str:
    """fp32, fp16, int8 or int4: ``--int8`` / ``--int4`` (ours) or SimulEval's own ``--fp16`` / ``--dtype fp16``,
    which put the LLM in float16 (``streaming_llm.quantize.half_precision``; the encoder and adapter stay float32)."""
    from streaming_llm.quantize import precision_from_flags

    fp16 = bool(getattr(args, "fp16", False)) or getattr(args, "dtype", None) == "fp16"
    try:
        return precision_from_flags(getattr(args, "int8", False), fp16, getattr(args, "int4", False))
    except ValueError as e:
        raise SetupError(str(e)) from None


def build_head(args: Namespace) -> Head:
    """The head from ``--head`` and its parameters: command line over the checkpoint's defaults over the class's."""
    name = head_name(args.head)
    params: dict = {}
    try:
        params.update(read_meta(args.checkpoint).get("extra", {}).get("heads", {}).get(name, {}))
    except CheckpointError:
        pass  # load_model reports it
    given = parse_head_params(args.head_param or [])
    params.update(given)
    fields = {f.name for f in dataclasses.fields(HEADS[name])}
    if not fields and (args.threshold is not None or args.k is not None):
        flag = "--threshold" if args.threshold is not None else "--k"
        raise SetupError(f"{flag} does not apply to the {name!r} head: it takes no parameters")
    if args.threshold is not None:
        if "threshold" not in fields:
            raise SetupError(f"--threshold does not apply to the {name!r} head (its parameters: {sorted(fields)})")
        check_given_once("--threshold", args.threshold, "threshold", given)
        params["threshold"] = args.threshold
    if args.k is not None:
        key = {"wait-k": "k", "fixed-chunk": "chunk", "local-agreement": "n"}.get(name)
        if key is None:
            raise SetupError(f"--k does not apply to the {name!r} head; use --head-param")
        check_given_once("--k", args.k, key, given)
        params[key] = args.k
    return make_head(name, **params)


def read_sources(args: Namespace, modality: str) -> list[str]:
    """The source lines (text: sentences; speech: audio paths), checked over the evaluated index range."""
    if not args.source:
        raise SetupError("--source is required: a file with one source per line")
    source = Path(args.source)
    if not source.is_file():
        raise SetupError(f"--source {source}: no such file")
    try:
        with open(source, encoding="utf-8") as f:
            lines = f.readlines()  # as SimulEval's dataloaders read it
    except UnicodeDecodeError as e:
        raise SetupError(f"--source {source}: not UTF-8 text ({e})") from None
    if not lines:
        raise SetupError(f"--source {source}: empty file; it needs one source per line")
    if args.target:
        target = Path(args.target)
        if not target.is_file():
            raise SetupError(f"--target {target}: no such file")
        try:
            with open(target, encoding="utf-8") as f:
                references = f.readlines()  # SimulEval reads it so too: a decode error would stop it mid-run
        except UnicodeDecodeError as e:
            raise SetupError(f"--target {target}: not UTF-8 text ({e}); re-encode it as UTF-8") from None
        n_target = len(references)
        if n_target != len(lines):
            raise SetupError(f"--source has {len(lines)} lines but --target has {n_target}; they must pair up")
    start = args.start_index
    if start >= len(lines):
        raise SetupError(f"--start-index {start} is past the {len(lines)} lines of --source {source} (the first is 0)")
    end = len(lines) if args.end_index < 0 else min(args.end_index, len(lines))
    if modality == TEXT and all(is_audio_path(lines[i].strip()) for i in range(start, end)):
        raise SetupError(
            f"--source {source}: its lines are audio files (line {start + 1}: {lines[start].strip()}), but "
            f"{args.checkpoint} is a text model: give a text source (one sentence per line) or a speech checkpoint"
        )
    for i in range(start, end):
        if args.target and not references[i].strip():
            raise SetupError(
                f"--target {args.target} line {i + 1} (instance {i}) is empty; every line needs a reference"
            )
        line = lines[i].strip()
        where = f"--source {source} line {i + 1} (instance {i})"
        if not line:
            what = "an audio path" if modality == SPEECH else "a sentence"
            raise SetupError(f"{where} is empty; every line needs {what}")
        if modality == SPEECH:
            check_audio_file(line, where)
    return [line.strip() for line in lines]


def check_text_sizes(args: Namespace, model, sources: list[str]) -> None:
    """Each text source of the run fits one session (the model's source capacity counts tokens, not words); one that
    does not is named before the first instance (with --skip-failed it fails alone, logged, as it runs)."""
    end = len(sources) if args.end_index < 0 else min(args.end_index, len(sources))
    for i in range(args.start_index, end):
        if problem := model.source_overflow(sources[i].split()):
            raise SetupError(f"--source {args.source} line {i + 1} (instance {i}): {problem}; split the sentence, or "
                             "pass --skip-failed to log it and go on")  # fmt: skip


AUDIO_SUFFIXES = {f".{name.lower()}" for name in soundfile.available_formats()} | {".opus", ".aif", ".oga"}


def is_audio_path(line: str) -> bool:
    """A source line that names an audio file: an existing file, or a name ending in an audio extension."""
    if not line:
        return False
    if Path(line).suffix.lower() in AUDIO_SUFFIXES:
        return True
    try:
        return Path(line).is_file()
    except (OSError, ValueError):  # a sentence too long for a file name, or holding a NUL
        return False


def check_audio_file(path: str, where: str) -> None:
    """The file exists, has samples, and (float encodings, the only ones that can) holds no NaN or Inf."""
    if not Path(path).is_file():
        raise SetupError(f"{where}: audio file {path} does not exist (paths are relative to the current directory)")
    try:
        info = soundfile.info(path)
    except (soundfile.LibsndfileError, RuntimeError) as e:
        raise SetupError(f"{where}: {path} cannot be read as audio ({str(e).strip()})") from None
    if info.frames == 0:
        raise SetupError(f"{where}: {path} holds no audio (0 samples)")
    if info.subtype in ("FLOAT", "DOUBLE"):
        try:
            bad = non_finite_samples(path)
        except (soundfile.LibsndfileError, RuntimeError) as e:
            raise SetupError(f"{where}: {path} cannot be decoded as audio ({str(e).strip()})") from None
        if bad:
            raise SetupError(f"{where}: {path} holds {bad} NaN or Inf samples; clean the audio or drop this line")


def non_finite_samples(path: str, block: int = 1 << 18) -> int:
    """How many NaN or Inf samples a float-encoded file holds (read in blocks: memory stays bounded)."""
    return sum(int((~np.isfinite(b)).sum()) for b in soundfile.blocks(path, blocksize=block, dtype="float64"))


def first_index(args: Namespace) -> int:
    """The index of the first instance this run evaluates (SimulEval's --start-index / --continue-unfinished)."""
    if getattr(args, "continue_unfinished", False) and args.output:
        records = finished_records(Path(args.output) / "instances.log")
        if records:
            return records[-1]["index"] + 1
    return args.start_index


def check_run_args(args: Namespace) -> None:
    """What SimulEval leaves unchecked and would fail on later: threads, the output folder, the index range."""
    if getattr(args, "threads", 0) < 0:
        raise SetupError(f"--threads {args.threads}: give a number of threads, or 0 for torch's default")
    output = Path(args.output) if getattr(args, "output", None) else None
    if output is not None and output.exists() and not output.is_dir():
        raise SetupError(f"--output {output}: a file, not a folder; give a folder for instances.log and scores")
    if getattr(args, "start_index", 0) < 0:
        raise SetupError(f"--start-index {args.start_index}: instances count from 0")
    if getattr(args, "end_index", -1) >= 0 and args.end_index <= getattr(args, "start_index", 0):
        raise SetupError(f"--end-index {args.end_index} is not after --start-index {args.start_index}: no instance")


def finished_records(log: Path) -> list[dict]:
    """The instances a run being continued has finished. A run killed while writing leaves its last line cut:
    that line is dropped from the log (SimulEval's own --continue-unfinished would stop on it) and its instance
    runs again. Any other line that is not an instance record is an error."""
    if not log.is_file():
        return []
    try:
        lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise SetupError(f"{log}: not UTF-8 text ({e.reason}); delete it to run from the start") from None
    records = []
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n < len(lines):
                raise SetupError(f"{log} line {n} is not JSON; only a killed run's last line can be cut: "
                                 "delete the log to run from the start") from None  # fmt: skip
            logger.warning("%s: its last line was cut (killed while writing it); dropped, instance runs again", log)
            log.write_text("".join(line + "\n" for line in lines[:-1]), encoding="utf-8")
            break
        if not isinstance(record, dict) or not isinstance(record.get("index"), int):
            raise SetupError(f"{log} line {n} is not a SimulEval instance record (no index)")
        records.append(record)
    return records


# ---- streaming audio in ----------------------------------------------------------------------------------


class AudioInput:
    """SimulEval's sample lists (any rate, mono or (n, channels)) -> new 16 kHz mono samples for the engine.

    At 16 kHz the samples pass through. At another rate the whole prefix received so far is resampled (soxr) and
    only the new output samples are returned, so a block completes at the same segment as at 16 kHz. The
    resampler's filter reaches past the prefix's end, so the prefix is continued by linear prediction
    (``extrapolate``) first: the last samples of each segment then stay close to those of the whole file
    resampled (on Piper speech, worst sample off by 0.0007 at 22.05-48 kHz and 0.12 at 8 kHz, where an odd
    reflection gave 0.016-0.027 and 0.17).
    """

    PAD = 128  # input samples predicted past the growing end (soxr HQ's filter reaches fewer)

    def __init__(self):
        self.rate: int | None = None
        self.raw = np.zeros(0, dtype=np.float32)
        self.n_out = 0

    def push(self, samples, rate: int) -> np.ndarray:
        audio = np.asarray(samples, dtype=np.float32)
        if audio.size == 0:
            return np.zeros(0, dtype=np.float32)
        if audio.ndim == 2:
            audio = audio.mean(axis=1)
        if audio.ndim != 1:
            raise AudioError(f"source segment of shape {audio.shape}; expected samples or (samples, channels)")
        if self.rate is not None and rate != self.rate:
            raise AudioError(f"the sample rate changed from {self.rate} to {rate} Hz within one utterance")
        self.rate = int(rate)
        if self.rate == SAMPLE_RATE:
            return to_mono_16k(audio, SAMPLE_RATE, name="source segment")
        self.raw = np.concatenate([self.raw, audio])
        padded = np.concatenate([self.raw, extrapolate(self.raw, self.PAD)])
        n_total = round(self.raw.shape[0] * SAMPLE_RATE / self.rate)
        if n_total <= self.n_out:  # a few samples at a high rate: nothing new at 16 kHz yet
            return np.zeros(0, dtype=np.float32)
        out = to_mono_16k(padded, self.rate, name="source segment")[:n_total]
        new = out[self.n_out :]
        self.n_out = max(self.n_out, out.shape[0])
        return new


# ---- the agents ------------------------------------------------------------------------------------------


class ProactiveStates(AgentStates):
    """SimulEval's states plus one utterance's session; ``reset`` (on every finish) drops all of it."""

    def reset(self) -> None:
        super().reset()
        self.session: StreamingSession | None = None
        self.memory: dict = {}  # the head's per-utterance memory
        self.consumed = 0  # items of self.source already given to the session
        self.audio = AudioInput()
        self.long: LongStream | None = None  # a long speech source: segments, each its own session
        self.failed = False


class ProactiveBase(GenericAgent):
    """Shared by the speech and text agents: the policy loop over a ``StreamingSession`` and a decision head."""

    modality = ""

    def __init__(self, args: Namespace, model=None, head: Head | None = None, sources: list[str] | None = None,
                 first: int | None = None):  # fmt: skip
        """``first``: the index of the first instance (``first_index``, read from the log once by ``from_args``)."""
        if model is None:
            model = load_model(args.checkpoint, precision_of(args), getattr(args, "compile", False))
        self.model = model
        self.head = head if head is not None else build_head(args)
        self.session_options = {**self.head.session_options(self.model),
                                 "reencode": getattr(args, "reencode", "never"),
                                 "hold_end": getattr(args, "hold_sentence_end", False)}  # fmt: skip
        self.sources = sources
        self.max_len_a = args.max_len_a
        self.max_len_b = args.max_len_b
        self.max_target_tokens = args.max_target_tokens
        self.skip_failed = args.skip_failed
        self.long_audio = getattr(args, "long_audio", "auto")
        self.segments = SegmentConfig(
            min_seconds=getattr(args, "segment_min_seconds", SegmentConfig.min_seconds),
            max_seconds=getattr(args, "segment_max_seconds", SegmentConfig.max_seconds),
            pause_seconds=getattr(args, "pause_seconds", SegmentConfig.pause_seconds),
            silence_db=getattr(args, "silence_db", SegmentConfig.silence_db),
        )
        self.output = Path(args.output) if getattr(args, "output", None) else None
        self.index = first_index(args) if first is None else first
        self.n_failed = 0
        self.lm_call = forward_one  # how sessions run the LM (simul_agents.batch_eval swaps in an LMBatcher)
        if self.output is not None and not getattr(args, "continue_unfinished", False):
            (self.output / "failed.jsonl").unlink(missing_ok=True)  # SimulEval restarts instances.log too
        super().__init__(args)

    # -- SimulEval hooks --

    @staticmethod
    def add_args(parser: ArgumentParser) -> None:
        parser.add_argument("--checkpoint", required=True, help="checkpoint directory (streaming_llm.checkpoint)")
        parser.add_argument("--head", default="entropy",
                            help=f"decision head: {', '.join(HEADS)} (default: %(default)s)")  # fmt: skip
        parser.add_argument(
            "--threshold", type=float, default=None,
            help="the head's threshold (entropy: nats; default: the checkpoint's, else the head's own: "
            + ", ".join(f"{n} {cls.threshold}" for n, cls in HEADS.items() if hasattr(cls, "threshold")) + ")",
        )  # fmt: skip
        parser.add_argument(
            "--k", type=int, default=None,
            help="wait-k: k; fixed-chunk: chunk; local-agreement: n (default: the checkpoint's, else the head's own: "
            f"{HEADS['wait-k'].k}, {HEADS['fixed-chunk'].chunk}, {HEADS['local-agreement'].n})",
        )  # fmt: skip
        parser.add_argument(
            "--head-param", action="append", default=None, metavar="KEY=VALUE",
            help="any head parameter, repeatable (e.g. frontier=2, layers=4,5,6, min_lag=2)",
        )  # fmt: skip
        words = "at most a * source units + b target words"
        parser.add_argument("--max-len-a", type=float, default=2.0, help=f"{words} (default: %(default)s)")
        parser.add_argument("--max-len-b", type=float, default=10.0, help=f"{words} (default: %(default)s)")
        parser.add_argument("--max-target-tokens", type=int, default=256,
                            help="at most this many target tokens (default: %(default)s)")  # fmt: skip
        parser.add_argument("--skip-failed", action="store_true", help="log a failing instance and go on")
        parser.add_argument(
            "--reencode", choices=REENCODE, default="never",
            help="re-read the words written so far under more source: never (each keeps the source it was written "
            "under), end (under the whole source, once it ends), read (after every read); StreamingSession.flush "
            "(default: %(default)s)",
        )  # fmt: skip
        parser.add_argument(
            "--hold-sentence-end", action="store_true",
            help="a word that closes the sentence (ends in . ! ?) waits for the source's end, under any head, so "
            "that a one-sentence source is not followed by a second, invented sentence (StreamingSession.write_word)",
        )  # fmt: skip
        add_precision_args(parser, fp16=False)  # --int8, --int4, --compile (SimulEval has its own --fp16)
        parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
        parser.add_argument(
            "--long-audio", choices=("auto", "segment", "off"), default="auto",
            help="speech longer than the model's ~30 s context: auto (segment only such sources), segment "
            "(every source), off (such a source fails its instance) (default: %(default)s)",
        )  # fmt: skip
        for flag, default, what in [
            ("--segment-min-seconds", SegmentConfig.min_seconds, "a pause cuts a segment once it is this long"),
            ("--segment-max-seconds", SegmentConfig.max_seconds, "hard cut (0: the model's context)"),
            ("--pause-seconds", SegmentConfig.pause_seconds, "this much audio below --silence-db is a pause"),
            ("--silence-db", SegmentConfig.silence_db, "a 20 ms frame below this RMS (dBFS) is silent"),
        ]:
            parser.add_argument(flag, type=float, default=default, help=f"long audio: {what} (default: %(default)s)")

    @classmethod
    def from_args(cls, args: Namespace) -> ProactiveBase:
        try:
            check_run_args(args)
            if getattr(args, "threads", 0):
                torch.set_num_threads(args.threads)
            model = load_model(args.checkpoint, precision_of(args), getattr(args, "compile", False))
            modality = model.config.modality
            agent_cls = cls if cls.modality else (ProactiveSpeechAgent if modality == SPEECH else ProactiveTextAgent)
            if agent_cls.modality != modality:
                raise SetupError(
                    f"{agent_cls.__name__} needs a {agent_cls.modality} checkpoint; {args.checkpoint} is {modality}"
                )
            if modality == SPEECH and getattr(args, "source_segment_size", MIN_SEGMENT_MS) < MIN_SEGMENT_MS:
                raise SetupError(
                    f"--source-segment-size is {args.source_segment_size} ms (SimulEval's default is 1); pass the "
                    f"segment length in ms, e.g. --source-segment-size {model.config.block_ms}"
                )
            if args.max_len_a < 0 or args.max_len_b < 0 or args.max_target_tokens < 1:
                raise SetupError("--max-len-a and --max-len-b must be >= 0 and --max-target-tokens >= 1")
            if modality == SPEECH:
                agent_cls.check_segments(args, model)
            head = build_head(args)
            head.session_options(model)  # checks the head against the model (probe present, layers in range)
            sources = read_sources(args, modality) if getattr(args, "source", None) or head.needs_full_source else None
            if sources and modality == TEXT and not getattr(args, "skip_failed", False):
                check_text_sizes(args, model, sources)
            first = first_index(args)  # a log cut by a kill is mended here; a broken one is refused here
        except (SetupError, CheckpointError, AudioError, ValueError) as e:
            raise SystemExit(f"proactive_agent: error: {e}") from None
        return agent_cls(args, model=model, head=head, sources=sources, first=first)

    def build_states(self) -> ProactiveStates:
        return ProactiveStates()

    def to(self, device: str, *args, fp16: bool = False, **kwargs) -> None:
        """SimulEval's device move. The precision was set at load (``precision_of``): only the LLM is float16."""
        if fp16 and self.model.lm_dtype != torch.float16:
            raise SetupError("--fp16: this agent's model was loaded in another precision; load it with --fp16")
        self.model.to(device)

    def policy(self):
        states = self.states
        if states.failed:
            return self._after_failure(states)
        try:
            words = self._step(states)
        except Exception as e:  # any model failure is reported with the instance index
            return self._fail(states, e)
        content = " ".join(words)
        if states.source_finished:
            self._finish()
            return WriteAction(content, finished=True)
        return WriteAction(content, finished=False) if content else ReadAction()

    # -- the loop --

    def _step(self, states: ProactiveStates) -> list[str]:
        if states.session is None:
            states.session = StreamingSession(
                self.model, max_target_tokens=self.max_target_tokens, lm_call=self.lm_call, **self.session_options
            )
            if self.head.needs_full_source:
                states.memory["full_source"] = self._full_source()
        session = states.session
        self._push_source(states, session)
        if states.source_finished and not session.source_finished:
            if session.units_read == 0 and not self._has_input(session):
                logger.warning("instance %d: the source is empty; writing nothing", self.index)
                return []
            session.finish_source()
        words = []
        while not session.finished:
            if len(session.words) >= self._max_words(session.units_read):
                break
            if decide(self.head, session, states.memory) is READ:
                break
            word = session.write_word()
            if word is None:  # the model ends the sentence: finished, or wait for more source
                break
            words.append("".join(word.split()))  # one model word is one SimulEval word (it splits on whitespace)
        return [w for w in words if w]

    def _max_words(self, units: int) -> int:
        return math.floor(self.max_len_a * units + self.max_len_b)

    def _finish(self) -> None:
        self.index += 1

    def _fail(self, states: ProactiveStates, error: Exception):
        source = f" ({self.sources[self.index]})" if self._names_source() else ""
        message = f"instance {self.index}{source}: {type(error).__name__}: {error}"
        if not self.skip_failed:
            raise InstanceError(message + " (pass --skip-failed to log it and go on)") from error
        self.n_failed += 1
        logger.warning("%s; skipped (--skip-failed), %d failed so far", message, self.n_failed)
        if self.output is not None:
            self.output.mkdir(parents=True, exist_ok=True)
            with open(self.output / "failed.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"index": self.index, "error": f"{type(error).__name__}: {error}"}) + "\n")
        states.failed = True
        return self._after_failure(states)

    def _after_failure(self, states: ProactiveStates):
        """Read to the end of the failed source (finishing early would reset the agent mid-utterance)."""
        if states.source_finished:
            self._finish()
            return WriteAction("", finished=True)
        return ReadAction()

    def _names_source(self) -> bool:
        """Speech errors name the audio file (a text source is the sentence itself)."""
        return self.modality == SPEECH and self.sources is not None and 0 <= self.index < len(self.sources)

    def _full_source(self):
        if self.sources is None or not 0 <= self.index < len(self.sources):
            raise SetupError(
                f"the {self.head.name} head needs the whole source of instance {self.index}: pass --source"
            )
        return self._load_source(self.sources[self.index])

    # -- per modality --

    def _push_source(self, states: ProactiveStates, session: StreamingSession) -> None:
        raise NotImplementedError

    def _has_input(self, session: StreamingSession) -> bool:
        raise NotImplementedError

    def _load_source(self, line: str):
        raise NotImplementedError


class ProactiveSpeechAgent(ProactiveBase, SpeechToTextAgent):
    """Speech in (SimulEval segments of any rate and channel count), text out."""

    modality = SPEECH

    @staticmethod
    def check_segments(args: Namespace, model) -> None:
        """The long-audio options against the model (``SetupError`` before the first instance)."""
        try:
            segments = SegmentConfig(
                min_seconds=getattr(args, "segment_min_seconds", SegmentConfig.min_seconds),
                max_seconds=getattr(args, "segment_max_seconds", SegmentConfig.max_seconds),
                pause_seconds=getattr(args, "pause_seconds", SegmentConfig.pause_seconds),
                silence_db=getattr(args, "silence_db", SegmentConfig.silence_db),
            )
            segments.max_samples(max_source_samples(model))
        except ValueError as e:
            raise SetupError(f"--segment-*/--pause-seconds: {e}") from None

    def _step(self, states):
        if states.session is None and states.long is None and self._is_long():
            states.long = LongStream(
                self.model, self.head, self.segments, max_target_tokens=self.max_target_tokens,
                max_len_a=self.max_len_a, max_len_b=self.max_len_b, reencode=self.session_options["reencode"],
                hold_end=self.session_options["hold_end"],
            )  # fmt: skip
        if states.long is None:
            return super()._step(states)
        long, rate = states.long, states.source_sample_rate or SAMPLE_RATE
        new = np.asarray(states.source, dtype=np.float32) if states.source else None
        del states.source[:]  # given to the stream: nothing of a long source piles up in the states
        if not states.source_finished:  # SimulEval's samples are (n,) or (n, channels)
            words = long.push_audio(new, rate, channels_last=True) if new is not None else []
        else:  # the last segment is pushed and finished at once, as for one session
            words = long.finish(new, rate, channels_last=True)
            if long.samples_in == 0:
                logger.warning("instance %d: the source is empty; writing nothing", self.index)
        return [w for w in ("".join(word.split()) for word in words) if w]

    def _is_long(self) -> bool:
        """Stream this instance with ``LongStream``? (``--long-audio``; auto: the file is longer than a session.)"""
        if self.long_audio != "auto":
            return self.long_audio == "segment"
        if not self._names_source():
            return False  # no --source: the length is unknown; one session, and an error if it does not fit
        try:
            info = soundfile.info(self.sources[self.index])
        except (soundfile.LibsndfileError, RuntimeError):
            return False  # the instance fails when SimulEval reads the file, naming it
        return round(info.frames * SAMPLE_RATE / info.samplerate) > max_source_samples(self.model)

    def _push_source(self, states, session):
        new = states.source[states.consumed :]
        states.consumed = len(states.source)
        if new:
            rate = states.source_sample_rate or SAMPLE_RATE
            samples = states.audio.push(new, rate)
            if samples.shape[0]:
                session.push_audio(samples, SAMPLE_RATE)

    def _has_input(self, session):
        return session.samples_in > 0

    def _load_source(self, line):
        from speech_frontend.audio import load_audio

        return load_audio(line)


class ProactiveTextAgent(ProactiveBase, TextToTextAgent):
    """Text in (one word per SimulEval segment), text out."""

    modality = TEXT

    def _push_source(self, states, session):
        new = states.source[states.consumed :]
        states.consumed = len(states.source)
        if new:
            session.push_words(new)

    def _has_input(self, session):
        return session.units_read > 0

    def _load_source(self, line):
        return line.split()


@entrypoint
class ProactiveAgent(ProactiveBase):
    """The entrypoint: ``from_args`` returns the speech or the text agent, by the checkpoint's modality."""

    source_type = "speech"  # placeholders; never instantiated (from_args returns a concrete agent)
    target_type = "text"
