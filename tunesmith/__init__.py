"""tunesmith: fine-tune large language models on the hardware you have.

The adapter API (`add_lora`, `save_adapter`, ...) is imported on first use, so the command
line starts without loading torch for verbs that do not need it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tunesmith.errors import AdapterError, TunesmithError

__version__ = "0.1.0"

_API = {
    **dict.fromkeys(
        (
            "BottleneckConfig",
            "FullConfig",
            "IA3Config",
            "LoRAConfig",
            "PrefixTuningConfig",
            "PromptTuningConfig",
            "QLoRAConfig",
        ),
        "tunesmith.methods",
    ),
    "add_lora": "tunesmith.methods.lora.impl",
    "add_ia3": "tunesmith.methods.ia3.impl",
    "add_prompt_tuning": "tunesmith.methods.prompt.impl",
    "add_prefix_tuning": "tunesmith.methods.prompt.impl",
    "add_bottleneck": "tunesmith.methods.bottleneck.impl",
    **dict.fromkeys(
        (
            "active_adapters",
            "adapter_names",
            "add_adapter",
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
        ),
        "tunesmith.adapters",
    ),
    **dict.fromkeys(("Method", "register_method", "method_named"), "tunesmith.registry"),
    **dict.fromkeys(
        (
            "DPOConfig",
            "KTOConfig",
            "ORPOConfig",
            "Objective",
            "RewardConfig",
            "SFTConfig",
            "SimPOConfig",
            "register_objective",
        ),
        "tunesmith.objectives",
    ),
    "RewardModel": "tunesmith.judge.score",
    **dict.fromkeys(("combine_adapters", "merge_checkpoint", "merge_models"), "tunesmith.combine"),
    "quantize_checkpoint": "tunesmith.quantize.pipeline",
    "export_gguf": "tunesmith.export.gguf",
    "export_lora_gguf": "tunesmith.export.gguf",
    "export_onnx": "tunesmith.export.onnx",
    "train_job": "tunesmith.jobs",
}
"""Each public name and the module it comes from, imported on first use."""
__all__ = ["AdapterError", "TunesmithError", "__version__", *_API]

if TYPE_CHECKING:
    from tunesmith.adapters import *  # noqa: F403
    from tunesmith.combine import combine_adapters, merge_checkpoint, merge_models  # noqa: F401
    from tunesmith.export.gguf import export_gguf, export_lora_gguf  # noqa: F401
    from tunesmith.export.onnx import export_onnx  # noqa: F401
    from tunesmith.jobs import train_job  # noqa: F401
    from tunesmith.judge.score import RewardModel  # noqa: F401
    from tunesmith.methods import *  # noqa: F403
    from tunesmith.methods.bottleneck.impl import add_bottleneck  # noqa: F401
    from tunesmith.methods.ia3.impl import add_ia3  # noqa: F401
    from tunesmith.methods.lora.impl import add_lora  # noqa: F401
    from tunesmith.methods.prompt.impl import add_prefix_tuning, add_prompt_tuning  # noqa: F401
    from tunesmith.objectives import *  # noqa: F403
    from tunesmith.quantize.pipeline import quantize_checkpoint  # noqa: F401
    from tunesmith.registry import Method, method_named, register_method  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
