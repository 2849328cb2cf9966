"""Bottleneck adapters (method `bottleneck`; Houlsby et al. 2019, Pfeiffer et al. 2021): small
residual MLPs after the attention and/or MLP sub-layers. No PEFT equivalent: saved in
tunesmith's format (peft_type "BOTTLENECK", docs/bottleneck-format.md).

This module is the schema (importable without torch); `layer.py` holds the adapters and their
hooks, `impl.py` attaches them and reads and writes the format."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tunesmith.errors import AdapterError
from tunesmith.methods.schema import field_name, method_config
from tunesmith.registry import Method, register_method


@method_config
class BottleneckConfig:
    """How to add one bottleneck adapter."""

    name: Literal["bottleneck"] = field_name("bottleneck")
    style: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    """"houlsby": adapters after attention and after the MLP; "pfeiffer": after the MLP only."""
    reduction_factor: Annotated[int, Field(gt=0, strict=True)] = 16
    """Bottleneck width = hidden size / reduction_factor."""
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """Activation between the down- and up-projection."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input during training."""
    targets: list[str] | None = None
    """Sub-layers to adapt: full module names, or names relative to a numbered layer ("mlp",
    "self_attn"); default: each layer's MLP, and for Houlsby also its attention."""
    layers: list[int] | None = None
    """Only adapt these layer indices."""

    def __post_init__(self) -> None:
        if self.targets is not None and not self.targets:
            raise AdapterError('targets is empty; name sub-layers such as ["mlp"]')

    def width(self, hidden: int) -> int:
        width = hidden // self.reduction_factor
        if width < 1:
            raise AdapterError(
                f"reduction_factor {self.reduction_factor} leaves no bottleneck for hidden size "
                f"{hidden}; use reduction_factor <= {hidden}"
            )
        return width


BOTTLENECK = register_method(
    Method(
        name="bottleneck",
        config=BottleneckConfig,
        summary="Bottleneck adapters: small residual MLPs after the attention and/or MLP "
        "sub-layers.",
        default_lr=1e-3,
        implementation="tunesmith.methods.bottleneck.impl",
        peft_types=("BOTTLENECK",),
        merge_refusal="its nonlinearity sits between two projections",
    )
)
