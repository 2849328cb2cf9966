"""The planner's analytic estimate (`tunesmith.plan.estimate`) against its traced peak
(`tunesmith.plan.trace`), over methods, checkpointing on/off and shapes. CPU only, no memory:
both run without allocating the model.

Two Llama widths at four layers: "1b" (Llama 3.2 1B's hidden 2048, MLP 8192, 32/8 heads,
vocabulary 128,256) and "q05" (Qwen2.5 0.5B's hidden 896, MLP 4864, 14/2 heads, vocabulary
151,936); micro-batch × sequence 1 × 512, 1 × 2048 and 4 × 2048; bf16.

    python bench/plan_estimate_vs_trace.py      # about 3 minutes on 2 cores
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from tunesmith.config import TrainSection  # noqa: E402
from tunesmith.methods import (  # noqa: E402
    BottleneckConfig,
    FullConfig,
    IA3Config,
    LoRAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    QLoRAConfig,
)
from tunesmith.plan.estimate import estimate_step, skeleton  # noqa: E402
from tunesmith.plan.trace import trace_step  # noqa: E402

SHAPES = {
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=4,
    ),
    "q05": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        num_hidden_layers=4,
    ),
}
METHODS = {  # name: (method, fp32 master weights, optimizer)
    "lora": (LoRAConfig(), True, "adamw"),
    "lora-no-dropout": (LoRAConfig(dropout=0.0), True, "adamw"),
    "dora": (LoRAConfig(use_dora=True), True, "adamw"),
    "qlora": (QLoRAConfig(), True, "adamw"),
    "full": (FullConfig(), True, "adamw"),
    "full-bf16-8bit": (FullConfig(), False, "adamw_8bit"),
    "ia3": (IA3Config(), True, "adamw"),
    "bottleneck": (BottleneckConfig(), True, "adamw"),
    "prompt": (PromptTuningConfig(), True, "adamw"),
    "prefix": (PrefixTuningConfig(), True, "adamw"),
}
SIZES = [(512, 1), (2048, 1), (2048, 4)]


def main() -> None:
    rows = []
    for name, (method, master, optimizer) in METHODS.items():
        full_master = master and method.name == "full"
        for shape, dims in SHAPES.items():
            config = LlamaConfig(**dims)
            sk = skeleton(config, method, torch.bfloat16, full_master)
            for checkpointing in (True, False):
                train = TrainSection(
                    gradient_checkpointing=checkpointing,
                    fp32_master_weights=master,
                    optimizer=optimizer,
                )
                for seq, batch in SIZES:
                    traced = trace_step(config, method, train, seq, batch, torch.bfloat16)
                    est = estimate_step(sk, seq, batch, checkpointing, optimizer)
                    ratio = est.peak_bytes / traced.peak_bytes
                    rows.append(
                        {
                            "method": name,
                            "shape": shape,
                            "checkpointing": checkpointing,
                            "batch": batch,
                            "seq": seq,
                            "traced_bytes": traced.peak_bytes,
                            "estimated_bytes": est.peak_bytes,
                            "ratio": round(ratio, 4),
                            "phase": est.phase,
                        }
                    )
                    line = f"{name:15} {shape:4} ckpt={int(checkpointing)} {batch}x{seq:<5} "
                    line += f"traced {traced.peak_bytes / 2**30:7.3f} GiB  estimated "
                    print(line + f"{est.peak_bytes / 2**30:7.3f} GiB  ratio {ratio:.3f}")
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    print(
        f"worst: {worst['method']} {worst['shape']} ckpt={worst['checkpointing']} "
        f"{worst['batch']}x{worst['seq']} ratio {worst['ratio']}"
    )
    out = ROOT / "bench" / "results" / f"plan_estimate_vs_trace_{date.today()}.json"
    record = {"command": "python bench/plan_estimate_vs_trace.py", "worst_ratio": worst["ratio"]}
    out.write_text(json.dumps({**record, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
