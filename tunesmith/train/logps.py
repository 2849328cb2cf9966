"""Each sequence's summed log-probability of its answer tokens (or a reward head's score),
what a preference objective's loss is computed from.

`sequence_logps` never builds the (batch, seq, vocab) logits for architectures with a plain
output head: like the supervised loss (`loss.py`), it runs the decoder, keeps the hidden states
of positions whose target trains, and applies the head in fp32 chunk by chunk, each recomputed
in the backward pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.objectives.losses import answer_logps
from tunesmith.objectives.rows import SCORE_HEAD, Rows
from tunesmith.train.loss import ALL_TRAINED, CHUNK_ELEMENTS, PLAIN_HEAD_TYPES, model_inputs


def _token_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def sequence_logps(model, batch: dict) -> Rows:
    """Each row's summed log-probability of its trained (answer) tokens, and their count."""
    labels = batch["labels"]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if model_type not in PLAIN_HEAD_TYPES or head is None:
        logits = model(**model_inputs(batch), use_cache=False).logits
        sums, counts = answer_logps(logits, labels)
        return Rows(sums, counts)
    hidden = model.base_model(**model_inputs(batch), use_cache=False).last_hidden_state
    if ALL_TRAINED.get():  # the planner's fake tensors: no data-dependent masking
        b, t = labels.shape
        rows = torch.arange(b, device=labels.device).repeat_interleave(t - 1)
        hidden, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
        counts = torch.full((b,), t - 1, device=labels.device)
    else:
        keep = labels[:, 1:] != IGNORE_INDEX
        rows = keep.nonzero()[:, 0]
        hidden, targets = hidden[:, :-1][keep], labels[:, 1:][keep]
        counts = keep.sum(-1)
    sums = hidden.new_zeros(labels.shape[0], dtype=torch.float32)
    step = max(1, CHUNK_ELEMENTS // head.out_features if hasattr(head, "out_features") else 1024)
    for at in range(0, len(targets), step):
        h, t = hidden[at : at + step], targets[at : at + step]
        if torch.is_grad_enabled() and h.requires_grad:
            part = checkpoint(_token_logps, head, h, t, use_reentrant=False)
        else:
            part = _token_logps(head, h, t)
        sums = sums.index_add(0, rows[at : at + step], part)
    return Rows(sums, counts)


def token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of each trained token (flat, in row-major order of the positions
    whose next token trains) and that mask (batch, seq - 1); the head runs chunk by chunk as in
    `sequence_logps`."""
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    hidden, head = answer_states(model, batch)
    targets = kept_targets(batch["labels"])
    if head is None:  # `hidden` holds the logits already
        return _token_logps(lambda h: h, hidden, targets), keep
    step = max(1, CHUNK_ELEMENTS // head.out_features if hasattr(head, "out_features") else 1024)
    parts = []
    for at in range(0, len(targets), step):
        h, t = hidden[at : at + step], targets[at : at + step]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_token_logps, head, h, t, use_reentrant=False))
        else:
            parts.append(_token_logps(head, h, t))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0, keep
    return torch.cat(parts), keep


def answer_states(model, batch: dict) -> tuple[torch.Tensor, object]:
    """The model's final hidden states at the positions whose next token trains (N, H) and its
    output head; or, for an architecture without a plain head, its logits there (N, V) and
    None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if model_type not in PLAIN_HEAD_TYPES or head is None:
        logits = model(**model_inputs(batch), use_cache=False).logits
        return kept(logits, batch["labels"]), None
    hidden = model.base_model(**model_inputs(batch), use_cache=False).last_hidden_state
    return kept(hidden, batch["labels"]), head


def kept(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`values` (batch, seq, ...) at the positions whose next token trains, in row order
    (every position under the planner's fake tensors, which have no values to mask by)."""
    if ALL_TRAINED.get():
        return values[:, :-1].reshape(-1, *values.shape[2:])
    return values[:, :-1][labels[:, 1:] != IGNORE_INDEX]


def kept_targets(labels: torch.Tensor) -> torch.Tensor:
    """The trained next-token targets, in the order `kept` gives their positions."""
    targets = labels[:, 1:]
    return targets.reshape(-1) if ALL_TRAINED.get() else targets[targets != IGNORE_INDEX]


def sequence_scores(model, batch: dict) -> Rows:
    """Each row's reward: the score head on the hidden state of its last token (rows are
    padded on the right), as transformers' sequence-classification models compute it."""
    head = getattr(model, SCORE_HEAD)
    hidden = model.base_model(**model_inputs(batch), use_cache=False).last_hidden_state
    last = batch["attention_mask"].sum(-1) - 1
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    scores = head(picked.float()).float().squeeze(-1)  # the head is fp32
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
    return Rows(scores, counts)
