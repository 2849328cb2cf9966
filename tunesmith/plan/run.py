"""`tunesmith plan run.yaml`: the traced peak memory of one training step of the run, its
breakdown, whether it fits the GPU, and a time estimate."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.plan.gpus import GPU, UTILIZATION, gpu
from tunesmith.plan.trace import TracedStep, trace_step

GIB = 2**30


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
    notes: list[str] = field(default_factory=list)

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
        return out + [f"  note: {n}" for n in [*t.notes, *self.notes]]


def flops_per_token(config, method: str, seq_len: int, checkpointing: bool) -> float:
    """Training FLOPs per token: full ≈ 6N (forward 2N, backward 4N), adapters ≈ 4N (no weight
    gradients for the frozen base), plus attention (causal: 2·layers·seq·hidden forward, twice
    that backward), plus one more forward with gradient checkpointing."""
    layers = config.num_hidden_layers
    hidden = config.hidden_size
    vocab = config.vocab_size
    inter = config.intermediate_size
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    per_layer = hidden * (hidden + 2 * kv * head_dim) + hidden * hidden + 3 * hidden * inter
    n = layers * per_layer + hidden * vocab  # matmul parameters (the head included)
    attention = 2 * layers * seq_len * hidden  # causal QKᵀ and AV, forward
    forward = 2 * n + attention
    backward = (4 * n if method == "full" else 2 * n) + 2 * attention
    return forward + backward + (forward if checkpointing else 0)


def plan_run(config, gpu_name: str | None = None, gpu_mem: str | None = None) -> Plan:
    """Trace the run config's training step (see `trace.py`) and estimate its speed."""
    from transformers import AutoConfig

    from tunesmith.shards import parse_size

    target: GPU | None = gpu(gpu_name) if gpu_name else None
    memory = target.memory_gib if target else None
    if gpu_mem is not None:
        memory = parse_size(gpu_mem, "--gpu-mem") / GIB
    path = config.model.path
    if path.startswith((".", "/", "~")) and not (Path(path).expanduser() / "config.json").is_file():
        raise TunesmithError(f"model.path: {path}: no config.json there (no such model folder)")
    try:
        model_config = AutoConfig.from_pretrained(
            config.model.path, revision=config.model.revision,
            trust_remote_code=config.model.trust_remote_code,
        )  # fmt: skip
    except (OSError, ValueError) as err:
        raise TunesmithError(
            f"model.path: cannot read a model config from {config.model.path!r} "
            f"({str(err).splitlines()[0]}); give a local folder with config.json or a hub id"
        ) from None
    method = config.method
    dtype_name = config.model.dtype if config.model.dtype != "auto" else "bf16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    checkpointing = config.train.gradient_checkpointing
    if checkpointing is None:
        checkpointing = True
    train = config.train.model_copy(update={"gradient_checkpointing": checkpointing})
    seq = config.data.max_seq_len
    batch = config.train.micro_batch_size
    traced = trace_step(model_config, method, train, seq, batch, dtype)
    fits = None if memory is None else traced.peak_bytes <= memory * GIB
    flops = flops_per_token(model_config, method.name, seq, checkpointing)
    speed = target.tflops * 1e12 * UTILIZATION / flops if target else None
    notes = []
    if fits is False:
        notes.append(
            "to fit: lower train.micro_batch_size or data.max_seq_len, turn on "
            "train.gradient_checkpointing, or use method.name=qlora"
        )
    return Plan(
        model=config.model.path, method=method.name, micro_batch=batch, seq_len=seq,
        dtype=dtype_name, gradient_checkpointing=checkpointing, optimizer=train.optimizer,
        traced=traced, gpu=target.name if target else None, gpu_memory_gib=memory, fits=fits,
        flops_per_token=flops, tokens_per_s=speed, notes=notes,
    )  # fmt: skip
