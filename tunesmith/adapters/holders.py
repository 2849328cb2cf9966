"""Modules that hold per-adapter weights, whatever the method.

Every holder is an `AdapterHolder`: `adapters` (a ModuleDict by adapter name), `active` (the
names applied), `disabled` (base only) and `routes` (per-row adapters, see `route`). The
generic functions in `tunesmith.adapters` (activation, disabling, routing, deletion) work on
holders alone, so they work the same for every method. `LinearWrapper` is the holder that
wraps a Linear/Conv1D (LoRA, IA3): it can merge into the weight it wraps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tunesmith.errors import AdapterError
from tunesmith.quantized.bnb import dequantized_weight, is_quantized, set_quantized_weight


@dataclass
class RowRoutes:
    """Per-row adapter choice for one forward pass: `groups` pairs an adapter name with the
    indices of the rows that use it (a row may appear under several names: stacking)."""

    batch_size: int
    groups: list[tuple[str, torch.Tensor]]


class AdapterHolder(nn.Module):
    """A module holding per-adapter weights (see the module docstring)."""

    routable = True
    """Whether rows of one batch may use different adapters of this holder (`route`)."""
    on_output = False
    """Attached to a sub-layer and applied to its output (bottleneck adapters), rather than
    wrapping a module; the planner counts the layer's work before it as frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.routes: RowRoutes | None = None

    def per_adapter(self) -> nn.ModuleDict:
        """The ModuleDict of per-adapter modules."""
        return self.adapters

    def detach_from(self, model: nn.Module, module_name: str) -> None:
        """Take this holder out of `model` once it holds no adapter."""
        raise NotImplementedError

    def saved_bytes_per_token(self, element_bytes: int) -> float:
        """For the planner: bytes per token its adapters keep for the backward pass."""
        return 0.0


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear, Conv1D (stored in × out) or a wrapper of one."""
    if isinstance(module, LinearWrapper):
        module = module.base_layer
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    raise AdapterError(
        f"adapters support nn.Linear and Conv1D modules, not {type(module).__name__}"
    )


class LinearWrapper(AdapterHolder):
    """A Linear/Conv1D (`base_layer`, possibly quantized) with per-adapter weights. Mutable
    state, all set by the functions in `tunesmith.adapters`: `active` (names applied),
    `merged` (names folded into the base weight), `disabled` (base only) and `routes` (per-row
    adapters)."""

    method_label = "adapter"
    """The method's name in messages ("LoRA", "IA3")."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        out_features, in_features = weight_shape(base_layer)
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = in_features, out_features
        self.merged: tuple[str, ...] = ()

    def detach_from(self, model: nn.Module, module_name: str) -> None:
        model.set_submodule(module_name, self.base_layer)

    def saved_bytes_beside_input(self, element_bytes: int) -> tuple[float, bool]:
        """For the planner: (bytes per token the adapters keep besides the layer's input,
        whether they need the input kept)."""
        return 0.0, False

    @property
    def quantized(self) -> bool:
        return is_quantized(self.base_layer)

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in): a view for plain layers (writes reach the module), the
        dequantized fp32 weight for quantized ones (write with `set_base_weight`)."""
        if self.quantized:
            return dequantized_weight(self.base_layer)
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    @torch.no_grad()
    def set_base_weight(self, value: torch.Tensor) -> None:
        """Write `value` (out, in) into the base weight (re-quantizing a quantized layer)."""
        if self.quantized:
            set_quantized_weight(self.base_layer, value)
            return
        weight = self.base_weight()
        weight.copy_(value.to(weight.dtype))

    def _plain_linear(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype) -> nn.Linear:
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight.to(dtype))
            if bias is not None:
                linear.bias.copy_(bias.to(dtype))
        return linear
