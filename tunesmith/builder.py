"""The run builder: the one place that turns a run's settings into a model ready to train,
trace or evaluate. `tunesmith train` (`train/loop.py`), `plan` (on fake or meta tensors),
`eval`, `generate` and `chat` all build their models here, so the planner traces exactly the
model `train` runs and every command loads a base the same way.

    device = resolve_device(config.model.device)
    compute, weights = run_dtypes(config, device)
    model = build_model(config.method, model=config.model, train=config.train, device=device,
                        compute_dtype=compute, tokenizer=tokenizer)

What differs between methods is asked of the method (`tunesmith.registry`): how its base is
loaded (QLoRA quantizes while loading), whether it trains an adapter or the model's own
weights (full fine-tuning: fp32 master weights, saved as a whole checkpoint), and how it
attaches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tunesmith.adapters import add_adapter, load_adapter, save_adapter, set_active
from tunesmith.config import ModelSection
from tunesmith.errors import TunesmithError
from tunesmith.models import (
    enable_checkpointing,
    load_model,
    load_tokenizer,
    random_model,
    resolve_device,
    resolve_dtype,
)
from tunesmith.paths import plain_name
from tunesmith.provenance import resolve_base
from tunesmith.registry import Method, method_of


class RunDtypes(NamedTuple):
    compute: torch.dtype
    """Activations (and autocast)."""
    weights: torch.dtype
    """What the model's weights are stored in: fp32 for full fine-tuning with fp32 master
    weights, the compute dtype otherwise (adapters keep their own fp32 weights)."""


def compute_dtype(method_config: Any, model: ModelSection, device: str) -> torch.dtype:
    """A run's compute dtype: the one the method fixes (its `compute_dtype` hook: QLoRA's
    setting) when it does, else `model.dtype`."""
    fixed = method_of(method_config).hook("compute_dtype")
    setting = fixed(method_config) if fixed is not None else "auto"
    return resolve_dtype(model.dtype if setting == "auto" else setting, device)


def run_dtypes(config: Any, device: str) -> RunDtypes:
    """The compute and weight dtypes of a run config on `device`."""
    compute = compute_dtype(config.method, config.model, device)
    return RunDtypes(compute, weights_dtype(config.method, config.train, compute))


def master_weights(method_config: Any, fp32_master_weights: bool) -> bool:
    """Whether the run keeps fp32 master copies of its trained weights and autocasts: full
    fine-tuning with `train.fp32_master_weights` (adapters keep their own fp32 weights)."""
    return not method_of(method_config).trains_adapter and fp32_master_weights


def weights_dtype(method_config: Any, train: Any, compute: torch.dtype) -> torch.dtype:
    return torch.float32 if master_weights(method_config, train.fp32_master_weights) else compute


def load_base(method_config: Any, model: ModelSection, device: str, dtype: torch.dtype):
    """The base model the method trains on, from `model.path` (QLoRA: quantized while
    loading)."""
    load = method_of(method_config).hook("load_base")
    if load is None:
        return load_model(model, device, dtype)
    base = None
    if model.init == "random":  # random weights of the real shape, for the method to prepare
        attention = None if model.attn_implementation == "auto" else model.attn_implementation
        base = random_model(model, device, dtype, attention)
    return load(method_config, model, device, dtype, base=base)


def build_model(
    method_config: Any,
    *,
    train: Any,
    compute_dtype: torch.dtype,
    device: str = "cpu",
    model: ModelSection | None = None,
    model_config: Any = None,
    attention: str | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    attach: bool = True,
    training: bool = True,
    prepare_base: Any = None,
) -> nn.Module:
    """The model a run trains: its base loaded from `model` (a checkpoint), or built from
    `model_config` under whatever tensor mode or device is current (the planner's fake and meta
    tensors; `attention` names the attention implementation then), with weights in the run's
    dtype; the method attached (`seed` seeds its initialisation); and, when `training`, gradient
    checkpointing as `train` says, no KV cache, and train mode. `prepare_base(model)` runs on
    the base before the method attaches (a reward model's score head)."""
    method = method_of(method_config)
    weights = weights_dtype(method_config, train, compute_dtype)
    if model_config is None:
        built = load_base(method_config, model, device, weights)
    else:
        config = type(model_config).from_dict(model_config.to_dict())
        if attention is not None:
            config._attn_implementation = attention
        built = AutoModelForCausalLM.from_config(config, dtype=weights)
        trace_base = method.hook("trace_base")
        if trace_base is not None:
            trace_base(built, method_config, compute_dtype)
    if prepare_base is not None:
        prepare_base(built)
    if attach and method.trains_adapter:
        if seed is not None:
            torch.manual_seed(seed)
        add_adapter(built, method_config, tokenizer=tokenizer)
    if not training:
        return built.eval()
    prepare = method.hook("prepare_training")
    if prepare is not None and attach:
        prepare(built, method_config, train)
    if train.gradient_checkpointing:
        enable_checkpointing(built)
    built.config.use_cache = False
    return built.train()


# --- what a run saves ------------------------------------------------------------------------
def output_name(method: Method) -> str:
    """The folder a finished run writes its result to: "adapter", or "model" (full)."""
    return "adapter" if method.trains_adapter else "model"


def save_trained(model: nn.Module, method: Method, folder: str | os.PathLike) -> None:
    """What the run trained: the adapter in PEFT's format, or the whole model."""
    save = method.hook("save")
    if save is not None:
        save(model, Path(folder))
    else:
        save_adapter(model, folder)


def load_trained(model: nn.Module, method: Method, folder: Path, device: str) -> None:
    """Restore what `save_trained` wrote into the model (resume): an adapter is hot-swapped
    in place."""
    load = method.hook("load_weights")
    if load is not None:
        load(model, folder, device)
    else:
        load_adapter(model, folder, name="default")


# --- inference: generate, chat, eval ---------------------------------------------------------
def load_for_inference(
    model_path: str | None,
    adapters: list[str],
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    names: list[str | None] | None = None,
):
    """(model, tokenizer, adapter names): the base with each adapter loaded (named by
    `names[i]`, else by its folder) and the first active, in eval mode. The tokenizer comes
    from the first adapter folder when it holds one (training saves it there), else from the
    model."""
    model_path = resolve_base(
        model_path, adapters, "--model: give the base model (the adapter does not name one)"
    )
    section = ModelSection(
        path=model_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    device_name = resolve_device(section.device)
    model = load_model(section, device_name, resolve_dtype(section.dtype, device_name))
    model.eval()
    given = list(names or [])
    names = []
    for i, folder in enumerate(adapters):
        name = given[i] if i < len(given) and given[i] else None
        if name is None:
            name = plain_name(Path(folder).name) or f"adapter{i}"
            if name in names or name == "default":
                name = f"adapter{i}"
        elif name in names:
            raise TunesmithError(f"--adapter: two adapters are named {name!r}; name them apart")
        load_adapter(model, folder, name=name)
        names.append(name)
    if names:
        set_active(model, names[0])
    tokenizer_source = model_path
    if adapters and (Path(adapters[0]) / "tokenizer_config.json").is_file():
        tokenizer_source = adapters[0]
    tokenizer = load_tokenizer(
        ModelSection(
            path=model_path, tokenizer=tokenizer_source, trust_remote_code=trust_remote_code
        )
    )
    return model, tokenizer, names
