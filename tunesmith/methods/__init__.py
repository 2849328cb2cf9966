"""The built-in training methods, one folder each: `full`, `lora` (LoRA, rsLoRA, DoRA, PiSSA;
and QLoRA), `ia3`, `prompt` (prompt and prefix tuning) and `bottleneck`.

Each folder's `__init__` is the method's schema and its `tunesmith.registry.Method` (importable
without torch); `layer.py` and `impl.py` do the work on a model and are imported when a model
is touched. Importing this package registers the built-ins, in the order below (the order of
`tunesmith config schema`, of the planner's table and of error messages listing methods)."""

import importlib

for _name in ("full", "lora", "prompt", "bottleneck", "ia3"):
    importlib.import_module(f"tunesmith.methods.{_name}")

from tunesmith.methods.bottleneck import BottleneckConfig  # noqa: E402
from tunesmith.methods.full import FullConfig  # noqa: E402
from tunesmith.methods.ia3 import IA3Config  # noqa: E402
from tunesmith.methods.lora import LoRAConfig, QLoRAConfig  # noqa: E402
from tunesmith.methods.prompt import PrefixTuningConfig, PromptTuningConfig  # noqa: E402

__all__ = [
    "BottleneckConfig",
    "FullConfig",
    "IA3Config",
    "LoRAConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QLoRAConfig",
]
