"""The training step's speed switches, applied to a built model by `tunesmith train`:

- `train.fused_lora` (LoRA's own autograd) is the method's `prepare_training`, in the builder;
- `train.kernels`: liger-kernel's RMSNorm, rotary, SwiGLU and fused head cross-entropy
  (`tunesmith.train.kernels`);
- `train.compile`: regional `torch.compile` of each decoder layer, with a dynamic sequence
  length so that packed rows of any length reuse one compiled graph;
- `train.offload_activations`: `ActivationOffload` around each forward (`tunesmith.train.offload`);
- `train.padding_free`: packed micro-batches as one row of variable-length sequences (the
  batch plan, `padding_free_for`).

`apply_speedups` returns one line per switch in effect, which the run prints and records in
summary.json.
"""

from __future__ import annotations

from torch import nn

from tunesmith.models import decoder_layers
from tunesmith.train.kernels import apply_kernels, checked_kernels, resolve_kernels

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
"""Attention implementations that take packed rows as variable-length sequences (cu_seqlens
from the position restarts), so a flattened batch costs no masking work."""


def compile_layers(model: nn.Module) -> int:
    """`torch.compile` every decoder layer in place (dynamic shapes: one graph for every
    sequence length). Checkpointed layers recompute through the same compiled graph; the
    fused LoRA step's record of which sibling output is pending is bookkeeping the recompute
    needs no replay of."""
    import torch._dynamo

    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def padding_free_for(setting: str, packing: bool, attention: str | None) -> bool:
    """Whether packed micro-batches go to the model as one row (see `train.padding_free`)."""
    if not packing or setting == "off":
        return False
    return setting == "on" or (attention or "") in VARLEN_ATTENTION


def apply_speedups(model: nn.Module, train, device: str) -> list[str]:
    """Apply `train.kernels` and `train.compile` to `model`; lines describing every switch in
    effect (fused LoRA and offloading included)."""
    lines = []
    if any(getattr(m, "fused", False) for m in model.modules()):
        lines.append("fused LoRA step")
    kernels = checked_kernels(resolve_kernels(train.kernels, device), device)
    changed = apply_kernels(model, kernels)
    if changed:
        lines.append(f"liger kernels ({', '.join(changed)})")
    if train.compile:
        lines.append(f"torch.compile: {compile_layers(model)} decoder layers")
    if train.offload_activations:
        pinned = "pinned host memory, side stream" if device == "cuda" else "host copies"
        lines.append(f"activation offloading ({pinned})")
    return lines
