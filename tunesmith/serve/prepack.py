"""oneDNN weight prepacking for serving bf16 weights on a CPU.

On a CPU, `F.linear` with bf16 weights runs oneDNN's matmul and reorders the weight into
oneDNN's blocked layout at every call; at decode batch sizes that reorder is a third of the
time. `prepack` does it once per `nn.Linear` (the base's layers, inside adapter wrappers too,
and the output head) and the layer then calls the same matmul on the packed copy: the outputs
are bit for bit the unpacked layer's (the tests hold it to that), 1.2-1.3x the decode
tokens/s of the 140M Llama on this machine (`python bench/serve_compile.py`). The plain
weight stays beside the packed copy (DoRA, merging and adapter loading read it): the linear
weights take twice their memory. fp32 is left alone: there the packed matmul is a different
kernel (other rounding, slower at one row)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose forward multiplies by its weight's oneDNN-packed copy. A weight
    changed since packing (loaded into, replaced) is packed again at the next call; with
    gradients wanted the plain `F.linear` runs (the packed matmul has no backward); a deep copy
    (`modules_to_save` copies a module per adapter) is a plain `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
            return F.linear(x, weight, self.bias)
        if self._packed_of != (weight.data_ptr(), weight._version):
            _pack(self)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def __deepcopy__(self, memo):
        plain = nn.Linear.__new__(nn.Linear)
        memo[id(self)] = plain
        for key, value in self.__dict__.items():
            if key not in ("_packed", "_packed_of"):
                plain.__dict__[key] = copy.deepcopy(value, memo)
        return plain


def _pack(module: nn.Linear, rows_hint: int = 16) -> None:
    weight = module.weight
    with torch.no_grad():
        module._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
    module._packed_of = (weight.data_ptr(), weight._version)


def can_prepack(model: nn.Module) -> bool:
    """Whether `prepack` changes anything: bf16 linear weights on a CPU with oneDNN."""
    return torch.backends.mkldnn.is_available() and any(_packable(m) for m in model.modules())


def _packable(module: nn.Module) -> bool:
    if type(module) is not nn.Linear:  # not quantized layers, not already packed
        return False
    weight = module.weight
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2


def prepack(model: nn.Module, rows_hint: int = 16) -> int:
    """Pack every bf16 `nn.Linear` of `model` (on a CPU); returns how many. `rows_hint`: the
    batch the layout is tuned for (any batch works)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    packed = 0
    for module in list(model.modules()):
        if _packable(module):
            _pack(module, rows_hint)
            module.__class__ = PackedLinear
            packed += 1
    return packed


def unpack(model: nn.Module) -> int:
    """Undo `prepack` (the plain weights are there); returns how many layers."""
    count = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            del module._packed, module._packed_of
            module.__class__ = nn.Linear
            count += 1
    return count
