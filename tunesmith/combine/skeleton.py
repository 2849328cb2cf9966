"""A model's structure without its weights, with adapters loaded for real.

`model_skeleton` builds the model on the meta device (no memory); `attach_adapters` loads
adapters onto it through the normal `load_adapter` path (so every check of names, targets and
shapes runs) and then gives the adapters' own tensors real CPU storage. The streaming merge
fills in base weights one module at a time; `tunesmith combine` uses the skeleton as it is,
since LoRA factors do not need the base weights."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from tunesmith.adapters.activation import set_active
from tunesmith.adapters.peft_format import (
    find_adapter_folder,
    load_adapter,
    read_adapter_weights,
    tensor_homes,
)
from tunesmith.adapters.state import adapter_state
from tunesmith.errors import TunesmithError
from tunesmith.models import read_model_config
from tunesmith.registry import method_of


def base_config(base: str, trust_remote_code: bool = False, revision: str | None = None):
    """The base checkpoint's transformers config; a pre-quantized checkpoint is refused."""

    config = read_model_config(base, "--base", revision, trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise TunesmithError(
            f"--base: {base} is already quantized (quantization_config in config.json); merge "
            "onto the 16-bit checkpoint it was made from (for a QLoRA adapter, tunesmith "
            "reproduces the 4-bit rounding itself: --quantized-base)"
        )
    return config


def model_skeleton(config, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of `config` with every parameter on the meta device (buffers real)."""

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    return model


def adapter_name(i: int) -> str:
    return f"adapter{i}"


def attach_adapters(model: nn.Module, folders: list[str], allow_pickle: bool = False) -> list[str]:
    """Load each adapter folder onto the skeleton (as adapter0, adapter1, …), all active, with
    their tensors in fp32 on the CPU. Returns the names."""
    names = []
    for i, folder in enumerate(folders):
        name = adapter_name(i)
        try:
            load_adapter(model, folder, name=name, allow_pickle=allow_pickle)
        except TunesmithError as err:
            message = str(err)
            if str(folder) not in message:
                message = f"--adapter {folder}: {message}"
            raise type(err)(message) from None
        tensors = read_adapter_weights(find_adapter_folder(folder, name), allow_pickle)
        _materialize(model, name, tensors)
        names.append(name)
    set_active(model, names)
    return names


@torch.no_grad()
def _materialize(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Give adapter `name` on a meta skeleton its real tensors (load_adapter checked that every
    key has a home of the right shape)."""
    for key, (owner, attr) in tensor_homes(model, name).items():
        if key not in tensors:
            raise TunesmithError(f"adapter {name}: tensor {key} is missing from the adapter file")
        setattr(owner, attr, nn.Parameter(tensors[key].float().contiguous(), requires_grad=False))
    config = adapter_state(model).configs[name]
    materialize = method_of(config).hook("materialize")
    if materialize is not None:
        materialize(model, name, config)


def checkpoint_key(model: nn.Module, reader, module_name: str, attr: str) -> str | None:
    """The key of `module_name.attr` in a checkpoint (which may lack the base-model prefix,
    e.g. GPT-2's `transformer.`), or None."""
    key = f"{module_name}.{attr}"
    if key in reader:
        return key
    prefix = getattr(model, "base_model_prefix", "") + "."
    if key.startswith(prefix) and key[len(prefix) :] in reader:
        return key[len(prefix) :]
    return None
