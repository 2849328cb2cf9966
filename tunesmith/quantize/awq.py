"""AWQ's activation-aware scale search (Lin et al. 2024) for linear layers that share an input.

Input channels with large activations matter most, so AWQ scales them up before quantizing:
W·diag(s) is quantized on the group grid and the input is divided by s (folded into the
previous operation, e.g. the RMSNorm weight, so inference costs nothing extra). The scales are
s = mean|x|^α per input channel, normalised so that max(s)·min(s) = 1, with α searched on a grid
of `n_grid` points in [0, 1) for the smallest output error of all the layers that read the
input (q/k/v after one norm, gate/up after another). α = 0 is round-to-nearest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tunesmith.quantize.rtn import QuantGrid, rtn_quantize


@dataclass
class AWQScales:
    scales: torch.Tensor
    """(in,): multiply the weights' columns by these, divide the input by them."""
    alpha: float
    error: float
    """Mean squared output error at the chosen α, summed over the layers."""
    rtn_error: float
    """The same at α = 0 (plain round-to-nearest), for comparison."""


@torch.no_grad()
def awq_search(
    weights: Sequence[torch.Tensor], x: torch.Tensor, grid: QuantGrid, n_grid: int = 20
) -> AWQScales:
    """The AWQ scales for `weights` (each out_k × in) that all read the input `x` (n × in)."""
    x = x.reshape(-1, x.shape[-1]).float()
    activation = x.abs().mean(0)
    references = [x @ w.float().T for w in weights]
    best: AWQScales | None = None
    rtn_error = None
    for k in range(n_grid):
        alpha = k / n_grid
        scales = activation.pow(alpha).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = 0.0
        for w, reference in zip(weights, references, strict=True):
            approx = rtn_quantize(w.float() * scales, grid).dequantize() / scales
            error += float(((x @ approx.T - reference) ** 2).mean())
        if k == 0:
            rtn_error = error
        if best is None or error < best.error:
            best = AWQScales(scales, alpha, error, 0.0)
    best.rtn_error = rtn_error
    return best


@torch.no_grad()
def awq_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    grid: QuantGrid,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """AWQ's clipping search: for each output row and group, the clipping range (a fraction
    of the largest |w|, from 1 down to 1 − max_shrink) whose rounded weights give the smallest
    error on that group's share of the output for inputs `x` (n × in). Returns the clipped
    weight (the grid is then fitted to it); ratio 1 is no clipping."""
    w = weight.float()
    x = x.reshape(-1, x.shape[-1]).float()
    width = grid.width(w.shape[1])
    clipped = w.clone()
    for start in range(0, w.shape[1], width):
        part = w[:, start : start + width]
        xs = x[:, start : start + width]
        reference = xs @ part.T
        top = part.abs().amax(dim=1, keepdim=True)
        best = torch.full((w.shape[0],), float("inf"), device=w.device)
        for k in range(int(n_grid * max_shrink)):
            limit = top * (1 - k / n_grid)
            candidate = part.clamp(-limit, limit)
            scale, zero = grid.params(candidate)
            approx = grid.dequantize(grid.quantize(candidate, scale, zero), scale, zero)
            error = ((xs @ approx.T - reference) ** 2).mean(0)
            better = error < best
            best = torch.where(better, error, best)
            clipped[:, start : start + width][better] = candidate[better]
    return clipped
