"""Save and load adapters in PEFT's on-disk format, byte-compatible with PEFT 0.21.

A folder holds `adapter_config.json` and `adapter_model.safetensors`. Keys by method:
- LoRA: `base_model.model.<module>.lora_A.weight` (r × in), `….lora_B.weight` (out × r),
  `….lora_magnitude_vector` (DoRA, out);
- IA3: `base_model.model.<module>.ia3_l`, (out × 1), or (1 × in) for feed-forward modules;
- prompt tuning: `prompt_embeddings` (n × hidden);
- prefix tuning: `prompt_embeddings` (n × layers·2·kv_heads·head_dim), per token the keys and
  values of layer 0, then layer 1, …; a prefix trained through an MLP is saved as the MLP's
  output (PEFT's rule), plus tunesmith's `prefix_projection.safetensors` with the MLP itself so
  that training can resume;
- bottleneck adapters (no PEFT equivalent; tunesmith's format, peft_type "BOTTLENECK", see
  docs/bottleneck-format.md): `base_model.model.<sub-layer>.bottleneck_down.weight`
  (width × hidden), `….bottleneck_down.bias`, `….bottleneck_up.weight` (hidden × width),
  `….bottleneck_up.bias`;
- `modules_to_save` copies: `base_model.model.<module>.<param>`.
The adapter named "default" lives in the folder itself, any other in `<dir>/<name>/` (PEFT's
layout).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from tunesmith.adapters.bottleneck import BottleneckConfig, bottleneck_holders, hidden_size
from tunesmith.adapters.ia3 import IA3Config
from tunesmith.adapters.inject import (
    adapter_state,
    add_adapter,
    delete_adapter,
    find_targets,
    ia3_layers,
    linear_wrappers,
    lora_layers,
    method_of,
    saved_modules,
)
from tunesmith.adapters.lora import LoRAConfig
from tunesmith.adapters.prompt import (
    PrefixTuningConfig,
    PromptTuningConfig,
    kv_shape,
    virtual_tokens,
)
from tunesmith.errors import AdapterError, TunesmithError, first_line
from tunesmith.io import atomic_write_json, atomic_write_safetensors
from tunesmith.paths import check_name, inside
from tunesmith.provenance import RECORD_NAME as BASE_RECORD_NAME
from tunesmith.provenance import base_record
from tunesmith.shards import read_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PROJECTION_NAME = "prefix_projection.safetensors"
PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"
BOTTLENECK_FORMAT = "tunesmith-bottleneck"
BOTTLENECK_FORMAT_VERSION = 1
PEFT_TYPES = {
    "LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix",
    "BOTTLENECK": "bottleneck",
}  # fmt: skip
PROMPT_INIT_TO_PEFT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}

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
        raise AdapterError(f"{source}: peft_type is {peft_type!r}, not a LORA adapter")
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
def tensor_homes(model: nn.Module, name: str) -> dict[str, tuple[nn.Module, str]]:
    """Where each saved tensor of adapter `name` lives: {saved key: (module, attribute)}. A
    prefix trained through an MLP has no home for its flattened prefix (see `adapter_tensors`)."""
    homes: dict[str, tuple[nn.Module, str]] = {}
    for module_name, layer in lora_layers(model):
        if name in layer.adapters:
            adapter, key = layer.adapters[name], PREFIX + module_name
            homes[f"{key}.lora_A.weight"] = (adapter, "lora_A")
            homes[f"{key}.lora_B.weight"] = (adapter, "lora_B")
            if adapter.use_dora:
                homes[f"{key}.lora_magnitude_vector"] = (adapter, "lora_magnitude_vector")
    for module_name, layer in ia3_layers(model):
        if name in layer.adapters:
            homes[f"{PREFIX}{module_name}.ia3_l"] = (layer.adapters[name], "weight")
    for module_name, holder in bottleneck_holders(model):
        if name in holder.adapters:
            adapter, key = holder.adapters[name], PREFIX + module_name
            for part in ("down", "up"):
                for attr in ("weight", "bias"):
                    homes[f"{key}.bottleneck_{part}.{attr}"] = (getattr(adapter, part), attr)
    adapter = _virtual_adapter(model, name)
    if adapter is not None and getattr(adapter, "transform", None) is None:
        homes[PROMPT_KEY] = (adapter, "embedding")
    for module_name, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            copy = wrapper.modules_to_save[name]
            for param_name, _ in list(copy.named_parameters()) + list(copy.named_buffers()):
                owner_name, _, attr = param_name.rpartition(".")
                owner = copy.get_submodule(owner_name) if owner_name else copy
                homes[f"{PREFIX}{module_name}.{param_name}"] = (owner, attr)
    return homes


def _virtual_adapter(model: nn.Module, name: str):
    """Prompt/prefix adapter `name` of `model`, or None."""
    holder = virtual_tokens(model)
    return holder.adapters[name] if holder is not None and name in holder.adapters else None


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's saved key names (detached, contiguous)."""
    out = {key: getattr(owner, attr) for key, (owner, attr) in tensor_homes(model, name).items()}
    adapter = _virtual_adapter(model, name)
    if adapter is not None:
        with torch.no_grad():
            out[PROMPT_KEY] = adapter.saved_tensor()
    return {k: v.detach().contiguous() for k, v in out.items()}


def _projection_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor] | None:
    adapter = _virtual_adapter(model, name)
    if adapter is None or getattr(adapter, "transform", None) is None:
        return None
    return {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}


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
        config = config_dict(model, name, base_path)
        # Weights first: a folder whose config exists is complete.
        atomic_write_safetensors(adapter_tensors(model, name), folder / WEIGHTS_NAME)
        projection = _projection_tensors(model, name)
        if projection is not None:
            atomic_write_safetensors(projection, folder / PROJECTION_NAME)
        else:
            (folder / PROJECTION_NAME).unlink(missing_ok=True)
        atomic_write_json(record, folder / BASE_RECORD_NAME)
        atomic_write_json(config, folder / CONFIG_NAME)
        written.append(folder)
    return written


def config_dict(model: nn.Module, name: str, base_path: str | None) -> dict:
    """The `adapter_config.json` contents for adapter `name` (PEFT's keys where PEFT has the
    method)."""
    config = adapter_state(model).configs[name]
    if isinstance(config, LoRAConfig):
        targets = [n for n, layer in lora_layers(model) if name in layer.adapters]
        return config_to_peft(config, targets, model, base_path)
    common = {
        "auto_mapping": None, "base_model_name_or_path": base_path, "inference_mode": True,
        "revision": None, "task_type": "CAUSAL_LM",
    }  # fmt: skip
    if isinstance(config, IA3Config):
        targets = [n for n, layer in ia3_layers(model) if name in layer.adapters]
        ff = [n for n, layer in ia3_layers(model) if name in layer.adapters and layer.feedforward]
        leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
        probe = IA3Config(leaves, [], config.exclude, config.modules_to_save)
        exact = _safe_find(model, probe) == targets
        ff_leaves = sorted({t.rsplit(".", 1)[-1] for t in ff})
        ff_exact = exact and [t for t in targets if any(t.endswith(f) for f in ff_leaves)] == ff
        return {
            **common, "peft_type": "IA3", "exclude_modules": config.exclude if exact else None,
            "fan_in_fan_out": any(
                layer.fan_in_fan_out for n, layer in ia3_layers(model) if n in targets
            ),
            "feedforward_modules": ff_leaves if ff_exact else ff, "init_ia3_weights": True,
            "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
            "target_modules": leaves if exact else targets,
        }  # fmt: skip
    text = model.config.get_text_config(decoder=True) if hasattr(model, "config") else None
    if isinstance(config, PromptTuningConfig):
        init = PROMPT_INIT_TO_PEFT[config.init]
        tokenizer_path = base_path if init == "TEXT" else None
        if init == "TEXT" and not base_path:
            init = "RANDOM"  # PEFT insists on a tokenizer path for TEXT; the weights are saved
        return {
            **common, "peft_type": "PROMPT_TUNING", "modules_to_save": None,
            "num_attention_heads": text.num_attention_heads, "num_layers": text.num_hidden_layers,
            "num_transformer_submodules": 1, "num_virtual_tokens": config.num_virtual_tokens,
            "prompt_tuning_init": init,
            "prompt_tuning_init_text": config.init_text if init == "TEXT" else None,
            "token_dim": hidden_size(model), "tokenizer_kwargs": None,
            "tokenizer_name_or_path": tokenizer_path,
        }  # fmt: skip
    if isinstance(config, PrefixTuningConfig):
        shape = kv_shape(model)
        return {
            **common, "peft_type": "PREFIX_TUNING",
            "encoder_hidden_size": config.encoder_hidden_size or hidden_size(model),
            "init_weights": None, "modules_to_save": None, "num_attention_heads": shape.heads,
            "num_layers": shape.layers, "num_transformer_submodules": 1,
            "num_virtual_tokens": config.num_virtual_tokens,
            "prefix_projection": config.projection, "token_dim": shape.heads * shape.head_dim,
        }  # fmt: skip
    holders = [(n, h) for n, h in bottleneck_holders(model) if name in h.adapters]
    hidden = hidden_size(model)
    return {
        **common, "peft_type": "BOTTLENECK", "format": BOTTLENECK_FORMAT,
        "format_version": BOTTLENECK_FORMAT_VERSION, "style": config.style,
        "reduction_factor": config.reduction_factor, "bottleneck_size": config.width(hidden),
        "hidden_size": hidden, "nonlinearity": config.nonlinearity, "dropout": config.dropout,
        "target_modules": [n for n, _ in holders],
    }  # fmt: skip


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
    prompt-tuning and prefix-tuning formats, and tunesmith's bottleneck format.

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
    projected = (folder / PROJECTION_NAME).is_file()
    config = read_config(raw, str(config_path), model, has_projection=projected)
    tensors = read_adapter_weights(folder, allow_pickle)
    state = adapter_state(model)
    hot_swap = name in state.configs
    if hot_swap:
        _check_hot_swap(model, name, state.configs[name], config, folder)
    else:
        add_adapter(model, _creation_config(config), name, trainable=trainable)
    try:
        projection = _projection_tensors(model, name)
        if projection is not None:
            tensors = {k: v for k, v in tensors.items() if k != PROMPT_KEY}
            _copy_projection(model, name, folder / PROJECTION_NAME)
        _copy_tensors(model, name, tensors, folder / WEIGHTS_NAME, config, resize=hot_swap)
    except AdapterError:
        if not hot_swap:
            delete_adapter(model, name)
        raise
    state.configs[name] = config
    return model


def _creation_config(config):
    """The config to build an adapter whose weights are about to be loaded: initialisation
    that needs a tokenizer or model passes is skipped."""
    if isinstance(config, (PromptTuningConfig, PrefixTuningConfig)) and config.init != "random":
        return dataclasses.replace(config, init="random", init_text=None)
    return config


@torch.no_grad()
def _copy_projection(model: nn.Module, name: str, path: Path) -> None:
    adapter = _virtual_adapter(model, name)
    try:
        tensors = load_file(str(path))
        adapter.load_state_dict(
            {k: v.to(adapter.embedding.device) for k, v in tensors.items()}, strict=True
        )
    except (RuntimeError, OSError) as err:
        raise AdapterError(f"{path}: does not fit the prefix MLP ({first_line(err)})") from None


def read_config(raw: dict, source: str, model: nn.Module, has_projection: bool = False):
    """The adapter config an `adapter_config.json` dict describes, checked against `model`."""
    peft_type = raw.get("peft_type", "LORA")
    method = PEFT_TYPES.get(peft_type)
    if method is None:
        raise AdapterError(
            f"{source}: peft_type {peft_type!r} is not supported; tunesmith loads "
            f"{', '.join(PEFT_TYPES)}"
        )
    if method == "lora":
        return config_from_peft(raw, source)
    task = raw.get("task_type", "CAUSAL_LM")
    if task not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{source}: task_type {task!r}; tunesmith loads CAUSAL_LM adapters")
    known = KNOWN_KEYS[method]
    unknown = sorted(set(raw) - known)
    if unknown:
        warnings.warn(
            f"{source}: ignoring keys unknown to tunesmith: {', '.join(unknown)}", stacklevel=3
        )
    try:
        if method == "ia3":
            if raw.get("target_modules") is None:
                raise AdapterError("target_modules is missing; cannot tell which modules")
            return IA3Config(
                targets=raw["target_modules"], feedforward=raw.get("feedforward_modules") or [],
                exclude=raw.get("exclude_modules"), modules_to_save=raw.get("modules_to_save"),
            )  # fmt: skip
        if raw.get("num_transformer_submodules", 1) != 1:
            raise AdapterError("num_transformer_submodules must be 1 (a decoder-only model)")
        if method == "prompt":
            if raw.get("token_dim") not in (None, hidden_size(model)):
                raise AdapterError(
                    f"token_dim is {raw['token_dim']} but {type(model).__name__} has hidden size "
                    f"{hidden_size(model)}; the adapter was made for another base model"
                )
            init = {v: k for k, v in PROMPT_INIT_TO_PEFT.items()}.get(
                raw.get("prompt_tuning_init"), "random"
            )
            text = raw.get("prompt_tuning_init_text")
            return PromptTuningConfig(
                raw["num_virtual_tokens"], init if init != "text" or text else "random", text
            )
        if method == "prefix":
            shape = kv_shape(model)
            found = (raw.get("num_layers"), raw.get("token_dim"))
            if found != (shape.layers, shape.heads * shape.head_dim):
                raise AdapterError(
                    f"the prefix is for {found[0]} layers × {found[1]} key/value dims but "
                    f"{type(model).__name__} has {shape.layers} × {shape.heads * shape.head_dim}; "
                    "the adapter was made for another base model"
                )
            projection = bool(raw.get("prefix_projection")) and has_projection
            return PrefixTuningConfig(
                raw["num_virtual_tokens"], projection=projection,
                encoder_hidden_size=raw.get("encoder_hidden_size") if projection else None,
                init="random",
            )  # fmt: skip
        return _bottleneck_config(raw, model)
    except KeyError as err:
        raise AdapterError(f"{source}: {err.args[0]} is missing") from None
    except AdapterError as err:
        raise AdapterError(f"{source}: {err}") from None


def _bottleneck_config(raw: dict, model: nn.Module) -> BottleneckConfig:
    if raw.get("format") != BOTTLENECK_FORMAT:
        raise AdapterError(f"format must be {BOTTLENECK_FORMAT!r}, got {raw.get('format')!r}")
    version = raw.get("format_version")
    if version != BOTTLENECK_FORMAT_VERSION:
        raise AdapterError(
            f"format_version {version!r} is not supported (this tunesmith reads version "
            f"{BOTTLENECK_FORMAT_VERSION}); upgrade tunesmith"
        )
    config = BottleneckConfig(
        style=raw["style"], reduction_factor=raw["reduction_factor"],
        nonlinearity=raw["nonlinearity"], dropout=raw.get("dropout", 0.0),
        targets=raw["target_modules"],
    )  # fmt: skip
    hidden = hidden_size(model)
    if raw.get("hidden_size", hidden) != hidden or raw.get("bottleneck_size") not in (
        None, config.width(hidden),
    ):  # fmt: skip
        raise AdapterError(
            f"the adapter is for hidden size {raw.get('hidden_size')} (bottleneck "
            f"{raw.get('bottleneck_size')}) but {type(model).__name__} has hidden size {hidden}; "
            "the adapter was made for another base model"
        )
    return config


_COMMON_KEYS = {
    "auto_mapping", "base_model_name_or_path", "inference_mode", "revision", "task_type",
    "peft_type", "peft_version", "modules_to_save",
}  # fmt: skip
_PROMPT_LEARNING_KEYS = _COMMON_KEYS | {
    "num_attention_heads", "num_layers", "num_transformer_submodules", "num_virtual_tokens",
    "token_dim",
}  # fmt: skip
KNOWN_KEYS = {
    "ia3": _COMMON_KEYS | {
        "exclude_modules", "fan_in_fan_out", "feedforward_modules", "init_ia3_weights",
        "target_modules",
    },
    "prompt": _PROMPT_LEARNING_KEYS | {
        "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_kwargs",
        "tokenizer_name_or_path",
    },
    "prefix": _PROMPT_LEARNING_KEYS | {"encoder_hidden_size", "init_weights", "prefix_projection"},
    "bottleneck": _COMMON_KEYS | {
        "format", "format_version", "style", "reduction_factor", "bottleneck_size",
        "hidden_size", "nonlinearity", "dropout", "target_modules",
    },
}  # fmt: skip


@torch.no_grad()
def _copy_tensors(
    model: nn.Module,
    name: str,
    tensors: dict[str, torch.Tensor],
    source: Path,
    config,
    resize: bool,
) -> None:
    """Copy adapter tensors into the model's adapter `name`. Every tensor must have a home and
    fit it; with `resize` (hot swap) a different LoRA rank replaces the parameter instead."""
    expected = tensor_homes(model, name)
    layers = {n: layer for n, layer in lora_layers(model) if name in layer.adapters}
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        where = f"targets {len(layers)} modules" if layers else f"is {method_of(config)}"
        raise AdapterError(
            f"{source}: tensor {unexpected[0]} has no matching module in "
            f"{type(model).__name__} (adapter {name!r} {where}); "
            "the adapter was made for a different model or target set"
        )
    missing = [k for k in expected if k not in tensors]
    lora_missing = [k for k in missing if ".lora_" in k]
    if lora_missing and not resize:
        raise AdapterError(f"{source}: tensor {lora_missing[0]} is missing from the adapter file")
    if missing and not isinstance(config, LoRAConfig):
        raise AdapterError(f"{source}: tensor {missing[0]} is missing from the adapter file")

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


def _check_hot_swap(model: nn.Module, name: str, old, new, folder: Path) -> None:
    if type(old) is not type(new):
        raise AdapterError(
            f"cannot hot-swap {folder} into adapter {name!r}: it is a {method_of(new)} adapter "
            f"and {name!r} is {method_of(old)}; delete_adapter(model, {name!r}) first"
        )
    for module_name, layer in linear_wrappers(model):
        if name in layer.merged:
            raise AdapterError(
                f"adapter {name!r} is merged into {module_name}; unmerge(model) before hot-swapping"
            )
    if not isinstance(new, LoRAConfig):
        if _structure(old) != _structure(new):
            raise AdapterError(
                f"cannot hot-swap {folder} into adapter {name!r}: its settings differ from the "
                f"loaded one's; delete_adapter(model, {name!r}) first"
            )
        return
    for field_name in ("use_dora", "init"):
        a, b = getattr(old, field_name), getattr(new, field_name)
        if a != b and (field_name == "use_dora" or "pissa" in (a, b)):
            raise AdapterError(
                f"cannot hot-swap {folder} into adapter {name!r}: {field_name} differs "
                f"({b!r} in the file, {a!r} loaded); delete_adapter(model, {name!r}) first"
            )


def _structure(config) -> tuple:
    """The settings that shape an adapter's modules beyond its tensors' shapes."""
    if isinstance(config, (PromptTuningConfig, PrefixTuningConfig)):
        return (config.num_virtual_tokens, getattr(config, "projection", False))
    if isinstance(config, BottleneckConfig):
        return (config.nonlinearity, config.reduction_factor)
    return ()


def _same_except_rank(attr: str, new: torch.Size, old: torch.Size) -> bool:
    if len(new) != 2 or len(old) != 2:
        return False
    return new[1] == old[1] if attr == "lora_A" else new[0] == old[0]
