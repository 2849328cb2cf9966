"""The causal-LM loss, as a sum and a count of trained tokens, so that any batching
(micro-batches, packing) can normalise by the trained tokens of the whole batch.

`model_loss_sum` never builds the (batch, seq, vocab) logits tensor for architectures with a
plain output head: it runs the decoder, keeps the hidden states of positions whose target
trains, and applies the head and cross-entropy chunk by chunk in fp32, each chunk recomputed in
the backward pass. Peak memory for the loss is one chunk of fp32 logits, not the whole batch in
fp32 (a 128k-vocabulary model at 2×2048 tokens would need 2 GiB for those alone)."""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.objectives.rows import BATCH_ONLY
from tunesmith.train.batches import eval_batches
from tunesmith.train.kernels import linear_cross_entropy_of

PLAIN_HEAD_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi3", "gpt2"}
"""Architectures whose logits are exactly `lm_head(last_hidden_state)`."""
CHUNK_ELEMENTS = 1 << 24
"""fp32 logits per chunk (64 MiB)."""
ALL_TRAINED: ContextVar[bool] = ContextVar("all_trained", default=False)
"""Set by the memory planner: every position trains, so no data-dependent masking is needed
(fake tensors have no values to mask by)."""


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over positions whose target label is not -100, and the
    number of those positions. logits (batch, seq, vocab), labels (batch, seq); position t
    predicts labels[t + 1]. The sum is computed in fp32."""
    targets = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())


NOT_INPUTS = ("labels", "dropout_keys", *BATCH_ONLY)


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments for a collated batch (everything but the labels and the
    dropout keys)."""
    return {k: v for k, v in batch.items() if k not in NOT_INPUTS}


def _head_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def model_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of token losses, trained-token count) of `model` on a collated `batch`."""
    labels = batch["labels"]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if model_type not in PLAIN_HEAD_TYPES or head is None:
        logits = model(**model_inputs(batch), use_cache=False).logits
        return causal_lm_loss_sum(logits, labels)
    hidden = model.base_model(**model_inputs(batch), use_cache=False).last_hidden_state
    if ALL_TRAINED.get():
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = labels[:, 1:].reshape(-1)
    else:
        keep = labels[:, 1:] != IGNORE_INDEX
        hidden, targets = hidden[:, :-1][keep], labels[:, 1:][keep]
    count = int(targets.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    fused = linear_cross_entropy_of(model)
    if fused is not None and type(head) is torch.nn.Linear and head.bias is None:
        return fused(hidden, head.weight.to(hidden.dtype), targets), count
    rows = max(1, CHUNK_ELEMENTS // head.out_features if hasattr(head, "out_features") else 1024)
    total = None
    for at in range(0, count, rows):
        h, t = hidden[at : at + rows], targets[at : at + rows]
        if torch.is_grad_enabled() and h.requires_grad:
            part = checkpoint(_head_loss, head, h, t, use_reentrant=False)
        else:
            part = _head_loss(head, h, t)
        total = part if total is None else total + part
    return total, count


def autocast_for(device: str, dtype: torch.dtype):
    """bf16/fp16 autocast where the device runs it; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(
    model,
    samples,
    batch_size: int,
    pad_id: int,
    device: str,
    dtype,
    device_type: str = "",
    loss_module=None,
) -> dict:
    """Mean token loss and perplexity of `model` on a SampleSet (trained tokens only)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(samples, batch_size, pad_id):
        with autocast_for(device_type or device, dtype):
            if loss_module is not None:  # FSDP: through the sharded root, on every rank
                s, c = loss_module(to_device(batch, device))
            else:
                s, c = model_loss_sum(model, to_device(batch, device))
        total += float(s)
        count += c
    model.train(was_training)
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}
