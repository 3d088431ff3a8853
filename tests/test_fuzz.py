"""Property tests (hypothesis): the audio front end and the manifest parser raise nothing but their documented errors.

- ``to_mono_16k`` / ``to_mono``: any shape, dtype, rate and values -> 16 kHz mono float32 in [-1, 1], or
  ``AudioError``;
- ``load_audio``: any bytes, and any file soundfile can write, cut anywhere -> the same, or ``AudioError``;
- ``StreamTo16k`` and ``EnergySegmenter``: chunking never changes what comes out;
- ``read_manifest`` / ``check_manifest`` / ``read_user_tsv``: any bytes -> rows or ``CorpusError``; rows that
  ``write_manifest`` accepts come back unchanged.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from speech_frontend.audio import MAX_RATE, MIN_RATE, SAMPLE_RATE, AudioError, StreamTo16k, load_audio, to_mono_16k
from streaming_llm.long_stream import FRAME, EnergySegmenter, SegmentConfig
from training.corpus.check import check_manifest
from training.corpus.errors import BadInput, CorpusError
from training.corpus.manifest import MANIFEST_COLUMNS, Row, read_manifest, write_manifest
from training.corpus.user_tsv import read_user_tsv

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = st.sampled_from(["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "float16", "float32",
                          "float64", "bool", "complex64", "<U3"])  # fmt: skip
RATES = st.one_of(
    st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000, 96000]),
    st.integers(-5, 2 * MAX_RATE),
    st.floats(allow_nan=True),
    st.just(True),
)


def expected_length(n: int, rate: int) -> int:
    return n if rate == SAMPLE_RATE else (2 * n * SAMPLE_RATE + rate) // (2 * rate)


@st.composite
def sample_arrays(draw):
    dtype = np.dtype(draw(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40))
    if dtype.kind == "f":
        elements = st.floats(width=8 * dtype.itemsize, allow_nan=True, allow_infinity=True)
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


def assert_audio(audio: np.ndarray) -> None:
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.shape[0] >= 1
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0


@FUZZ
@given(samples=sample_arrays(), rate=RATES, channels_last=st.sampled_from([None, True, False]))
def test_to_mono_16k_converts_anything_or_raises_audio_error(samples, rate, channels_last):
    try:
        audio = to_mono_16k(samples, rate, name="fuzz", channels_last=channels_last)
    except AudioError as e:
        assert str(e).startswith("fuzz: ") and "\n" not in str(e)
        return
    assert isinstance(rate, int) and MIN_RATE <= rate <= MAX_RATE and samples.dtype.kind in "iuf"
    assert_audio(audio)
    n = samples.shape[0] if samples.ndim == 1 else None
    if n is not None:
        assert abs(audio.shape[0] - expected_length(n, rate)) <= 1


@FUZZ
@given(
    rate=st.sampled_from([8000, 16000, 22050, 44100, 48000]),
    n=st.integers(1, 6000),
    cuts=st.lists(st.integers(0, 6000), max_size=8),
    channels=st.integers(1, 3),
)
def test_stream_to_16k_equals_converting_the_whole_signal(rate, n, cuts, channels):
    signal = (0.5 * np.sin(np.arange(n * channels) * 0.01)).reshape(n, channels).astype(np.float32)
    stream = StreamTo16k("fuzz")
    pieces = []
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    for a, b in zip(bounds, bounds[1:], strict=False):
        pieces.append(stream.push(signal[a:b], rate, channels_last=True))
    pieces.append(stream.flush())
    streamed = np.concatenate(pieces)
    try:
        whole = to_mono_16k(signal, rate, channels_last=True)
    except AudioError:  # too short to give one 16 kHz sample
        assert streamed.shape[0] == 0
        return
    assert streamed.shape[0] == whole.shape[0]
    np.testing.assert_allclose(streamed, whole, atol=1e-6)


# ---- files -------------------------------------------------------------------------------------------------

WRITABLE = [("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_32"), ("WAV", "FLOAT"), ("WAV", "DOUBLE"),
            ("WAV", "PCM_U8"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III"),
            ("AIFF", "PCM_16")]  # fmt: skip


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def assert_loads_or_names_the_file(path) -> None:
    """load_audio gives sane 16 kHz mono audio, or one AudioError line that starts with the file's name."""
    try:
        audio = load_audio(path)
    except AudioError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        return
    assert_audio(audio)


@FUZZ
@given(data=st.binary(max_size=3000), suffix=st.sampled_from([".wav", ".flac", ".ogg", ".mp3", ".raw"]))
def test_load_audio_of_any_bytes_converts_or_raises_audio_error(scratch, data, suffix):
    path = scratch / f"bytes{suffix}"
    path.write_bytes(data)
    assert_loads_or_names_the_file(path)


@FUZZ
@given(
    kind=st.sampled_from(WRITABLE),
    rate=st.sampled_from([8000, 16000, 22050, 44100, 48000]),
    channels=st.integers(1, 6),
    n=st.integers(1, 3000),
    level=st.floats(0.0, 4.0),
    keep=st.one_of(st.none(), st.integers(0, 4000)),
    flip=st.one_of(st.none(), st.integers(0, 4000)),
)
def test_load_audio_of_written_then_damaged_files_converts_or_raises_audio_error(
    scratch, kind, rate, channels, n, level, keep, flip
):
    fmt, subtype = kind
    samples = (level * np.sin(np.arange(n * channels) * 0.37)).reshape(n, channels)
    buffer = io.BytesIO()
    try:
        sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    except (sf.LibsndfileError, RuntimeError, ValueError):
        return  # this format cannot hold this rate or channel count: nothing to read
    data = bytearray(buffer.getvalue())
    if keep is not None:
        data = data[:keep]  # truncated anywhere: header, or samples
    if flip is not None and flip < len(data):
        data[flip] ^= 0xFF  # one damaged byte
    path = scratch / f"file.{fmt.lower()}"
    path.write_bytes(bytes(data))
    assert_loads_or_names_the_file(path)


# ---- the segmenter ---------------------------------------------------------------------------------------


@FUZZ
@given(
    pattern=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=20),
    chunks=st.lists(st.integers(1, 4000), min_size=1, max_size=6),
    min_frames=st.integers(0, 60),
    max_frames=st.integers(1, 80),
    pause_frames=st.integers(1, 10),
)
def test_segment_cuts_do_not_depend_on_chunking(pattern, chunks, min_frames, max_frames, pause_frames):
    """pattern: (sound?, frames) runs; cuts fall on the frame grid, within max, whatever the push sizes."""
    audio = np.concatenate([np.full(f * FRAME, 0.1 if loud else 0.0, np.float32) for loud, f in pattern])
    max_frames = max(max_frames, min_frames)
    config = SegmentConfig(min_seconds=min_frames * 0.02, max_seconds=max_frames * 0.02,
                           pause_seconds=pause_frames * 0.02)  # fmt: skip

    def cuts(sizes):
        segmenter = EnergySegmenter(config, config.max_samples(10**9))
        out, position, i = [], 0, 0
        while position < audio.shape[0]:
            size = sizes[i % len(sizes)]
            for piece, cut in segmenter.split(audio[position : position + size]):
                position += piece.shape[0]
                if cut:
                    out.append(position)
            i += 1
        return out

    reference = cuts([audio.shape[0]])
    assert cuts(chunks) == reference
    starts = [0, *reference]
    assert all(b - a <= max_frames * FRAME and (b - a) % FRAME == 0 for a, b in zip(starts, reference, strict=False))


# ---- manifests ---------------------------------------------------------------------------------------------

FIELD = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["", "0", "16000", "-3", "x.wav", "a.wav:0:100", "1e3", " ", "\r"]),
).map(lambda s: s.encode("utf-8"))
RAW_FIELD = st.one_of(FIELD, st.binary(max_size=6))


@st.composite
def manifest_bytes(draw):
    columns = draw(st.one_of(
        st.just(list(MANIFEST_COLUMNS)),
        st.permutations(list(MANIFEST_COLUMNS)),
        st.lists(st.sampled_from([*MANIFEST_COLUMNS, "extra", ""]), max_size=8),
    ))  # fmt: skip
    header = b"\t".join(c.encode() for c in columns)
    rows = draw(st.lists(st.lists(RAW_FIELD, min_size=0, max_size=len(columns) + 2), max_size=6))
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = ending.join([header, *(b"\t".join(r) for r in rows)])
    return draw(st.one_of(st.just(body), st.just(body + ending), st.binary(max_size=200)))


@FUZZ
@given(content=manifest_bytes())
def test_manifest_parser_reads_rows_or_raises_corpus_error(scratch, content):
    path = scratch / "fuzz.tsv"
    path.write_bytes(content)
    try:
        rows = read_manifest(path)
    except CorpusError as e:
        assert str(e).startswith(f"{path}:") and "\n" not in str(e)
    else:
        assert all(isinstance(r, Row) and r.tgt_text.strip() and r.src_text.strip() for r in rows)
    collected: list[CorpusError] = []
    try:
        kept = read_manifest(path, on_error=collected.append)  # bad lines are reported, never fatal
        assert all(isinstance(e, CorpusError) for e in collected)
        assert all(isinstance(r, Row) for r in kept)
    except CorpusError as e:  # only the file itself (missing, empty, header) stops it
        assert e.line in (None, 1)
    report = check_manifest(path, progress=False)  # never raises for bad data
    assert report.ok == (not report.problems)
    try:
        read_user_tsv(path, audio_column=None, bad=BadInput(skip_bad=True))
    except CorpusError as e:
        assert e.line in (None, 1)


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)


@FUZZ
@given(rows=st.lists(st.tuples(st.from_regex(r"[A-Za-z0-9_.-]{1,10}", fullmatch=True), TEXT, TEXT), max_size=5))
def test_rows_the_writer_accepts_come_back_unchanged(scratch, rows):
    path = scratch / "roundtrip.tsv"
    try:
        write_manifest(path, [Row(i, "", 0, s, t) for i, s, t in rows])
    except ValueError:
        return  # a row the writer refuses (text that is only whitespace, a repeated id): never written
    back = read_manifest(path)
    assert [(r.id, r.src_text, r.tgt_text) for r in back] == [(i, " ".join(s.split()), " ".join(t.split()))
                                                             for i, s, t in rows]  # fmt: skip
    assert not os.path.exists(str(path) + ".part")
