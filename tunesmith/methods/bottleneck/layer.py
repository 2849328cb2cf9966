"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

A small residual MLP on a sub-layer's output, before the block adds its residual:

    h = sublayer(x);   h' = h + W_up · act(W_down · dropout(h) + b_down) + b_up

Houlsby places one after the attention and one after the MLP of every layer; Pfeiffer only
after the MLP. The bottleneck width is hidden_size / reduction_factor. W_up and b_up start at
zero, so a new adapter changes nothing. The adapter runs on the sub-layer's output, so it cannot
be merged into a weight; it costs two small matmuls per adapted sub-layer at inference.

Nothing is replaced: a `Bottlenecks` module (all adapters of one sub-layer) is attached to the
sub-layer as `tunesmith_bottleneck` and a forward hook applies the active ones, so the model's
own parameter names do not change. Several active adapters add their outputs, each computed
from h (like stacked LoRA adapters).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.adapters.dropout import KeyedDropout
from tunesmith.adapters.holders import AdapterHolder
from tunesmith.adapters.targets import MLP_SUBLAYERS, hidden_size
from tunesmith.errors import AdapterError
from tunesmith.methods.bottleneck import BottleneckConfig

ATTR = "tunesmith_bottleneck"
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = MLP_SUBLAYERS
NONLINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class BottleneckAdapter(nn.Module):
    def __init__(
        self, hidden: int, width: int, nonlinearity: str, dropout: float, device=None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": torch.float32}
        self.down = nn.Linear(hidden, width, **factory)
        self.up = nn.Linear(width, hidden, **factory)
        self.nonlinearity = nonlinearity
        self.dropout = KeyedDropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        z = F.linear(self.dropout(h), self.down.weight.to(dtype), self.down.bias.to(dtype))
        z = NONLINEARITIES[self.nonlinearity](z)
        return F.linear(z, self.up.weight.to(dtype), self.up.bias.to(dtype))


class Bottlenecks(AdapterHolder):
    """The bottleneck adapters of one sub-layer (attached to it as `tunesmith_bottleneck`)."""

    def __init__(self, sublayer: nn.Module, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self._handle = sublayer.register_forward_hook(self._apply)

    on_output = True

    def detach_from(self, model: nn.Module, module_name: str) -> None:
        remove_bottleneck(model, module_name.rsplit(".", 1)[0])

    def saved_bytes_per_token(self, element_bytes: int) -> float:
        """Each adapter keeps its nonlinearity's input (its linears' inputs are counted as the
        sub-layer's output and the bottleneck)."""
        return float(sum(element_bytes * a.down.out_features for a in self.adapters.values()))

    def remove_hook(self) -> None:
        self._handle.remove()

    def _apply(self, module: nn.Module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if self.disabled:
            return None
        if self.routes is not None:
            if h.shape[0] != self.routes.batch_size:
                raise AdapterError(
                    f"route() was given {self.routes.batch_size} rows but the batch has "
                    f"{h.shape[0]}; give one adapter name (or None) per row"
                )
            result = h
            for name, rows in self.routes.groups:
                if name in self.adapters:
                    rows = rows.to(h.device)
                    result = result.index_add(0, rows, self.adapters[name](h.index_select(0, rows)))
        else:
            names = [n for n in self.active if n in self.adapters]
            if not names:
                return None
            result = h
            for name in names:
                result = result + self.adapters[name](h)
        return (result, *output[1:]) if isinstance(output, tuple) else result


def find_sublayers(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Names of the sub-layers `config` adapts, in model order."""
    if config.targets is not None:
        wanted = list(config.targets)
    else:
        wanted = list(MLP_NAMES) + (list(ATTENTION_NAMES) if config.style == "houlsby" else [])
    found = []
    for name, _ in model.named_modules():
        match = re.match(r"(?:.*\.)?(?P<idx>\d+)\.(?P<rest>.+)$", name)
        if not match:
            continue
        rest = match.group("rest")
        if not any(name == w or rest == w or rest.endswith("." + w) for w in wanted):
            continue
        if config.layers is not None and int(match.group("idx")) not in config.layers:
            continue
        found.append(name)
    if not found:
        raise AdapterError(
            f"bottleneck targets {', '.join(wanted)} match no sub-layer inside the numbered layers "
            f"of {type(model).__name__}; set targets to its attention/MLP module names"
        )
    return found


def bottleneck_holders(model: nn.Module):
    """(sub-layer name, Bottlenecks) for every adapted sub-layer."""
    for name, module in model.named_modules():
        if isinstance(module, Bottlenecks):
            yield name.rsplit(".", 1)[0], module


def add_bottleneck_adapter(model: nn.Module, config: BottleneckConfig, name: str) -> list[str]:
    """Attach bottleneck adapter `name` to its sub-layers (not yet active). Returns their names."""
    hidden = hidden_size(model)
    width = config.width(hidden)
    targets = find_sublayers(model, config)
    device = model.get_input_embeddings().weight.device
    for target in targets:
        sublayer = model.get_submodule(target)
        holder = getattr(sublayer, ATTR, None)
        if holder is None:
            holder = Bottlenecks(sublayer, hidden)
            sublayer.add_module(ATTR, holder)
        adapter = BottleneckAdapter(hidden, width, config.nonlinearity, config.dropout, device)
        holder.adapters[name] = adapter.train(model.training)
    return targets


def remove_bottleneck(model: nn.Module, sublayer_name: str) -> None:
    sublayer = model.get_submodule(sublayer_name)
    holder = getattr(sublayer, ATTR, None)
    if holder is not None:
        holder.remove_hook()
        delattr(sublayer, ATTR)
