"""Save and load LoRA adapters in PEFT's on-disk format, byte-compatible with PEFT 0.21.

A folder holds `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.<module>.lora_A.weight` (r × in), `….lora_B.weight` (out × r),
`….lora_magnitude_vector` (DoRA, out) and `base_model.model.<module>.<param>` for
`modules_to_save` copies. The adapter named "default" lives in the folder itself, any other in
`<dir>/<name>/` (PEFT's layout).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from tunesmith.adapters.inject import (
    adapter_state,
    add_lora,
    delete_adapter,
    find_targets,
    lora_layers,
    saved_modules,
)
from tunesmith.adapters.lora import LoRAConfig, LoRALayer
from tunesmith.errors import AdapterError
from tunesmith.io import atomic_write_json, atomic_write_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

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
    "auto_mapping", "base_model_name_or_path", "corda_config", "ensure_weight_tying",
    "eva_config", "fan_in_fan_out", "inference_mode", "kasa_config", "loftq_config",
    "lora_ga_config", "megatron_core", "monteclora_config", "peft_version", "qalora_group_size",
    "revision", "task_type", "velora_config",
}  # fmt: skip


# --- config <-> PEFT dict --------------------------------------------------------------------
def config_to_peft(
    config: LoRAConfig, targets: list[str], model: nn.Module, base_model_name_or_path: str | None
) -> dict:
    """The `adapter_config.json` PEFT would write for this adapter. `target_modules` is written
    as module-name suffixes when they select exactly `targets` again, else as full names."""
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
    if _safe_find(model, probe) == targets:
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
        fan_in_fan_out=any(
            layer.fan_in_fan_out for name, layer in lora_layers(model) if name in targets
        ),
        base_model_name_or_path=base_model_name_or_path,
    )
    return out


def _safe_find(model: nn.Module, config: LoRAConfig) -> list[str] | None:
    try:
        return find_targets(model, config)
    except AdapterError:
        return None


def config_from_peft(raw: dict, source: str) -> LoRAConfig:
    """A LoRAConfig from an `adapter_config.json` dict. Unknown keys are ignored with a warning;
    PEFT features tunesmith lacks are refused when they are switched on."""
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(
            f"{source}: peft_type is {peft_type!r}; load_adapter reads LORA adapters"
        )
    for key in UNSUPPORTED_UNLESS_DEFAULT:
        if key in raw and raw[key] not in (PEFT_LORA_DEFAULTS[key], None, [], {}):
            raise AdapterError(
                f"{source}: {key}={raw[key]!r} is a PEFT feature tunesmith does not support"
            )
    unknown = sorted(set(raw) - set(PEFT_LORA_DEFAULTS) - IGNORED_KEYS)
    if unknown:
        warnings.warn(
            f"{source}: ignoring keys unknown to tunesmith: {', '.join(unknown)}", stacklevel=3
        )
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
    try:
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
    except AdapterError as err:
        raise AdapterError(f"{source}: {err}") from None


# --- save ------------------------------------------------------------------------------------
def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's saved key names (detached, contiguous)."""
    out: dict[str, torch.Tensor] = {}
    for module_name, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        key = PREFIX + module_name
        out[f"{key}.lora_A.weight"] = adapter.lora_A
        out[f"{key}.lora_B.weight"] = adapter.lora_B
        if adapter.use_dora:
            out[f"{key}.lora_magnitude_vector"] = adapter.lora_magnitude_vector
    for module_name, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            for param_name, tensor in wrapper.modules_to_save[name].state_dict().items():
                out[f"{PREFIX}{module_name}.{param_name}"] = tensor
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write adapters (default: all) in PEFT's format: "default" into `directory`, any other name
    into `directory/<name>/`. Each file is written to a temp file and renamed, so an interrupted
    save never leaves a corrupt file. Returns the folders written."""
    state = adapter_state(model)
    names = list(state.configs if names is None else names)
    if not names:
        raise AdapterError("the model has no adapters to save; add_lora() or load_adapter() first")
    written = []
    base_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    for name in names:
        if name not in state.configs:
            raise AdapterError(
                f"unknown adapter {name!r}; adapters on this model: {', '.join(state.configs)}"
            )
        folder = Path(directory) if name == "default" else Path(directory) / name
        folder.mkdir(parents=True, exist_ok=True)
        targets = [n for n, layer in lora_layers(model) if name in layer.adapters]
        config = config_to_peft(state.configs[name], targets, model, base_path)
        # Weights first: a folder whose config exists is complete.
        atomic_write_safetensors(adapter_tensors(model, name), folder / WEIGHTS_NAME)
        atomic_write_json(config, folder / CONFIG_NAME)
        written.append(folder)
    return written


# --- load ------------------------------------------------------------------------------------
def find_adapter_folder(directory: str | os.PathLike, name: str) -> Path:
    """The folder holding adapter `name` inside `directory`."""
    path = Path(directory)
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path} does not exist")
    # PEFT's layout: "default" in the folder itself, other names in sub-folders. A folder that
    # holds a single adapter can still be loaded under any name.
    candidates = (path, path / name) if name == "default" else (path / name, path)
    for folder in candidates:
        if (folder / CONFIG_NAME).is_file():
            return folder
    subdirs = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())
    hint = f"; it holds adapters {', '.join(subdirs)} (pass name=...)" if subdirs else ""
    raise AdapterError(f"no {CONFIG_NAME} in {path} or {path / name}{hint}")


def read_adapter_weights(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    safetensors_path = folder / WEIGHTS_NAME
    if safetensors_path.is_file():
        return load_file(str(safetensors_path))
    pickle_path = folder / PICKLE_WEIGHTS_NAME
    if pickle_path.is_file():
        if not allow_pickle:
            raise AdapterError(
                f"{folder} has only {PICKLE_WEIGHTS_NAME}, a pickle file that can run code when "
                f"loaded; convert it to {WEIGHTS_NAME}, or pass allow_pickle=True if you trust it"
            )
        return torch.load(pickle_path, map_location="cpu", weights_only=True)
    raise AdapterError(f"{folder} has no {WEIGHTS_NAME}; the adapter's weights are missing")


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    trainable: bool = False,
    allow_pickle: bool = False,
) -> nn.Module:
    """Load a PEFT-format LoRA adapter from `directory` (or `directory/<name>/`) as `name`.

    A new name is injected and becomes the one active adapter. An existing name is hot-swapped:
    its weights are replaced in place, the module structure is untouched, and parameters keep
    their identity when ranks match (a compiled model need not recompile).
    """
    folder = find_adapter_folder(directory, name)
    config_path = folder / CONFIG_NAME
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_path} is not valid JSON: {err}") from None
    config = config_from_peft(raw, str(config_path))
    tensors = read_adapter_weights(folder, allow_pickle)
    state = adapter_state(model)
    hot_swap = name in state.configs
    if hot_swap:
        _check_hot_swap(model, name, state.configs[name], config, folder)
    else:
        add_lora(model, config, name, trainable=trainable)
    try:
        _copy_tensors(model, name, tensors, folder / WEIGHTS_NAME, config, resize=hot_swap)
    except AdapterError:
        if not hot_swap:
            delete_adapter(model, name)
        raise
    state.configs[name] = config
    return model


@torch.no_grad()
def _copy_tensors(
    model: nn.Module,
    name: str,
    tensors: dict[str, torch.Tensor],
    source: Path,
    config: LoRAConfig,
    resize: bool,
) -> None:
    """Copy adapter tensors into the model's adapter `name`. Every tensor must have a home and
    fit it; with `resize` (hot swap) a different rank replaces the parameter instead."""
    expected: dict[str, tuple[nn.Module, str]] = {}
    layers: dict[str, LoRALayer] = {}
    for module_name, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        layers[module_name] = layer
        adapter = layer.adapters[name]
        key = PREFIX + module_name
        expected[f"{key}.lora_A.weight"] = (adapter, "lora_A")
        expected[f"{key}.lora_B.weight"] = (adapter, "lora_B")
        if adapter.use_dora:
            expected[f"{key}.lora_magnitude_vector"] = (adapter, "lora_magnitude_vector")
    for module_name, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            copy = wrapper.modules_to_save[name]
            for param_name, _ in list(copy.named_parameters()) + list(copy.named_buffers()):
                owner_name, _, attr = param_name.rpartition(".")
                owner = copy.get_submodule(owner_name) if owner_name else copy
                expected[f"{PREFIX}{module_name}.{param_name}"] = (owner, attr)

    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise AdapterError(
            f"{source}: tensor {unexpected[0]} has no matching module in "
            f"{type(model).__name__} (adapter {name!r} targets {len(layers)} modules); "
            "the adapter was made for a different model or target set"
        )
    missing = [k for k in expected if k not in tensors]
    lora_missing = [k for k in missing if ".lora_" in k]
    if lora_missing and not resize:
        raise AdapterError(f"{source}: tensor {lora_missing[0]} is missing from the adapter file")

    # Check every shape before writing anything, so a bad file changes nothing.
    plan = []
    for key, tensor in tensors.items():
        owner, attr = expected[key]
        current = getattr(owner, attr)
        if tuple(tensor.shape) != tuple(current.shape):
            rank_only = (
                resize
                and attr in ("lora_A", "lora_B")
                and _same_except_rank(attr, tensor.shape, current.shape)
            )
            if not rank_only:
                raise AdapterError(
                    f"{source}: tensor {key} has shape {tuple(tensor.shape)} but the model "
                    f"expects {tuple(current.shape)}; the adapter was made for another base "
                    "model or config"
                )
        plan.append((owner, attr, current, tensor))
    for owner, attr, current, tensor in plan:
        if current.shape == tensor.shape:
            current.copy_(tensor.to(current.dtype))
        else:  # hot swap to another rank: same module, new parameter
            setattr(
                owner,
                attr,
                nn.Parameter(
                    tensor.to(current.device, current.dtype), requires_grad=current.requires_grad
                ),
            )
    # A hot swap from a file that skips some modules: those contribute nothing.
    for key in lora_missing:
        owner, attr = expected[key]
        if attr == "lora_B":
            getattr(owner, attr).zero_()
    for module_name, layer in layers.items():
        layer.adapters[name].scaling.fill_(config.scaling_for(module_name))


def _check_hot_swap(
    model: nn.Module, name: str, old: LoRAConfig, new: LoRAConfig, folder: Path
) -> None:
    for field_name in ("use_dora", "init"):
        a, b = getattr(old, field_name), getattr(new, field_name)
        if a != b and (field_name == "use_dora" or "pissa" in (a, b)):
            raise AdapterError(
                f"cannot hot-swap {folder} into adapter {name!r}: {field_name} differs "
                f"({b!r} in the file, {a!r} loaded); delete_adapter(model, {name!r}) first"
            )
    for module_name, layer in lora_layers(model):
        if name in layer.merged:
            raise AdapterError(
                f"adapter {name!r} is merged into {module_name}; unmerge(model) before hot-swapping"
            )


def _same_except_rank(attr: str, new: torch.Size, old: torch.Size) -> bool:
    if len(new) != 2 or len(old) != 2:
        return False
    return new[1] == old[1] if attr == "lora_A" else new[0] == old[0]
