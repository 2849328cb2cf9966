"""Adapters: LoRA family (LoRA, rsLoRA, DoRA), injection and multi-adapter state, PEFT format."""

from tunesmith.adapters.inject import (
    active_adapters,
    adapter_names,
    add_lora,
    delete_adapter,
    disabled,
    merge,
    merge_and_unload,
    route,
    set_active,
    trainable_parameters,
    unmerge,
)
from tunesmith.adapters.lora import LoRAConfig
from tunesmith.adapters.peft_format import load_adapter, save_adapter

__all__ = [
    "LoRAConfig",
    "active_adapters",
    "adapter_names",
    "add_lora",
    "delete_adapter",
    "disabled",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "route",
    "save_adapter",
    "set_active",
    "trainable_parameters",
    "unmerge",
]
