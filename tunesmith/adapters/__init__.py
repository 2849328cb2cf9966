"""Adapters: LoRA (rsLoRA, DoRA, PiSSA init), IA3, prompt tuning, prefix tuning and bottleneck
adapters; injection and multi-adapter state; PEFT-format save/load."""

from tunesmith.adapters.bottleneck import BottleneckConfig
from tunesmith.adapters.ia3 import IA3Config
from tunesmith.adapters.inject import (
    active_adapters,
    adapter_names,
    add_adapter,
    add_bottleneck,
    add_ia3,
    add_lora,
    add_prefix_tuning,
    add_prompt_tuning,
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
from tunesmith.adapters.prompt import PrefixTuningConfig, PromptTuningConfig

__all__ = [
    "BottleneckConfig",
    "IA3Config",
    "LoRAConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "active_adapters",
    "adapter_names",
    "add_adapter",
    "add_bottleneck",
    "add_ia3",
    "add_lora",
    "add_prefix_tuning",
    "add_prompt_tuning",
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
