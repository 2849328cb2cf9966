"""Which adapters run: making adapters active (stacking several), running the base alone, and
giving each row of a batch its own adapter."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tunesmith.adapters.holders import LinearWrapper, RowRoutes
from tunesmith.adapters.saved import ModulesToSave
from tunesmith.adapters.state import (
    adapter_parameters,
    adapter_state,
    check_known,
    freeze_base,
    holders,
    linear_wrappers,
    modules_of,
)
from tunesmith.errors import AdapterError
from tunesmith.registry import method_of


def register_adapter(model: nn.Module, name: str, config: Any, trainable: bool) -> None:
    """Record a new adapter (a method's `attach` calls this last, after changing the model),
    freeze the base, set the adapter's trainability and make it the one active adapter."""
    adapter_state(model).configs[name] = config
    freeze_base(model)
    for p in adapter_parameters(model, name):
        p.requires_grad_(trainable)
    set_active(model, [name])


def _virtual(model: nn.Module, names) -> list[str]:
    configs = adapter_state(model).configs
    return [n for n in names if method_of(configs[n]).virtual_tokens]


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters. Several active adapters add their outputs (stacking).
    Trainability is unchanged."""
    names = [names] if isinstance(names, str) else list(names)
    state = adapter_state(model)
    check_known(model, names)
    virtual = _virtual(model, names)
    if len(virtual) > 1:
        raise AdapterError(
            f"adapters {', '.join(virtual)} are all prompt/prefix adapters; only one set of "
            "virtual tokens can be active at a time"
        )
    for module_name, layer in linear_wrappers(model):
        stale = [n for n in layer.merged if n not in names]
        if stale:
            raise AdapterError(
                f"adapter(s) {', '.join(stale)} are merged into {module_name}; "
                "call unmerge(model) before deactivating them"
            )
    for _, holder in holders(model):
        per_adapter = holder.per_adapter()
        holder.active = tuple(n for n in names if n in per_adapter)
    state.active = names


@contextmanager
def disabled(model: nn.Module):
    """Run the base model only: adapters are skipped (merged ones are unmerged for the duration
    and merged back afterwards)."""
    found = list(holders(model))
    remerge = {}
    for module_name, holder in found:
        if isinstance(holder, LinearWrapper) and holder.merged:
            remerge[module_name] = list(holder.merged)
            holder.unmerge()
        holder.disabled = True
    try:
        yield model
    finally:
        for module_name, holder in found:
            holder.disabled = False
            if module_name in remerge:
                holder.merge(remerge[module_name], module_name)


@contextmanager
def route(model: nn.Module, rows: Sequence[str | Sequence[str] | None]):
    """Give each row of the batch its own adapter: `rows[i]` is an adapter name, a list of names
    (stacked), or None (base model). Works around a forward pass or `model.generate(...)`; the
    batch runs as one pass per adapter group, never a loop over rows."""
    if not rows:
        raise AdapterError("route() needs one entry per batch row; got an empty list")
    per_row = [[] if r is None else [r] if isinstance(r, str) else list(r) for r in rows]
    check_known(model, [n for names in per_row for n in names])
    virtual = sorted(_virtual(model, {n for names in per_row for n in names}))
    if virtual:
        raise AdapterError(
            f"route() cannot give rows different virtual tokens ({', '.join(virtual)} are "
            "prompt/prefix adapters); batch requests by prompt/prefix adapter instead"
        )
    for module_name, layer in linear_wrappers(model):
        if layer.merged:
            raise AdapterError(
                f"{module_name} has merged adapters; call unmerge(model) before route()"
            )
    _check_saved_copies(model, per_row)
    device = next(model.parameters()).device
    groups: dict[str, list[int]] = {}
    for i, names in enumerate(per_row):
        for name in names:
            groups.setdefault(name, []).append(i)
    routes = RowRoutes(
        batch_size=len(rows),
        groups=[
            (n, torch.tensor(idx, dtype=torch.long, device=device)) for n, idx in groups.items()
        ],
    )
    routed = [holder for _, holder in holders(model) if holder.routable]
    for holder in routed:
        holder.routes = routes
    try:
        yield model
    finally:
        for holder in routed:
            holder.routes = None


def _check_saved_copies(model: nn.Module, per_row: list[list[str]]) -> None:
    for module_name, module in modules_of(model, ModulesToSave):
        for i, names in enumerate(per_row):
            with_copy = [n for n in names if n in module.modules_to_save]
            if len(with_copy) > 1:
                raise AdapterError(
                    f"row {i} stacks adapters {', '.join(with_copy)} that each have their own "
                    f"copy of {module_name} (modules_to_save); give that row only one of them"
                )
