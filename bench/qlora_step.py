"""One QLoRA training step: tunesmith LoRA, tunesmith QLoRA and the transformers + PEFT +
bitsandbytes QLoRA recipe (with and without `prepare_model_for_kbit_training`), in one run.

All sides train the same random-init Llama-shape checkpoint (written once, then loaded by each
side its own way) on the same batch: LoRA r=16, alpha=32, dropout 0 on q/k/v/o/gate/up/down,
NF4 with double quantization, gradient checkpointing (non-reentrant), AdamW lr 1e-4, compute in
bf16 on CUDA and fp32 on CPU. tunesmith computes its loss as `tunesmith train` does (chunked,
trained positions only); the PEFT sides as their docs show (`model(..., labels=...)`). Each run
is a separate process (so its peak memory is its own), alternating the sides; the median step
time, tokens/s and peak memory (torch peak allocated on CUDA, process peak RSS on CPU) of each,
and ratios against PEFT's QLoRA recipes, go to bench/results/.

    python bench/qlora_step.py                                  # CPU: "small", 2×256 tokens
    python bench/qlora_step.py --shape 1b --seq 2048 --batch 1  # CUDA
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_step import SHAPES, TARGETS, _peak_rss_bytes, run_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("tunesmith_lora", "tunesmith_qlora", "peft_qlora_prepare", "peft_qlora")


def write_checkpoint(shape: str, seq: int, folder: Path, cuda: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(4096, seq))
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16 if cuda else torch.float32).save_pretrained(folder)


def worker(args: argparse.Namespace) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    impl = args.impl
    if impl.startswith("tunesmith"):
        import tunesmith
        from tunesmith.train.loss import model_loss_sum

        if impl == "tunesmith_qlora":
            from tunesmith.quantized.bnb import QuantConfig, load_quantized

            model = load_quantized(
                args.checkpoint,
                QuantConfig("nf4", compute_dtype=dtype),
                device,
                attn_implementation="sdpa",
            )
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                args.checkpoint, dtype=dtype, attn_implementation="sdpa"
            ).to(device)
        tunesmith.add_lora(
            model, tunesmith.LoRAConfig(r=16, alpha=32, dropout=0.0, targets=TARGETS)
        )

        def loss_of(ids):
            total, count = model_loss_sum(model, {"input_ids": ids, "labels": ids})
            return total / count
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            args.checkpoint,
            quantization_config=quant,
            dtype=dtype,
            device_map=device,
            attn_implementation="sdpa",
        )
        if impl == "peft_qlora_prepare":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        lora = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=TARGETS
        )
        model = get_peft_model(model, lora)

        def loss_of(ids):
            return model(input_ids=ids, labels=ids).loss

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if impl.startswith("peft"):
        model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(
        0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = loss_of(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    return dict(
        impl=impl,
        step_s=statistics.median(times),
        peak_bytes=peak,
        losses=[round(x, 4) for x in losses],
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if cuda else "cpu",
    )


def run_worker(impl: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--checkpoint",
        args.checkpoint,
        "--seq",
        str(args.seq),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    return run_json(cmd, impl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--write-checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_checkpoint:
        import torch

        write_checkpoint(
            args.shape, args.seq, Path(args.write_checkpoint), torch.cuda.is_available()
        )
        return
    if args.worker:
        args.impl = args.worker
        print(json.dumps(worker(args)))
        return

    import torch

    cuda = torch.cuda.is_available()
    args.shape = args.shape or ("1b" if cuda else "small")
    args.seq = args.seq or (2048 if cuda else 256)
    args.batch = args.batch or (1 if cuda else 2)
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as folder:
        # In a child process: a worker's peak RSS starts at this process's RSS when it forks,
        # which must not include a model.
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--write-checkpoint",
                folder,
                "--shape",
                args.shape,
                "--seq",
                str(args.seq),
            ],
            check=True,
            capture_output=True,
        )
        args.checkpoint = folder
        runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
        for _ in range(args.repeats):
            for impl in IMPLS:
                runs[impl].append(run_worker(impl, args))
    tokens = args.batch * args.seq
    summary = {}
    for impl, results in runs.items():
        step = statistics.median(r["step_s"] for r in results)
        summary[impl] = dict(
            step_s=round(step, 4),
            tokens_per_s=round(tokens / step, 1),
            peak_gib=round(statistics.median(r["peak_bytes"] for r in results) / 2**30, 3),
            first_losses=results[0]["losses"][:3],
        )
    ours = summary["tunesmith_qlora"]
    ratios = {
        f"tunesmith_qlora_vs_{other}": dict(
            step_time=round(ours["step_s"] / summary[other]["step_s"], 3),
            peak_memory=round(ours["peak_gib"] / summary[other]["peak_gib"], 3),
        )
        for other in ("tunesmith_lora", "peft_qlora_prepare", "peft_qlora")
    }
    report = dict(
        bench="qlora_step",
        date=str(date.today()),
        device=runs["tunesmith_qlora"][0]["device"],
        memory="torch.cuda.max_memory_allocated" if cuda else "peak process RSS",
        shape=args.shape,
        batch=args.batch,
        seq=args.seq,
        steps=args.steps,
        repeats=args.repeats,
        torch=runs["tunesmith_qlora"][0]["torch"],
        results=summary,
        ratios=ratios,
        command=" ".join(["python", "bench/qlora_step.py", *sys.argv[1:]]),
    )
    text = json.dumps(report, indent=2)
    print(text)
    out = args.out or ROOT / "bench" / "results" / (
        f"qlora_step_{'cuda' if cuda else 'cpu'}_{args.shape}_{date.today()}.json"
    )
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
