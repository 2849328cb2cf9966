"""The adapters on a model: their configs by name, which are active, the modules holding their
weights, and adding (generic part), deleting and counting them.

The configs live in `model.tunesmith_adapters` (an `AdapterState`), which is all the
model-level state there is; the weights live in `AdapterHolder` modules inside the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import nn

from tunesmith.adapters.holders import AdapterHolder, LinearWrapper
from tunesmith.errors import AdapterError, TunesmithError
from tunesmith.paths import check_name
from tunesmith.registry import method_of

STATE_ATTR = "tunesmith_adapters"


@dataclass
class AdapterState:
    """The adapters on a model: their configs (by name) and which are active."""

    configs: dict[str, Any] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def adapter_state(model: nn.Module) -> AdapterState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = AdapterState()
        setattr(model, STATE_ATTR, state)
    return state


def adapter_names(model: nn.Module) -> list[str]:
    return list(adapter_state(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    return list(adapter_state(model).active)


def modules_of(model: nn.Module, kind: type | tuple[type, ...]) -> Iterator[tuple[str, Any]]:
    """(name, module) for every module of `model` that is a `kind`."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            yield name, module


def holders(model: nn.Module) -> Iterator[tuple[str, AdapterHolder]]:
    """Every module holding per-adapter weights."""
    return modules_of(model, AdapterHolder)


def linear_wrappers(model: nn.Module) -> Iterator[tuple[str, LinearWrapper]]:
    """Every wrapped Linear/Conv1D (the adapters that can merge into a weight)."""
    return modules_of(model, LinearWrapper)


def check_new_name(model: nn.Module, name: str) -> None:
    """Refuse an adapter name that is not plain or already taken."""
    try:
        check_name(name)
    except TunesmithError as err:
        raise AdapterError(str(err)) from None
    if name in adapter_state(model).configs:
        raise AdapterError(
            f"an adapter named {name!r} already exists; pick another name, or "
            f"delete_adapter(model, {name!r}) first (load_adapter into an existing name hot-swaps)"
        )


def check_known(model: nn.Module, names: Sequence[str | None]) -> None:
    state = adapter_state(model)
    for name in names:
        if name is not None and name not in state.configs:
            have = ", ".join(state.configs) or "none"
            raise AdapterError(f"unknown adapter {name!r}; adapters on this model: {have}")


def add_adapter(
    model: nn.Module,
    config: Any,
    name: str = "default",
    trainable: bool = True,
    *,
    tokenizer: Any = None,
) -> nn.Module:
    """Add an adapter of whichever method `config` belongs to (LoRAConfig, IA3Config,
    PromptTuningConfig, PrefixTuningConfig, BottleneckConfig or a registered method's config);
    `model` is changed in place and returned. The new adapter becomes the one active adapter."""
    method = method_of(config)
    if not method.trains_adapter:
        raise AdapterError(f"method {method.name} trains the model itself, not an adapter")
    check_new_name(model, name)
    method.impl.attach(model, config, name=name, trainable=trainable, tokenizer=tokenizer)
    return model


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters that belong to adapter `name` (its weights and saved-module copies)."""
    params: list[nn.Parameter] = []
    for _, holder in holders(model):
        per_adapter = holder.per_adapter()
        if name in per_adapter:
            params.extend(per_adapter[name].parameters())
    return params


def freeze_base(model: nn.Module) -> None:
    adapter_ids = {
        id(p) for n in adapter_state(model).configs for p in adapter_parameters(model, n)
    }
    for p in model.parameters():
        if id(p) not in adapter_ids:
            p.requires_grad_(False)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` (unmerging it first). Modules left with no adapter go back to the
    original module."""
    state = adapter_state(model)
    check_known(model, [name])
    for module_name, holder in list(holders(model)):
        if isinstance(holder, LinearWrapper) and name in holder.merged:
            still_merged = [n for n in holder.merged if n != name]
            holder.unmerge()
            holder.merge(still_merged, module_name)
        per_adapter = holder.per_adapter()
        if name in per_adapter:
            del per_adapter[name]
        holder.active = tuple(n for n in holder.active if n != name)
        if not per_adapter:
            holder.detach_from(model, module_name)
    del state.configs[name]
    state.active = [n for n in state.active if n != name]


class TrainableParameters(NamedTuple):
    trainable: int
    total: int
    percent: float


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Counts of trainable and all parameters (shared tensors counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return TrainableParameters(trainable, total, 100.0 * trainable / total if total else 0.0)
