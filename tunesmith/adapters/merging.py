"""Folding adapters into the base weights and back: W' = W + s·BA (DoRA: k·(W + s·BA), IA3:
W ⊙ l), the exact inverse, and merge-and-unload to a plain `transformers` model."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from tunesmith.adapters.activation import set_active
from tunesmith.adapters.holders import LinearWrapper
from tunesmith.adapters.saved import ModulesToSave
from tunesmith.adapters.state import (
    STATE_ATTR,
    adapter_state,
    check_known,
    holders,
    linear_wrappers,
)
from tunesmith.errors import AdapterError
from tunesmith.registry import method_of


def unmergeable_message(name: str, method: str, reason: str) -> str:
    return (
        f"adapter {name!r} ({method}) cannot be merged: {reason}; "
        "merge LoRA or IA3 adapters only, and keep this one loaded at inference"
    )


def check_mergeable(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse adapters whose method cannot fold into the weights (prompt, prefix, bottleneck)."""
    configs = adapter_state(model).configs
    for name in names:
        method = method_of(configs[name])
        if method.merge_refusal is not None:
            raise AdapterError(unmergeable_message(name, method.name, method.merge_refusal))


def merge(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights: W' = W + s·BA, DoRA
    W' = k·(W + s·BA), IA3 W' = W ⊙ l. Refuses, changing nothing, if any merged weight would be
    NaN/Inf, or if an adapter's method cannot merge (prompt, prefix, bottleneck)."""
    state = adapter_state(model)
    names = list(state.active if names is None else names)
    check_known(model, names)
    check_mergeable(model, names)
    if any(layer.quantized for _, layer in linear_wrappers(model)):
        warnings.warn(
            "merging into a quantized base re-quantizes W + s·BA, which rounds the result; "
            "merge_and_unload() instead builds 16-bit layers from the dequantized weights",
            stacklevel=2,
        )
    done: list[tuple[str, LinearWrapper, tuple[str, ...]]] = []
    try:
        for module_name, layer in linear_wrappers(model):
            before = layer.merged
            layer.merge(names, module_name)
            done.append((module_name, layer, before))
    except AdapterError:
        for module_name, layer, before in done:
            layer.unmerge()
            layer.merge(list(before), module_name)
        raise
    if any(n not in state.active for n in names):
        set_active(model, list(dict.fromkeys(state.active + names)))


def unmerge(model: nn.Module) -> None:
    """Undo every merge: W = (W' − L) / c, the exact inverse of `merge` up to rounding."""
    for _, layer in linear_wrappers(model):
        layer.unmerge()


def merge_and_unload(
    model: nn.Module, names: Sequence[str] | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Merge adapters (default: the active ones) and remove every tunesmith module: returns the
    same model object as a plain `transformers` model. Saved-module copies of the merged
    adapters replace the originals.

    Quantized base layers (QLoRA) become plain nn.Linear layers in `dtype` (default: the dtype
    of the input embeddings): W' = dequantized W + s·BA computed in fp32, so the merged model
    uses exactly the weights the adapter was trained against. Re-quantize it with
    `tunesmith.quantized.bnb.quantize_model` if wanted."""
    state = adapter_state(model)
    names = list(state.active if names is None else names)
    check_known(model, names)
    check_mergeable(model, names)
    quantized = [(n, layer) for n, layer in linear_wrappers(model) if layer.quantized]
    if quantized:
        if dtype is None:
            embeddings = (
                model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            )
            dtype = embeddings.weight.dtype if embeddings is not None else torch.float32
        for module_name, layer in quantized:
            model.set_submodule(module_name, layer.merged_linear(names, dtype))
    merge(model, names)
    for module_name, holder in list(holders(model)):
        if isinstance(holder, ModulesToSave):  # the merged adapters' copy replaces it
            holder.active = tuple(n for n in names if n in holder.modules_to_save)
            model.set_submodule(module_name, holder.active_copy(module_name))
        else:
            holder.detach_from(model, module_name)
    delattr(model, STATE_ATTR)
    return model
