"""Audio in at the edges a manifest or a caller meets: slice specs, rate bounds, the last sample of a file."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speech_frontend.audio import MAX_RATE, MIN_RATE, AudioError, load_audio, parse_audio_spec, to_mono


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("talk.wav", ("talk.wav", 0, -1)),
        ("talk.wav:16000:32000", ("talk.wav", 16000, 32000)),
        ("rec 10:30.wav:16000:32000", ("rec 10:30.wav", 16000, 32000)),  # a colon in the file name
        ("take:1:final.wav", ("take:1:final.wav", 0, -1)),  # two colons, but no slice
        ("talk.wav:-5:100", ("talk.wav:-5:100", 0, -1)),
    ],
)
def test_an_audio_field_is_a_path_or_a_path_and_a_slice_split_at_its_last_two_colons(
    spec: str, expected: tuple[str, int, int]
):
    assert parse_audio_spec(spec) == expected


@pytest.mark.parametrize("rate", [MIN_RATE, 16000, MAX_RATE])
def test_the_sample_rate_bounds_are_accepted(rate: int):
    assert to_mono(np.zeros(10, np.float32), rate).shape == (10,)


@pytest.mark.parametrize("rate", [MIN_RATE - 1, MAX_RATE + 1])
def test_a_sample_rate_just_outside_the_bounds_is_refused(rate: int):
    with pytest.raises(AudioError, match=rf"sample rate {rate} Hz is outside {MIN_RATE}\.\.{MAX_RATE} Hz"):
        to_mono(np.zeros(10, np.float32), rate)


def _one_second(tmp_path: Path) -> Path:
    path = tmp_path / "talk.wav"
    sf.write(path, np.full(8000, 0.1, dtype=np.float32), 8000)  # 1 s at 8 kHz
    return path


def test_an_offset_at_the_very_end_of_the_file_is_named_as_beyond_the_end(tmp_path):
    path = _one_second(tmp_path)
    assert load_audio(path, 7999, 1).shape == (2,)  # the last sample, resampled to 16 kHz
    with pytest.raises(AudioError, match=r"talk\.wav: offset 8000 is beyond the end \(8000 samples\)"):
        load_audio(path, 8000, 100)


def test_reading_a_whole_file_or_a_slice_inside_it_logs_nothing(tmp_path, caplog):
    path = _one_second(tmp_path)
    with caplog.at_level(logging.WARNING, logger="speech_frontend.audio"):
        assert load_audio(path).shape == (16000,)
        assert load_audio(path, 2000, 4000).shape == (8000,)
        assert load_audio(path, 4000, 4000).shape == (8000,)  # up to the last sample exactly
    assert not caplog.records, caplog.text


def test_a_directory_given_as_audio_is_named_as_not_a_file(tmp_path):
    with pytest.raises(AudioError, match=rf"^{re.escape(str(tmp_path))}: not a file$"):
        load_audio(tmp_path)
