"""`tunesmith plan --gpus N [--nodes M]`: the run on N GPUs per machine × M machines, per GPU,
for DDP and FSDP, from the traced one-GPU step.

- DDP replicates everything: the per-GPU peak is the one-GPU peak, plus the gradient buckets
  DDP reduces from (a copy of the trainable parameters' gradients).
- FSDP (FSDP2, one unit per decoder layer) keeps 1/W of the weights, trainable parameters,
  gradients and optimizer states on each GPU, plus the gathered parameters of two layers (the
  one computing and the one prefetched); activations are the same as on one GPU.

Time: each GPU runs the one-GPU step on 1/W of the global batch; the communication per step is
DDP's all-reduce of the gradients (2·(W−1)/W of their bytes, ring) or FSDP's all-gathers of
the weights (forward, recompute under checkpointing, backward) and reduce-scatter of the
gradients, at a stated bandwidth: 200 GB/s per GPU inside a machine (NVLink, about half its
peak), 20 GB/s per GPU between machines (one 200 Gb/s link per GPU, InfiniBand or RoCE), the
slower of the two when M > 1. Compute and communication are assumed to overlap, so a step
takes the longer of the two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 2**30
INTRA_NODE_BYTES_PER_S = 200e9
INTER_NODE_BYTES_PER_S = 20e9


@dataclass
class Scale:
    gpus_per_node: int
    nodes: int
    ddp_peak_bytes: int
    fsdp_peak_bytes: int
    pick: str
    why: str
    bandwidth_bytes_per_s: float
    ddp_comm_s_per_step: float
    fsdp_comm_s_per_step: float
    tokens_per_s: float | None
    """At the pick, over all GPUs (None without --gpu)."""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        where = f"{self.gpus_per_node} GPU(s) × {self.nodes} machine(s) = {self.world}"
        out = [
            f"Several GPUs: {where} (per GPU):",
            f"  ddp   peak {self.ddp_peak_bytes / GIB:6.2f} GiB, gradients all-reduced: "
            f"{self.ddp_comm_s_per_step * 1e3:,.0f} ms of communication per step",
            f"  fsdp  peak {self.fsdp_peak_bytes / GIB:6.2f} GiB, weights gathered and gradients "
            f"reduce-scattered: {self.fsdp_comm_s_per_step * 1e3:,.0f} ms per step",
            f"  pick: {self.pick} ({self.why})",
        ]
        if self.tokens_per_s is not None:
            out.append(
                f"  time: about {self.tokens_per_s:,.0f} tokens/s over all GPUs, assuming "
                f"{self.bandwidth_bytes_per_s / 1e9:g} GB/s per GPU and communication overlapped "
                "with compute"
            )
        return out


def plan_scale(
    traced,
    layer_params_bytes: int,
    gpus_per_node: int,
    nodes: int,
    memory_bytes: float | None,
    tokens_per_s_one: float | None,
    tokens_per_step: int,
    trains_adapter: bool,
    checkpointing: bool,
    weights_compute_bytes: int,
    setting: str = "auto",
) -> Scale:
    """See the module docstring. `traced`: the one-GPU TracedStep; `layer_params_bytes`: one
    decoder layer's parameters in the compute dtype; `weights_compute_bytes`: the model's
    parameters in the compute dtype (what FSDP gathers); `tokens_per_step`: one GPU's
    micro-batch tokens."""
    world = gpus_per_node * nodes
    sharded = (
        traced.weights_bytes + traced.trainable_bytes + traced.grads_bytes + traced.optimizer_bytes
    )
    activations = traced.peak_bytes - sharded
    ddp = traced.peak_bytes + traced.trainable_bytes  # + the reducer's gradient buckets
    fsdp = sharded // world + activations + 2 * layer_params_bytes
    bandwidth = INTRA_NODE_BYTES_PER_S if nodes == 1 else INTER_NODE_BYTES_PER_S
    ring = 2 * (world - 1) / world
    grads_bytes = traced.trainable_bytes  # reduced in the trainable parameters' dtype
    ddp_comm = ring * grads_bytes / bandwidth
    gathers = 3 if checkpointing else 2
    fsdp_comm = ((world - 1) / world) * (gathers * weights_compute_bytes + grads_bytes) / bandwidth
    fits = {
        "ddp": memory_bytes is None or ddp <= memory_bytes,
        "fsdp": memory_bytes is None or fsdp <= memory_bytes,
    }
    if setting in ("ddp", "fsdp"):
        pick, why = setting, "train.distributed says so"
    elif not trains_adapter:
        pick = "fsdp"
        why = "full fine-tuning: FSDP shards the fp32 master weights and optimizer states"
    elif fits["ddp"]:
        pick, why = "ddp", "the model fits one GPU, and DDP communicates only the gradients"
    elif fits["fsdp"]:
        pick, why = "fsdp", "the frozen base does not fit one GPU; FSDP shards it"
    else:
        pick, why = "fsdp", "neither fits; FSDP needs the least memory per GPU"
    tokens = None
    if tokens_per_s_one:
        compute_s = tokens_per_step / tokens_per_s_one
        comm = ddp_comm if pick == "ddp" else fsdp_comm
        tokens = world * tokens_per_step / max(compute_s, comm)
    return Scale(
        gpus_per_node, nodes, int(ddp), int(fsdp), pick, why, bandwidth, ddp_comm, fsdp_comm, tokens
    )
