"""Which samples make up each optimizer step.

The training data is a list of units: samples, or packed rows of samples. Each epoch shuffles
the units with a generator seeded by (seed, epoch), cuts them into micro-batches and groups
`grad_accum_steps` micro-batches per optimizer step. The batches of step s therefore depend on
s alone, which is what makes resuming exact: the data position is the step number. Each batch
carries its tokens' dropout keys (`tunesmith.adapters.dropout`): (seed, step, unit, position),
so a unit's dropout mask does not depend on which process or micro-batch it lands in."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tunesmith.adapters.dropout import hash_int, token_keys
from tunesmith.data.encode import IGNORE_INDEX, SampleSet
from tunesmith.data.pack import collate, collate_packed
from tunesmith.objectives.rows import REFERENCE_LOGPS, UNIT_FLAGS

DROPOUT_KEYS = "dropout_keys"
"""The batch entry holding its tokens' dropout keys (not a model input)."""


@dataclass
class BatchPlan:
    samples: SampleSet
    rows: list[list[int]] | None
    """Packed rows of sample indices, or None: each unit is one sample."""
    micro_batch_size: int
    grad_accum_steps: int
    seed: int
    pad_id: int
    flatten: bool = False
    """Packed rows only: each micro-batch's rows as one row (padding-free; see
    `train.padding_free`)."""
    group: int = 1
    """Consecutive samples per unit (2: a preference pair); a micro-batch holds
    `micro_batch_size` whole units."""
    reference: np.ndarray | None = None
    """Precomputed reference log-probabilities, one per sample, put in each batch."""
    extras: object | None = None
    """Per-sample entries put in each batch (`extras.entries(sample indices)`, the samples in
    batch order): distillation's precomputed teacher top-k."""

    @property
    def num_units(self) -> int:
        if self.rows is not None:
            return len(self.rows)
        return len(self.samples) // self.group

    @property
    def steps_per_epoch(self) -> int:
        micro = math.ceil(self.num_units / self.micro_batch_size)
        return math.ceil(micro / self.grad_accum_steps)

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> float:
        """Epochs completed after optimizer step `step` (1-based count of steps)."""
        return step / self.steps_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_units)

    def micro_batches(self, step: int) -> list[dict]:
        """The collated micro-batches of optimizer step `step` (0-based, across epochs)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        per_step = self.micro_batch_size * self.grad_accum_steps
        units = order[within * per_step : (within + 1) * per_step]
        batches = []
        for at in range(0, len(units), self.micro_batch_size):
            chunk = [int(u) for u in units[at : at + self.micro_batch_size]]
            if self.rows is not None:
                rows = [[self.samples[i] for i in self.rows[u]] for u in chunk]
                segments = [
                    [(u, sum(len(ids) for ids, _ in row))]
                    for u, row in zip(chunk, rows, strict=True)
                ]
                if self.flatten:
                    rows = [[sample for row in rows for sample in row]]
                    segments = [[seg for row in segments for seg in row]]
                batch = collate_packed(rows, self.pad_id)
            elif self.group > 1:
                members = [u * self.group + k for u in chunk for k in range(self.group)]
                batch = collate_units(self.samples, members, self.pad_id, self.reference)
                segments = [[(i, int(self.samples.lengths[i]))] for i in members]
            else:
                batch = collate([self.samples[u] for u in chunk], self.pad_id)
                segments = [[(u, int(self.samples.lengths[u]))] for u in chunk]
            if self.extras is not None:
                if self.rows is not None:
                    members = [i for u in chunk for i in self.rows[u]]
                elif self.group == 1:
                    members = chunk
                batch.update(self.extras.entries(members))
            width = batch["input_ids"].shape[1]
            batch[DROPOUT_KEYS] = token_keys(self.seed, step, segments, width)
            batches.append(batch)
        return batches


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The seed of torch's generator for micro-batch `index` of step `step` (0-based)."""
    return hash_int(hash_int(hash_int(seed) ^ step) ^ index)


def trained_tokens(batch: dict) -> int:
    """Positions whose next-token target trains (labels[:, 1:] != -100)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def collate_units(
    samples: SampleSet,
    rows: list[int],
    pad_id: int,
    reference: np.ndarray | None = None,
    extras: object | None = None,
) -> dict:
    batch = collate([samples[i] for i in rows], pad_id)
    if extras is not None:
        batch.update(extras.entries(rows))
    if samples.flags is not None:
        batch[UNIT_FLAGS] = torch.as_tensor(samples.flags[rows].astype(np.int64))
    if reference is not None:
        batch[REFERENCE_LOGPS] = torch.as_tensor(reference[rows])
    return batch


def eval_batches(samples: SampleSet, batch_size: int, pad_id: int):
    """Padded batches in length order (less padding), for evaluation."""
    order = np.argsort(samples.lengths, kind="stable")
    for at in range(0, len(order), batch_size):
        yield collate([samples[int(i)] for i in order[at : at + batch_size]], pad_id)
