"""LoRA's training step with its own autograd (`train.fused_lora`, on by default).

One `FusedLoRA` call computes, for a group of LoRA layers that read the same input x (a
decoder layer's q/k/v projections, or gate/up; a group of one otherwise):

    x̃   = dropout(x)                       one mask for the whole group
    xa  = x̃ · [A₁; A₂; …]ᵀ                  one matmul for every adapter of the group
    yᵢ  = x Wᵢᵀ + bᵢ + xa[:, slotᵢ] · (sᵢ Bᵢ)ᵀ   base and low-rank term in one addmm

and saves only x (once for the group: the same tensor autograd already holds), the dropout
mask (one byte per element, only with dropout) and xa (rank-wide). The backward forms
dBᵢ = gᵢᵀ xa, dA = (Σ gᵢ sBᵢ)ᵀ x̃ and dx = Σ gᵢ Wᵢ + (dxa · A) ⊙ mask with accumulating
matmuls (`addmm_`), never materialising dropout(x) or the per-projection deltas.

The layers of a group are called one after the other by the model (`q_proj(x)`, `k_proj(x)`,
...). The first call computes every member's output and keeps the others' until their layer is
called with the same tensor; a call with another tensor recomputes. Results equal the plain
layer's (`LoRALayer.adapter_delta`) up to rounding; with dropout they differ only in that the
group shares one mask (PEFT draws one per projection: the same distribution). DoRA, routed rows,
merged or disabled adapters, and adapters of different dropout use the plain layer; a
quantized base (QLoRA) keeps bitsandbytes' own autograd for W x and fuses the LoRA part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tunesmith.adapters.dropout import keep_mask

SHARED_INPUT_GROUPS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)
"""Sibling projections that a decoder layer applies to one input (by module name)."""


class FusedLoRA(torch.autograd.Function):
    """See the module docstring. Arguments: x (..., in), the dropout probability p and site
    (`tunesmith.adapters.dropout`), A (R × in, every adapter's A stacked), `slots` (per output:
    the (start, end) columns of xa it reads), then per output: W (out × in, or None: the base
    is computed outside), bias (or None) and sB (out × (end − start)). Returns one tensor per
    output."""

    @staticmethod
    def forward(ctx, x, p: float, site: int | None, a, slots, *per_output):
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            mask = None
            if p > 0:
                mask = keep_mask(x2.shape, p, site, x2.device)
                if mask is None:
                    mask = torch.empty_like(x2).bernoulli_(1.0 - p).bool()
                x_drop = x2 * mask * (1.0 / (1.0 - p))
            else:
                x_drop = x2
            xa = x_drop @ a.t()
            outputs, weights, bs = [], [], []
            for i, (start, end) in enumerate(slots):
                weight, bias, b = per_output[3 * i : 3 * i + 3]
                part = xa[:, start:end]
                if weight is None:
                    y = part @ b.t()
                else:
                    y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
                    y.addmm_(part, b.t())
                outputs.append(y.view(*x.shape[:-1], y.shape[-1]))
                weights.append(weight)
                bs.append(b)
        ctx.p, ctx.slots, ctx.shape = p, slots, x.shape
        ctx.has_mask = mask is not None
        ctx.biases = [per_output[3 * i + 1] is not None for i in range(len(slots))]
        ctx.has_weight = [w is not None for w in weights]
        ctx.save_for_backward(
            x2,
            mask if mask is not None else x2.new_empty(0),
            xa,
            a,
            *[w for w in weights if w is not None],
            *bs,
        )
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        x2, mask, xa, a, *rest = ctx.saved_tensors
        n_weights = sum(ctx.has_weight)
        weights_iter = iter(rest[:n_weights])
        bs = rest[n_weights:]
        needs = ctx.needs_input_grad
        with torch.autocast(x2.device.type, enabled=False):
            dxa = xa.new_zeros(xa.shape)
            dx = None
            per_output_grads = []
            for i, ((start, end), grad) in enumerate(zip(ctx.slots, grads, strict=True)):
                weight = next(weights_iter) if ctx.has_weight[i] else None
                b = bs[i]
                at = 5 + 3 * i
                if grad is None:
                    per_output_grads += [None, None, None]
                    continue
                g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
                dxa[:, start:end].addmm_(g, b)
                d_b = g.t() @ xa[:, start:end] if needs[at + 2] else None
                d_w = g.t() @ x2 if weight is not None and needs[at] else None
                d_bias = g.sum(0) if ctx.biases[i] and needs[at + 1] else None
                if weight is not None and needs[0]:
                    dx = g @ weight if dx is None else dx.addmm_(g, weight)
                per_output_grads += [d_w, d_bias, d_b]
            scale = 1.0 / (1.0 - ctx.p) if ctx.has_mask else 1.0
            d_a = None
            if needs[3]:
                x_drop = x2 * mask * scale if ctx.has_mask else x2
                d_a = dxa.t() @ x_drop
            if needs[0]:
                lora_dx = dxa @ a
                if ctx.has_mask:
                    lora_dx.mul_(mask).mul_(scale)
                dx = lora_dx if dx is None else dx.add_(lora_dx)
                dx = dx.view(ctx.shape)
        return (dx, None, None, d_a, None, *per_output_grads)


@dataclass(eq=False)
class SharedInputGroup:
    """LoRA layers fed the same input (see the module docstring); `pending` holds the outputs
    computed for `x` that their layers have not asked for yet."""

    members: list = field(default_factory=list)
    x: torch.Tensor | None = None
    pending: dict = field(default_factory=dict)

    def output_for(self, layer, x: torch.Tensor) -> torch.Tensor:
        if self.x is x and id(layer) in self.pending:
            out = self.pending.pop(id(layer))
            if not self.pending:
                self.x = None
            return out
        p = layer.fusable()
        members = [m for m in self.members if m is layer or m.fusable() == p]
        outputs = fused_forward(members, x)
        self.pending = {id(m): out for m, out in zip(members, outputs, strict=True)}
        self.x = x
        return self.pending.pop(id(layer))


def fuses_base(layer) -> bool:
    """Whether the fused step computes the layer's W x too: plain Linear and Conv1D bases.
    Others (bitsandbytes, GPTQ, the planner's stand-ins) compute it themselves."""
    return type(layer.base_layer) in (nn.Linear, Conv1D)


def dropout_of(adapter) -> float:
    return adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0


def dropout_site(adapter) -> int | None:
    return getattr(adapter.dropout, "site", None)


def fused_forward(layers: list, x: torch.Tensor) -> list[torch.Tensor]:
    """The training-mode outputs of `layers` on x: LoRALayers whose `fusable()` gives one
    dropout probability."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = x.dtype
    a_parts, slots, per_output, at = [], [], [], 0
    p = layers[0].fusable()
    first = layers[0]
    site = dropout_site(first.adapters[first.active[0]])  # one mask for the group
    for layer in layers:
        adapters = [layer.adapters[name] for name in layer.active]
        a_parts += [adapter.lora_A.to(dtype) for adapter in adapters]
        width = sum(adapter.r for adapter in adapters)
        slots.append((at, at + width))
        at += width
        b = torch.cat([adapter.lora_B.to(dtype) * adapter.scaling for adapter in adapters], 1)
        if not fuses_base(layer):
            per_output += [None, None, b]
        else:
            weight = layer.base_weight()
            bias = layer.base_layer.bias
            per_output += [
                weight.to(dtype),
                None if bias is None else bias.to(dtype),
                b,
            ]
    a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, 0)
    outputs = FusedLoRA.apply(x.to(dtype), p, site, a, slots, *per_output)
    return [
        out if fuses_base(layer) else layer.base_layer(x) + out
        for layer, out in zip(layers, outputs, strict=True)
    ]
