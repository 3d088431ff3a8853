"""The real offline models end to end: Whisper tiny.en (block-causal) + SmolLM2-135M on 2 s of audio."""

import numpy as np
import pytest
import torch

from speech_frontend.assets import AssetError, asset_file
from streaming_llm.engine import StreamingSession

try:
    asset_file("whisper-tiny.en")
    asset_file("smollm2-135m-instruct")
    HAVE_ASSETS = True
except AssetError:
    HAVE_ASSETS = False

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not HAVE_ASSETS, reason="the offline assets are not built: run `make assets`"),
]


@pytest.fixture(scope="module")
def real_model():
    from training.config import load_config
    from training.train import build_training_model

    cfg = load_config(None, {"llm": "asset:smollm2-135m-instruct", "whisper": "asset:whisper-tiny.en"})
    return build_training_model(cfg).eval()


def test_real_models_stream_two_seconds_and_match_the_masked_forward(real_model):
    model = real_model
    audio = (0.05 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32)
    targets = model.target_ids("Das ist gut.")
    n_units = -(-audio.shape[0] // model.block_samples)
    phi = torch.tensor([1] * (len(targets) - 1) + [n_units])
    session = StreamingSession(model)
    session.push_audio(audio[: model.block_samples])
    steps = []
    for t, y in enumerate(targets):
        if phi[t] == n_units and not session.source_finished:
            session.push_audio(audio[model.block_samples :])
            session.finish_source()
        steps.append(session.next_logits().clone())
        session.force_target([y])
    units = model.speech_units(model.encode_speech(audio))
    embeds, positions, layouts = model.assemble([units], [targets])
    with torch.no_grad():
        logits, _ = model(embeds, positions, layouts, [phi])
    full = logits[0, layouts[0].predictor_rows()]
    torch.testing.assert_close(torch.stack(steps), full, atol=2e-3, rtol=1e-3)


def test_real_models_write_words_from_speech(real_model):
    session = StreamingSession(real_model, max_target_tokens=12)
    session.push_audio((0.05 * np.random.default_rng(1).standard_normal(32000)).astype(np.float32))
    session.finish_source()
    sig = session.signals()
    assert np.isfinite(sig.entropy) and sig.units_read == -(-32000 // real_model.block_samples)
    while session.write_word() is not None:
        pass
    assert session.finished and len(session.written) <= 13

