"""`tunesmith plan run.yaml`: the traced peak memory of one training step of the run, its
breakdown, whether it fits the GPU, the time for the run's dataset, and which methods and
switches fit (`recommend.py`, from the analytic estimate)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tunesmith.builder import master_weights
from tunesmith.errors import TunesmithError
from tunesmith.models import load_tokenizer, read_model_config
from tunesmith.objectives import objective_of
from tunesmith.plan.estimate import estimate_step, flops_per_token, skeleton
from tunesmith.plan.gpus import GPU, UTILIZATION, gpu
from tunesmith.plan.recommend import (
    SEQ_STEP,
    Option,
    Setting,
    Workload,
    compare_methods,
    method_label,
    methods_to_compare,
    option_for,
    pick,
    switch_notes,
    to_fit,
    workload,
)
from tunesmith.plan.scaling import Scale, plan_scale
from tunesmith.plan.trace import TracedStep, trace_step
from tunesmith.registry import method_of
from tunesmith.shards import parse_size

GIB = 2**30
SMALL_MODEL = 3e9
"""Below this many parameters steps are bound by per-kernel overheads, not FLOPs."""


@dataclass
class Plan:
    model: str
    method: str
    micro_batch: int
    seq_len: int
    dtype: str
    gradient_checkpointing: bool
    optimizer: str
    traced: TracedStep
    gpu: str | None
    gpu_memory_gib: float | None
    fits: bool | None
    flops_per_token: float
    tokens_per_s: float | None
    workload: Workload | None = None
    hours: float | None = None
    """The run's dataset and epochs at tokens_per_s."""
    options: list[Option] = field(default_factory=list)
    """Full, LoRA, QLoRA (and the run's method): the cheapest switches that fit (estimates)."""
    recommended: Option | None = None
    switches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    scale: Scale | None = None
    """With --gpus / --nodes: the run on several GPUs (per GPU, DDP and FSDP)."""

    @property
    def fits_nothing(self) -> bool:
        """No method fits even at micro-batch 1 and the shortest sequence searched."""
        return self.gpu_memory_gib is not None and not any(o.max_seq_len for o in self.options)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        t = self.traced

        def gib(n: int) -> str:
            return f"{n / GIB:9.2f} GiB"

        out = [
            f"{self.model}: {self.method}, micro-batch {self.micro_batch} × {self.seq_len} tokens, "
            f"{self.dtype}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"
            f", {self.optimizer}",
            f"  parameters        {t.total_params / 1e9:9.3f} B "
            f"({t.trainable_params / 1e6:,.1f} M trainable)",
            f"  weights (frozen)  {gib(t.weights_bytes)}",
            f"  trainable         {gib(t.trainable_bytes)}",
            f"  gradients         {gib(t.grads_bytes)}",
            f"  optimizer states  {gib(t.optimizer_bytes)}",
            f"  activations etc.  {gib(t.activations_bytes)}",
            f"  peak (traced)     {gib(t.peak_bytes)}",
        ]
        if self.gpu_memory_gib is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"  {verdict} in {self.gpu or 'the GPU'} ({self.gpu_memory_gib:g} GiB)")
        if self.tokens_per_s is not None:
            out.append(
                f"  time: {self.flops_per_token / 1e9:.1f} GFLOP/token, about "
                f"{self.tokens_per_s:,.0f} tokens/s at {UTILIZATION:.0%} utilisation "
                f"({3600 * self.tokens_per_s / 1e6:,.1f} M tokens/hour)"
            )
        w = self.workload
        if w is not None:
            line = (
                f"  dataset: {w.samples:,} samples, {w.tokens_per_epoch / 1e6:,.2f} M tokens per "
                f"epoch; {w.steps:,} steps ({w.epochs:g} epochs) process "
                f"{w.processed_tokens / 1e6:,.2f} M tokens ({w.padding:.0%} padding)"
            )
            if self.hours is not None:
                line += f": about {_duration(self.hours)}"
            out.append(line)
        if self.options:
            where = f"{self.gpu or 'the GPU'} ({self.gpu_memory_gib:g} GiB)"
            out += [
                "",
                f"Methods for {where} at micro-batch {self.micro_batch} × "
                f"{self.seq_len} (analytic estimates):",
            ]
            header = f"  {'method':10} {'peak':>9}  {'fits':4}  {'max batch':>9}  "
            header += f"{'max seq':>7}  {'tokens/s':>8}  {'time':>7}  settings"
            out.append(header)
            for o in self.options:
                speed = f"{o.tokens_per_s:,.0f}" if o.tokens_per_s is not None else "-"
                time = _duration(o.hours) if o.hours is not None else "-"
                out.append(
                    f"  {o.method:10} {o.peak_bytes / GIB:6.1f} GiB  {'yes' if o.fits else 'no':4}"
                    f"  {o.max_micro_batch:9d}  {o.max_seq_len:7d}  {speed:>8}  {time:>7}  "
                    f"{o.setting.describe()}"
                )
            out.append("  (max batch: at the run's sequence length; max seq: at micro-batch 1)")
            if self.recommended is not None:
                r = self.recommended
                out.append(f"  recommended: {r.method} with {r.setting.describe()}")
        if self.switches:
            out += ["", "Switches at this shape (estimates):"]
            out += [f"  {line}" for line in self.switches]
        if self.scale is not None:
            out += ["", *self.scale.lines()]
        notes = [*t.notes, *self.notes]
        return out + ([""] if notes else []) + [f"note: {n}" for n in notes]


def size(n: float) -> str:
    """Bytes as GiB with one decimal, or MiB below 1 GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    return f"{hours:.1f} h"


def plan_run(
    config,
    gpu_name: str | None = None,
    gpu_mem: str | None = None,
    gpus: int = 1,
    nodes: int = 1,
) -> Plan:
    """Trace the run config's training step (see `trace.py`) and estimate its speed; with
    `gpus` × `nodes` > 1, also per GPU on that many (see `scaling.py`)."""

    target: GPU | None = gpu(gpu_name) if gpu_name else None
    memory = target.memory_gib if target else None
    if gpu_mem is not None:
        memory = parse_size(gpu_mem, "--gpu-mem") / GIB
    model_config = read_model_config(
        config.model.path, "model.path", config.model.revision, config.model.trust_remote_code
    )
    method = config.method
    dtype_name = config.model.dtype if config.model.dtype != "auto" else "bf16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    checkpointing = config.train.gradient_checkpointing
    if checkpointing is None:
        checkpointing = True
    train = config.train.model_copy(update={"gradient_checkpointing": checkpointing})
    seq = config.data.max_seq_len
    batch = config.train.micro_batch_size
    teacher_config = _teacher_config(config)
    traced = trace_step(
        model_config,
        method,
        train,
        seq,
        batch,
        dtype,
        objective=config.objective,
        teacher_config=teacher_config,
    )
    fits = None if memory is None else traced.peak_bytes <= memory * GIB
    flops = flops_per_token(model_config, method_of(method).name, seq, checkpointing)
    notes: list[str] = []
    flops *= _objective_passes(config, model_config, notes, teacher_config)
    speed = target.tflops * 1e12 * UTILIZATION / flops if target else None
    if speed is not None and traced.total_params < SMALL_MODEL:
        notes.append(
            "time: models this small run below the assumed utilisation (an H100 ran a 1B LoRA "
            "step at 1 × 2048 at 9%, an 8B one at 2 × 2048 at 36%); read it as a lower bound"
        )
    work = _workload(config, notes)
    hours = work.processed_tokens / speed / 3600 if work is not None and speed else None
    plan = Plan(
        model=config.model.path,
        method=method_of(method).name,
        micro_batch=batch,
        seq_len=seq,
        dtype=dtype_name,
        gradient_checkpointing=checkpointing,
        optimizer=train.optimizer,
        traced=traced,
        gpu=target.name if target else None,
        gpu_memory_gib=memory,
        fits=fits,
        flops_per_token=flops,
        tokens_per_s=speed,
        workload=work,
        hours=hours,
        notes=notes,
    )
    _advise(plan, model_config, config, dtype, memory, target, work)
    if gpus * nodes > 1:
        e = torch.empty((), dtype=dtype).element_size()
        kv = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
        head_dim = getattr(model_config, "head_dim", None) or (
            model_config.hidden_size // model_config.num_attention_heads
        )
        d, inter = model_config.hidden_size, model_config.intermediate_size
        layer = d * (d + 2 * kv * head_dim) + d * d + 3 * d * inter
        plan.scale = plan_scale(
            traced,
            layer * e,
            gpus,
            nodes,
            memory * GIB if memory is not None else None,
            speed,
            batch * seq,
            method_of(method).trains_adapter,
            checkpointing,
            traced.total_params * e,
            config.train.distributed,
        )
    return plan


def _teacher_config(config):
    """Distillation's teacher's model config (an adapter folder's base), unless its top-k is
    precomputed; None otherwise."""
    objective = config.objective
    if objective_of(objective).output != "logits" or objective.precompute_teacher:
        return None
    path = objective.teacher
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        path = json.loads(adapter.read_text()).get("base_model_name_or_path") or path
    return read_model_config(path, "objective.teacher", None, config.model.trust_remote_code)


def _parameters(model_config) -> float:
    """Decoder parameters of a Llama-shaped config (for the teacher's share of the time)."""
    d = model_config.hidden_size
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or d // heads
    inter = model_config.intermediate_size
    layer = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * inter
    return layer * model_config.num_hidden_layers + 2 * d * model_config.vocab_size


def _distill_passes(config, model_config, notes: list[str], teacher_config) -> float:
    """Distillation: the teacher's forward pass (2 FLOPs per parameter and token beside the
    student's 6), unless its top-k is precomputed."""
    objective = config.objective
    if teacher_config is None:
        notes.append(
            f"objective distill: the teacher's top-{objective.top_k} log-probabilities are "
            "computed once before training and read with the batches"
        )
        return 1.0
    ratio = _parameters(teacher_config) / max(_parameters(model_config), 1)
    notes.append(
        f"objective distill: the teacher ({objective.teacher}) is held in memory beside the "
        f"model and runs a forward pass without gradients each step: time × {1 + ratio / 3:.2f}"
    )
    return 1 + ratio / 3


def _grpo_passes(config, notes: list[str]) -> float:
    """GRPO: a micro-batch is micro_batch_size prompts x num_generations completions; each round
    also generates them (counted as one more forward pass over every token: decoding is
    memory-bound, so read it as a lower bound), and passes without gradients for the
    generating policy's log-probabilities (num_iterations > 1) and the reference (beta > 0)."""
    o = config.objective
    batch = config.train.micro_batch_size
    factor = 1 + (1 / 3) / o.num_iterations  # generation, once per round
    extra = []
    if o.num_iterations > 1:
        factor += (1 / 3) / o.num_iterations
        extra.append("the sampling policy's log-probabilities")
    if o.beta > 0:
        factor += (1 / 3) / o.num_iterations
        extra.append("the reference's (the adapter off)")
    passes = f"; then passes without gradients for {' and '.join(extra)}" if extra else ""
    notes.append(
        f"objective grpo: a micro-batch is {batch} prompts x {o.num_generations} completions "
        f"({batch * o.num_generations} sequences of up to max_seq_len; the peak above is traced "
        f"with them); each round first generates them on the serving engine (its KV cache is "
        f"not in the traced peak){passes}: time × {factor:.2f} at least"
    )
    return factor


def _objective_passes(config, model_config, notes: list[str], teacher_config=None) -> float:
    """A preference objective's cost beside the supervised step's, as a factor on its FLOPs
    per token, with a note saying what the step holds: each micro-batch is
    micro_batch_size units (a pair is two sequences), and objectives with a reference run
    one more forward pass without gradients (2 of the step's 6 FLOPs per parameter and
    token), unless it is precomputed (once, before training)."""
    objective = objective_of(config.objective)
    if objective.token_level:
        return 1.0
    if objective.output == "logits":
        return _distill_passes(config, model_config, notes, teacher_config)
    if objective.output == "generation":
        return _grpo_passes(config, notes)
    unit = {"preference": "pair", "unpaired": "example"}[objective.formats[0]]
    batch = config.train.micro_batch_size
    text = (
        f"objective {objective.name}: a micro-batch is {batch} {unit}s ({batch * objective.group} "
        "sequences; the peak above is traced with them"
    )
    precompute = getattr(config.objective, "precompute_reference", False)
    factor = 1.0
    if objective.reference and precompute:
        text += "); the reference log-probabilities are computed once before training"
    elif objective.reference:
        copy = "" if method_of(config.method).trains_adapter else ", a frozen copy of the model"
        text += (
            f"), plus a reference forward pass without gradients{copy or ' (the adapter off)'}"
            f"{copy and ' counted in the weights'}: time × 4/3"
        )
        factor = 4 / 3
    else:
        text += "; no reference model)"
    notes.append(text)
    return factor


def planned_peak(config) -> int:
    """The traced peak bytes of the run config's training step (what `tunesmith train` records
    beside the measured peak)."""
    return plan_run(config).traced.peak_bytes


def nothing_fits(plan: Plan, model_config, config, dtype) -> str:
    """What the smallest setup needs, at micro-batch 1 and a short sequence, and what to do."""

    best = None
    for label, method in methods_to_compare(config.method):
        o = next(o for o in plan.options if o.method == label)
        master = master_weights(method, o.setting.master)
        sk = skeleton(model_config, method, dtype, master)
        est = estimate_step(sk, SEQ_STEP, 1, True, o.setting.optimizer, o.setting.offload)
        if best is None or est.peak_bytes < best[0].peak_bytes:
            best = (est, o)
    est, o = best
    return (
        f"nothing fits in {plan.gpu_memory_gib:g} GiB: the smallest setup, {o.method} with "
        f"{o.setting.describe()}, needs {size(est.peak_bytes)} at micro-batch 1 × "
        f"{SEQ_STEP} tokens ({size(est.weights_bytes)} of it frozen weights); use a "
        "GPU with more memory (--gpu, --gpu-mem) or a smaller model (model.path)"
    )


def _workload(config, notes: list[str]) -> Workload | None:
    """The run's dataset as the trainer batches it, or None with a note saying why not."""
    if objective_of(config.objective).output == "generation":
        notes.append(
            "dataset time not estimated: objective grpo's batches are generated, their "
            "lengths known only when it runs"
        )
        return None
    try:
        tokenizer = load_tokenizer(config.model)
    except (OSError, ValueError):
        where = config.model.tokenizer or config.model.path
        notes.append(
            f"dataset time not estimated: no tokenizer could be loaded from {where} "
            "(model.tokenizer / model.path)"
        )
        return None
    try:
        return workload(config, tokenizer)
    except (TunesmithError, OSError) as err:
        notes.append(f"dataset time not estimated: {str(err).splitlines()[0]}")
        return None


def _advise(plan: Plan, model_config, config, dtype, memory, target, work) -> None:
    """Fill in the method table, the recommendation, the switches and what to change."""

    memory_bytes = memory * GIB if memory is not None else None
    tflops = target.tflops if target else None
    method, train = config.method, config.train
    master = master_weights(method, train.fp32_master_weights)
    sk = skeleton(model_config, method, dtype, master)
    plan.switches = switch_notes(
        sk,
        plan.seq_len,
        plan.micro_batch,
        plan.gradient_checkpointing,
        train.optimizer,
        config,
        work,
    )
    if memory_bytes is None:
        return
    plan.options = compare_methods(
        model_config, config, dtype, memory_bytes, tflops, work, plan.notes
    )
    plan.recommended = pick(plan.options, method_label(method))
    if plan.fits_nothing:
        plan.notes.append(nothing_fits(plan, model_config, config, dtype))
    elif plan.fits is False:
        setting = Setting(
            plan.gradient_checkpointing,
            train.optimizer,
            master or method_of(method).trains_adapter,
            offload=train.offload_activations,
        )
        own = option_for(model_config, method, setting, sk, config, memory_bytes, tflops, work)
        own.method = method_label(method)
        changes = to_fit(plan.options, own, plan.seq_len, plan.micro_batch)
        plan.notes.append(f"to fit {memory:g} GiB: {changes or 'nothing in reach'}")
