"""Save and load adapters in PEFT's on-disk format, byte-compatible with PEFT 0.21, for every
method: the method supplies its `adapter_config.json` dict and where each saved tensor lives
(its `MethodImplementation`); this module does the files, the checks and hot swapping.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (keys
`base_model.model.<module>.<tensor>`, as PEFT writes them), plus `tunesmith_base.json` (the
base it was trained on). The adapter named "default" lives in the folder itself, any other in
`<dir>/<name>/` (PEFT's layout). The keys of each method are described in its module.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from tunesmith.adapters.saved import ModulesToSave
from tunesmith.adapters.state import (
    adapter_state,
    add_adapter,
    delete_adapter,
    linear_wrappers,
    modules_of,
)
from tunesmith.errors import AdapterError, TunesmithError
from tunesmith.io import atomic_write_json, atomic_write_safetensors
from tunesmith.paths import check_name, inside
from tunesmith.provenance import RECORD_NAME as BASE_RECORD_NAME
from tunesmith.provenance import base_record
from tunesmith.registry import method_for_peft_type, method_of, peft_types
from tunesmith.shards import read_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
COMMON_PEFT_KEYS = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "inference_mode": True,
    "revision": None,
    "task_type": "CAUSAL_LM",
}
"""Keys every PEFT adapter config has, with what tunesmith writes."""


def common_peft_keys(base_path: str | None) -> dict:
    return {**COMMON_PEFT_KEYS, "base_model_name_or_path": base_path}


def warn_unknown_keys(raw: dict, known: set[str], source: str) -> None:
    """Keys from a newer PEFT are ignored with a warning, never a crash."""
    unknown = sorted(set(raw) - known)
    if unknown:
        warnings.warn(
            f"{source}: ignoring keys unknown to tunesmith: {', '.join(unknown)}", stacklevel=4
        )


def check_causal_lm(raw: dict, source: str) -> None:
    task = raw.get("task_type", "CAUSAL_LM")
    if task not in (None, "CAUSAL_LM", "SEQ_CLS"):
        raise AdapterError(
            f"{source}: task_type {task!r}; tunesmith loads CAUSAL_LM adapters and SEQ_CLS ones "
            "(reward models, with their score head)"
        )


def saved_module_homes(model: nn.Module, name: str) -> dict[str, tuple[nn.Module, str]]:
    """Where the `modules_to_save` copies of adapter `name` keep each saved tensor."""
    homes: dict[str, tuple[nn.Module, str]] = {}
    for module_name, wrapper in modules_of(model, ModulesToSave):
        if name in wrapper.modules_to_save:
            copy = wrapper.modules_to_save[name]
            for param_name, _ in list(copy.named_parameters()) + list(copy.named_buffers()):
                owner_name, _, attr = param_name.rpartition(".")
                owner = copy.get_submodule(owner_name) if owner_name else copy
                homes[f"{PREFIX}{module_name}.{param_name}"] = (owner, attr)
    return homes


def tensor_homes(model: nn.Module, name: str) -> dict[str, tuple[nn.Module, str]]:
    """Where each saved tensor of adapter `name` lives: {saved key: (module, attribute)}."""
    method = method_of(adapter_state(model).configs[name])
    return {**method.impl.tensor_homes(model, name), **saved_module_homes(model, name)}


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's saved key names (detached, contiguous)."""
    method = method_of(adapter_state(model).configs[name])
    own = method.hook("saved_tensors")
    if own is not None:
        with torch.no_grad():
            out = {**own(model, name), **_tensors_at(saved_module_homes(model, name))}
    else:
        out = _tensors_at(tensor_homes(model, name))
    return {k: v.detach().contiguous() for k, v in out.items()}


def _tensors_at(homes: dict[str, tuple[nn.Module, str]]) -> dict[str, torch.Tensor]:
    return {key: getattr(owner, attr) for key, (owner, attr) in homes.items()}


# --- save ------------------------------------------------------------------------------------
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
    record = base_record(base_path)
    base_path = record["path"]  # absolute for a local base: a relative path means nothing elsewhere
    for name in names:
        if name not in state.configs:
            raise AdapterError(
                f"unknown adapter {name!r}; adapters on this model: {', '.join(state.configs)}"
            )
        folder = Path(directory) if name == "default" else adapter_subfolder(directory, name)
        folder.mkdir(parents=True, exist_ok=True)
        method = method_of(state.configs[name])
        config = config_dict(model, name, base_path)
        # Weights first: a folder whose config exists is complete.
        atomic_write_safetensors(adapter_tensors(model, name), folder / WEIGHTS_NAME)
        write_extra = method.hook("write_extra")
        if write_extra is not None:
            write_extra(model, name, folder)
        atomic_write_json(record, folder / BASE_RECORD_NAME)
        atomic_write_json(config, folder / CONFIG_NAME)
        written.append(folder)
    return written


def config_dict(model: nn.Module, name: str, base_path: str | None) -> dict:
    """The `adapter_config.json` contents for adapter `name` (PEFT's keys where PEFT has the
    method)."""
    config = adapter_state(model).configs[name]
    return method_of(config).impl.peft_config(model, name, config, base_path=base_path)


# --- load ------------------------------------------------------------------------------------
def adapter_subfolder(directory: str | os.PathLike, name: str) -> Path:
    """`directory/name` for a named adapter: the name must be plain (`check_name`) and the
    folder must stay inside `directory` (a link may not lead out)."""
    try:
        check_name(name)
        return inside(directory, name, what=f"adapter {name!r}'s folder")
    except TunesmithError as err:
        raise AdapterError(str(err)) from None


def find_adapter_folder(directory: str | os.PathLike, name: str) -> Path:
    """The folder holding adapter `name` inside `directory`."""
    path = Path(directory)
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path} does not exist")
    # PEFT's layout: "default" in the folder itself, other names in sub-folders. A folder that
    # holds a single adapter can still be loaded under any name.
    sub = adapter_subfolder(path, name)
    candidates = (path, sub) if name == "default" else (sub, path)
    for folder in candidates:
        if (folder / CONFIG_NAME).is_file():
            return folder
    subdirs = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())
    hint = f"; it holds adapters {', '.join(subdirs)} (pass name=...)" if subdirs else ""
    raise AdapterError(f"no {CONFIG_NAME} in {path} or {path / name}{hint}")


def read_adapter_weights(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    safetensors_path = folder / WEIGHTS_NAME
    if safetensors_path.is_file():
        read_header(safetensors_path)  # a damaged file is named, not a SafetensorError
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
    """Load an adapter from `directory` (or `directory/<name>/`) as `name`: PEFT's LoRA, IA3,
    prompt-tuning and prefix-tuning formats, tunesmith's bottleneck format, and any registered
    method's.

    A new name is injected and becomes the one active adapter. An existing name is hot-swapped:
    its weights are replaced in place, the module structure is untouched, and parameters keep
    their identity when shapes match (a compiled model need not recompile).
    """
    folder = find_adapter_folder(directory, name)
    config_path = folder / CONFIG_NAME
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{config_path} must hold a JSON object")
    method, config = read_config(raw, str(config_path), model, folder)
    tensors = read_adapter_weights(folder, allow_pickle)
    state = adapter_state(model)
    hot_swap = name in state.configs
    if hot_swap:
        _check_hot_swap(model, name, state.configs[name], config, folder)
    else:
        creation = method.hook("creation_config")
        add_adapter(model, creation(config) if creation else config, name, trainable)
    try:
        load = method.hook("load_tensors") or copy_tensors
        load(
            model,
            name,
            tensors,
            source=folder / WEIGHTS_NAME,
            config=config,
            hot_swap=hot_swap,
            folder=folder,
        )
    except AdapterError:
        if not hot_swap:
            delete_adapter(model, name)
        raise
    state.configs[name] = config
    return model


def read_config(raw: dict, source: str, model: nn.Module, folder: Path | None = None):
    """(method, adapter config) that an `adapter_config.json` dict describes, checked against
    `model`."""
    peft_type = raw.get("peft_type", "LORA")
    method = method_for_peft_type(peft_type)
    if method is None:
        raise AdapterError(
            f"{source}: peft_type {peft_type!r} is not supported; tunesmith loads "
            f"{', '.join(peft_types())}"
        )
    try:
        config = method.impl.config_from_peft(raw, source=source, model=model, folder=folder)
    except KeyError as err:
        raise AdapterError(f"{source}: {err.args[0]} is missing") from None
    except AdapterError as err:
        text = str(err)
        raise AdapterError(text if text.startswith(source) else f"{source}: {text}") from None
    return method, config


@torch.no_grad()
def copy_tensors(
    model: nn.Module,
    name: str,
    tensors: dict[str, torch.Tensor],
    *,
    source: Path,
    config: Any,
    hot_swap: bool = False,
    folder: Path | None = None,
    may_miss: Callable[[str], bool] = lambda key: False,
    may_resize: Callable[[str, torch.Size, torch.Size], bool] = lambda key, new, old: False,
) -> list[str]:
    """Copy adapter tensors into the model's adapter `name`. Every tensor must have a home and
    fit it, and every home must get a tensor unless `may_miss(key)`; a shape may differ only
    where `may_resize` allows (the parameter is then replaced). Checks everything before
    writing anything, so a bad file changes nothing. Returns the keys that were missing."""
    expected = tensor_homes(model, name)
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise AdapterError(
            f"{source}: tensor {unexpected[0]} has no matching module in "
            f"{type(model).__name__} (adapter {name!r} {_what(model, name, config)}); "
            "the adapter was made for a different model or target set"
        )
    missing = [k for k in expected if k not in tensors]
    refused = [k for k in missing if not may_miss(k)]
    if refused:
        raise AdapterError(f"{source}: tensor {refused[0]} is missing from the adapter file")
    plan = []
    for key, tensor in tensors.items():
        owner, attr = expected[key]
        current = getattr(owner, attr)
        if tuple(tensor.shape) != tuple(current.shape):
            if not may_resize(key, tensor.shape, current.shape):
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
    return missing


def _what(model: nn.Module, name: str, config: Any) -> str:
    layers = [n for n, layer in linear_wrappers(model) if name in layer.adapters]
    return f"targets {len(layers)} modules" if layers else f"is {method_of(config).name}"


def _check_hot_swap(model: nn.Module, name: str, old: Any, new: Any, folder: Path) -> None:
    old_method, new_method = method_of(old), method_of(new)
    if old_method.name != new_method.name:
        raise AdapterError(
            f"cannot hot-swap {folder} into adapter {name!r}: it is a {new_method.name} adapter "
            f"and {name!r} is {old_method.name}; delete_adapter(model, {name!r}) first"
        )
    for module_name, layer in linear_wrappers(model):
        if name in layer.merged:
            raise AdapterError(
                f"adapter {name!r} is merged into {module_name}; unmerge(model) before hot-swapping"
            )
    structure = new_method.hook("hot_swap_structure")
    if structure is not None and structure(old) != structure(new):
        raise AdapterError(
            f"cannot hot-swap {folder} into adapter {name!r}: its settings differ from the "
            f"loaded one's; delete_adapter(model, {name!r}) first"
        )
    check = new_method.hook("check_hot_swap")
    if check is not None:
        check(model, name, old, new, folder)
