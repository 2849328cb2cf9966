"""tunesmith: fine-tune large language models on the hardware you have."""

__version__ = "0.1.0"

from tunesmith.adapters import (  # noqa: E402
    LoRAConfig,
    active_adapters,
    adapter_names,
    add_lora,
    delete_adapter,
    disabled,
    load_adapter,
    merge,
    merge_and_unload,
    route,
    save_adapter,
    set_active,
    trainable_parameters,
    unmerge,
)
from tunesmith.errors import AdapterError, TunesmithError  # noqa: E402

__all__ = [
    "AdapterError",
    "LoRAConfig",
    "TunesmithError",
    "__version__",
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
