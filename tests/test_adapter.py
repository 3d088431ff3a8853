import pytest
import torch

from speech_frontend.adapter import Adapter, AdapterConfig


@pytest.mark.parametrize("mode", ["stack", "mean"])
@pytest.mark.parametrize("stack", [1, 2, 3, 4])
def test_shapes(stack, mode):
    adapter = Adapter(AdapterConfig(d_in=8, d_out=12, stack=stack, hidden=16, mode=mode))
    out = adapter(torch.randn(2, 12, 8))
    assert out.shape == (2, 12 // stack, 12)


def test_groups_are_consecutive_frames():
    """Output i depends on frames i * stack .. (i + 1) * stack - 1 only (so it is causal per group)."""
    adapter = Adapter(AdapterConfig(d_in=4, d_out=6, stack=4, hidden=8))
    frames = torch.randn(1, 16, 4)
    changed = frames.clone()
    changed[:, 8:] += 1.0
    a, b = adapter(frames), adapter(changed)
    torch.testing.assert_close(a[:, :2], b[:, :2])
    assert not torch.allclose(a[:, 2:], b[:, 2:])


def test_mean_mode_pools():
    adapter = Adapter(AdapterConfig(d_in=4, d_out=6, stack=2, hidden=8, mode="mean"))
    frames = torch.randn(1, 4, 4)
    swapped = frames[:, [1, 0, 3, 2]]
    torch.testing.assert_close(adapter(frames), adapter(swapped))


def test_errors():
    adapter = Adapter(AdapterConfig(d_in=8, d_out=12, stack=4))
    with pytest.raises(ValueError, match="multiple of stack=4"):
        adapter(torch.randn(1, 10, 8))
    with pytest.raises(ValueError, match="expected"):
        adapter(torch.randn(1, 8, 7))
    with pytest.raises(ValueError, match="stack"):
        AdapterConfig(d_in=8, d_out=12, stack=0)
    with pytest.raises(ValueError, match="mode"):
        AdapterConfig(d_in=8, d_out=12, mode="max")


def test_mean_mode_averages_a_group_so_repeated_frames_give_the_one_frame_output():
    """``mean`` pools a group to its average (not its sum): a group of copies of one frame is that frame, and the
    same MLP on it gives the output of a ``stack=1`` adapter."""
    one = Adapter(AdapterConfig(d_in=4, d_out=6, stack=1, hidden=8))
    pooled = Adapter(AdapterConfig(d_in=4, d_out=6, stack=3, hidden=8, mode="mean"))
    pooled.load_state_dict(one.state_dict())
    frames = torch.randn(2, 5, 4)  # frames: (batch, n, d_in)
    torch.testing.assert_close(pooled(frames.repeat_interleave(3, dim=1)), one(frames))


@pytest.mark.parametrize("field", ["d_in", "d_out", "hidden"])
def test_a_zero_width_in_the_config_is_refused(field: str):
    sizes = {"d_in": 8, "d_out": 12, "hidden": 16} | {field: 0}
    with pytest.raises(ValueError, match="must be positive"):
        AdapterConfig(**sizes)
