"""Several processes, one training run: torchrun's environment, the process group, and how a
run's model is wrapped (`train.distributed`).

    torchrun --nproc_per_node 2 -m tunesmith train run.yaml

Every process builds the same model and the same batch plan. Step s's micro-batches are dealt
out in turn (process r takes micro-batches r, r + N, r + 2N, ...); a process left without one
runs a copy of another with its loss weighted 0, so that every process takes part in every
gradient reduction. The trained tokens of the step are summed over all processes before the
loss is formed, so the gradient is exactly the one-process gradient of the whole step: each
process divides its token-loss sum by the global count and multiplies by N, because DDP and
FSDP average the gradients they reduce.

Strategies: `ddp` replicates the model (every adapter method; DDP reduces the trainable
parameters' gradients), `fsdp` shards it with FSDP2 (`fully_shard` on every decoder layer and
on the model: parameters, gradients and optimizer states in 1/N per process; full fine-tuning
keeps fp32 master weights through a mixed-precision policy). `auto`: fsdp for full
fine-tuning, ddp for adapters. The backend is NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from tunesmith.errors import TunesmithError
from tunesmith.model_config import read_model_config
from tunesmith.models import decoder_layers


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def world_from_env() -> World:
    """The process's place in a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK), or one
    process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def start(world: World, device: str, timeout_s: float) -> str:
    """Join the process group (NCCL on CUDA, gloo otherwise); returns this process's device."""
    if not world.distributed:
        return device
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)
        device = f"cuda:{world.local_rank}"
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(value: float | int, device: str = "cpu") -> float:
    """`value` summed over all processes (itself when there is one)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def strategy_for(setting: str, method, world: World, fits: bool = True) -> str:
    """The strategy of this run: "none" for one process; otherwise ddp or fsdp as
    `train.distributed` says (auto: fsdp for full fine-tuning, ddp for adapters unless their
    base does not `fit` one device). QLoRA's 4-bit base cannot be sharded."""
    if not world.distributed:
        return "none"
    if setting == "auto":
        adapters = method.trains_adapter and (fits or method.quantized_base)
        setting = "ddp" if adapters else "fsdp"
    if setting == "fsdp" and method.quantized_base:
        raise TunesmithError(
            f"train.distributed: fsdp cannot shard method {method.name}'s base: bitsandbytes "
            "keeps each 4-bit weight as one packed tensor with its quantization state, which "
            "FSDP2 does not split; use train.distributed: ddp (every GPU holds the whole 4-bit "
            "base), or method lora with fsdp"
        )
    return setting


FIT_SHARE = 0.8
"""`auto` shards an adapter run's base when its weights take more than this share of one
GPU's memory (activations and the rest need the remainder)."""


def fits_one_device(config, device: str, world: World) -> bool:
    """Whether the run's base weights fit one GPU with room to train (`FIT_SHARE`): counted on
    the meta device from config.json. CPU processes: always."""
    if not world.distributed or not device.startswith("cuda"):
        return True
    model = config.model
    model_config = read_model_config(
        model.path, "model.path", model.revision, model.trust_remote_code
    )
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model_config)
    element = 2 if model.dtype != "fp32" else 4
    weights = sum(p.numel() for p in skeleton.parameters()) * element
    return weights <= FIT_SHARE * torch.cuda.get_device_properties(device).total_memory


class LossModule(nn.Module):
    """The model with its loss as the forward, so that DDP sees every call."""

    def __init__(self, model: nn.Module, loss_fn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


def wrap(
    model: nn.Module,
    strategy: str,
    world: World,
    device: str,
    compute_dtype,
    master: bool,
    loss_fn,
    cpu_offload: bool = False,
) -> nn.Module:
    """The module a step calls, `batch -> (loss sum, trained tokens)`: `LossModule(model)`,
    under DDP wrapped by DistributedDataParallel, under FSDP2 sharded (in place: `model`'s
    parameters are shards afterwards)."""
    if strategy == "ddp":
        ids = [world.local_rank] if device.startswith("cuda") else None
        return DistributedDataParallel(LossModule(model, loss_fn), device_ids=ids)
    if strategy == "fsdp":
        policy = MixedPrecisionPolicy()
        if master and compute_dtype != torch.float32:
            policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        shard = {"mp_policy": policy}
        if cpu_offload and device.startswith("cuda"):  # shards, gradients, states in host memory
            shard["offload_policy"] = CPUOffloadPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, **shard)
        # the loss module is the root: the loss calls the backbone and the head directly, so
        # the root's hooks (which gather the embeddings, final norm and head) must be its own
        root = LossModule(model, loss_fn)
        fully_shard(root, **shard)
        return root
    return LossModule(model, loss_fn)


def barrier(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()


def accumulating(step_module: nn.Module, strategy: str, more_to_come: bool):
    """While gradients accumulate over a rank's micro-batches, reduce them only after its last
    (DDP: `no_sync`; FSDP2: gradient sync off until the last backward)."""
    if strategy == "ddp" and more_to_come:
        return step_module.no_sync()
    if strategy == "fsdp":
        step_module.set_requires_gradient_sync(not more_to_come)
    return contextlib.nullcontext()
