"""Bottleneck adapters on a model: attaching them, and tunesmith's format (peft_type
"BOTTLENECK", docs/bottleneck-format.md): `base_model.model.<sub-layer>.bottleneck_down.weight`
(width × hidden), `….bottleneck_down.bias`, `….bottleneck_up.weight` (hidden × width),
`….bottleneck_up.bias`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tunesmith.adapters.activation import register_adapter
from tunesmith.adapters.peft_format import (
    PREFIX,
    check_causal_lm,
    common_peft_keys,
    warn_unknown_keys,
)
from tunesmith.adapters.state import add_adapter
from tunesmith.adapters.targets import hidden_size
from tunesmith.errors import AdapterError
from tunesmith.methods.bottleneck import BottleneckConfig
from tunesmith.methods.bottleneck.layer import add_bottleneck_adapter, bottleneck_holders

FORMAT = "tunesmith-bottleneck"
FORMAT_VERSION = 1
KNOWN_KEYS = {
    "auto_mapping",
    "base_model_name_or_path",
    "inference_mode",
    "revision",
    "task_type",
    "peft_type",
    "peft_version",
    "modules_to_save",
    "format",
    "format_version",
    "style",
    "reduction_factor",
    "bottleneck_size",
    "hidden_size",
    "nonlinearity",
    "dropout",
    "target_modules",
}


def add_bottleneck(
    model: nn.Module,
    config: BottleneckConfig | None = None,
    name: str = "default",
    trainable: bool = True,
) -> nn.Module:
    """Add a bottleneck adapter `name` (Houlsby or Pfeiffer placement, zero-initialised)."""
    return add_adapter(model, config or BottleneckConfig(), name, trainable)


def attach(model: nn.Module, config: Any, *, name: str, trainable: bool, tokenizer: Any = None):
    add_bottleneck_adapter(model, config, name)
    register_adapter(model, name, config, trainable)


def tensor_homes(model: nn.Module, name: str) -> dict[str, tuple[nn.Module, str]]:
    homes: dict[str, tuple[nn.Module, str]] = {}
    for module_name, holder in bottleneck_holders(model):
        if name in holder.adapters:
            adapter, key = holder.adapters[name], PREFIX + module_name
            for part in ("down", "up"):
                for attr in ("weight", "bias"):
                    homes[f"{key}.bottleneck_{part}.{attr}"] = (getattr(adapter, part), attr)
    return homes


def peft_config(model: nn.Module, name: str, config: Any, *, base_path: str | None) -> dict:
    holders = [(n, h) for n, h in bottleneck_holders(model) if name in h.adapters]
    hidden = hidden_size(model)
    return {
        **common_peft_keys(base_path),
        "peft_type": "BOTTLENECK",
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "style": config.style,
        "reduction_factor": config.reduction_factor,
        "bottleneck_size": config.width(hidden),
        "hidden_size": hidden,
        "nonlinearity": config.nonlinearity,
        "dropout": config.dropout,
        "target_modules": [n for n, _ in holders],
    }


def config_from_peft(raw: dict, *, source: str, model: nn.Module, folder: Path | None = None):
    check_causal_lm(raw, source)
    warn_unknown_keys(raw, KNOWN_KEYS, source)
    if raw.get("num_transformer_submodules", 1) != 1:
        raise AdapterError("num_transformer_submodules must be 1 (a decoder-only model)")
    if raw.get("format") != FORMAT:
        raise AdapterError(f"format must be {FORMAT!r}, got {raw.get('format')!r}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterError(
            f"format_version {version!r} is not supported (this tunesmith reads version "
            f"{FORMAT_VERSION}); upgrade tunesmith"
        )
    config = BottleneckConfig(
        style=raw["style"],
        reduction_factor=raw["reduction_factor"],
        nonlinearity=raw["nonlinearity"],
        dropout=raw.get("dropout", 0.0),
        targets=raw["target_modules"],
    )
    hidden = hidden_size(model)
    if raw.get("hidden_size", hidden) != hidden or raw.get("bottleneck_size") not in (
        None,
        config.width(hidden),
    ):
        raise AdapterError(
            f"the adapter is for hidden size {raw.get('hidden_size')} (bottleneck "
            f"{raw.get('bottleneck_size')}) but {type(model).__name__} has hidden size {hidden}; "
            "the adapter was made for another base model"
        )
    return config


def hot_swap_structure(config: Any) -> tuple:
    """The settings that shape the modules beyond the tensors' shapes (a hot swap keeps them)."""
    return (config.nonlinearity, config.reduction_factor)
