"""Adapter arithmetic: several adapters on one model become one new adapter of their method.

    combine_adapters(model, ["math", "code"], [0.7, 0.3], method="ties", density=0.5, rank=16)

What is generic lives here: the names and weights are checked, full module copies
(`modules_to_save`) are refused, and the adapters' method does the arithmetic through its
`combine` hook. LoRA's (LoRA, rsLoRA and DoRA alike; the methods `linear`, `cat`, `svd`, TIES
and DARE) is `tunesmith.methods.lora.arithmetic`. `combine_adapter_folders` is `tunesmith
combine`: adapter folders on a base built without weights, to one adapter folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from tunesmith.adapters.peft_format import save_adapter
from tunesmith.adapters.saved import ModulesToSave
from tunesmith.adapters.state import adapter_state, modules_of
from tunesmith.combine.skeleton import attach_adapters, base_config, model_skeleton
from tunesmith.errors import AdapterError
from tunesmith.methods.lora.arithmetic import COMBINE_METHODS, CombineResult
from tunesmith.provenance import resolve_base
from tunesmith.registry import Method, method_of
from tunesmith.shards import CheckpointReader, check_output, staging_dir

__all__ = ["COMBINE_METHODS", "CombineResult", "combine_adapter_folders", "combine_adapters"]


def combine_adapters(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    method: str = "svd",
    name: str = "combined",
    *,
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
    majority_sign: str = "total",
    device: str | torch.device | None = None,
    **options: Any,
) -> CombineResult:
    """Add adapter `name`, the combination of adapters `names` with `weights` (LoRA's methods:
    `tunesmith.methods.lora.arithmetic`). `rank` (svd and the pruning methods) defaults to
    the largest rank among the inputs; `density` is the kept fraction for the pruning methods;
    `seed` makes DARE reproducible; `device` is where ΔW and its SVD are computed (default:
    where the adapters are). The active adapters are unchanged (`set_active(model, name)` to use
    the new one). Returns the new adapter's config and, per module, the fraction of the
    combined ΔW's squared norm that the rank kept (1.0 where exact)."""
    names = list(names)
    weights = [float(w) for w in weights]
    combine = _check_inputs(model, names, weights, name).hook("combine")
    settings = {"rank": rank, "density": density, "seed": seed, "majority_sign": majority_sign}
    return combine(model, names, weights, method, name, device=device, **settings, **options)


def _check_inputs(model, names, weights, name) -> Method:
    """The method that combines `names`, once what any method needs is checked."""
    state = adapter_state(model)
    if not names:
        raise AdapterError("combine_adapters needs at least one adapter name")
    if len(weights) != len(names):
        raise AdapterError(
            f"{len(names)} adapters but {len(weights)} weights; give one weight each"
        )
    if len(set(names)) != len(names):
        raise AdapterError(f"adapters are listed twice: {', '.join(names)}")
    for adapter in names:
        if adapter not in state.configs:
            have = ", ".join(state.configs) or "none"
            raise AdapterError(f"unknown adapter {adapter!r}; adapters on this model: {have}")
        method = method_of(state.configs[adapter])
        if method.hook("combine") is None:
            raise AdapterError(
                f"adapter {adapter!r} is {method.name}; combine_adapters combines "
                "LoRA adapters (rsLoRA and DoRA included)"
            )
    for module_name, wrapper in modules_of(model, ModulesToSave):
        holders = [a for a in names if a in wrapper.modules_to_save]
        if holders:
            raise AdapterError(
                f"adapter {holders[0]!r} trains a full copy of {module_name} (modules_to_save); "
                "full module copies cannot be combined: combine adapters without modules_to_save"
            )
    if name in state.configs:
        raise AdapterError(f"an adapter named {name!r} already exists; pick another name")
    return method_of(state.configs[names[0]])


def combine_adapter_folders(
    adapters: Sequence[str],
    weights: Sequence[float],
    out: str | Path,
    method: str = "svd",
    base: str | None = None,
    *,
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
    majority_sign: str = "total",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> CombineResult:
    """`tunesmith combine`: combine adapter folders into one adapter folder `out` (PEFT format,
    with the first adapter's tokenizer when it has one). The base model is built without
    weights; only DoRA adapters read the base weights of the modules they adapt."""

    adapters = [str(a) for a in adapters]
    if not adapters:
        raise AdapterError("--adapter: give the adapter folders to combine")
    base = resolve_base(
        base, adapters, "--base: give the base model (the adapter does not name one)"
    )
    check_output(Path(out), overwrite, inputs=[base, *adapters])
    model = model_skeleton(base_config(base, trust_remote_code), trust_remote_code)
    model.config._name_or_path = base
    names = attach_adapters(model, adapters)
    reader: list[CheckpointReader] = []  # opened when a method first reads a base weight

    def read_base_weight(module_name: str) -> torch.Tensor:
        reader[:] = reader or [CheckpointReader(base)]
        return reader[0].read(f"{module_name}.weight")

    result = combine_adapters(
        model,
        names,
        weights,
        method,
        "default",
        rank=rank,
        density=density,
        seed=seed,
        majority_sign=majority_sign,
        read_base_weight=read_base_weight,
    )
    with staging_dir(out, overwrite) as tmp:
        save_adapter(model, tmp, names=["default"])
        if (Path(adapters[0]) / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(adapters[0]).save_pretrained(tmp)
    return result
