"""Fused kernels for the parts of a decoder layer that are not matmuls (`train.kernels`).

    names = apply_kernels(model, resolve_kernels("auto", device))

The kernels are liger-kernel's Triton kernels (a maintained library made for exactly this;
`pip install 'tunesmith[gpu]'`): RMSNorm, rotary embeddings, SwiGLU, and the output head fused
with its cross-entropy and backward (the (tokens × vocab) logits never exist, not even one
chunk at a time). They replace the model's own torch code module by module, which stays the
reference: `train.kernels: torch` runs it, and the tests compare the two.

- rms_norm: every `*RMSNorm` module with a `weight` (Gemma's `1 + weight` offset and fp32
  casting included) calls liger's RMSNorm.
- swiglu: every MLP with `gate_proj`, `up_proj`, `down_proj` and a SiLU activation computes
  `down(silu(gate(x)) * up(x))` with liger's fused SiLU-multiply (the projections stay the
  model's own modules, LoRA-wrapped or not).
- rope: the architecture's `apply_rotary_pos_emb` (which its attention looks up at call
  time) becomes liger's, for every model of that architecture in this process.
- cross_entropy: `tunesmith.train.loss.model_loss_sum` uses liger's fused linear
  cross-entropy where the head is a plain `nn.Linear` without bias.

Each kernel is applied only where the module is what it expects; `apply_kernels` returns what
it changed, which `tunesmith train` reports.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch
from torch import nn

from tunesmith.errors import TunesmithError

KERNELS = ("rms_norm", "rope", "swiglu", "cross_entropy")
ROPE_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma"}
"""Architectures whose `apply_rotary_pos_emb` is the standard full-head rotation."""
SILU_NAMES = ("silu", "swish")


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_kernels(setting: str, device: str) -> tuple[str, ...]:
    """The kernels `train.kernels` asks for on `device`: all of them for liger (auto: on CUDA
    where liger-kernel is installed), none for torch."""
    if setting == "torch" or (setting == "auto" and not (device == "cuda" and liger_installed())):
        return ()
    if not liger_installed():
        raise TunesmithError(
            "train.kernels: liger needs liger-kernel (and Triton); pip install "
            "'tunesmith[gpu]', or set train.kernels: torch"
        )
    return KERNELS


def liger_functions() -> dict:
    """liger-kernel's autograd functions by kernel name (imported on first use: Triton)."""
    from liger_kernel.ops.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyFunction,
    )
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    def rms_norm(x, weight, eps, offset, casting):
        return LigerRMSNormFunction.apply(x, weight, eps, offset, casting, False)

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        return LigerRopeFunction.apply(q, k, cos, sin, position_ids, unsqueeze_dim)

    def linear_cross_entropy(hidden, weight, targets):
        out = LigerFusedLinearCrossEntropyFunction.apply(
            hidden, weight, targets, None, None, -100, 0.0, 0.0, "sum"
        )
        return out[0] if isinstance(out, tuple) else out

    return {
        "rms_norm": rms_norm,
        "swiglu": LigerSiLUMulFunction.apply,
        "rope": rope,
        "cross_entropy": linear_cross_entropy,
    }


def torch_functions() -> dict:
    """The same four in plain torch: the references the kernels are tested against."""

    def rms_norm(x, weight, eps, offset, casting):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if casting == "gemma":
            return (h * (offset + weight.float())).to(dtype)
        return (offset + weight) * h.to(dtype)

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rotate(x):
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    def linear_cross_entropy(hidden, weight, targets):
        logits = (hidden @ weight.t()).float()
        return nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")

    return {
        "rms_norm": rms_norm,
        "swiglu": lambda a, b: nn.functional.silu(a) * b,
        "rope": rope,
        "cross_entropy": linear_cross_entropy,
    }


def _rms_forward(module, functions):
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
    gemma = "Gemma" in type(module).__name__
    offset, casting = (1.0, "gemma") if gemma else (0.0, "llama")
    rms = functions["rms_norm"]

    def forward(self, hidden_states):
        return rms(hidden_states, self.weight, eps, offset, casting)

    return forward


def _swiglu_forward(functions):
    silu_mul = functions["swiglu"]

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))

    return forward


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation",)


def apply_kernels(model: nn.Module, kernels, functions: dict | None = None) -> list[str]:
    """Put the kernels named in `kernels` into `model` (in place; `functions`: liger's by
    default, `torch_functions()` for the reference wiring). Returns one line per kind changed,
    e.g. "rms_norm: 5 modules"."""
    kernels = tuple(kernels)
    if not kernels:
        return []
    functions = functions or liger_functions()
    done: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if "rms_norm" in kernels and name.endswith("RMSNorm") and _has_weight(module):
            module.forward = types.MethodType(_rms_forward(module, functions), module)
            done["rms_norm"] = done.get("rms_norm", 0) + 1
        if "swiglu" in kernels and all(
            hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")
        ):
            if _is_silu(getattr(module, "act_fn", None)):
                module.forward = types.MethodType(_swiglu_forward(functions), module)
                done["swiglu"] = done.get("swiglu", 0) + 1
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if "rope" in kernels and model_type in ROPE_TYPES:
        modeling = sys.modules.get(type(model).__module__)
        if modeling is not None and hasattr(modeling, "apply_rotary_pos_emb"):
            modeling.apply_rotary_pos_emb = functions["rope"]
            done["rope"] = 1
    if "cross_entropy" in kernels:
        model._tunesmith_linear_cross_entropy = functions["cross_entropy"]
        done["cross_entropy"] = 1
    lines = []
    for kind, count in done.items():
        where = f"{count} modules" if kind in ("rms_norm", "swiglu") else "on"
        lines.append(f"{kind}: {where}")
    return lines


def _has_weight(module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.Tensor)


def linear_cross_entropy_of(model):
    """The fused head + cross-entropy `apply_kernels` gave `model`, or None."""
    return getattr(model, "_tunesmith_linear_cross_entropy", None)
