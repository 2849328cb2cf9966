"""`tunesmith train`'s own step against the anchors, side by side, on the anchor shapes.

Every side runs in its own process, the sides alternating (A B C A B C ...), on a random-init
Llama-shape model: tunesmith through the real CLI (`tunesmith train run.yaml` with
`model.init: random`, a folder holding only config.json and a tokenizer, tokenized rows of
exactly `seq` tokens), transformers + PEFT (+ bitsandbytes) with ../shared/anchors/
peft_baseline.py, and Unsloth with ../shared/anchors/unsloth_anchor.py (skipped where Unsloth
is not installed). The recipe is the anchors': LoRA r=16, alpha=32, dropout 0 on the seven
projections, gradient checkpointing, AdamW lr 1e-4, bf16. tunesmith runs in several variants
so that each switch's share shows:

    plain    train.fused_lora false, train.kernels torch      (the adapter layer as before)
    fused    + the fused LoRA step
    kernels  + liger-kernel's RMSNorm, rotary, SwiGLU, fused head cross-entropy
    compile  + torch.compile of each decoder layer
    offload  + activation offloading

Reported per case: median tokens/s over the timed steps, torch peak allocated, tunesmith's
planned peak (`tunesmith plan`'s trace of the same run), and the ratios against Unsloth and
PEFT. Results go to bench/results/gpu_step_<device>_<date>.json.

    python bench/gpu_step.py                  # CPU: tiny shapes, tunesmith and PEFT (a check)
    python bench/gpu_step.py --gpu            # the lent GPU: 8B and 1B, every side
    python bench/gpu_step.py --check          # correctness of every switch on this device
    python bench/gpu_step.py --examples       # the 8B example configs, a few steps each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = ROOT.parent / "shared" / "anchors"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_step import SHAPES, TARGETS  # noqa: E402

GPU_CASES = [
    ("8b", "lora", 2048, 2),
    ("8b", "qlora", 2048, 2),
    ("1b", "lora", 2048, 1),
    ("1b", "qlora", 2048, 1),
    ("1b", "full", 2048, 1),
]
CPU_CASES = [("tiny", "lora", 128, 2), ("tiny", "qlora", 128, 2), ("tiny", "full", 128, 1)]
VARIANTS = {
    "plain": {"fused_lora": False, "kernels": "torch"},
    "fused": {"fused_lora": True, "kernels": "torch"},
    "kernels": {"fused_lora": True, "kernels": "auto"},
    "compile": {"fused_lora": True, "kernels": "auto", "compile": True},
    "offload": {
        "fused_lora": True,
        "kernels": "auto",
        "compile": True,
        "offload_activations": True,
    },
}


def write_model_folder(shape: str, seq: int, folder: Path) -> int:
    """config.json and a word-level tokenizer covering the vocabulary; returns the vocab size."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(4096, seq))
    config.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
        unk_token="t0",
        pad_token="t0",
        eos_token="t1",
        bos_token="t2",
    )
    tokenizer.save_pretrained(folder)
    return config.vocab_size


def write_run(
    work: Path, shape: str, method: str, seq: int, batch: int, steps: int, variant: str, device: str
) -> Path:
    """The run config of one tunesmith side (YAML), its model folder and data."""
    import random

    import yaml

    model = work / f"model-{shape}"
    if not (model / "config.json").is_file():
        model.mkdir(parents=True, exist_ok=True)
        write_model_folder(shape, seq, model)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    data = work / f"data-{seq}.jsonl"
    if not data.is_file():
        rng = random.Random(1)
        rows = [
            {"input_ids": [rng.randrange(3, vocab) for _ in range(seq)]}
            for _ in range(batch * steps)
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    method_section = {"name": method}
    if method != "full":
        method_section.update(r=16, alpha=32, dropout=0.0, targets=TARGETS)
    train = {
        "max_steps": steps,
        "micro_batch_size": batch,
        "grad_accum_steps": 1,
        "lr": 1e-4,
        "warmup_steps": 0,
        "gradient_checkpointing": True,
        "log_every_steps": 1,
        "optimizer": "adamw",
        **VARIANTS[variant],
    }
    if method == "full":
        train["fused_lora"] = False
    run = {
        "model": {
            "path": str(model),
            "init": "random",
            "device": device,
            "dtype": "bf16" if device == "cuda" else "fp32",
            "attn_implementation": "sdpa",
        },
        "method": method_section,
        "data": {
            "datasets": [{"path": str(data), "format": "tokenized"}],
            "max_seq_len": seq,
            "val_fraction": 0.0,
            "packing": False,
            "cache_dir": str(work / "cache"),
        },
        "train": train,
        "output_dir": str(work / f"out-{shape}-{method}-{variant}"),
    }
    path = work / f"{shape}-{method}-{variant}.yaml"
    path.write_text(yaml.safe_dump(run, sort_keys=False))
    return path


def run_tunesmith(work: Path, case, variant: str, steps: int, warmup: int, device: str) -> dict:
    shape, method, seq, batch = case
    config = write_run(work, shape, method, seq, batch, steps + warmup, variant, device)
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", "train", str(config), "--overwrite"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode != 0:
        return {"side": f"tunesmith-{variant}", "error": done.stderr.strip()[-2000:]}
    out = Path(yaml_output(config))
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [m["tokens_per_s"] for m in metrics if "loss" in m][warmup:]
    peak = summary.get("gpu_peak_allocated_bytes") or summary.get("host_peak_rss_bytes")
    return {
        "side": f"tunesmith-{variant}",
        "tokens_per_s": round(statistics.median(per_step), 1),
        "peak_gib": round(peak / 2**30, 3),
        "planned_peak_gib": round(summary.get("planned_peak_bytes", 0) / 2**30, 3) or None,
        "speedups": summary["speedups"],
        "loss": summary["final_train_loss"],
        "wall_s": round(time.time() - started, 1),
    }


EXAMPLES = ("examples/configs/llama3-8b-lora.yaml", "examples/configs/llama3-8b-qlora.yaml")


def run_example(work: Path, example: str, shape: str, steps: int, device: str) -> dict:
    """One of the 8B example configs as it is, on random weights of `shape` (8b on the GPU):
    only the model folder, the dataset (alpaca rows made here: the hub is out of reach) and the
    step count are overridden."""
    import random

    model = work / f"model-{shape}"
    if not (model / "config.json").is_file():
        model.mkdir(parents=True, exist_ok=True)
        write_model_folder(shape, 2048, model)
    data = work / "alpaca.jsonl"
    rng = random.Random(2)
    words = [f"t{i}" for i in range(3, 2000)]
    rows = [
        {
            "instruction": " ".join(rng.choices(words, k=rng.randrange(20, 200))),
            "output": " ".join(rng.choices(words, k=rng.randrange(20, 600))),
        }
        for _ in range(400)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = work / f"example-{Path(example).stem}"
    overrides = [
        f"model.path={model}",
        "model.init=random",
        f"model.device={device}",
        f"data.datasets=[{{path: {data}, format: alpaca}}]",
        f"data.cache_dir={work / 'cache'}",
        f"train.max_steps={steps}",
        "train.log_every_steps=1",
        "train.save_every_steps=null",
        "eval.every_steps=null",
        "eval.generate_samples=0",
        f"output_dir={out}",
    ]
    if device != "cuda":
        overrides += ["model.dtype=fp32", "data.max_seq_len=256", "train.grad_accum_steps=1"]
    done = subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", "train", example, *overrides, "--overwrite"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode != 0:
        return {"example": example, "error": done.stderr.strip()[-2000:]}
    summary = json.loads((out / "summary.json").read_text())
    keep = (
        "steps",
        "tokens_per_s",
        "gpu_peak_allocated_bytes",
        "planned_peak_bytes",
        "host_peak_rss_bytes",
        "speedups",
        "padding_free",
        "final_train_loss",
    )
    return {"example": example, **{k: summary.get(k) for k in keep}}


def yaml_output(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["output_dir"]


def run_anchor(script: str, case, steps: int, warmup: int, side: str, extra=()) -> dict:
    shape, method, seq, batch = case
    if shape not in ("tiny", "1b", "8b"):
        return {"side": side, "error": f"the anchors have no shape {shape}"}
    cmd = [
        sys.executable,
        str(ANCHORS / script),
        "--shape",
        shape,
        "--method",
        method,
        "--seq",
        str(seq),
        "--batch",
        str(batch),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        *extra,
    ]
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ANCHORS)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"side": side, "error": (done.stderr or done.stdout).strip()[-2000:]}
    result = json.loads(lines[-1])
    return {
        "side": side,
        "tokens_per_s": result["tokens_per_s"],
        "peak_gib": result["peak_gib"],
        "loss": result["loss"],
        "wall_s": round(time.time() - started, 1),
    }


def unsloth_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("unsloth") is not None


def ratios(results: list[dict]) -> dict:
    """Best tunesmith variant over each anchor (tokens/s; peak memory the other way)."""
    ours = [r for r in results if r["side"].startswith("tunesmith") and "tokens_per_s" in r]
    if not ours:
        return {}
    best = max(ours, key=lambda r: r["tokens_per_s"])
    out = {"best_variant": best["side"]}
    for anchor in ("unsloth", "peft"):
        theirs = [r for r in results if r["side"] == anchor and "tokens_per_s" in r]
        if theirs:
            other = theirs[0]
            out[f"speed_vs_{anchor}"] = round(best["tokens_per_s"] / other["tokens_per_s"], 3)
            if other.get("peak_gib") and best.get("peak_gib"):
                out[f"peak_vs_{anchor}"] = round(best["peak_gib"] / other["peak_gib"], 3)
    return out


def correctness_checks(device: str) -> dict:
    """Each switch against its reference on `device`: the fused LoRA step and the plain layer
    (bf16 on a GPU), liger's four kernels and the torch references, offloading and no
    offloading. Differences are reported, not judged."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tunesmith
    from tunesmith.methods.lora.impl import fuse_lora_layers
    from tunesmith.train.kernels import KERNELS, apply_kernels, liger_functions, liger_installed
    from tunesmith.train.loss import model_loss_sum
    from tunesmith.train.offload import ActivationOffload

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES["tiny"], max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype)
    tunesmith.add_lora(base, tunesmith.LoRAConfig(r=16, alpha=32, dropout=0.0, targets=TARGETS))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, config.vocab_size, (2, 256), device=device)

    def step(model, context=None):
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            with context or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                loss, n = model_loss_sum(model, {"input_ids": ids, "labels": ids})
        (loss / n).backward()
        grads = {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}
        return float(loss / n), grads

    def difference(a, b) -> dict:
        (la, ga), (lb, gb) = a, b
        rel = max(float((ga[k] - gb[k]).norm() / (gb[k].norm() + 1e-12)) for k in gb)
        return {"loss_diff": abs(la - lb), "max_rel_grad_diff": rel}

    reference = step(base)
    out = {"device": device}
    fused = copy.deepcopy(base)
    fuse_lora_layers(fused)
    out["fused_lora"] = difference(step(fused), reference)
    offload = ActivationOffload(device, min_bytes=0)
    out["offload"] = difference(step(fused, offload), step(fused))
    out["offload"]["tensors_moved"] = offload.stats["tensors"]
    if liger_installed() and device == "cuda":
        for kernel in KERNELS:
            patched = copy.deepcopy(fused)
            apply_kernels(patched, [kernel], liger_functions())
            out[f"liger_{kernel}"] = difference(step(patched), step(fused))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU cases (8B and 1B)")
    parser.add_argument("--check", action="store_true", help="only the correctness checks")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="times each side runs")
    parser.add_argument("--cases", default=None, help="e.g. 8b-lora,1b-qlora")
    parser.add_argument("--variants", default=None, help="tunesmith variants, e.g. fused,compile")
    parser.add_argument(
        "--examples",
        action="store_true",
        help="run the 8B example configs a few steps on random weights",
    )
    parser.add_argument("--example-shape", default=None, help="default: 8b on CUDA, tiny else")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.check:
        print(json.dumps(correctness_checks(device), indent=1))
        return
    if args.examples:
        shape = args.example_shape or ("8b" if device == "cuda" else "tiny")
        with tempfile.TemporaryDirectory() as tmp:
            for example in EXAMPLES:
                result = run_example(Path(tmp), example, shape, args.steps or 4, device)
                print(json.dumps(result), flush=True)
        return
    cases = GPU_CASES if args.gpu else CPU_CASES
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if f"{c[0]}-{c[1]}" in wanted]
    steps = args.steps or (8 if args.gpu else 3)
    default_variants = list(VARIANTS) if device == "cuda" else ["plain", "fused"]
    variants = args.variants.split(",") if args.variants else default_variants
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": date.today().isoformat(),
        "steps": steps,
        "warmup": args.warmup,
        "cases": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for case in cases:
            shape, method, seq, batch = case
            sides = [
                ("tunesmith", v)
                for v in variants
                if method != "full" or v in ("plain", "kernels", "compile")
            ]
            sides.append(("peft", None))
            if device == "cuda" and method != "full" and unsloth_installed():
                sides.append(("unsloth", None))
            results = []
            for _ in range(args.rounds):
                for side, variant in sides:
                    if side == "tunesmith":
                        result = run_tunesmith(work, case, variant, steps, args.warmup, device)
                    elif side == "peft":
                        extra = ("--no-prepare",) if method == "qlora" else ()
                        result = run_anchor(
                            "peft_baseline.py", case, steps, args.warmup, "peft", extra
                        )
                    else:
                        result = run_anchor(
                            "unsloth_anchor.py", case, steps, args.warmup, "unsloth"
                        )
                    print(
                        json.dumps({"case": f"{shape}-{method}-{batch}x{seq}", **result}),
                        flush=True,
                    )
                    results.append(result)
            report["cases"].append(
                {
                    "case": f"{shape}-{method}-{batch}x{seq}",
                    "results": results,
                    "ratios": ratios(results),
                }
            )
    best = {
        c["case"]: max(
            (
                r["tokens_per_s"]
                for r in c["results"]
                if r["side"].startswith("tunesmith") and "tokens_per_s" in r
            ),
            default=None,
        )
        for c in report["cases"]
    }
    for lora in [c for c in best if "-lora-" in c]:
        full = lora.replace("-lora-", "-full-")
        if best.get(full) and best[lora]:  # the rule: LoRA never slower than full
            report[f"{lora}_vs_{full}"] = round(best[lora] / best[full], 3)
    out = (
        Path(args.out)
        if args.out
        else (ROOT / "bench" / "results" / f"gpu_step_{device}_{report['date']}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for case in report["cases"]:
        print(case["case"], json.dumps(case["ratios"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
