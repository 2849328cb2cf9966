"""The planner's traced peak against `torch.cuda.max_memory_allocated` of real training steps.

For each case (Llama shape, method, micro-batch × sequence) the step is traced on fake tensors
with `tunesmith.plan.trace.trace_step` (on the CPU, no GPU memory) and then run for real on the
GPU the way `tunesmith train` runs it: the model built from the config in the weights dtype
(bf16; fp32 master weights with bf16 autocast for full fine-tuning; QLoRA: NF4 with double
quantization by `tunesmith.quant.quantize_model`), the method attached with
`add_adapter`, gradient checkpointing (non-reentrant), tunesmith's chunked loss, fused AdamW,
two steps. Each real run is its own process, so its peak is its own.

    python bench/plan_vs_cuda.py            # on a CUDA machine
    python bench/plan_vs_cuda.py qlora      # only the QLoRA cases
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lora_step import SHAPES, TARGETS  # noqa: E402

CASES = [  # (shape, method, batch, seq)
    ("1b", "lora", 1, 2048),
    ("1b", "lora", 4, 2048),
    ("1b", "full", 1, 2048),
    ("8b", "lora", 1, 2048),
    ("8b", "lora", 2, 4096),
    ("1b", "qlora", 1, 2048),
    ("8b", "qlora", 1, 2048),
    ("8b", "qlora", 2, 4096),
]


def sections(method: str):
    from tunesmith.config import TrainSection
    from tunesmith.methods import FullConfig, LoRAConfig, QLoRAConfig

    lora = dict(r=16, alpha=32, dropout=0.0, targets=TARGETS)
    m = {"full": FullConfig(), "lora": LoRAConfig(**lora), "qlora": QLoRAConfig(**lora)}[method]
    return m, TrainSection(lr=1e-4, gradient_checkpointing=True)


def model_config(shape: str, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=max(4096, seq))


def real(shape: str, method: str, batch: int, seq: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.train.loss import model_loss_sum
    from tunesmith.train.optim import build_optimizer

    m, train = sections(method)
    config = model_config(shape, seq)
    config._attn_implementation = "sdpa"
    full = method == "full"
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32 if full else torch.bfloat16
        )
    if method == "qlora":  # NF4, double quantization, blocks of 64, bf16 compute
        from tunesmith.quantized.bnb import QuantConfig, quantize_model

        quantize_model(model, QuantConfig("nf4", compute_dtype=torch.bfloat16))
        torch.cuda.empty_cache()
    if not full:
        from tunesmith.adapters import add_adapter

        add_adapter(model, m)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    optimizer = build_optimizer(model, train)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=full):
            total, count = model_loss_sum(model, {"input_ids": ids, "labels": ids})
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return dict(peak_bytes=torch.cuda.max_memory_allocated(), device=torch.cuda.get_device_name())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--real":
        shape, method, batch, seq = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(real(shape, method, batch, seq)))
        return
    import torch

    from tunesmith.plan.trace import trace_step

    only = sys.argv[1:]  # e.g. qlora: only the cases of these methods
    rows = []
    for shape, method, batch, seq in CASES:
        if only and method not in only:
            continue
        m, train = sections(method)
        planned = trace_step(model_config(shape, seq), m, train, seq, batch, torch.bfloat16)
        run = subprocess.run(
            [sys.executable, __file__, "--real", shape, method, str(batch), str(seq)],
            capture_output=True,
            text=True,
        )
        measured = json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else {}
        row = dict(
            shape=shape,
            method=method,
            batch=batch,
            seq=seq,
            planned_gib=round(planned.peak_bytes / 2**30, 3),
            measured_gib=round(measured["peak_bytes"] / 2**30, 3) if measured else None,
            error=run.stderr.strip().splitlines()[-1] if run.returncode else None,
        )
        if measured:
            row["planned_over_measured"] = round(planned.peak_bytes / measured["peak_bytes"], 3)
            row["device"] = measured["device"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = dict(
        bench="plan_vs_cuda",
        date=str(date.today()),
        torch=torch.__version__,
        results=rows,
        command="python bench/plan_vs_cuda.py",
    )
    suffix = "_" + "_".join(only) if only else ""
    out = ROOT / "bench" / "results" / f"plan_vs_cuda_{date.today()}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
