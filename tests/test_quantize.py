"""Post-training quantization primitives: the group grid, round-to-nearest and GPTQ."""

from __future__ import annotations

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.quantize import (
    HessianAccumulator,
    QuantGrid,
    awq_search,
    gptq_quantize,
    rtn_quantize,
)


def calibration(n=1024, i=128, seed=0):
    """Correlated inputs with a few outlier features, like real activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(i, i, generator=gen) / i**0.5
    x = torch.randn(n, i, generator=gen) @ mix + 0.1 * torch.randn(n, i, generator=gen)
    x = x * (0.1 + 3 * torch.rand(i, generator=gen))
    x[:, :4] *= 10
    return x


def output_error(x, weight, approx) -> float:
    return float(((x @ weight.T - x @ approx.T) ** 2).mean())


def test_grid_round_trip_and_codes():
    grid = QuantGrid(bits=4, group_size=8)
    w = torch.linspace(-1, 2, 16).reshape(2, 8)
    qw = rtn_quantize(w, grid)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
    assert qw.scales.shape == (2, 1) and qw.g_idx.tolist() == [0] * 8
    # each group's extremes are on the grid (up to the zero point's rounding)
    err = (qw.dequantize() - w).abs()
    assert float(err.max()) <= float(qw.scales.max()) / 2 + 1e-6
    # values already on a grid come back unchanged (in two groups of 8 columns)
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    once = rtn_quantize(w, grid).dequantize()
    torch.testing.assert_close(rtn_quantize(once, grid).dequantize(), once)


def test_hessian_accumulates_in_batches():
    x = calibration()
    acc = HessianAccumulator(x.shape[1])
    for part in x.split(100):
        acc.add(part)
    torch.testing.assert_close(acc.h, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 128), (3, 64), (4, -1), (8, 128)])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits, group_size):
    x = calibration()
    weight = 0.05 * torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(128)
    acc.add(x)
    grid = QuantGrid(bits, group_size)
    rtn = output_error(x, weight, rtn_quantize(weight, grid).dequantize())
    gptq = output_error(x, weight, gptq_quantize(weight, acc.h, grid).dequantize())
    ordered = output_error(
        x, weight, gptq_quantize(weight, acc.h, grid, act_order=True).dequantize()
    )
    assert gptq < 0.6 * rtn, (gptq, rtn)
    assert ordered < rtn, (ordered, rtn)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    """With uncorrelated unit inputs there is nothing to compensate: GPTQ rounds to nearest."""
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    grid = QuantGrid(4, 32)
    gptq = gptq_quantize(weight, torch.eye(64), grid, damp=0.0)
    rtn = rtn_quantize(weight, grid)
    assert torch.equal(gptq.q, rtn.q)
    torch.testing.assert_close(gptq.scales, rtn.scales)


def test_gptq_ignores_dead_inputs():
    x = calibration(i=64)
    x[:, 10] = 0.0
    acc = HessianAccumulator(64)
    acc.add(x)
    weight = torch.randn(8, 64)
    qw = gptq_quantize(weight, acc.h, QuantGrid(4, 32))
    assert torch.isfinite(qw.dequantize()).all()


def test_grid_errors():
    with pytest.raises(TunesmithError, match="--bits: 5 is not supported; use one of 2, 3, 4, 8"):
        QuantGrid(bits=5)
    with pytest.raises(TunesmithError, match="--group-size: 100 must be -1"):
        QuantGrid(group_size=100)


def test_ragged_last_group_and_storable_grid():
    """A width the group size does not divide gets a shorter last group (as GPTQ checkpoints
    do); scales are fp16 values and zero points lie in 1..levels (stored as zero - 1)."""
    w = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    w[0] = w[0].abs()  # all positive: would need zero point 0
    qw = rtn_quantize(w, QuantGrid(4, 64))
    assert qw.scales.shape == (4, 2)
    assert qw.g_idx.tolist() == [0] * 64 + [1] * 32
    torch.testing.assert_close(qw.scales, qw.scales.half().float(), rtol=0, atol=0)
    assert int(qw.zeros.min()) >= 1 and int(qw.zeros.max()) <= 15
    err = (qw.dequantize() - w).abs().max(dim=1).values
    assert bool((err <= qw.scales.max(dim=1).values / 2 + 1e-6).all())


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 128), (3, 64)])
def test_awq_scales_beat_round_to_nearest_for_layers_sharing_an_input(bits, group_size):
    x = calibration()
    gen = torch.Generator().manual_seed(3)
    weights = [0.05 * torch.randn(64, 128, generator=gen) for _ in range(3)]  # like q, k, v
    grid = QuantGrid(bits, group_size)
    found = awq_search(weights, x, grid)
    rtn = sum(output_error(x, w, rtn_quantize(w, grid).dequantize()) for w in weights)
    assert found.rtn_error == pytest.approx(rtn, rel=1e-4)  # alpha 0 is round-to-nearest
    assert found.alpha > 0 and found.error < 0.8 * rtn, (found.alpha, found.error, rtn)
    # the scales fold exactly: quantize W·diag(s), divide the input by s
    s = found.scales
    approx = [rtn_quantize(w * s, grid).dequantize() for w in weights]
    error = sum(output_error(x / s, w * s, a) for w, a in zip(weights, approx, strict=True))
    assert error == pytest.approx(found.error, rel=1e-3)
