"""Registers the built-in objectives, in this order (that of `tunesmith config schema` and of
error messages listing them)."""

import importlib

for _name in ("sft", "dpo", "simpo", "orpo", "kto", "reward", "distill", "grpo"):
    importlib.import_module(f"tunesmith.objectives.{_name}")
