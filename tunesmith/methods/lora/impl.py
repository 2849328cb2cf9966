"""LoRA on a model: attaching `LoRALayer`s, and PEFT's format both ways.

Saved keys: `base_model.model.<module>.lora_A.weight` (r × in), `….lora_B.weight` (out × r),
`….lora_magnitude_vector` (DoRA, out); `adapter_config.json` carries exactly the keys PEFT 0.21
writes (`PEFT_LORA_DEFAULTS`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.adapters.activation import register_adapter
from tunesmith.adapters.holders import weight_shape
from tunesmith.adapters.peft_format import PREFIX, copy_tensors, warn_unknown_keys
from tunesmith.adapters.state import add_adapter, modules_of
from tunesmith.adapters.targets import (
    add_saved_copies,
    check_wrapper_kind,
    find_targets,
    find_targets_or_none,
    modules_to_save_names,
)
from tunesmith.errors import AdapterError
from tunesmith.methods.lora import LoRAConfig
from tunesmith.methods.lora.arithmetic import combine  # noqa: F401  (the `combine` hook)
from tunesmith.methods.lora.fused import SHARED_INPUT_GROUPS, SharedInputGroup
from tunesmith.methods.lora.layer import LoRAAdapter, LoRALayer, init_adapter_weights


def add_lora(
    model: nn.Module, config: LoRAConfig | None = None, name: str = "default", trainable=True
) -> nn.Module:
    """Inject a LoRA adapter called `name` into `model` (mutated in place and returned).

    Targets are replaced by `LoRALayer`s, `config.modules_to_save` by `ModulesToSave` copies.
    Every base parameter is frozen; the new adapter's parameters train if `trainable`. The new
    adapter becomes the one active adapter (use `set_active` to stack several).
    """
    return add_adapter(model, config or LoRAConfig(), name, trainable)


def lora_layers(model: nn.Module):
    """(name, LoRALayer) for every LoRA-wrapped module of `model`."""
    return modules_of(model, LoRALayer)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    # Half-precision bases get fp32 adapter weights (master weights, as PEFT does); the forward
    # casts them to the activation dtype so activations stay in the compute dtype.
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def attach(
    model: nn.Module, config: LoRAConfig, *, name: str, trainable: bool, tokenizer: Any = None
) -> None:
    """Replace the targets by `LoRALayer`s (and `modules_to_save` by copies) holding adapter
    `name`; everything is validated before the model changes."""
    targets = find_targets(model, config, "LoRA")
    check_wrapper_kind(model, targets, LoRALayer)
    _check_ranks(model, config, targets)
    saved_names = modules_to_save_names(model, config)
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
            dtype=adapter_dtype(weight.dtype),
        )
        layer.adapters[name] = adapter.train(layer.training)
        init_adapter_weights(layer, adapter, config.init, module_name)
    add_saved_copies(model, saved_names, name)
    register_adapter(model, name, config, trainable)


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


def tensor_homes(model: nn.Module, name: str) -> dict[str, tuple[nn.Module, str]]:
    homes: dict[str, tuple[nn.Module, str]] = {}
    for module_name, layer in lora_layers(model):
        if name in layer.adapters:
            adapter, key = layer.adapters[name], PREFIX + module_name
            homes[f"{key}.lora_A.weight"] = (adapter, "lora_A")
            homes[f"{key}.lora_B.weight"] = (adapter, "lora_B")
            if adapter.use_dora:
                homes[f"{key}.lora_magnitude_vector"] = (adapter, "lora_magnitude_vector")
    return homes


# --- PEFT's adapter_config.json ---------------------------------------------------------------
# Every key PEFT 0.21 writes for a LoRA adapter, with PEFT's default. What we write is this set.
PEFT_LORA_DEFAULTS: dict[str, object] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": "CAUSAL_LM",
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
# PEFT features tunesmith does not implement: loading refuses them unless they are at default.
UNSUPPORTED_UNLESS_DEFAULT = (
    "alora_invocation_tokens",
    "arrow_config",
    "layer_replication",
    "lora_bias",
    "megatron_config",
    "target_parameters",
    "trainable_token_indices",
    "use_bdlora",
    "use_qalora",
)
# Keys PEFT writes that carry nothing tunesmith needs (bookkeeping, or settings whose effect
# is already in the saved weights).
IGNORED_KEYS = {
    "auto_mapping",
    "base_model_name_or_path",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "fan_in_fan_out",
    "inference_mode",
    "kasa_config",
    "loftq_config",
    "lora_ga_config",
    "megatron_core",
    "monteclora_config",
    "peft_version",
    "qalora_group_size",
    "revision",
    "task_type",
    "velora_config",
}


def peft_config(model: nn.Module, name: str, config: LoRAConfig, *, base_path: str | None) -> dict:
    """The `adapter_config.json` PEFT would write for this adapter. `target_modules` is written
    as module-name suffixes when they select exactly the adapted modules again, else as full
    names."""
    targets = [n for n, layer in lora_layers(model) if name in layer.adapters]
    out = dict(PEFT_LORA_DEFAULTS)
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    probe = LoRAConfig(
        r=config.r,
        targets=leaves,
        exclude=config.exclude,
        layers=config.layers,
        layers_pattern=config.layers_pattern,
        modules_to_save=config.modules_to_save,
    )
    if find_targets_or_none(model, probe, "LoRA") == targets:
        out.update(
            target_modules=leaves,
            exclude_modules=config.exclude,
            layers_to_transform=config.layers,
            layers_pattern=config.layers_pattern,
        )
    else:
        out["target_modules"] = list(targets)
    out.update(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        init_lora_weights=True if config.init == "default" else config.init,
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        fan_in_fan_out=any(layer.fan_in_fan_out for n, layer in lora_layers(model) if n in targets),
        base_model_name_or_path=base_path,
    )
    return out


def config_from_peft(raw: dict, *, source: str, model: Any = None, folder: Any = None):
    """A LoRAConfig from an `adapter_config.json` dict. Unknown keys are ignored with a warning;
    PEFT features tunesmith lacks are refused when they are switched on."""
    for key in UNSUPPORTED_UNLESS_DEFAULT:
        if key in raw and raw[key] not in (PEFT_LORA_DEFAULTS[key], None, [], {}):
            raise AdapterError(
                f"{source}: {key}={raw[key]!r} is a PEFT feature tunesmith does not support"
            )
    warn_unknown_keys(raw, set(PEFT_LORA_DEFAULTS) | IGNORED_KEYS, source)
    if raw.get("target_modules") is None:
        raise AdapterError(f"{source}: target_modules is missing; cannot tell which modules")
    init = raw.get("init_lora_weights", True)
    if init in (True, False):  # False = random B (a PEFT testing mode); weights get loaded
        init = "default"
    if init not in ("default", "gaussian", "pissa"):
        raise AdapterError(
            f"{source}: init_lora_weights={init!r} is not supported "
            "(tunesmith knows default, gaussian and pissa)"
        )
    layers = raw.get("layers_to_transform")
    return LoRAConfig(
        r=raw.get("r", PEFT_LORA_DEFAULTS["r"]),
        alpha=raw.get("lora_alpha", PEFT_LORA_DEFAULTS["lora_alpha"]),
        dropout=raw.get("lora_dropout") or 0.0,
        targets=raw["target_modules"],
        exclude=raw.get("exclude_modules"),
        layers=[layers] if isinstance(layers, int) else layers,
        layers_pattern=raw.get("layers_pattern"),
        rank_pattern=raw.get("rank_pattern") or {},
        alpha_pattern=raw.get("alpha_pattern") or {},
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        init=init,
        bias=raw.get("bias", "none"),
        modules_to_save=raw.get("modules_to_save"),
    )


# --- loading weights, hot swap ----------------------------------------------------------------
@torch.no_grad()
def load_tensors(
    model: nn.Module,
    name: str,
    tensors: dict[str, torch.Tensor],
    *,
    source: Path,
    config: LoRAConfig,
    hot_swap: bool,
    folder: Path | None = None,
) -> None:
    """Copy the tensors in. A hot swap may change ranks (the parameters are replaced) and may
    skip modules (those then contribute nothing: B = 0)."""

    def may_resize(key: str, new: torch.Size, old: torch.Size) -> bool:
        if not hot_swap or len(new) != 2 or len(old) != 2:
            return False
        if key.endswith(".lora_A.weight"):
            return new[1] == old[1]
        return key.endswith(".lora_B.weight") and new[0] == old[0]

    missing = copy_tensors(
        model,
        name,
        tensors,
        source=source,
        config=config,
        may_miss=lambda key: hot_swap or ".lora_" not in key,
        may_resize=may_resize,
    )
    homes = tensor_homes(model, name)
    for key in missing:
        owner, attr = homes[key]
        if attr == "lora_B":
            getattr(owner, attr).zero_()
    for module_name, layer in lora_layers(model):
        if name in layer.adapters:
            layer.adapters[name].scaling.fill_(config.scaling_for(module_name))


def materialize(model: nn.Module, name: str, config: LoRAConfig) -> None:
    """On a meta-device skeleton whose adapter tensors were given real storage: the scaling
    buffers too."""
    for module_name, layer in lora_layers(model):
        if name in layer.adapters:
            layer.adapters[name].scaling = torch.tensor(float(config.scaling_for(module_name)))


def check_hot_swap(model: nn.Module, name: str, old: LoRAConfig, new: LoRAConfig, folder) -> None:
    for field_name in ("use_dora", "init"):
        a, b = getattr(old, field_name), getattr(new, field_name)
        if a != b and (field_name == "use_dora" or "pissa" in (a, b)):
            raise AdapterError(
                f"cannot hot-swap {folder} into adapter {name!r}: {field_name} differs "
                f"({b!r} in the file, {a!r} loaded); delete_adapter(model, {name!r}) first"
            )


def prepare_training(model: nn.Module, config: LoRAConfig, train: Any) -> None:
    """`train.fused_lora`: every LoRA layer takes the fused training step, sibling projections
    that read one input (`SHARED_INPUT_GROUPS`) in one pass."""
    if getattr(train, "fused_lora", False):
        fuse_lora_layers(model)


def fuse_lora_layers(model: nn.Module) -> int:
    """Turn on `FusedLoRA` for every LoRA layer of `model` and group the sibling projections of
    `SHARED_INPUT_GROUPS` under each parent module; returns the number of groups of more than
    one layer."""
    by_parent: dict[str, dict[str, LoRALayer]] = {}
    for name, module in lora_layers(model):
        module.fused = True
        module.group = None
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = module
    groups = 0
    for siblings in by_parent.values():
        for names in SHARED_INPUT_GROUPS:
            members = [siblings[n] for n in names if n in siblings]
            if len(members) > 1 and len({m.in_features for m in members}) == 1:
                group = SharedInputGroup(members)
                for member in members:
                    member.group = group
                groups += 1
    return groups
