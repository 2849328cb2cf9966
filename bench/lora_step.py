"""One LoRA training step: tunesmith against Hugging Face transformers + PEFT.

Both sides train the same random-init Llama-shape model on the same batch with the anchor's
recipe (../shared/anchors/peft_baseline.py): LoRA r=16, alpha=32, dropout 0 on q/k/v/o/gate/up/
down, gradient checkpointing (non-reentrant), AdamW lr 1e-4, bf16 on CUDA, fp32 on CPU.
Runs alternate A B A B … in separate processes so each one's peak memory is its own. Prints, and
writes to bench/results/, the median step time, tokens/s and peak memory of each and the ratios
tunesmith / PEFT (time < 1 and memory < 1 mean tunesmith is better).

    python bench/lora_step.py                          # CPU: "small" shape, 2×256 tokens
    python bench/lora_step.py --shape 1b --seq 2048    # CUDA
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": dict(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "small": dict(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMPLS = ("tunesmith", "peft")


def worker(args: argparse.Namespace) -> dict:
    """One process: build the model, add LoRA with `args.impl`, time the steps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(4096, args.seq))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if args.impl == "tunesmith":
        import tunesmith

        lora = tunesmith.LoRAConfig(r=args.r, alpha=2 * args.r, dropout=0.0, targets=TARGETS)
        tunesmith.add_lora(model, lora)
    else:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=args.r,
            lora_alpha=2 * args.r,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=TARGETS,
        )
        model = get_peft_model(model, lora)
    if not args.no_gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.impl == "peft":
            model.enable_input_require_grads()  # as PEFT's docs show
    model.config.use_cache = False
    model.train()  # transformers skips gradient checkpointing in eval mode
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _peak_rss_bytes()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()
    return dict(
        impl=args.impl,
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        step_s=statistics.median(times),
        peak_bytes=peak,
        rss_before_steps_bytes=rss_before,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        losses=[round(x, 5) for x in losses],
        torch=torch.__version__,
    )


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_worker(impl: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--shape",
        args.shape,
        "--seq",
        str(args.seq),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--r",
        str(args.r),
    ] + (["--no-gc"] if args.no_gc else [])
    return run_json(cmd, impl)


def run_json(cmd: list[str], label: str) -> dict:
    """Run a worker process with the repository on its path; its last stdout line is JSON."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        sys.exit(f"{label} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="processes per implementation")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--no-gc", action="store_true", help="no gradient checkpointing")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.impl = args.worker
        print(json.dumps(worker(args)))
        return

    import torch

    cuda = torch.cuda.is_available()
    args.shape = args.shape or ("1b" if cuda else "small")
    args.seq = args.seq or (2048 if cuda else 256)
    args.batch = args.batch or (1 if cuda else 2)
    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for _ in range(args.repeats):  # alternate A B A B so drift hits both sides alike
        for impl in IMPLS:
            runs[impl].append(run_worker(impl, args))
    tokens = args.batch * args.seq
    summary = {}
    for impl, results in runs.items():
        step = statistics.median(r["step_s"] for r in results)
        summary[impl] = dict(
            step_s=round(step, 5),
            tokens_per_s=round(tokens / step, 1),
            peak_gib=round(statistics.median(r["peak_bytes"] for r in results) / 2**30, 3),
            trainable=results[0]["trainable"],
            first_losses=results[0]["losses"][:3],
        )
    report = dict(
        bench="lora_step",
        date=str(date.today()),
        device=runs["tunesmith"][0]["device"],
        memory="torch.cuda.max_memory_allocated" if cuda else "peak process RSS",
        shape=args.shape,
        batch=args.batch,
        seq=args.seq,
        r=args.r,
        gc=not args.no_gc,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        torch=runs["tunesmith"][0]["torch"],
        results=summary,
        ratio_step_time=round(summary["tunesmith"]["step_s"] / summary["peft"]["step_s"], 3),
        ratio_peak_memory=round(summary["tunesmith"]["peak_gib"] / summary["peft"]["peak_gib"], 3),
        command=" ".join([Path(sys.executable).name, "bench/lora_step.py", *sys.argv[1:]]),
    )
    text = json.dumps(report, indent=2)
    print(text)
    out = args.out or ROOT / "bench" / "results" / (
        f"lora_step_{'cuda' if cuda else 'cpu'}_{args.shape}_{date.today()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
