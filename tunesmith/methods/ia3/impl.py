"""IA3 on a model: attaching `IA3Layer`s, and PEFT's format both ways.

Saved keys: `base_model.model.<module>.ia3_l`, (out × 1), or (1 × in) for feed-forward
modules; `adapter_config.json` as PEFT writes it (peft_type "IA3")."""

from __future__ import annotations

from typing import Any

from torch import nn

from tunesmith.adapters.activation import register_adapter
from tunesmith.adapters.peft_format import (
    PREFIX,
    check_causal_lm,
    common_peft_keys,
    warn_unknown_keys,
)
from tunesmith.adapters.state import add_adapter, modules_of
from tunesmith.adapters.targets import (
    add_saved_copies,
    check_wrapper_kind,
    find_targets,
    find_targets_or_none,
    modules_to_save_names,
    name_matches,
)
from tunesmith.errors import AdapterError
from tunesmith.methods.ia3 import IA3Config
from tunesmith.methods.ia3.layer import IA3Layer

KNOWN_KEYS = {
    "auto_mapping",
    "base_model_name_or_path",
    "inference_mode",
    "revision",
    "task_type",
    "peft_type",
    "peft_version",
    "modules_to_save",
    "exclude_modules",
    "fan_in_fan_out",
    "feedforward_modules",
    "init_ia3_weights",
    "target_modules",
}


def add_ia3(
    model: nn.Module, config: IA3Config | None = None, name: str = "default", trainable=True
) -> nn.Module:
    """Inject IA3 adapter `name`: scaling vectors (all ones) on `config`'s targets, PEFT's
    defaults for the architecture unless set. Becomes the one active adapter."""
    return add_adapter(model, config or IA3Config(), name, trainable)


def ia3_layers(model: nn.Module):
    return modules_of(model, IA3Layer)


def attach(
    model: nn.Module, config: IA3Config, *, name: str, trainable: bool, tokenizer: Any = None
) -> None:
    config = config.resolved(model)
    targets = find_targets(model, config, "IA3")
    check_wrapper_kind(model, targets, IA3Layer)
    feedforward = config.feedforward or []
    ff_targets = [t for t in targets if name_matches(feedforward, t)]
    if isinstance(feedforward, (list, tuple)):
        stray = [f for f in feedforward if not any(name_matches([f], t) for t in targets)]
        if stray:
            raise AdapterError(
                f"IA3 feedforward entries {', '.join(map(repr, stray))} are not among the "
                "targets; feedforward must be a subset of targets"
            )
    saved_names = modules_to_save_names(model, config)
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
    add_saved_copies(model, saved_names, name)
    register_adapter(model, name, config, trainable)


def tensor_homes(model: nn.Module, name: str) -> dict[str, tuple[nn.Module, str]]:
    return {
        f"{PREFIX}{module_name}.ia3_l": (layer.adapters[name], "weight")
        for module_name, layer in ia3_layers(model)
        if name in layer.adapters
    }


def peft_config(model: nn.Module, name: str, config: IA3Config, *, base_path: str | None) -> dict:
    layers = [(n, layer) for n, layer in ia3_layers(model) if name in layer.adapters]
    targets = [n for n, _ in layers]
    ff = [n for n, layer in layers if layer.feedforward]
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    probe = IA3Config(leaves, [], config.exclude, config.modules_to_save)
    exact = find_targets_or_none(model, probe, "IA3") == targets
    ff_leaves = sorted({t.rsplit(".", 1)[-1] for t in ff})
    ff_exact = exact and [t for t in targets if any(t.endswith(f) for f in ff_leaves)] == ff
    return {
        **common_peft_keys(base_path),
        "peft_type": "IA3",
        "exclude_modules": config.exclude if exact else None,
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "feedforward_modules": ff_leaves if ff_exact else ff,
        "init_ia3_weights": True,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "target_modules": leaves if exact else targets,
    }


def config_from_peft(raw: dict, *, source: str, model: Any = None, folder: Any = None):
    check_causal_lm(raw, source)
    warn_unknown_keys(raw, KNOWN_KEYS, source)
    if raw.get("target_modules") is None:
        raise AdapterError("target_modules is missing; cannot tell which modules")
    return IA3Config(
        targets=raw["target_modules"],
        feedforward=raw.get("feedforward_modules") or [],
        exclude=raw.get("exclude_modules"),
        modules_to_save=raw.get("modules_to_save"),
    )
