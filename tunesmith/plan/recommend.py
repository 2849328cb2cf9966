"""Which methods fit the GPU, with which switches, at what micro-batch and sequence length, and
how long the run's dataset takes: the usual decision tree (full if it fits, else LoRA, else
QLoRA; checkpointing, then an 8-bit optimizer, then pure-bf16 weights when memory is short),
computed with `estimate.py` for the model at hand.

For each method the cheapest setting that fits the run's micro-batch and sequence length is
chosen, in the order that costs least speed or precision: gradient checkpointing off, then on
(one more forward pass, about a third more compute), then 8-bit AdamW states, then (full
fine-tuning only) bf16 weights without fp32 master copies, then offloaded activations (the
checkpointed layer inputs in host memory; a little time, overlapped on a side stream). A
method that fits at none of them is shown at its most frugal setting with the largest
micro-batch and sequence that fit there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tunesmith.builder import master_weights
from tunesmith.data import prepare_data
from tunesmith.data.pack import pack_groups
from tunesmith.errors import TunesmithError, first_line
from tunesmith.plan.estimate import Skeleton, estimate_step, flops_per_token, skeleton
from tunesmith.plan.gpus import UTILIZATION
from tunesmith.registry import find_method, method_of, registered_methods
from tunesmith.train.batches import BatchPlan
from tunesmith.train.loss import CHUNK_ELEMENTS

GIB = 2**30
MAX_MICRO_BATCH = 1024
SEQ_STEP = 128
"""Sequence lengths are searched in multiples of this."""


@dataclass
class Setting:
    checkpointing: bool
    optimizer: str
    master: bool
    """Full fine-tuning: fp32 master weights (false: pure bf16 weights)."""
    offload: bool = False
    """Checkpointed layer inputs in host memory (`train.offload_activations`)."""

    def changes_from(self, other: Setting) -> str:
        """This setting as the run-config keys that differ from `other`."""
        keys = []
        if self.checkpointing != other.checkpointing:
            keys.append(f"train.gradient_checkpointing={str(self.checkpointing).lower()}")
        if self.optimizer != other.optimizer:
            keys.append(f"train.optimizer={self.optimizer}")
        if self.master != other.master:
            keys.append(f"train.fp32_master_weights={str(self.master).lower()}")
        if self.offload != other.offload:
            keys.append(f"train.offload_activations={str(self.offload).lower()}")
        return " ".join(keys)

    def describe(self) -> str:
        parts = ["checkpointing " + ("on" if self.checkpointing else "off"), self.optimizer]
        if not self.master:
            parts.append("bf16 weights")
        if self.offload:
            parts.append("offloaded activations")
        return ", ".join(parts)


@dataclass
class Option:
    method: str
    setting: Setting
    peak_bytes: int
    """Estimated peak at the run's micro-batch and sequence length."""
    fits: bool
    max_micro_batch: int
    """Largest micro-batch at the run's sequence length that fits (0: none)."""
    max_seq_len: int
    """Longest sequence (a multiple of 128, within the model's positions) at micro-batch 1."""
    max_seq_at_batch: int
    """Longest sequence at the run's micro-batch."""
    trainable_params: int
    tokens_per_s: float | None
    hours: float | None
    """For the run's dataset and epochs, when the plan could read them."""


@dataclass
class Workload:
    """The run's training data as the trainer will batch it."""

    samples: int
    tokens_per_epoch: int
    """Real tokens (no padding)."""
    processed_tokens: int
    """Tokens the run pushes through the model, padding included, over all its steps."""
    steps: int
    epochs: float
    padding: float
    """Fraction of processed tokens that are padding."""
    packed_padding: float | None = None
    """With data.packing on instead (when it is off): the padding fraction it would leave."""


def method_label(method) -> str:
    """The method's name in the table: its name, or dora / qlora+dora for LoRA with DoRA."""
    return method_of(method).label_of(method)


def methods_to_compare(method) -> list[tuple[str, object]]:
    """(label, method config) for every registered method with its defaults (LoRA: LoRA and
    DoRA; LoRA-family rows take the run's rank and targets when the run uses LoRA), and the
    run's own method replaces its row (or is added)."""
    rows = {}
    for spec in registered_methods():
        rows.update(spec.rows_for_plan(method))
    rows[method_label(method)] = method
    return list(rows.items())


def settings_for(method) -> list[Setting]:
    """The switches tried, cheapest last; full fine-tuning may also drop fp32 master weights."""
    out = [Setting(False, "adamw", True), Setting(True, "adamw", True)]
    out.append(Setting(True, "adamw_8bit", True))
    if not method_of(method).trains_adapter:
        out.append(Setting(True, "adamw_8bit", False))
    last = out[-1]
    out.append(Setting(True, "adamw_8bit", last.master, offload=True))
    return out


def largest(fits, low: int, high: int) -> int:
    """The largest n in [low, high] with fits(n), for a monotone `fits`; low - 1 if none."""
    if not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def option_for(
    model_config,
    method,
    setting: Setting,
    sk: Skeleton,
    config,
    memory_bytes: float | None,
    tflops: float | None,
    work: Workload | None,
) -> Option:
    """`method` at `setting`: its estimated peak at the run's shape, whether that fits, the
    largest micro-batch and sequences that fit, its speed and the dataset's hours."""
    seq, batch = config.data.max_seq_len, config.train.micro_batch_size
    max_positions = getattr(model_config, "max_position_embeddings", None) or 131072

    def under(b: int, s: int) -> bool:
        est = estimate_step(sk, s, b, setting.checkpointing, setting.optimizer, setting.offload)
        return memory_bytes is None or est.peak_bytes <= memory_bytes

    peak = estimate_step(
        sk, seq, batch, setting.checkpointing, setting.optimizer, setting.offload
    ).peak_bytes
    max_batch = max_seq = max_seq_batch = 0
    if memory_bytes is not None:
        max_batch = largest(lambda b: under(b, seq), 1, MAX_MICRO_BATCH)
        top = max(1, max_positions // SEQ_STEP)
        max_seq = largest(lambda n: under(1, n * SEQ_STEP), 1, top) * SEQ_STEP
        max_seq_batch = largest(lambda n: under(batch, n * SEQ_STEP), 1, top) * SEQ_STEP
    speed = hours = None
    if tflops is not None:
        flops = flops_per_token(model_config, method_of(method).name, seq, setting.checkpointing)
        speed = tflops * 1e12 * UTILIZATION / flops
        if work is not None:
            hours = work.processed_tokens / speed / 3600
    return Option(
        method_of(method).name,
        setting,
        int(peak),
        memory_bytes is None or peak <= memory_bytes,
        max_batch,
        max_seq,
        max_seq_batch,
        sk.trainable_params,
        speed,
        hours,
    )


def compare_methods(
    model_config,
    config,
    compute_dtype: torch.dtype,
    memory_bytes: float | None,
    tflops: float | None,
    work: Workload | None,
    notes: list[str] | None = None,
) -> list[Option]:
    """One `Option` per method of `methods_to_compare`, at the first of its `settings_for`
    that fits (or the last); see the module docstring. A method other than the run's own that
    cannot be attached to this model is left out, with the reason appended to `notes`."""
    seq, batch = config.data.max_seq_len, config.train.micro_batch_size
    own = method_label(config.method)
    options = []
    for label, method in methods_to_compare(config.method):
        skeletons: dict[bool, Skeleton] = {}
        try:
            skeletons[False] = skeleton(model_config, method, compute_dtype, False)
        except TunesmithError as err:
            if label == own:
                raise
            if notes is not None:
                notes.append(f"{label} left out of the method table: {first_line(err)}")
            continue
        for setting in settings_for(method):
            master = master_weights(method, setting.master)
            if master not in skeletons:
                skeletons[master] = skeleton(model_config, method, compute_dtype, master)
            sk = skeletons[master]
            peak = estimate_step(
                sk, seq, batch, setting.checkpointing, setting.optimizer, setting.offload
            )
            if memory_bytes is None or peak.peak_bytes <= memory_bytes:
                break
        option = option_for(model_config, method, setting, sk, config, memory_bytes, tflops, work)
        option.method = label
        options.append(option)
    return options


def pick(options: list[Option], run_method: str) -> Option | None:
    """The run's own method (its `method_label`) when it fits, else the first in the table
    that fits: full, LoRA, QLoRA, then the rest."""
    fitting = [o for o in options if o.fits]
    for option in fitting:
        if option.method == run_method:
            return option
    return fitting[0] if fitting else None


def workload(config, tokenizer) -> Workload:
    """Tokenize the run's data as `tunesmith train` does and count what its steps process."""

    prepared = prepare_data(config.data, tokenizer, config.train.seed)
    lengths = np.asarray(prepared.train.lengths, dtype=np.int64)
    plan = BatchPlan(
        prepared.train,
        prepared.train_rows,
        config.train.micro_batch_size,
        config.train.grad_accum_steps,
        config.train.seed,
        0,
        group=prepared.group,
    )
    steps = plan.total_steps(config.train.epochs, config.train.max_steps)
    processed, real = _processed_tokens(plan, lengths, prepared.train_rows, steps)
    packed_padding = None
    if prepared.train_rows is None and len(lengths) and prepared.group == 1:
        rows = pack_groups(lengths, config.data.max_seq_len)
        packed = BatchPlan(
            prepared.train,
            rows,
            config.train.micro_batch_size,
            config.train.grad_accum_steps,
            config.train.seed,
            0,
        )
        packed_steps = packed.total_steps(config.train.epochs, config.train.max_steps)
        p_all, p_real = _processed_tokens(packed, lengths, rows, packed_steps)
        packed_padding = 1 - p_real / p_all if p_all else 0.0
    return Workload(
        samples=len(lengths),
        tokens_per_epoch=int(lengths.sum()),
        processed_tokens=processed,
        steps=steps,
        epochs=steps / plan.steps_per_epoch,
        padding=1 - real / processed if processed else 0.0,
        packed_padding=packed_padding,
    )


def _processed_tokens(plan, lengths, rows, steps: int) -> tuple[int, int]:
    """(tokens with padding, tokens without) in the micro-batches of `steps` optimizer steps,
    in `BatchPlan.micro_batches`' order: each micro-batch's rows are padded to its longest (a
    unit is a sample, a packed row, or `plan.group` sequences: a pair is two rows)."""
    if rows is not None:
        units = np.array([lengths[r].sum() for r in rows]).reshape(-1, 1)
    else:
        units = lengths[: len(lengths) // plan.group * plan.group].reshape(-1, plan.group)
    if len(units) == 0:
        return 0, 0
    per_step = plan.micro_batch_size * plan.grad_accum_steps
    padded = real = done = epoch = 0
    while done < steps:
        order = plan._order(epoch)
        take = min(steps - done, plan.steps_per_epoch)
        chosen = units[order[: take * per_step]]
        for at in range(0, len(chosen), plan.micro_batch_size):
            chunk = chosen[at : at + plan.micro_batch_size]
            padded += int(chunk.max()) * chunk.size
            real += int(chunk.sum())
        done += take
        epoch += 1
    return padded, real


def switch_notes(
    sk: Skeleton,
    seq: int,
    batch: int,
    checkpointing: bool,
    optimizer: str,
    config,
    work: Workload | None,
) -> list[str]:
    """What each switch does at the run's shape, in GiB (estimates)."""
    notes = []
    on = estimate_step(sk, seq, batch, True, optimizer).peak_bytes
    off = estimate_step(sk, seq, batch, False, optimizer).peak_bytes
    notes.append(
        f"gradient checkpointing: {off / GIB:.1f} GiB off, {on / GIB:.1f} GiB on (one more "
        f"forward pass per step){' [on]' if checkpointing else ''}"
    )
    if sk.trainable_params and optimizer in ("adamw", "paged_adamw"):
        saved = 2 * sk.trainable_bytes - 2 * sk.trainable_params
        if saved > 0.05 * GIB:
            notes.append(
                f"8-bit optimizer (train.optimizer: adamw_8bit): saves {saved / GIB:.1f} GiB of "
                "optimizer states"
            )
    notes.append(
        "paged optimizer (paged_adamw, paged_adamw_8bit): states move to CPU memory under "
        "pressure, which absorbs spikes but does not lower this peak"
    )
    if checkpointing:
        offloaded = estimate_step(sk, seq, batch, True, optimizer, offload=True).peak_bytes
        notes.append(
            f"activation offloading (train.offload_activations): {offloaded / GIB:.1f} GiB, the "
            "checkpointed layer inputs in pinned host memory, copied on a side stream"
            f"{' [on]' if config.train.offload_activations else ''}"
        )
    tokens = batch * seq
    logits = tokens * sk.vocab * (sk.compute_bytes + 8)
    notes.append(
        f"chunked loss (always on): avoids {logits / GIB:.1f} GiB of full-batch logits, their "
        "fp32 copy and log-softmax"
    )
    rows = max(1, min(tokens, CHUNK_ELEMENTS // sk.vocab))
    notes.append(
        f"kernels (train.kernels: liger, on a GPU): the fused head cross-entropy keeps the "
        f"hidden states' gradient ({tokens * sk.hidden * sk.compute_bytes / GIB:.2f} GiB) "
        f"instead of a chunk's fp32 logits and gradients ({rows * sk.vocab * 12 / GIB:.2f} GiB); "
        "RMSNorm, rotary, SwiGLU and train.compile change only the temporaries of the one "
        "layer being recomputed (not modelled)"
    )
    if work is not None:
        if config.data.packing:
            notes.append(f"packing (on): {work.padding:.0%} of processed tokens are padding")
        elif work.packed_padding is not None:
            notes.append(
                f"packing (data.packing: true): padding would fall from {work.padding:.0%} to "
                f"{work.packed_padding:.0%} of processed tokens; the peak stays the same"
            )
    return notes


def to_fit(options: list[Option], run: Option, seq: int, batch: int) -> str:
    """The changes that make the run fit, each computed: a smaller micro-batch, a shorter
    sequence, other switches, full / LoRA / QLoRA. `run.method` is the run's label."""
    changes = []
    if 1 <= run.max_micro_batch < batch:
        changes.append(
            f"train.micro_batch_size {batch} → {run.max_micro_batch} (raise "
            "train.grad_accum_steps to keep the batch)"
        )
    if SEQ_STEP <= run.max_seq_at_batch < seq:
        changes.append(f"data.max_seq_len {seq} → {run.max_seq_at_batch}")
    elif run.max_micro_batch < 1 and SEQ_STEP <= run.max_seq_len < seq:
        changes.append(f"micro-batch 1 and data.max_seq_len {seq} → {run.max_seq_len}")
    for option in options:
        if option.method == run.method:
            if option.setting != run.setting and option.max_micro_batch > run.max_micro_batch:
                size = "" if option.fits else f" at micro-batch {option.max_micro_batch}"
                changes.append(f"{option.setting.changes_from(run.setting)}{size}")
            continue
        if not _suggested(option.method):
            continue  # the table shows the rest
        if option.fits:
            changes.append(
                f"method.name={option.method} ({option.peak_bytes / GIB:.1f} GiB with "
                f"{option.setting.describe()})"
            )
        elif option.max_micro_batch >= 1:
            changes.append(
                f"method.name={option.method} at micro-batch {option.max_micro_batch} (with "
                f"{option.setting.describe()})"
            )
    return "; or ".join(changes)


def _suggested(label: str) -> bool:
    """Whether what-to-change may suggest switching to the method of a table row."""
    spec = find_method(label)
    return spec is not None and spec.suggest_in_plan
