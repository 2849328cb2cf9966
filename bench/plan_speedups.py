"""GPU memory of the 8B LoRA step at 2×2048 as `tunesmith plan` traces it (fake tensors, no
GPU), before and after the memory switches: the plain adapter layer, the fused LoRA step, and
the fused step with activation offloading. Also QLoRA NF4 at the same shape and the 1B shapes.
Writes bench/results/plan_speedups_<date>.json and prints a table.

    python bench/plan_speedups.py            # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import sys
import time
from datetime import date
from pathlib import Path

import torch
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_step import SHAPES, TARGETS  # noqa: E402

from tunesmith.config import TrainSection  # noqa: E402
from tunesmith.methods.lora import LoRAConfig, QLoRAConfig  # noqa: E402
from tunesmith.plan.trace import trace_step  # noqa: E402

GIB = 2**30
VARIANTS = {
    "plain layer": {"fused_lora": False},
    "fused LoRA": {"fused_lora": True},
    "fused LoRA + offload": {"fused_lora": True, "offload_activations": True},
}
CASES = [
    ("8b", "lora", 2048, 2),
    ("8b", "qlora", 2048, 2),
    ("1b", "lora", 2048, 1),
    ("1b", "qlora", 2048, 1),
]


def main() -> None:
    rows = []
    for shape, method, seq, batch in CASES:
        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(4096, seq))
        lora = dict(r=16, alpha=32, dropout=0.0, targets=TARGETS)
        spec = LoRAConfig(**lora) if method == "lora" else QLoRAConfig(**lora)
        for name, switches in VARIANTS.items():
            train = TrainSection(gradient_checkpointing=True, **switches)
            started = time.time()
            traced = trace_step(config, spec, train, seq, batch, torch.bfloat16)
            row = {
                "case": f"{shape}-{method}-{batch}x{seq}",
                "variant": name,
                "peak_gib": round(traced.peak_bytes / GIB, 2),
                "weights_gib": round(traced.weights_bytes / GIB, 2),
                "trainable_gib": round(traced.trainable_bytes / GIB, 3),
                "grads_gib": round(traced.grads_bytes / GIB, 3),
                "optimizer_gib": round(traced.optimizer_bytes / GIB, 3),
                "activations_gib": round(traced.activations_bytes / GIB, 2),
                "trace_s": round(time.time() - started, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = ROOT / "bench" / "results" / f"plan_speedups_{date.today().isoformat()}.json"
    out.write_text(
        json.dumps({"command": "python bench/plan_speedups.py", "rows": rows}, indent=1) + "\n"
    )
    print("\n| case | variant | peak GiB | weights | activations and temporaries |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['variant']} | {r['peak_gib']} | {r['weights_gib']} | "
            f"{r['activations_gib']} |"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
