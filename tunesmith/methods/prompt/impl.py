"""Prompt and prefix tuning on a model: attaching the virtual tokens, and PEFT's format.

Saved keys: `prompt_embeddings`: (n × hidden) for prompt tuning; for prefix tuning
(n × layers·2·kv_heads·head_dim), per token the keys and values of layer 0, then layer 1, …
A prefix trained through an MLP is saved as the MLP's output (PEFT's rule), plus tunesmith's
`prefix_projection.safetensors` with the MLP itself so that training can resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from tunesmith.adapters.activation import register_adapter
from tunesmith.adapters.peft_format import (
    check_causal_lm,
    common_peft_keys,
    copy_tensors,
    warn_unknown_keys,
)
from tunesmith.adapters.state import add_adapter
from tunesmith.adapters.targets import hidden_size
from tunesmith.errors import AdapterError, first_line
from tunesmith.io import atomic_write_safetensors
from tunesmith.methods.prompt import PrefixTuningConfig, PromptTuningConfig
from tunesmith.methods.prompt.layer import add_prompt_adapter, kv_shape, virtual_tokens

PROMPT_KEY = "prompt_embeddings"
PROJECTION_NAME = "prefix_projection.safetensors"
PROMPT_INIT_TO_PEFT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
_PROMPT_LEARNING_KEYS = {
    "auto_mapping",
    "base_model_name_or_path",
    "inference_mode",
    "revision",
    "task_type",
    "peft_type",
    "peft_version",
    "modules_to_save",
    "num_attention_heads",
    "num_layers",
    "num_transformer_submodules",
    "num_virtual_tokens",
    "token_dim",
}
KNOWN_KEYS = {
    "PROMPT_TUNING": _PROMPT_LEARNING_KEYS
    | {
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_kwargs",
        "tokenizer_name_or_path",
    },
    "PREFIX_TUNING": _PROMPT_LEARNING_KEYS
    | {
        "encoder_hidden_size",
        "init_weights",
        "prefix_projection",
    },
}


def add_prompt_tuning(
    model: nn.Module,
    config: PromptTuningConfig | PrefixTuningConfig | None = None,
    name: str = "default",
    trainable: bool = True,
    tokenizer=None,
) -> nn.Module:
    """Add a prompt-tuning (or, given a PrefixTuningConfig, prefix-tuning) adapter `name`.
    `tokenizer` is needed for init "text". Becomes the one active adapter."""
    return add_adapter(model, config or PromptTuningConfig(), name, trainable, tokenizer=tokenizer)


def add_prefix_tuning(
    model: nn.Module,
    config: PrefixTuningConfig | None = None,
    name: str = "default",
    trainable: bool = True,
    tokenizer=None,
) -> nn.Module:
    """Add a prefix-tuning adapter `name` (key/value prefixes in every attention layer)."""
    return add_prompt_tuning(model, config or PrefixTuningConfig(), name, trainable, tokenizer)


def attach(model: nn.Module, config: Any, *, name: str, trainable: bool, tokenizer: Any = None):
    add_prompt_adapter(model, config, name, tokenizer)
    register_adapter(model, name, config, trainable)


def _adapter(model: nn.Module, name: str):
    holder = virtual_tokens(model)
    return holder.adapters[name] if holder is not None and name in holder.adapters else None


def tensor_homes(model: nn.Module, name: str) -> dict[str, tuple[nn.Module, str]]:
    """The prompt or prefix itself, unless it is computed by an MLP (then it has no home: see
    `saved_tensors`)."""
    adapter = _adapter(model, name)
    if adapter is not None and getattr(adapter, "transform", None) is None:
        return {PROMPT_KEY: (adapter, "embedding")}
    return {}


def saved_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {PROMPT_KEY: _adapter(model, name).saved_tensor()}


def _projection(model: nn.Module, name: str) -> dict[str, torch.Tensor] | None:
    adapter = _adapter(model, name)
    if adapter is None or getattr(adapter, "transform", None) is None:
        return None
    return {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}


def write_extra(model: nn.Module, name: str, folder: Path) -> None:
    """The prefix MLP, so that training can resume (PEFT saves only its output)."""
    projection = _projection(model, name)
    if projection is not None:
        atomic_write_safetensors(projection, folder / PROJECTION_NAME)
    else:
        (folder / PROJECTION_NAME).unlink(missing_ok=True)


def creation_config(config: Any) -> Any:
    """The config to build an adapter whose weights are about to be loaded: initialisation that
    needs a tokenizer or model passes is skipped."""
    if config.init != "random":
        return dataclasses.replace(config, init="random", init_text=None)
    return config


@torch.no_grad()
def load_tensors(
    model: nn.Module,
    name: str,
    tensors: dict[str, torch.Tensor],
    *,
    source: Path,
    config: Any,
    hot_swap: bool,
    folder: Path,
) -> None:
    if _projection(model, name) is not None:
        tensors = {k: v for k, v in tensors.items() if k != PROMPT_KEY}
        _copy_projection(model, name, folder / PROJECTION_NAME)
    copy_tensors(model, name, tensors, source=source, config=config)


def _copy_projection(model: nn.Module, name: str, path: Path) -> None:
    adapter = _adapter(model, name)
    try:
        tensors = load_file(str(path))
        adapter.load_state_dict(
            {k: v.to(adapter.embedding.device) for k, v in tensors.items()}, strict=True
        )
    except (RuntimeError, OSError) as err:
        raise AdapterError(f"{path}: does not fit the prefix MLP ({first_line(err)})") from None


def hot_swap_structure(config: Any) -> tuple:
    """The settings that shape the modules beyond the tensors' shapes (a hot swap keeps them)."""
    return (config.num_virtual_tokens, getattr(config, "projection", False))


# --- adapter_config.json ---------------------------------------------------------------------
def peft_config(model: nn.Module, name: str, config: Any, *, base_path: str | None) -> dict:
    common = common_peft_keys(base_path)
    if isinstance(config, PrefixTuningConfig):
        shape = kv_shape(model)
        return {
            **common,
            "peft_type": "PREFIX_TUNING",
            "encoder_hidden_size": config.encoder_hidden_size or hidden_size(model),
            "init_weights": None,
            "modules_to_save": None,
            "num_attention_heads": shape.heads,
            "num_layers": shape.layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": config.num_virtual_tokens,
            "prefix_projection": config.projection,
            "token_dim": shape.heads * shape.head_dim,
        }
    text = model.config.get_text_config(decoder=True)
    init = PROMPT_INIT_TO_PEFT[config.init]
    tokenizer_path = base_path if init == "TEXT" else None
    if init == "TEXT" and not base_path:
        init = "RANDOM"  # PEFT insists on a tokenizer path for TEXT; the weights are saved
    return {
        **common,
        "peft_type": "PROMPT_TUNING",
        "modules_to_save": None,
        "num_attention_heads": text.num_attention_heads,
        "num_layers": text.num_hidden_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": config.num_virtual_tokens,
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": config.init_text if init == "TEXT" else None,
        "token_dim": hidden_size(model),
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": tokenizer_path,
    }


def config_from_peft(raw: dict, *, source: str, model: nn.Module, folder: Path | None = None):
    peft_type = raw["peft_type"]
    check_causal_lm(raw, source)
    warn_unknown_keys(raw, KNOWN_KEYS[peft_type], source)
    if raw.get("num_transformer_submodules", 1) != 1:
        raise AdapterError("num_transformer_submodules must be 1 (a decoder-only model)")
    if peft_type == "PROMPT_TUNING":
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
    shape = kv_shape(model)
    found = (raw.get("num_layers"), raw.get("token_dim"))
    if found != (shape.layers, shape.heads * shape.head_dim):
        raise AdapterError(
            f"the prefix is for {found[0]} layers × {found[1]} key/value dims but "
            f"{type(model).__name__} has {shape.layers} × {shape.heads * shape.head_dim}; "
            "the adapter was made for another base model"
        )
    has_projection = folder is not None and (Path(folder) / PROJECTION_NAME).is_file()
    projection = bool(raw.get("prefix_projection")) and has_projection
    return PrefixTuningConfig(
        raw["num_virtual_tokens"],
        projection=projection,
        encoder_hidden_size=raw.get("encoder_hidden_size") if projection else None,
        init="random",
    )
