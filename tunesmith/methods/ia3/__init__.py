"""IA3 (method `ia3`): learned scaling vectors on keys, values and the MLP's intermediate
activation, as PEFT implements them. This module is the schema (importable without torch);
`layer.py` holds `IA3Layer`, `impl.py` attaches it and reads and writes PEFT's format."""

from __future__ import annotations

from typing import Any, Literal

from tunesmith.errors import AdapterError
from tunesmith.methods.schema import field_name, method_config
from tunesmith.registry import Method, register_method

# PEFT's defaults per architecture: (targets, feed-forward targets).
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


@method_config
class IA3Config:
    """How to add one IA3 adapter. `targets`/`feedforward` default to PEFT's choice for the
    architecture (Llama: k_proj, v_proj and down_proj, down_proj being feed-forward)."""

    name: Literal["ia3"] = field_name("ia3")
    targets: str | list[str] | None = None
    """Modules to scale: name suffixes or a regex matching the whole name (PEFT:
    `target_modules`)."""
    feedforward: str | list[str] | None = None
    """Which of the targets scale their input rather than their output; must be a subset of
    the targets (PEFT: `feedforward_modules`)."""
    exclude: str | list[str] | None = None
    """Modules never to adapt (PEFT: `exclude_modules`)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full as a copy per adapter."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, list) and not self.targets:
            raise AdapterError('targets is empty; name modules such as ["k_proj", "v_proj"]')

    def resolved(self, model: Any) -> IA3Config:
        """This config with architecture defaults filled in."""
        if self.targets is not None:
            feedforward = self.feedforward or []
            return IA3Config(self.targets, feedforward, self.exclude, self.modules_to_save)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise AdapterError(
                f"IA3 has no default targets for model type {model_type!r} (known: "
                f"{', '.join(DEFAULT_TARGETS)}); set targets and feedforward"
            )
        targets, feedforward = DEFAULT_TARGETS[model_type]
        return IA3Config(list(targets), list(feedforward), self.exclude, self.modules_to_save)


IA3 = register_method(
    Method(
        name="ia3",
        config=IA3Config,
        summary="IA3: learned scaling vectors on keys, values and the MLP's intermediate.",
        default_lr=3e-3,
        implementation="tunesmith.methods.ia3.impl",
        peft_types=("IA3",),
    )
)
