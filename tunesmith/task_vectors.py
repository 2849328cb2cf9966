"""Task-vector arithmetic shared by adapter combination and model merging.

A task vector τᵢ is what fine-tuning `i` changed: a LoRA adapter's full ΔWᵢ = sᵢ·BᵢAᵢ (for DoRA
the effective k(W + sBA) − W), or a fine-tuned tensor minus the base tensor. Methods (the
definitions of TIES, Yadav et al. 2023, and DARE, Yu et al. 2024, as PEFT and mergekit use
them):

- `linear` / `task_arithmetic`: Σ wᵢ τᵢ
- `magnitude_prune`: keep each τᵢ's `density` fraction of largest-magnitude entries, then Σ wᵢ τᵢ
- `ties`: magnitude-prune, weight, elect a sign per entry (the sign of Σ wᵢ τᵢ, or with
  `majority_sign="frequency"` the sign most τᵢ have), then average the entries that agree with
  it (disjoint mean)
- `dare_linear`: drop each entry with probability 1 − density and rescale the rest by 1/density
  (unbiased), then Σ wᵢ τᵢ
- `dare_ties`: DARE's random drop and rescale, then TIES's sign election and disjoint mean
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunesmith.errors import TunesmithError

PRUNING_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY_SIGN = ("total", "frequency")


def check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise TunesmithError(f"density must be in (0, 1], got {density}")


CHUNK = 1 << 18  # entries per task combined at a time: bounds the temporaries of big tensors


def magnitude_threshold(task: torch.Tensor, density: float) -> float:
    """The smallest |entry| that magnitude pruning keeps: the int(density·numel)-th largest
    (entries tied with it are kept too). -inf keeps everything, +inf nothing."""
    keep = int(density * task.numel())
    if keep >= task.numel():
        return float("-inf")
    if keep == 0:
        return float("inf")
    return float(torch.kthvalue(task.reshape(-1).abs(), task.numel() - keep + 1).values)


def majority_sign_mask(weighted: torch.Tensor, majority_sign: str = "total") -> torch.Tensor:
    """(n, …) bool: where each task's entry has the elected sign (zeros never agree)."""
    signs = weighted.sign()
    votes = weighted.sum(0) if majority_sign == "total" else signs.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)
    return signs == elected


def combine_tasks(
    tasks: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str,
    density: float = 1.0,
    generator: torch.Generator | None = None,
    majority_sign: str = "total",
) -> torch.Tensor:
    """Combine same-shape task vectors with `method` (see the module), in fp32. Big tensors
    are combined CHUNK entries at a time, so the temporaries stay small next to the tasks
    themselves. DARE draws its keep-mask per chunk, (n × chunk) values at a time, from
    `generator`."""
    flat = [t.detach().float().reshape(-1) for t in tasks]
    thresholds = None
    if method in ("ties", "magnitude_prune"):
        thresholds = torch.tensor([magnitude_threshold(t, density) for t in flat])[:, None]
    dare = method in ("dare_linear", "dare_ties")
    if dare and generator is None:
        raise ValueError("DARE needs a seeded generator")
    w = torch.tensor([float(x) for x in weights])[:, None]
    out = torch.empty_like(flat[0])
    for start in range(0, out.numel(), CHUNK):
        part = torch.stack([t[start : start + CHUNK] for t in flat])
        if thresholds is not None:
            part = part * (part.abs() >= thresholds.to(part.device))
        elif dare and density < 1.0:
            keep = torch.rand(part.shape, generator=generator, device=generator.device) < density
            part = part * keep.to(part.device) / density
        weighted = part * w.to(part.device)
        if method in ("ties", "dare_ties"):
            mask = majority_sign_mask(weighted, majority_sign)
            merged = (weighted * mask).sum(0) / mask.sum(0).clamp(min=1)
        else:
            merged = weighted.sum(0)
        out[start : start + CHUNK] = merged
    return out.reshape(tasks[0].shape)


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, kept) with B @ A the best rank-`rank` approximation of `delta` (truncated SVD; √S
    goes to each side) and `kept` the fraction of ‖delta‖² it keeps (1.0: exact). The SVD runs in
    float64 (fp32 rounding alone moved logits by 3e-5 on a tiny model); the factors are float32."""
    u, s, vh = torch.linalg.svd(delta.detach().double(), full_matrices=False)
    return _truncate(u, s, vh, rank)


def factored_low_rank(
    left: torch.Tensor, right: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`low_rank_factors(left @ right, rank)` without forming the (out × in) product: QR of
    both factors and an SVD of the small (k × k) core, k = left.shape[1]. Exact."""
    q_left, r_left = torch.linalg.qr(left.detach().double())
    q_right, r_right = torch.linalg.qr(right.detach().double().T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    return _truncate(q_left @ u, s, vh @ q_right.T, rank)


def _truncate(u, s, vh, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    rank = min(rank, s.numel())
    energy = float((s**2).sum())
    kept = float((s[:rank] ** 2).sum()) / energy if energy > 0 else 1.0
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float(), kept
