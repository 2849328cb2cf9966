"""LoRA adapter arithmetic: several LoRA adapters on one model become one new LoRA adapter,
as PEFT keeps `add_weighted_adapter` with LoRA. `combine` is LoRA's `combine` hook;
`tunesmith.combine.combine_adapters` checks what is generic and calls it.

Every method works per adapted module on each adapter's real contribution ΔWᵢ = sᵢ·BᵢAᵢ with
that adapter's own scaling (alpha/r, or alpha/√r for rsLoRA, per-module rank and alpha
patterns included), so adapters with different ranks, alphas and scalings combine correctly.
A DoRA adapter contributes its effective ΔWᵢ = k(W + sBA) − W (k the magnitude over the row
norm), which needs the base weight and is not low-rank; `svd` and the pruning methods take it.

- `linear`: A' = Σ sgn(wᵢ)·√(|wᵢ|sᵢ)·Aᵢ, B' = Σ √(|wᵢ|sᵢ)·Bᵢ (PEFT's definition; equal ranks;
  B'A' has cross terms, so it equals Σ wᵢΔWᵢ only for a single adapter: use `cat` for that)
- `cat`: A', B' stack the adapters' factors, rank Σ rᵢ: B'A' = Σ wᵢΔWᵢ exactly
- `svd`: Σ wᵢΔWᵢ truncated to `rank` by SVD
- `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the task-vector methods of
  `tunesmith.task_vectors` on the full ΔWᵢ, then truncated to `rank` by SVD

The result is an ordinary LoRA adapter with scaling 1 (alpha = r): save it, load it, merge it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tunesmith.adapters.activation import set_active
from tunesmith.adapters.state import adapter_state, add_adapter, modules_of
from tunesmith.errors import AdapterError
from tunesmith.methods.lora import LoRAConfig
from tunesmith.methods.lora.layer import LoRAAdapter, LoRALayer
from tunesmith.task_vectors import (
    MAJORITY_SIGN,
    PRUNING_METHODS,
    check_density,
    combine_tasks,
    factored_low_rank,
    low_rank_factors,
)

COMBINE_METHODS = ("linear", "cat", "svd", *PRUNING_METHODS)


@dataclass
class CombineResult:
    config: LoRAConfig
    kept: dict[str, float]
    """Per module: the fraction of the combined ΔW's squared Frobenius norm the rank kept."""

    def summary(self) -> str:
        if not self.kept:
            return "no modules"
        worst = min(self.kept, key=self.kept.get)
        mean = sum(self.kept.values()) / len(self.kept)
        if self.kept[worst] >= 1 - 1e-6:
            return f"{len(self.kept)} modules, exact (no rank truncation)"
        return (
            f"{len(self.kept)} modules; the rank kept {100 * mean:.1f}% of ΔW's energy on "
            f"average, {100 * self.kept[worst]:.1f}% at worst ({worst})"
        )


def combine(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    method: str,
    name: str,
    *,
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
    majority_sign: str = "total",
    device: str | torch.device | None = None,
    read_base_weight: Callable[[str], torch.Tensor] | None = None,
) -> CombineResult:
    """Add LoRA adapter `name`, the combination of LoRA adapters `names` (checked to exist,
    be distinct and hold no full module copies) with `weights`. `read_base_weight(module)`
    gives a module's base weight where the model holds none (a skeleton): only DoRA reads it."""
    _check(model, names, method, rank, density, majority_sign)
    layers = {
        n: layer
        for n, layer in modules_of(model, LoRALayer)
        if any(a in layer.adapters for a in names)
    }
    if method == "linear":
        ranks = {
            layer.adapters[a].r for layer in layers.values() for a in names if a in layer.adapters
        }
        if len(ranks) > 1:
            raise AdapterError(
                f"method 'linear' needs adapters of one rank; {', '.join(names)} have ranks "
                f"{', '.join(map(str, sorted(ranks)))}; use 'cat' (exact) or 'svd'"
            )
    if rank is None:
        rank = max(
            layer.adapters[a].r for layer in layers.values() for a in names if a in layer.adapters
        )
    generator = torch.Generator().manual_seed(seed)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    kept: dict[str, float] = {}
    for module_name, layer in layers.items():
        pairs = zip(names, weights, strict=True)
        parts = [(layer.adapters[a], w) for a, w in pairs if a in layer.adapters]
        site = _Site(layer, module_name, device or parts[0][0].lora_A.device, read_base_weight)
        b, a, kept[module_name] = _combine_layer(
            site, parts, method, rank, density, generator, majority_sign
        )
        factors[module_name] = (b, a)
    return CombineResult(_add_combined(model, name, factors), kept)


def _check(model, names, method, rank, density, majority_sign) -> None:
    configs = adapter_state(model).configs
    if method not in COMBINE_METHODS:
        raise AdapterError(f"method {method!r} is not one of {', '.join(COMBINE_METHODS)}")
    for adapter in names:
        if method in ("linear", "cat") and configs[adapter].use_dora:
            raise AdapterError(
                f"adapter {adapter!r} is DoRA, whose ΔW = k(W + sBA) − W is not a product of its "
                f"factors; method {method!r} cannot combine it: use 'svd' or a pruning method"
            )
    for module_name, layer in modules_of(model, LoRALayer):
        merged = [a for a in names if a in layer.merged]
        if merged:
            raise AdapterError(
                f"adapter {merged[0]!r} is merged into {module_name}; unmerge(model) first"
            )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    if method in PRUNING_METHODS:
        try:
            check_density(density)
        except ValueError as err:
            raise AdapterError(str(err)) from None
    if majority_sign not in MAJORITY_SIGN:
        raise AdapterError(f"majority_sign must be one of {', '.join(MAJORITY_SIGN)}")


@dataclass
class _Site:
    """One adapted module: its layer, its name, where ΔW is computed, how to read its base."""

    layer: LoRALayer
    name: str
    device: torch.device | str
    read_base_weight: Callable[[str], torch.Tensor] | None

    def base_weight(self) -> torch.Tensor:
        weight = self.layer.base_weight()
        if weight.device.type == "meta" and self.read_base_weight is not None:
            weight = self.read_base_weight(self.name)
        if weight.device.type == "meta":
            raise AdapterError(
                f"{self.name}: combining a DoRA adapter needs the base weights (load the base "
                "model, not only its structure)"
            )
        return weight.float().to(self.device)


def _delta(site: _Site, adapter: LoRAAdapter) -> torch.Tensor:
    """The full (out × in) change the adapter makes to the layer's weight, in fp32."""
    device = site.device
    low_rank = (adapter.lora_B.float().to(device) @ adapter.lora_A.float().to(device)) * float(
        adapter.scaling
    )
    if not adapter.use_dora:
        return low_rank
    weight = site.base_weight()
    adapted = weight + low_rank
    k = adapter.lora_magnitude_vector.float().to(device) / torch.linalg.norm(adapted, dim=1)
    return adapted * k[:, None] - weight


def _combine_layer(
    site: _Site, parts, method, rank, density, generator, majority_sign
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B', A', kept) for one module, with B'A' the combined ΔW (scaling 1)."""
    device = site.device
    if method in ("linear", "cat"):
        lefts, rights = [], []
        for adapter, w in parts:
            root = (abs(w) * float(adapter.scaling)) ** 0.5
            sign = 1.0 if w >= 0 else -1.0
            lefts.append(adapter.lora_B.float().to(device) * root)
            rights.append(adapter.lora_A.float().to(device) * (sign * root))
        if method == "cat":
            left, right = torch.cat(lefts, dim=1), torch.cat(rights, dim=0)
            full = min(left.shape[0], right.shape[1])
            # More stacked ranks than the layer has dimensions: the same product, re-factored.
            if left.shape[1] <= full:
                return left, right, 1.0
            return factored_low_rank(left, right, full)
        return sum(lefts), sum(rights), 1.0
    if method == "svd" and not any(adapter.use_dora for adapter, _ in parts):
        # Σ wᵢsᵢBᵢAᵢ = [wᵢsᵢBᵢ …] @ [Aᵢ; …]: an exact SVD without forming the product.
        left = torch.cat(
            [
                adapter.lora_B.float().to(device) * (w * float(adapter.scaling))
                for adapter, w in parts
            ],
            dim=1,
        )
        right = torch.cat([adapter.lora_A.float().to(device) for adapter, _ in parts], dim=0)
        return factored_low_rank(left, right, rank)
    deltas = [_delta(site, adapter) for adapter, _ in parts]
    task_method = "linear" if method == "svd" else method
    weights = [w for _, w in parts]
    combined = combine_tasks(deltas, weights, task_method, density, generator, majority_sign)
    return low_rank_factors(combined, rank)


def _add_combined(
    model: nn.Module, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> LoRAConfig:
    """Add the combined adapter with scaling 1 everywhere: r = alpha = the commonest rank,
    rank_pattern/alpha_pattern for modules of another rank."""
    state = adapter_state(model)
    previous = list(state.active)
    ranks = {m: a.shape[0] for m, (_, a) in factors.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    other = {re.escape(m): r for m, r in ranks.items() if r != common}
    config = LoRAConfig(
        r=common,
        alpha=common,
        dropout=0.0,
        targets=sorted(factors),
        rank_pattern=other,
        alpha_pattern=dict(other),
    )
    add_adapter(model, config, name, trainable=False)
    layers = dict(modules_of(model, LoRALayer))
    with torch.no_grad():
        for module_name, (b, a) in factors.items():
            adapter = layers[module_name].adapters[name]
            home = adapter.lora_A.device
            if home.type == "meta":  # a model skeleton: the adapter's tensors live on the CPU
                home = torch.device("cpu")
                adapter.scaling = torch.tensor(1.0)
            dtype = adapter.lora_A.dtype
            adapter.lora_A = nn.Parameter(a.to(home, dtype).contiguous(), requires_grad=False)
            adapter.lora_B = nn.Parameter(b.to(home, dtype).contiguous(), requires_grad=False)
            adapter.scaling.fill_(config.scaling_for(module_name))
    set_active(model, previous)
    return config
