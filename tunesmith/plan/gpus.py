"""GPUs the planner knows: memory and dense bf16 (fp16 on T4) tensor throughput from the vendors'
data sheets (without sparsity), and the utilisation the time estimate assumes."""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.errors import TunesmithError


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    tflops: float


GPUS = {
    "h200": GPU("NVIDIA H200 141GB", 141, 989),
    "h100": GPU("NVIDIA H100 80GB SXM", 80, 989),
    "a100": GPU("NVIDIA A100 80GB", 80, 312),
    "a100-40gb": GPU("NVIDIA A100 40GB", 40, 312),
    "l40s": GPU("NVIDIA L40S 48GB", 48, 362),
    "a10g": GPU("NVIDIA A10G 24GB", 24, 70),
    "4090": GPU("NVIDIA RTX 4090 24GB", 24, 165),
    "3090": GPU("NVIDIA RTX 3090 24GB", 24, 71),
    "t4": GPU("NVIDIA T4 16GB", 16, 65),
}
UTILIZATION = 0.40
"""Model FLOPs utilisation assumed for the time estimate (dense training steps of this kind
reach 35-50% on the GPUs above)."""


def gpu(name: str) -> GPU:
    key = name.lower().removeprefix("nvidia-").removeprefix("rtx")
    if key not in GPUS:
        raise TunesmithError(
            f"--gpu: {name!r} is not a GPU the planner knows; known: {', '.join(GPUS)}. Give "
            "--gpu-mem (e.g. 24GiB) for another card"
        )
    return GPUS[key]
