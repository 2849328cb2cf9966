"""Batches: padding, and packing several samples into one row.

A packed row is the samples' tokens back to back, with `position_ids` restarting at 0 for each
sample and no `attention_mask`. transformers (>= 4.56) reads the restarts as sequence
boundaries and builds a block-diagonal causal mask (flash-attention backends use variable-
length kernels instead), so no token attends across samples. Labels of each sample's first
token are already -100 (see `encode`), so no position learns to predict the next sample. The
packed loss therefore equals the unpacked one; the tests prove it per architecture."""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from tunesmith.data.encode import IGNORE_INDEX


def pack_groups(lengths, max_seq_len: int) -> list[list[int]]:
    """Group sample indices into rows of at most `max_seq_len` tokens: best-fit decreasing
    (longest first, each into the fullest row it still fits). Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    free: list[tuple[int, int]] = []  # (free slots, row index), sorted
    rows: list[list[int]] = []
    for i in order:
        need = int(lengths[i])
        if need > max_seq_len:
            raise ValueError(f"sample {i} has {need} tokens, more than max_seq_len {max_seq_len}")
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            rows.append([i])
            slot = (max_seq_len - need, len(rows) - 1)
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            slot = (room - need, row)
        if slot[0] > 0:
            bisect.insort(free, slot)
    return rows


def packing_efficiency(lengths, rows: list[list[int]], max_seq_len: int) -> float:
    """Real tokens / slots (rows × max_seq_len)."""
    if not rows:
        return 0.0
    return float(np.sum(lengths)) / (len(rows) * max_seq_len)


def collate(samples, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad (ids, labels) samples on the right to the longest: `input_ids`, `labels`,
    `attention_mask`, each (batch, seq) int64."""
    import torch  # here, not at the top: `tunesmith config check` must not load torch

    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(samples):
        n = len(ids)
        input_ids[row, :n] = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        labels[row, :n] = torch.as_tensor(np.asarray(lab), dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(rows, pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Packed rows (each a list of (ids, labels) samples) to `input_ids`, `labels` and
    `position_ids`, padded on the right to `width` (default: the longest row). Padding is a
    sequence of its own (positions from 0, labels -100). Call the model with these three and
    `use_cache=False`, and no attention mask: transformers only reads the position restarts
    as sample boundaries when there is neither a mask nor a KV cache."""
    import torch

    lengths = [sum(len(ids) for ids, _ in row) for row in rows]
    width = width or max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ids, lab in row:
            n = len(ids)
            input_ids[r, at : at + n] = torch.as_tensor(np.asarray(ids), dtype=torch.long)
            labels[r, at : at + n] = torch.as_tensor(np.asarray(lab), dtype=torch.long)
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
