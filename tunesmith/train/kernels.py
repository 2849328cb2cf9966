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

Before liger's kernels first run in a process, `checked_kernels` runs each one and its torch
reference on small tensors on the training device (forward and backward, milliseconds) and
keeps only those that agree: a kernel that differs or fails falls back to torch with a one-line
warning naming it (the `auto` path on CUDA has not yet been checked on a GPU by a test run).
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import torch
from torch import nn

from tunesmith.errors import TunesmithError, first_line

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


_CHECKED: dict[tuple[str, str], str | None] = {}
"""(kernel, device) -> None when liger's agreed with torch's there, else why not."""


def _check_inputs(kernel: str, device: str) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    if kernel == "rms_norm":
        return rand(2, 8, 64), rand(64), 1e-6, 0.0, "llama"
    if kernel == "swiglu":
        return rand(2, 8, 128), rand(2, 8, 128)
    if kernel == "rope":
        angles = torch.rand(2, 8, 32, generator=g).to(device) * 6.0
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        return rand(2, 4, 8, 64), rand(2, 2, 8, 64), cos, sin
    targets = torch.randint(0, 128, (16,), generator=g).to(device)
    targets[3] = -100
    return rand(16, 64), rand(128, 64), targets


def _outputs_and_grads(function, args) -> list[torch.Tensor]:
    args = [a.detach().clone().requires_grad_() if _leaf(a) else a for a in args]
    out = function(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    total = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
    leaves = [a for a in args if _leaf(a)]
    grads = torch.autograd.grad(total, leaves)
    return [o.detach().float() for o in outs] + [grad.float() for grad in grads]


def _leaf(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad


def kernel_problem(kernel: str, device: str, candidate: dict, reference: dict) -> str | None:
    """Why `candidate[kernel]` cannot stand in for `reference[kernel]` on `device` (outputs
    and input gradients on small fp32 tensors differ beyond 1e-3 relative, or it fails), or
    None when it can."""
    args = _check_inputs(kernel, device)
    try:
        got = _outputs_and_grads(candidate[kernel], args)
    except Exception as err:  # noqa: BLE001 - a kernel that cannot run on this device
        return f"it failed ({type(err).__name__}: {first_line(err)[:200]})"
    want = _outputs_and_grads(reference[kernel], args)
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape or not torch.isfinite(g).all():
            return "it gave outputs of another shape or non-finite values"
        error = float((g - w).abs().max()) / max(float(w.abs().max()), 1e-6)
        if error > 1e-3:
            return f"it differs from torch's by {error:.1e} (relative, on small fp32 tensors)"
    return None


def checked_kernels(kernels, device: str, candidate: dict | None = None) -> tuple[str, ...]:
    """The kernels of `kernels` whose liger implementation (or `candidate`'s) agrees with the
    torch reference on `device`; checked once per process and device, each one that does not
    is named in a warning and left to torch."""
    kernels = tuple(kernels)
    if not kernels:
        return kernels
    cached = candidate is None
    candidate = candidate or liger_functions()
    reference = torch_functions()
    kept = []
    for kernel in kernels:
        key = (kernel, device)
        if not cached or key not in _CHECKED:
            problem = kernel_problem(kernel, device, candidate, reference)
            if cached:
                _CHECKED[key] = problem
        else:
            problem = _CHECKED[key]
        if problem is None:
            kept.append(kernel)
        else:
            warnings.warn(
                f"train.kernels: liger's {kernel} kernel was checked against torch on {device} "
                f"and {problem}; torch's {kernel} is used instead",
                stacklevel=2,
            )
    return tuple(kept)


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
