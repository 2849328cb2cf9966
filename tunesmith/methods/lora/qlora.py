"""QLoRA (method `qlora`): LoRA adapters on a frozen base that bitsandbytes quantizes while it
loads (`tunesmith.quantized.bnb`). The adapter itself is a plain LoRA adapter (saved as PEFT's
LORA); what this method adds is how the base is loaded, and, for the planner, a stand-in for
bitsandbytes' layers, which cannot run on fake tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunesmith.methods.lora import QLoRAConfig
from tunesmith.methods.lora.impl import attach as attach_lora
from tunesmith.methods.lora.impl import (  # noqa: F401  (the rest of LoRA's implementation)
    check_hot_swap,
    combine,
    config_from_peft,
    load_tensors,
    materialize,
    peft_config,
    prepare_training,
    tensor_homes,
)
from tunesmith.quantized.bnb import QuantConfig, load_quantized, quantizable_linears, quantize_model


def attach(
    model: nn.Module, config: QLoRAConfig, *, name: str, trainable: bool, tokenizer: Any = None
) -> None:
    """The LoRA part of `config` (the base is already quantized by `load_base`)."""
    attach_lora(model, config.lora(), name=name, trainable=trainable, tokenizer=tokenizer)


def quant_config(config: QLoRAConfig, compute_dtype: torch.dtype) -> QuantConfig:
    return QuantConfig(config.quant, config.double_quant, config.blocksize, compute_dtype)


def compute_dtype(config: QLoRAConfig) -> str:
    """The run's compute dtype setting ("auto": the model's `dtype`)."""
    return config.compute_dtype


def load_base(config: QLoRAConfig, model_section: Any, device: str, dtype: torch.dtype, base=None):
    """The base quantized while loading (one tensor at a time; see `load_quantized`); or
    `base` (random weights of the real shape, `model.init: random`) quantized in place layer
    by layer."""
    attn = model_section.attn_implementation
    if base is not None:
        return quantize_model(base, quant_config(config, dtype))
    return load_quantized(
        model_section.path,
        quant_config(config, dtype),
        device,
        model_section.revision,
        model_section.trust_remote_code,
        None if attn == "auto" else attn,
    )


def trace_base(model: nn.Module, config: QLoRAConfig, compute_dtype: torch.dtype) -> None:
    """For the planner: every linear bitsandbytes would quantize becomes a `QuantizedStandIn`."""
    for name in quantizable_linears(model, quant_config(config, compute_dtype)):
        linear = model.get_submodule(name)
        stand_in = QuantizedStandIn(linear, config.quant, config.blocksize, config.double_quant)
        model.set_submodule(name, stand_in)


class _QuantizedMatmul(torch.autograd.Function):
    """Memory of a bitsandbytes quantized matmul with a frozen weight: the forward and the
    backward each dequantize the weight into a temporary of the compute dtype (4-bit), or, for
    LLM.int8, quantize the input to int8 and accumulate in int32; the input is saved."""

    @staticmethod
    def forward(ctx, x, packed, out_features, int8):
        ctx.int8, ctx.out_features, ctx.in_features = int8, out_features, x.shape[-1]
        ctx.save_for_backward(x)
        if int8:
            x8 = torch.empty(x.shape, dtype=torch.int8)
            acc = torch.empty(*x.shape[:-1], out_features, dtype=torch.int32)
            del x8
            return acc.to(x.dtype)
        weight = x.new_empty(out_features, x.shape[-1])
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        weight = grad.new_empty(ctx.out_features, ctx.in_features)  # dequantized again
        return grad @ weight, None, None, None


class QuantizedStandIn(torch.nn.Linear):
    """A frozen linear stored as bitsandbytes stores it (NF4/FP4: packed 4-bit codes, one
    absmax per block, double-quantized or not; int8: one byte per weight and a per-row scale),
    computing with `_QuantizedMatmul`'s memory. For tracing only: it computes no values."""

    saves_input = True
    """bitsandbytes' matmul keeps its input for the backward pass (the planner counts it)."""

    def __init__(self, linear: torch.nn.Linear, quant: str, blocksize: int, double_quant: bool):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant = quant
        n = self.in_features * self.out_features
        frozen = {"requires_grad": False}
        if quant == "int8":
            self.weight = torch.nn.Parameter(torch.empty(n, dtype=torch.int8), **frozen)
            self.register_buffer("scales", torch.empty(self.out_features))
        else:
            self.weight = torch.nn.Parameter(torch.empty(n // 2, dtype=torch.uint8), **frozen)
            blocks = -(-n // blocksize)
            if double_quant:
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8))
                self.register_buffer("absmax2", torch.empty(-(-blocks // 256)))
            else:
                self.register_buffer("absmax", torch.empty(blocks))
        self.bias = linear.bias

    def forward(self, x):
        out = _QuantizedMatmul.apply(x, self.weight, self.out_features, self.quant == "int8")
        return out if self.bias is None else out + self.bias
