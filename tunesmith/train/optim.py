"""Optimizers and learning-rate schedules for a run."""

from __future__ import annotations

import math

import torch
from torch import nn

from tunesmith.config import TrainSection
from tunesmith.errors import TunesmithError

BNB_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw_8bit": "PagedAdamW8bit",
}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices decay, vectors (norms, biases, DoRA
    magnitudes) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise TunesmithError("the model has no trainable parameters; check the method section")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, train: TrainSection) -> torch.optim.Optimizer:
    groups = parameter_groups(model, train.weight_decay)
    if train.optimizer == "adamw":
        device = groups[0]["params"][0].device if groups[0]["params"] else torch.device("cpu")
        fused = device.type == "cuda"  # the fused CUDA kernel; CPU keeps the reference path
        return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.999), fused=fused or None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TunesmithError(
            f"train.optimizer: {train.optimizer} needs bitsandbytes; pip install bitsandbytes, "
            "or use optimizer: adamw"
        ) from None
    return getattr(bnb.optim, BNB_OPTIMIZERS[train.optimizer])(groups, lr=train.lr)


def warmup_steps(train: TrainSection, total_steps: int) -> int:
    if train.warmup_steps is not None:
        return min(train.warmup_steps, total_steps)
    return int(math.ceil(train.warmup_ratio * total_steps))


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """The multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up from
    1/(warmup+1) to 1, then constant, linear to 0 or cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, train: TrainSection, total_steps: int):
    warmup = warmup_steps(train, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(train.schedule, step, warmup, total_steps)
    )
