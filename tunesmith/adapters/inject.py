"""Put adapters into a plain `transformers` model and manage several of them.

Everything here is a function on the user's model; the model stays the same class.
- LoRA and IA3 replace their target Linear/Conv1D modules in place by a `LoRALayer` or
  `IA3Layer` (and `modules_to_save` by `ModulesToSave`);
- bottleneck adapters attach a `Bottlenecks` module (and a forward hook) to each adapted
  attention/MLP sub-layer;
- prompt and prefix tuning attach one `VirtualTokens` module (and hooks on the backbone).
The adapters' configs live in `model.tunesmith_adapters` (an `AdapterState`), which is all the
model-level state there is. Every holder has `adapters`, `active` and `disabled`, so activation,
disabling and deletion work the same for every method.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tunesmith.adapters.bottleneck import (
    BottleneckConfig,
    Bottlenecks,
    add_bottleneck_adapter,
    remove_bottleneck,
)
from tunesmith.adapters.ia3 import IA3Config, IA3Layer
from tunesmith.adapters.lora import (
    LinearWrapper,
    LoRAAdapter,
    LoRAConfig,
    LoRALayer,
    RowRoutes,
    init_adapter_weights,
    weight_shape,
)
from tunesmith.adapters.prompt import (
    PrefixTuningConfig,
    PromptTuningConfig,
    VirtualTokens,
    add_prompt_adapter,
    remove_virtual_tokens,
)
from tunesmith.adapters.saved import ModulesToSave
from tunesmith.errors import AdapterError, TunesmithError
from tunesmith.paths import check_name

STATE_ATTR = "tunesmith_adapters"


AdapterConfig = LoRAConfig | IA3Config | PromptTuningConfig | PrefixTuningConfig | BottleneckConfig
VIRTUAL_TOKEN_CONFIGS = (PromptTuningConfig, PrefixTuningConfig)
MERGEABLE_CONFIGS = (LoRAConfig, IA3Config)


def method_of(config: AdapterConfig) -> str:
    """The method name of an adapter config: lora, ia3, prompt, prefix or bottleneck."""
    return {
        LoRAConfig: "lora", IA3Config: "ia3", PromptTuningConfig: "prompt",
        PrefixTuningConfig: "prefix", BottleneckConfig: "bottleneck",
    }[type(config)]  # fmt: skip


@dataclass
class AdapterState:
    """The adapters on a model: their configs (by name) and which are active."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
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


def _modules_of(model: nn.Module, kind: type | tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, kind):
            yield name, module


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    return _modules_of(model, LoRALayer)


def ia3_layers(model: nn.Module) -> Iterator[tuple[str, IA3Layer]]:
    return _modules_of(model, IA3Layer)


def linear_wrappers(model: nn.Module) -> Iterator[tuple[str, LinearWrapper]]:
    """Every LoRA or IA3 layer (the adapters that can merge into a weight)."""
    return _modules_of(model, LinearWrapper)


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    return _modules_of(model, ModulesToSave)


HOLDERS = (LinearWrapper, ModulesToSave, Bottlenecks, VirtualTokens)


def _wrapped_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module holding per-adapter weights."""
    return _modules_of(model, HOLDERS)


def _holder_dict(module: nn.Module) -> nn.ModuleDict:
    return module.modules_to_save if isinstance(module, ModulesToSave) else module.adapters


# --- which modules to adapt ------------------------------------------------------------------
def outer_modules(
    model: nn.Module, stop: Callable[[str], bool] = lambda name: False
) -> Iterator[tuple[str, nn.Module]]:
    """`named_modules()` without the insides of tunesmith's wrappers, nor of modules whose name
    `stop` accepts (the wrapper or stopped module itself is yielded)."""

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        yield prefix, module
        if isinstance(module, (LinearWrapper, ModulesToSave)) or (prefix and stop(prefix)):
            return
        for child_name, child in module.named_children():
            yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    return walk("", model)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv1D (or LoRA/IA3 layer already wrapping one) by module name."""
    return {
        name: module
        for name, module in outer_modules(model)
        if isinstance(module, (nn.Linear, Conv1D, LinearWrapper))
    }


def name_matches(spec: str | Sequence[str], name: str) -> bool:
    """PEFT's rule: a string is a regex matching the whole name; a list holds names or
    suffixes that end at a dot boundary."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The index of the layer a module sits in (the first numbered segment), or None."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _output_head_name(model: nn.Module) -> str | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head or (isinstance(module, ModulesToSave) and module.original_module is head):
            return name
    return None


def find_targets(model: nn.Module, config: LoRAConfig | IA3Config) -> list[str]:
    """Names of the modules `config` adapts, in model order. Raises if nothing matches, or if a
    listed target matches no linear module."""
    linears = linear_modules(model)
    spec = config.targets
    what = "IA3" if isinstance(config, IA3Config) else "LoRA"
    if spec == "all-linear":
        head = _output_head_name(model)
        chosen = [n for n in linears if n != head]
    else:
        chosen = [n for n in linears if name_matches(spec, n)]
        if not chosen:
            raise AdapterError(_no_match_message(model, spec, linears, what=what))
        if isinstance(spec, (list, tuple)):
            unused = [t for t in spec if not any(name_matches([t], n) for n in linears)]
            if unused:  # fine for a list meant for several architectures; a typo otherwise
                warnings.warn(
                    f"{what} targets {', '.join(map(repr, unused))} match no linear module of "
                    f"{type(model).__name__}",
                    stacklevel=3,
                )
    if config.modules_to_save:
        chosen = [n for n in chosen if not name_matches(config.modules_to_save, n)]
    if config.exclude:
        chosen = [n for n in chosen if not name_matches(config.exclude, n)]
    layers = getattr(config, "layers", None)
    if layers is not None:
        wanted = set(layers)
        pattern = getattr(config, "layers_pattern", None)
        chosen = [n for n in chosen if layer_index(n, pattern) in wanted]
    if not chosen:
        raise AdapterError(_no_match_message(model, spec, linears, filtered=True, what=what))
    return chosen


def _no_match_message(
    model: nn.Module,
    spec: str | Sequence[str],
    linears: dict[str, nn.Module],
    filtered=False,
    what="LoRA",
) -> str:
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linears))
    others = [
        f"{n} ({type(m).__name__})"
        for n, m in model.named_modules()
        if n and n not in linears and name_matches(spec, n)
    ]
    why = " after exclude/layers/modules_to_save filtering" if filtered else ""
    hint = f"; it matches non-linear modules {', '.join(others[:3])}" if others else ""
    return (
        f"{what} targets {spec!r} match no linear module of {type(model).__name__}{why}{hint}; "
        f"linear modules are: {', '.join(leaves)}"
    )


# --- adding and removing adapters ------------------------------------------------------------
def add_lora(
    model: nn.Module,
    config: LoRAConfig | None = None,
    name: str = "default",
    trainable: bool = True,
) -> nn.Module:
    """Inject a LoRA adapter called `name` into `model` (mutated in place and returned).

    Targets are replaced by `LoRALayer`s, `config.modules_to_save` by `ModulesToSave` copies.
    Every base parameter is frozen; the new adapter's parameters train if `trainable`. The new
    adapter becomes the one active adapter (use `set_active` to stack several).
    """
    config = config or LoRAConfig()
    state = adapter_state(model)
    _check_new_name(state, name)
    targets = find_targets(model, config)  # validate everything before changing the model
    _check_kind(model, targets, LoRALayer)
    _check_ranks(model, config, targets)
    saved_names = _modules_to_save_names(model, config)

    for module_name in targets:
        layer = model.get_submodule(module_name)
        if not isinstance(layer, LoRALayer):
            layer = LoRALayer(layer).train(layer.training)  # new modules follow the model's mode
            model.set_submodule(module_name, layer)
        weight = layer.base_weight()
        adapter = LoRAAdapter(
            layer.in_features,
            layer.out_features,
            r=config.rank_for(module_name),
            scaling=config.scaling_for(module_name),
            dropout=config.dropout,
            use_dora=config.use_dora,
            device=weight.device,
            dtype=_adapter_dtype(weight.dtype),
        )
        layer.adapters[name] = adapter.train(layer.training)
        init_adapter_weights(layer, adapter, config.init, module_name)

    _add_saved_copies(model, saved_names, name)
    _register(model, name, config, trainable)
    return model


def _add_saved_copies(model: nn.Module, saved_names: list[str], name: str) -> None:
    for module_name in saved_names:
        wrapper = model.get_submodule(module_name)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper).train(wrapper.training)
            model.set_submodule(module_name, wrapper)
        wrapper.add_copy(name)


def _register(model: nn.Module, name: str, config: AdapterConfig, trainable: bool) -> None:
    """Record a new adapter, freeze the base, set its trainability and make it the active one."""
    adapter_state(model).configs[name] = config
    _freeze_base(model)
    for p in adapter_parameters(model, name):
        p.requires_grad_(trainable)
    set_active(model, [name])


def _check_kind(model: nn.Module, targets: list[str], kind: type) -> None:
    for module_name in targets:
        module = model.get_submodule(module_name)
        if isinstance(module, LinearWrapper) and not isinstance(module, kind):
            have = "LoRA" if isinstance(module, LoRALayer) else "IA3"
            raise AdapterError(
                f"{module_name} already has {have} adapters; LoRA and IA3 cannot share a module "
                "(exclude it from one of them)"
            )


def add_ia3(
    model: nn.Module, config: IA3Config | None = None, name: str = "default", trainable=True
) -> nn.Module:
    """Inject IA3 adapter `name`: scaling vectors (all ones) on `config`'s targets, PEFT's
    defaults for the architecture unless set. Becomes the one active adapter."""
    config = (config or IA3Config()).resolved(model)
    state = adapter_state(model)
    _check_new_name(state, name)
    targets = find_targets(model, config)
    _check_kind(model, targets, IA3Layer)
    feedforward = config.feedforward or []
    ff_targets = [t for t in targets if name_matches(feedforward, t)]
    if isinstance(feedforward, (list, tuple)):
        stray = [f for f in feedforward if not any(name_matches([f], t) for t in targets)]
        if stray:
            raise AdapterError(
                f"IA3 feedforward entries {', '.join(map(repr, stray))} are not among the "
                "targets; feedforward must be a subset of targets"
            )
    saved_names = _modules_to_save_names(model, config)
    for module_name in targets:
        layer = model.get_submodule(module_name)
        is_ff = module_name in ff_targets
        if not isinstance(layer, IA3Layer):
            layer = IA3Layer(layer, feedforward=is_ff).train(layer.training)
            model.set_submodule(module_name, layer)
        elif layer.feedforward != is_ff:
            raise AdapterError(
                f"{module_name} already has IA3 adapters that scale its "
                f"{'input' if layer.feedforward else 'output'}; feedforward must agree"
            )
        layer.add(name, device=layer.base_layer.weight.device)
    _add_saved_copies(model, saved_names, name)
    _register(model, name, config, trainable)
    return model


def add_prompt_tuning(
    model: nn.Module,
    config: PromptTuningConfig | PrefixTuningConfig | None = None,
    name: str = "default",
    trainable: bool = True,
    tokenizer=None,
) -> nn.Module:
    """Add a prompt-tuning (or, given a PrefixTuningConfig, prefix-tuning) adapter `name`.
    `tokenizer` is needed for init "text". Becomes the one active adapter."""
    config = config or PromptTuningConfig()
    _check_new_name(adapter_state(model), name)
    add_prompt_adapter(model, config, name, tokenizer)
    _register(model, name, config, trainable)
    return model


def add_prefix_tuning(
    model: nn.Module,
    config: PrefixTuningConfig | None = None,
    name: str = "default",
    trainable: bool = True,
    tokenizer=None,
) -> nn.Module:
    """Add a prefix-tuning adapter `name` (key/value prefixes in every attention layer)."""
    return add_prompt_tuning(model, config or PrefixTuningConfig(), name, trainable, tokenizer)


def add_bottleneck(
    model: nn.Module,
    config: BottleneckConfig | None = None,
    name: str = "default",
    trainable: bool = True,
) -> nn.Module:
    """Add a bottleneck adapter `name` (Houlsby or Pfeiffer placement, zero-initialised)."""
    config = config or BottleneckConfig()
    _check_new_name(adapter_state(model), name)
    add_bottleneck_adapter(model, config, name)
    _register(model, name, config, trainable)
    return model


def add_adapter(
    model: nn.Module,
    config: AdapterConfig,
    name: str = "default",
    trainable: bool = True,
    tokenizer=None,
) -> nn.Module:
    """Add an adapter of whichever method `config` describes (LoRAConfig, IA3Config,
    PromptTuningConfig, PrefixTuningConfig or BottleneckConfig)."""
    if isinstance(config, LoRAConfig):
        return add_lora(model, config, name, trainable)
    if isinstance(config, IA3Config):
        return add_ia3(model, config, name, trainable)
    if isinstance(config, VIRTUAL_TOKEN_CONFIGS):
        return add_prompt_tuning(model, config, name, trainable, tokenizer)
    if isinstance(config, BottleneckConfig):
        return add_bottleneck(model, config, name, trainable)
    raise AdapterError(f"unknown adapter config type {type(config).__name__}")


def _check_new_name(state: AdapterState, name: str) -> None:
    try:
        check_name(name)
    except TunesmithError as err:
        raise AdapterError(str(err)) from None
    if name in state.configs:
        raise AdapterError(
            f"an adapter named {name!r} already exists; pick another name, or "
            f"delete_adapter(model, {name!r}) first (load_adapter into an existing name hot-swaps)"
        )


def _check_ranks(model: nn.Module, config: LoRAConfig, targets: list[str]) -> None:
    for module_name in targets:
        out_features, in_features = weight_shape(model.get_submodule(module_name))
        r = config.rank_for(module_name)
        if r > min(in_features, out_features):
            raise AdapterError(
                f"r={r} is larger than {module_name} allows (in_features={in_features}, "
                f"out_features={out_features}); use r <= {min(in_features, out_features)} "
                "or a rank_pattern entry for this module"
            )


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    # Half-precision bases get fp32 adapter weights (master weights, as PEFT does); the forward
    # casts them to the activation dtype so activations stay in the compute dtype.
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def _modules_to_save_names(model: nn.Module, config: LoRAConfig | IA3Config) -> list[str]:
    if not config.modules_to_save:
        return []

    def is_saved(module_name: str) -> bool:
        return name_matches(config.modules_to_save, module_name)

    found = [n for n, _ in outer_modules(model, stop=is_saved) if n and is_saved(n)]
    for entry in config.modules_to_save:
        if not any(name_matches([entry], n) for n in found):
            raise AdapterError(
                f"modules_to_save entry {entry!r} matches no module of {type(model).__name__}"
            )
    return found


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters that belong to adapter `name` (its weights and saved-module copies)."""
    params: list[nn.Parameter] = []
    for _, module in _wrapped_modules(model):
        holder = _holder_dict(module)
        if name in holder:
            params.extend(holder[name].parameters())
    return params


def _freeze_base(model: nn.Module) -> None:
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
    _check_known(state, [name])
    for module_name, module in list(_wrapped_modules(model)):
        if isinstance(module, LinearWrapper) and name in module.merged:
            still_merged = [n for n in module.merged if n != name]
            module.unmerge()
            module.merge(still_merged, module_name)
        holder = _holder_dict(module)
        if name in holder:
            del holder[name]
        module.active = tuple(n for n in module.active if n != name)
        if not holder:
            _unwrap(model, module_name, module)
    del state.configs[name]
    state.active = [n for n in state.active if n != name]


def _unwrap(model: nn.Module, module_name: str, module: nn.Module) -> None:
    """Take a holder out of the model: a wrapper gives back the module it wraps; an attached
    holder (bottleneck, virtual tokens) goes, with its hooks."""
    if isinstance(module, Bottlenecks):
        remove_bottleneck(model, module_name.rsplit(".", 1)[0])
    elif isinstance(module, VirtualTokens):
        remove_virtual_tokens(model)
    elif isinstance(module, LinearWrapper):
        model.set_submodule(module_name, module.base_layer)
    else:
        model.set_submodule(module_name, module.original_module)


def _check_known(state: AdapterState, names: Sequence[str | None]) -> None:
    for name in names:
        if name is not None and name not in state.configs:
            have = ", ".join(state.configs) or "none"
            raise AdapterError(f"unknown adapter {name!r}; adapters on this model: {have}")


# --- which adapters run ----------------------------------------------------------------------
def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters. Several active adapters add their outputs (stacking).
    Trainability is unchanged."""
    names = [names] if isinstance(names, str) else list(names)
    state = adapter_state(model)
    _check_known(state, names)
    virtual = [n for n in names if isinstance(state.configs[n], VIRTUAL_TOKEN_CONFIGS)]
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
    for _, module in _wrapped_modules(model):
        holder = _holder_dict(module)
        module.active = tuple(n for n in names if n in holder)
    state.active = names


@contextmanager
def disabled(model: nn.Module):
    """Run the base model only: adapters are skipped (merged ones are unmerged for the duration
    and merged back afterwards)."""
    modules = list(_wrapped_modules(model))
    remerge = {}
    for module_name, module in modules:
        if isinstance(module, LinearWrapper) and module.merged:
            remerge[module_name] = list(module.merged)
            module.unmerge()
        module.disabled = True
    try:
        yield model
    finally:
        for module_name, module in modules:
            module.disabled = False
            if module_name in remerge:
                module.merge(remerge[module_name], module_name)


@contextmanager
def route(model: nn.Module, rows: Sequence[str | Sequence[str] | None]):
    """Give each row of the batch its own adapter: `rows[i]` is an adapter name, a list of names
    (stacked), or None (base model). Works around a forward pass or `model.generate(...)`; the
    batch runs as one pass per adapter group, never a loop over rows."""
    state = adapter_state(model)
    if not rows:
        raise AdapterError("route() needs one entry per batch row; got an empty list")
    per_row = [[] if r is None else [r] if isinstance(r, str) else list(r) for r in rows]
    _check_known(state, [n for names in per_row for n in names])
    named = {n for names in per_row for n in names}
    virtual = sorted(n for n in named if isinstance(state.configs[n], VIRTUAL_TOKEN_CONFIGS))
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
    modules = [m for _, m in _wrapped_modules(model) if not isinstance(m, VirtualTokens)]
    for module_name, module in saved_modules(model):
        for i, names in enumerate(per_row):
            with_copy = [n for n in names if n in module.modules_to_save]
            if len(with_copy) > 1:
                raise AdapterError(
                    f"row {i} stacks adapters {', '.join(with_copy)} that each have their own "
                    f"copy of {module_name} (modules_to_save); give that row only one of them"
                )
    for module in modules:
        module.routes = routes
    try:
        yield model
    finally:
        for module in modules:
            module.routes = None


# --- merging ---------------------------------------------------------------------------------
def merge(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights: W' = W + s·BA, DoRA
    W' = k·(W + s·BA), IA3 W' = W ⊙ l. Refuses, changing nothing, if any merged weight would be
    NaN/Inf, or if an adapter's method cannot merge (prompt, prefix, bottleneck)."""
    state = adapter_state(model)
    names = list(state.active if names is None else names)
    _check_known(state, names)
    _check_mergeable(state, names)
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


UNMERGEABLE = {
    "prompt": "it adds virtual input tokens, not weights",
    "prefix": "it adds key/value prefixes, not weights",
    "bottleneck": "its nonlinearity sits between two projections",
}


def unmergeable_message(name: str, method: str) -> str:
    return (
        f"adapter {name!r} ({method}) cannot be merged: {UNMERGEABLE[method]}; "
        "merge LoRA or IA3 adapters only, and keep this one loaded at inference"
    )


def _check_mergeable(state: AdapterState, names: Sequence[str]) -> None:
    for name in names:
        config = state.configs[name]
        if not isinstance(config, MERGEABLE_CONFIGS):
            raise AdapterError(unmergeable_message(name, method_of(config)))


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
    `tunesmith.quant.quantize_model` if wanted."""
    state = adapter_state(model)
    names = list(state.active if names is None else names)
    _check_known(state, names)
    _check_mergeable(state, names)
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
    for module_name, module in list(_wrapped_modules(model)):
        if isinstance(module, ModulesToSave):  # the merged adapters' copy replaces it
            module.active = tuple(n for n in names if n in module.modules_to_save)
            model.set_submodule(module_name, module.active_copy(module_name))
        else:
            _unwrap(model, module_name, module)
    delattr(model, STATE_ATTR)
    return model


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
