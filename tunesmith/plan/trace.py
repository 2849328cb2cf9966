"""Peak memory of one training step, traced without allocating memory.

The real step runs on fake tensors (`FakeTensorMode`: shapes, dtypes and autograd, no data):
the model is built from its config, the run's method is attached with the same code `tunesmith
train` uses, and two steps of forward (tunesmith's chunked loss), backward and AdamW run. A
dispatch mode counts every storage an operation creates and, through a weak reference, when it
is freed, so the live total and its peak are exact for the step as traced. The peak of the
second step (optimizer states exist by then) is reported, broken down at its moment into
weights, trainable parameters, gradients, optimizer states and the rest (saved activations,
logits chunks and temporaries).

On a GPU, attention runs in a fused kernel (flash / memory-efficient SDPA) that keeps only the
output and a log-sum-exp per row, never the (seq × seq) score matrix; `attention="flash"`
traces that kernel's memory, `attention="eager"` traces the model's own attention (what CPU
runs use). With "flash", dropout also keeps a 1-byte mask as on a GPU (`FusedDropout`), where
the CPU kernel keeps one in the activations' dtype. 8-bit optimizer states are counted as 2
bytes per trainable parameter. QLoRA's bitsandbytes layers cannot run on fake tensors: the
method's `trace_base` puts a stand-in in their place that stores what they store and allocates
what their matmul allocates. With `train.offload_activations` the step runs under the same
`ActivationOffload` as training, simulated: what it would move leaves the traced device total
until its prefetch brings it back.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AttentionInterface

from tunesmith import builder
from tunesmith.adapters.dropout import KeyedDropout
from tunesmith.objectives import objective_of
from tunesmith.objectives.rows import (
    ADVANTAGES,
    OLD_LOGPS,
    REFERENCE_LOGPS,
    TEACHER_IDS,
    TEACHER_LOGPS,
    UNIT_FLAGS,
)
from tunesmith.registry import method_named, method_of
from tunesmith.train.distill import DistillLoss
from tunesmith.train.loss import ALL_TRAINED, model_loss_sum
from tunesmith.train.objective import GRPOLoss, UnitLoss, add_score_head
from tunesmith.train.offload import ActivationOffload

PLAN_ATTENTION = "tunesmith_plan_fused"


class MemoryTracker(TorchDispatchMode):
    """Live bytes of the storages created while active, and their peak. Storages are keyed by
    a serial number, not by `id()`, which Python reuses once a storage is freed: `at_peak`
    names exactly what was alive at the peak, and `key_of` maps a live storage to its key."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.serial: dict[int, int] = {}
        self.total = 0
        self.peak = 0
        self.at_peak: dict[int, int] = {}
        self.hidden: dict[int, int] = {}
        self._next = 0

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if id(storage) in self.serial:
            return
        key = self._register(storage)
        size = storage.nbytes()
        self.live[key] = size
        self.total += size
        if self.total > self.peak:
            self.peak = self.total
            self.at_peak = dict(self.live)

    def _register(self, storage) -> int:
        key = self._next
        self._next += 1
        self.serial[id(storage)] = key
        weakref.finalize(storage, self._free, id(storage), key)
        return key

    def _free(self, ident: int, key: int) -> None:
        if self.serial.get(ident) == key:
            del self.serial[ident]
        self.total -= self.live.pop(key, 0)
        self.hidden.pop(key, None)

    def move_off(self, t: torch.Tensor) -> None:
        """Activation offloading: `t`'s storage leaves the device (still alive on the host)."""
        key = self.key_of(t.untyped_storage())
        if key is not None and key in self.live:
            self.hidden[key] = self.live.pop(key)
            self.total -= self.hidden[key]

    def move_back(self, t: torch.Tensor) -> None:
        """`t`'s storage is on the device again (prefetched for the backward)."""
        key = self.key_of(t.untyped_storage())
        if key is not None and key in self.hidden:
            self.live[key] = self.hidden.pop(key)
            self.total += self.live[key]
            if self.total > self.peak:
                self.peak = self.total
                self.at_peak = dict(self.live)

    def key_of(self, storage) -> int | None:
        return self.serial.get(id(storage))

    def seed(self, tensors) -> dict[int, int]:
        """Storages that exist already (weights): counted, never freed while tracing. Returns
        their {key: bytes}."""
        out = {}
        for t in tensors:
            storage = t.untyped_storage()
            if id(storage) in self.serial:
                continue
            key = self._register(storage)
            out[key] = storage.nbytes()
        self.live.update(out)
        self.total += sum(out.values())
        self.reset_peak()
        return out

    def keys(self, tensors) -> dict[int, int]:
        """{key: bytes} of the live storages of `tensors` (None entries skipped)."""
        out = {}
        for t in tensors:
            if isinstance(t, torch.Tensor):
                key = self.key_of(t.untyped_storage())
                if key is not None:
                    out[key] = self.live.get(key, 0)
        return out

    def reset_peak(self) -> None:
        self.peak = self.total
        self.at_peak = dict(self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


class _FlashAttention(torch.autograd.Function):
    """Memory of a fused attention kernel: output and fp32 log-sum-exp saved; gradients of
    q, k, v in the backward (no values are computed: only shapes matter here)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FusedDropout(torch.nn.Dropout):
    """Dropout as a GPU runs it (`native_dropout`, which saves a 1-byte mask), not as the CPU
    kernel does (a mask in the activations' dtype): the plan is for a GPU."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


def _plan_attention(module, query, key, value, attention_mask, **kwargs):
    out = _FlashAttention.apply(query, key, value)  # (batch, heads, seq, dim)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    AttentionInterface.register(PLAN_ATTENTION, _plan_attention)


def build_traced_model(model_config, method, train, compute_dtype, attention: str = "flash"):
    """The model the run trains (see `tunesmith.builder.build_model`), built from
    `model_config` under whatever tensor mode or device is current (fake tensors to trace, the
    meta device to count), in training mode with `train`'s checkpointing. "flash" attention is
    the GPU's fused kernel's memory (see the module docstring)."""
    if attention == "flash":
        _register_attention()
    return builder.build_model(
        method,
        train=train,
        compute_dtype=compute_dtype,
        model_config=model_config,
        attention=PLAN_ATTENTION if attention == "flash" else attention,
    )


@dataclass
class TracedStep:
    peak_bytes: int
    weights_bytes: int
    trainable_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    """Everything else live at the peak: saved activations, loss chunks, temporaries."""
    trainable_params: int
    total_params: int
    notes: list[str] = field(default_factory=list)


def _breakdown(tracker, model, params, static, grads, states, optimizer: str) -> TracedStep:
    """The traced peak, split at its moment into weights, trainable parameters, gradients,
    optimizer states and the rest."""
    trainable = tracker.keys(params)
    at_peak = tracker.at_peak
    optimizer_bytes = sum(v for k, v in at_peak.items() if k in states)
    peak = tracker.peak
    notes = []
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        # fp32 m and v traced; 8-bit states are 2 bytes per parameter
        traced_states = optimizer_bytes
        optimizer_bytes = sum(p.numel() for p in params) * 2
        peak += optimizer_bytes - traced_states
        notes.append("8-bit optimizer states counted as 2 bytes per trainable parameter")
    grads_bytes = sum(v for k, v in at_peak.items() if k in grads)
    other = tracker.peak - sum(static.values()) - grads_bytes
    other -= sum(v for k, v in at_peak.items() if k in states)
    return TracedStep(
        peak_bytes=peak,
        weights_bytes=sum(v for k, v in static.items() if k not in trainable),
        trainable_bytes=sum(trainable.values()),
        grads_bytes=grads_bytes,
        optimizer_bytes=optimizer_bytes,
        activations_bytes=other,
        trainable_params=sum(p.numel() for p in params),
        total_params=sum(p.numel() for p in model.parameters()),
        notes=notes,
    )


def trace_step(
    model_config,
    method,
    train,
    seq_len: int,
    batch: int,
    compute_dtype: torch.dtype,
    attention: str = "flash",
    objective=None,
    teacher_config=None,
) -> TracedStep:
    """Trace two training steps of `method` (a run config's method section) with `train`'s
    micro-batch settings on a model built from `model_config`; see the module docstring.
    With a preference `objective` (its config), a micro-batch is `batch` units of its group
    (pairs: 2 × batch rows) scored by its loss, with the reference pass in the step (the
    adapter switched off, or a frozen copy of a fully trained model) unless it is
    precomputed. Distillation's teacher (`teacher_config`, unless its top-k is precomputed)
    is built beside the model, frozen, and runs its forward pass in the step."""
    found = objective_of(objective) if objective is not None else None
    unit = None if found is None or found.token_level else found
    rows = batch * (unit.group if unit else 1)
    if unit is not None and unit.output == "generation":  # GRPO: prompts x completions
        rows = batch * objective.num_generations
    master = builder.master_weights(method, train.fp32_master_weights)
    token = ALL_TRAINED.set(True)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = build_traced_model(model_config, method, train, compute_dtype, attention)
            if attention == "flash":  # the GPU's kernels (eager: the CPU's, for tests)
                for module in model.modules():  # adapters' keyed dropout saves 1 byte too
                    if type(module) in (torch.nn.Dropout, KeyedDropout):
                        module.__class__ = FusedDropout
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
            ids = torch.zeros(rows, seq_len, dtype=torch.long)
            tracker = MemoryTracker()
            if unit is not None and unit.output == "score":
                add_score_head(model, 0)
                params.append(model.score.weight)
                optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
            reference = None
            precompute = getattr(objective, "precompute_reference", False)
            full = not method_of(method).trains_adapter
            if unit and unit.reference and not precompute and full:  # a frozen copy
                reference = build_traced_model(
                    model_config, method, train, compute_dtype, attention
                )
                reference.eval().requires_grad_(False)
            teacher = None
            if unit and unit.output == "logits" and teacher_config is not None:
                if not objective.precompute_teacher:
                    frozen = method_named("full").config(name="full")
                    teacher = build_traced_model(
                        teacher_config, frozen, train, compute_dtype, attention
                    )
                    teacher.eval().requires_grad_(False)
            tensors = list(model.parameters()) + list(model.buffers())
            for other in (reference, teacher):
                if other is not None:
                    tensors += list(other.parameters()) + list(other.buffers())
            static = tracker.seed(tensors)
            step_loss = None
            batch_in = {"input_ids": ids, "labels": ids}
            if unit is not None and unit.output == "logits":
                step_loss = DistillLoss(
                    objective, teacher, getattr(model_config, "vocab_size", None)
                )
                batch_in["attention_mask"] = torch.ones(rows, seq_len, dtype=torch.long)
                if objective.precompute_teacher:
                    k = objective.top_k
                    tokens = rows * (seq_len - 1)
                    batch_in[TEACHER_IDS] = torch.zeros(tokens, k, dtype=torch.int32)
                    batch_in[TEACHER_LOGPS] = torch.zeros(tokens, k)
            elif unit is not None and unit.output == "generation":
                step_loss = GRPOLoss(objective)
                batch_in["attention_mask"] = torch.ones(rows, seq_len, dtype=torch.long)
                batch_in[ADVANTAGES] = torch.zeros(rows)
                if objective.num_iterations > 1:
                    batch_in[OLD_LOGPS] = torch.zeros(rows * (seq_len - 1))
            elif unit is not None:
                step_loss = UnitLoss(unit, objective, reference, unit.group)
                batch_in["attention_mask"] = torch.ones(rows, seq_len, dtype=torch.long)
                if precompute and unit.reference:
                    batch_in[REFERENCE_LOGPS] = torch.zeros(rows)
                if "unpaired" in unit.formats:
                    batch_in[UNIT_FLAGS] = torch.zeros(rows, dtype=torch.long)
            autocast = torch.autocast(
                "cpu", dtype=compute_dtype, enabled=master and compute_dtype != torch.float32
            )
            offload = contextlib.nullcontext()
            if train.offload_activations:
                offload = ActivationOffload(
                    "cpu", simulate=True, on_move=tracker.move_off, on_return=tracker.move_back
                )
            with tracker:
                for step in range(2):
                    if step == 1:
                        tracker.reset_peak()
                    with autocast, offload:
                        if step_loss is None:
                            total, count = model_loss_sum(model, batch_in)
                        else:
                            total, count, _ = step_loss(model, batch_in)
                    (total / count).backward()
                    grads = tracker.keys(p.grad for p in params)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            states = tracker.keys(v for s in optimizer.state.values() for v in s.values())
            return _breakdown(tracker, model, params, static, grads, states, train.optimizer)
    finally:
        ALL_TRAINED.reset(token)
