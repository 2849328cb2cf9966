"""The LoRA family: LoRA, rsLoRA, DoRA and PiSSA init (method `lora`), and QLoRA (method
`qlora`: LoRA on a base quantized to 4 or 8 bits while loading).

This module is the schema (importable without torch); `layer.py` holds the layers and
`impl.py` attaches them and reads and writes PEFT's format."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import Field

from tunesmith.errors import AdapterError
from tunesmith.methods.schema import field_name, method_config, settings
from tunesmith.registry import Method, register_method

Rank = Annotated[int, Field(gt=0, strict=True)]


@method_config
class LoRAConfig:
    """How to add one LoRA adapter to a model (the YAML `method:` section of method lora).
    PEFT's names are noted where they differ."""

    name: Literal["lora"] = field_name("lora")
    r: Rank = 16
    """Rank of the update B·A. PEFT: `r`."""
    alpha: float = Field(32.0, gt=0)
    """Scale numerator: s = alpha / r, or alpha / sqrt(r) with use_rslora (PEFT:
    `lora_alpha`)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter branch's input during training (PEFT: `lora_dropout`)."""
    targets: str | list[str] = "all-linear"
    """Modules to adapt: "all-linear" (every Linear/Conv1D but the output head), a list of
    module-name suffixes (["q_proj", "v_proj"]) or a regex that matches the whole module name
    (PEFT: `target_modules`)."""
    exclude: str | list[str] | None = None
    """Modules never to adapt: suffixes or a regex, as for targets (PEFT: `exclude_modules`)."""
    layers: list[int] | None = None
    """Only adapt modules inside these layer indices (PEFT: `layers_to_transform`)."""
    layers_pattern: str | list[str] | None = None
    """Name of the layer list ("layers", "h") used to find the layer index; default: the first
    numbered segment of the module name (PEFT: `layers_pattern`)."""
    rank_pattern: dict[str, Rank] = Field(default_factory=dict)
    """Per-module ranks: {regex matching the end of a module name: r}."""
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    """Per-module alphas: {regex matching the end of a module name: alpha}."""
    use_rslora: bool = False
    """Rank-stabilised scaling s = alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): a trainable magnitude per output row."""
    init: Literal["default", "gaussian", "pissa"] = "default"
    """A/B initialisation: "default" (Kaiming-uniform A, zero B), "gaussian" (normal A with
    std 1/r, zero B) or "pissa" (top-r singular vectors of W; W keeps the residual)."""
    bias: str = "none"
    """Which biases train. Only "none" is supported: biases stay frozen."""
    modules_to_save: list[str] | None = None
    """Modules trained in full as a copy saved with the adapter, e.g. ["lm_head"]."""

    def __post_init__(self) -> None:
        if self.bias != "none":
            raise AdapterError(
                f'bias={self.bias!r} is not supported: only "none" (biases stay frozen); '
                "use modules_to_save to train a whole module instead"
            )
        if isinstance(self.targets, list) and not self.targets:
            raise AdapterError('targets is empty; name modules such as ["q_proj", "v_proj"]')

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        r = self.rank_for(module_name)
        return self.alpha_for(module_name) / (math.sqrt(r) if self.use_rslora else r)


@method_config
class QLoRAConfig(LoRAConfig):
    """LoRA on a frozen base quantized to 4 or 8 bits while loading (bitsandbytes)."""

    name: Literal["qlora"] = field_name("qlora")
    quant: Literal["nf4", "fp4", "int8"] = "nf4"
    """Base weight format: nf4 / fp4 (4-bit blockwise) or int8 (LLM.int8)."""
    double_quant: bool = True
    """4-bit: quantize the block constants too (about 4.127 bits per weight instead of 4.5)."""
    blocksize: Literal[64, 128, 256, 512, 1024, 2048, 4096] = 64
    """4-bit: weights per quantization block."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype of activations, norms, embeddings and the output head. "auto": model.dtype (bf16
    on a GPU that supports it, fp32 on CPU). Nothing is upcast to fp32 on a GPU."""

    def lora(self) -> LoRAConfig:
        """The adapter this run trains: the LoRA part of the settings."""
        names = set(LoRAConfig.__dataclass_fields__) - {"name"}
        return LoRAConfig(**{k: v for k, v in settings(self).items() if k in names})


def _pattern_value(patterns: dict, module_name: str, default: Any) -> Any:
    # PEFT's rule: the key is a regex that must match a trailing part of the module name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _lora_rows(run: Any) -> list[tuple[str, Any]]:
    shared = _shared(run)
    return [("lora", LoRAConfig(**shared)), ("dora", LoRAConfig(**{**shared, "use_dora": True}))]


def _qlora_rows(run: Any) -> list[tuple[str, Any]]:
    return [("qlora", QLoRAConfig(**_shared(run)))]


def _shared(run: Any) -> dict:
    """The run's LoRA settings (rank, targets...) when it trains LoRA, for the planner's LoRA
    rows; DoRA off (it has its own row)."""
    if not isinstance(run, LoRAConfig):
        return {}
    names = set(LoRAConfig.__dataclass_fields__) - {"name"}
    return {**{k: v for k, v in settings(run).items() if k in names}, "use_dora": False}


def _label(base: str) -> Any:
    def label(config: LoRAConfig) -> str:
        return ("dora" if base == "lora" else "qlora+dora") if config.use_dora else base

    return label


LORA = register_method(
    Method(
        name="lora",
        config=LoRAConfig,
        summary="LoRA: W + s·B·A with small trainable A and B; the base stays frozen.",
        default_lr=2e-4,
        implementation="tunesmith.methods.lora.impl",
        peft_types=("LORA",),
        low_rank=True,
        plan_rows=_lora_rows,
        label=_label("lora"),
        suggest_in_plan=True,
    )
)
QLORA = register_method(
    Method(
        name="qlora",
        config=QLoRAConfig,
        summary="QLoRA: LoRA on a frozen base quantized to 4 or 8 bits (bitsandbytes).",
        default_lr=2e-4,
        implementation="tunesmith.methods.lora.qlora",
        quantized_base=True,
        low_rank=True,
        plan_rows=_qlora_rows,
        label=_label("qlora"),
        suggest_in_plan=True,
    )
)
