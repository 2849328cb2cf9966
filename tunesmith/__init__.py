"""tunesmith: fine-tune large language models on the hardware you have.

The adapter API (`add_lora`, `save_adapter`, ...) is imported on first use, so the command
line starts without loading torch for verbs that do not need it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tunesmith.errors import AdapterError, TunesmithError

__version__ = "0.1.0"

_ADAPTER_API = (
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
)
_COMBINE_API = ("combine_adapters", "merge_checkpoint", "merge_models")
_DEPLOY_API = {
    "quantize_checkpoint": "tunesmith.quantize.run",
    "export_gguf": "tunesmith.export.gguf",
    "export_lora_gguf": "tunesmith.export.gguf",
}
__all__ = [
    "AdapterError", "TunesmithError", "__version__", *_ADAPTER_API, *_COMBINE_API, *_DEPLOY_API,
]  # fmt: skip

if TYPE_CHECKING:
    from tunesmith.adapters import *  # noqa: F403
    from tunesmith.combine import combine_adapters, merge_checkpoint, merge_models  # noqa: F401
    from tunesmith.export.gguf import export_gguf, export_lora_gguf  # noqa: F401
    from tunesmith.quantize.run import quantize_checkpoint  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _ADAPTER_API or name == "adapters":
        adapters = importlib.import_module("tunesmith.adapters")
        return adapters if name == "adapters" else getattr(adapters, name)
    if name in _COMBINE_API:
        return getattr(importlib.import_module("tunesmith.combine"), name)
    if name in _DEPLOY_API:
        return getattr(importlib.import_module(_DEPLOY_API[name]), name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
