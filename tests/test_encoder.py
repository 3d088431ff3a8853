import pytest
import torch
from whisper.model import AudioEncoder, ModelDimensions, Whisper

from speech_frontend.encoder import ENCODER_FRAME_MS, BlockCausalEncoder, EncoderCache

DIMS = ModelDimensions(
    n_mels=80,
    n_audio_ctx=64,
    n_audio_state=32,
    n_audio_head=4,
    n_audio_layer=2,
    n_vocab=64,
    n_text_ctx=16,
    n_text_state=32,
    n_text_head=4,
    n_text_layer=1,
)


def random_whisper_encoder(seed: int = 0) -> AudioEncoder:
    torch.manual_seed(seed)
    enc = AudioEncoder(DIMS.n_mels, DIMS.n_audio_ctx, DIMS.n_audio_state, DIMS.n_audio_head, DIMS.n_audio_layer)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "ln" in name:  # LayerNorms are 1 / 0 at init: make them matter
                p.add_(0.1 * torch.randn_like(p))
    return enc.eval()


def block_causal(block_frames: int, seed: int = 0) -> BlockCausalEncoder:
    enc = BlockCausalEncoder(DIMS, block_frames)
    enc.load_state_dict(random_whisper_encoder(seed).state_dict())
    return enc.eval()


def whisper_reference(enc: AudioEncoder, mel: torch.Tensor) -> torch.Tensor:
    """whisper's AudioEncoder.forward with the positional embedding sliced instead of asserting 30 s."""
    x = torch.nn.functional.gelu(enc.conv1(mel))
    x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
    x = x + enc.positional_embedding[: x.shape[1]]
    for block in enc.blocks:
        x = block(x)
    return enc.ln_post(x)


def random_mel(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, DIMS.n_mels, n, generator=torch.Generator().manual_seed(seed))


def encode_blocks(enc: BlockCausalEncoder, mel: torch.Tensor) -> tuple[torch.Tensor, EncoderCache]:
    cache = enc.new_cache()
    blocks = mel.split(enc.mel_per_block, dim=-1)
    return torch.cat([enc.encode_block(b, cache) for b in blocks], dim=1), cache


@pytest.mark.parametrize("n_frames", [1, 2, 7, 20, 64])
def test_one_block_equals_whisper(n_frames):
    reference_encoder = random_whisper_encoder()
    enc = BlockCausalEncoder(DIMS, block_frames=n_frames)
    enc.load_state_dict(reference_encoder.state_dict())
    mel = random_mel(2, 2 * n_frames)
    with torch.no_grad():
        torch.testing.assert_close(enc(mel), whisper_reference(reference_encoder, mel), atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_frames,n_blocks", [(1, 9), (2, 8), (3, 5), (4, 4), (8, 8), (16, 2)])
def test_cached_blocks_equal_forward(block_frames, n_blocks):
    enc = block_causal(block_frames)
    mel = random_mel(2, n_blocks * enc.mel_per_block)
    with torch.no_grad():
        whole = enc(mel)
        cached, cache = encode_blocks(enc, mel)
    assert whole.shape == (2, n_blocks * block_frames, DIMS.n_audio_state)
    torch.testing.assert_close(cached, whole, atol=1e-5, rtol=0)
    assert cache.n_frames == n_blocks * block_frames
    d_head = DIMS.n_audio_state // DIMS.n_audio_head
    assert cache.keys[0].shape == (2, DIMS.n_audio_head, cache.n_frames, d_head)


def test_block_causal_no_lookahead():
    """Changing block k + 1's mel changes nothing in blocks 0..k, not even its conv edge."""
    enc = block_causal(4)
    mel = random_mel(1, 4 * enc.mel_per_block)
    changed = mel.clone()
    changed[..., 2 * enc.mel_per_block :] += 1.0
    with torch.no_grad():
        a, b = enc(mel), enc(changed)
    torch.testing.assert_close(a[:, : 2 * enc.block_frames], b[:, : 2 * enc.block_frames])
    assert not torch.allclose(a[:, 2 * enc.block_frames], b[:, 2 * enc.block_frames])


def test_first_block_is_whisper_on_that_block_alone():
    """Block 0 of a longer input = whisper on block 0's mel alone: a zero frame, not block 1, on its right."""
    reference_encoder = random_whisper_encoder()
    enc = BlockCausalEncoder(DIMS, block_frames=4)
    enc.load_state_dict(reference_encoder.state_dict())
    mel = random_mel(2, 3 * enc.mel_per_block)
    with torch.no_grad():
        first_block = whisper_reference(reference_encoder, mel[..., : enc.mel_per_block])
        torch.testing.assert_close(enc(mel)[:, :4], first_block, atol=1e-5, rtol=0)


def test_blocks_differ_from_full_attention():
    """Sanity: several blocks are not the one-block (full attention) encoder."""
    mel = random_mel(1, 32)
    with torch.no_grad():
        assert not torch.allclose(block_causal(4)(mel), block_causal(16)(mel), atol=1e-3)


def test_from_whisper():
    torch.manual_seed(0)
    model = Whisper(DIMS).eval()
    enc = BlockCausalEncoder.from_whisper(model, block_frames=8).eval()
    assert (enc.n_mels, enc.n_state, enc.n_ctx, enc.block_frames, enc.mel_per_block) == (80, 32, 64, 8, 16)
    assert enc.block_ms == 8 * ENCODER_FRAME_MS and enc.samples_per_block == 2560
    mel = random_mel(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc(mel), whisper_reference(model.encoder, mel), atol=1e-5, rtol=0)


def test_length_errors():
    enc = block_causal(8)
    with pytest.raises(ValueError, match=r"1\.44 s .*limit of 1\.28 s"):
        enc(random_mel(1, 2 * 72))
    with pytest.raises(ValueError, match="not a whole number of blocks"):
        enc(random_mel(1, 20))
    cache = enc.new_cache()
    with torch.no_grad():
        for block in random_mel(1, 128).split(16, dim=-1):  # exactly n_ctx = 64 frames: fine
            enc.encode_block(block, cache)
        with pytest.raises(ValueError, match="limit"):
            enc.encode_block(random_mel(1, 16), cache)


def test_shape_errors():
    enc = block_causal(8)
    with pytest.raises(ValueError, match="expected"):
        enc(torch.randn(1, 40, 16))
    with pytest.raises(ValueError, match="a block is 16 mel frames"):
        enc.encode_block(random_mel(1, 8), enc.new_cache())
    cache = enc.new_cache()
    with torch.no_grad():
        enc.encode_block(random_mel(2, 16), cache)
    with pytest.raises(ValueError, match="batch"):
        enc.encode_block(random_mel(1, 16), cache)
    with pytest.raises(ValueError, match="block_frames"):
        BlockCausalEncoder(DIMS, 0)


def test_empty_input():
    enc = block_causal(8)
    assert enc(random_mel(2, 0)).shape == (2, 0, DIMS.n_audio_state)


def test_a_caller_refilling_one_mel_buffer_block_after_block_gets_the_forward_output():
    """A streaming caller may write each block into the same preallocated tensor: the cache keeps its own copy of
    the conv's left context (the last mel frames of the block before), not a view of the caller's buffer."""
    enc = block_causal(4)
    mel = random_mel(2, 3 * enc.mel_per_block)
    buffer = torch.empty(2, DIMS.n_mels, enc.mel_per_block)
    cache = enc.new_cache()
    outputs: list[torch.Tensor] = []
    with torch.no_grad():
        for block in mel.split(enc.mel_per_block, dim=-1):
            buffer.copy_(block)
            outputs.append(enc.encode_block(buffer, cache))
        torch.testing.assert_close(torch.cat(outputs, dim=1), enc(mel), atol=1e-5, rtol=0)
