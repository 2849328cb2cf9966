"""GRPO side by side: `tunesmith train` (objective grpo) against TRL's GRPOTrainer, same task,
model and recipe, on this CPU.

The task is examples/grpo.yaml's: the quickstart's questions as prompts
(examples/build_grpo.py), an exact-match reward against the `answer` column, starting from
one briefly supervised LoRA adapter (the quickstart for one epoch, made once here and loaded
by both sides: PEFT's `is_trainable` on TRL's, `model.adapter` on tunesmith's). Recipe: 32
prompts × 8 completions per optimizer step (a micro-batch of 8 prompts, 4 accumulated;
TRL: 64 completions per device batch, 4 accumulated), at most 16 completion tokens,
temperature 1.0, loss_type grpo, beta 0, one pass per generation batch, lr 5e-4 constant,
AdamW, gradient norm clipped at 1, fp32. Each trainer runs in its own process; wall time is
the whole process (imports, data, training with its generation, saving) measured from
outside, peak memory the process's own peak RSS. The reward curve is each side's logged
mean training reward per step; the held-out exact match comes from one evaluator for both
adapters: greedy decoding through PEFT + transformers' `generate` on the 100 held-out
prompts, before (the starting adapter) and after.

    python bench/grpo_vs_trl.py [--steps 40] [--threads 2]

Needs `pip install trl` (1.16 tested). Writes bench/results/grpo_vs_trl_cpu_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples/tiny-llama"
TRAIN = ROOT / "examples/data/grpo_train.jsonl"
VAL = ROOT / "examples/data/grpo_val.jsonl"
RECIPE = {
    "r": 16,
    "alpha": 32,
    "prompts_per_micro_batch": 8,
    "grad_accum_steps": 4,
    "num_generations": 8,
    "max_completion_tokens": 16,
    "temperature": 1.0,
    "lr": 5e-4,
    "loss_type": "grpo",
    "beta": 0.0,
    "seed": 42,
}


def start_adapter(work: Path) -> Path:
    """The briefly supervised adapter both sides start from (made once)."""
    out = work / "sft-brief"
    if not (out / "adapter/adapter_config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "tunesmith", "train", str(ROOT / "examples/quickstart.yaml"),
             "train.epochs=1", f"output_dir={out}", "--overwrite", "eval.generate_samples=0"],
            check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return out / "adapter"


def run_tunesmith(out: Path, adapter: Path, steps: int) -> dict:
    args = [
        sys.executable, "-m", "tunesmith", "train", str(ROOT / "examples/grpo.yaml"),
        f"output_dir={out}", "--overwrite", "--no-cache", f"model.adapter={adapter}",
        f"method.r={RECIPE['r']}", f"method.alpha={RECIPE['alpha']}",
        f"objective.num_generations={RECIPE['num_generations']}",
        f"objective.max_completion_tokens={RECIPE['max_completion_tokens']}",
        f"objective.temperature={RECIPE['temperature']}",
        f"objective.loss_type={RECIPE['loss_type']}", f"objective.beta={RECIPE['beta']}",
        f"train.micro_batch_size={RECIPE['prompts_per_micro_batch']}",
        f"train.grad_accum_steps={RECIPE['grad_accum_steps']}", f"train.max_steps={steps}",
        f"train.lr={RECIPE['lr']}", "train.warmup_ratio=0", "train.schedule=constant",
        f"train.seed={RECIPE['seed']}", "train.log_every_steps=1", "eval.every_steps=null",
        "data.validation=[]", f"train.save_every_steps={steps}",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    curve = [
        json.loads(line).get("reward")
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "reward" in json.loads(line)
    ]
    return {
        "wall_s": round(wall, 2),
        "train_s": summary["seconds"],
        "peak_rss_bytes": summary["host_peak_rss_bytes"],
        "reward_curve": [round(r, 4) for r in curve],
        "adapter": str(out / "adapter"),
    }


def trl_worker(out: Path, adapter: Path, steps: int) -> None:
    """TRL's GRPOTrainer as its docs show it, on a PEFT model loaded trainable from the
    starting adapter (this process)."""
    import datasets
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.objectives.answers import normalize

    started = time.perf_counter()
    datasets.disable_caching()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    data = datasets.load_dataset("json", data_files=str(TRAIN), split="train")

    def exact_match(prompts, completions, answer, **kwargs):
        return [
            float(normalize(c[0]["content"] if isinstance(c, list) else c) == normalize(a))
            for c, a in zip(completions, answer, strict=True)
        ]

    g = RECIPE["num_generations"]
    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=RECIPE["prompts_per_micro_batch"] * g,
        gradient_accumulation_steps=RECIPE["grad_accum_steps"],
        num_generations=g,
        max_completion_length=RECIPE["max_completion_tokens"],
        temperature=RECIPE["temperature"],
        loss_type=RECIPE["loss_type"],
        beta=RECIPE["beta"],
        learning_rate=RECIPE["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=steps,
        max_grad_norm=1.0,
        seed=RECIPE["seed"],
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=exact_match, args=args, train_dataset=data,
        processing_class=tokenizer,
    )  # fmt: skip
    trained = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - trained
    trainer.model.save_pretrained(out / "adapter")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    curve = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    (out / "worker.json").write_text(
        json.dumps({"train_s": round(train_s, 2), "peak_rss_bytes": peak,
                    "setup_s": round(trained - started, 2),
                    "reward_curve": [round(r, 4) for r in curve]})
    )  # fmt: skip


def run_trl(out: Path, adapter: Path, steps: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--trl-worker", str(out), "--adapter", str(adapter),
         "--steps", str(steps)],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wall = time.perf_counter() - started
    worker = json.loads((out / "worker.json").read_text())
    return {"wall_s": round(wall, 2), **worker, "adapter": str(out / "adapter")}


def held_out(adapter: str) -> float:
    """Greedy exact match of an adapter on the held-out prompts: PEFT + transformers'
    generate, the prompts encoded by the chat template's generation prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.config import config_from_dict
    from tunesmith.generation import Sampling, generate_batch
    from tunesmith.objectives.answers import normalize
    from tunesmith.rollout.prompts import read_prompts

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    data = config_from_dict(
        {
            "model": {"path": str(MODEL)},
            "data": {"datasets": [{"path": str(VAL)}], "max_seq_len": 256},
            "objective": {"name": "grpo", "rewards": [{"function": "exact_match"}]},
        }
    ).data
    prompts = read_prompts(data, tokenizer, 0, RECIPE["max_completion_tokens"]).train
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    sampling = Sampling(max_new_tokens=RECIPE["max_completion_tokens"])
    texts = generate_batch(model, tokenizer, [p.ids for p in prompts], sampling, 16)
    hits = [
        normalize(t) == normalize(p.columns["answer"]) for t, p in zip(texts, prompts, strict=True)
    ]
    return sum(hits) / len(hits)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-worker", type=Path)
    parser.add_argument("--adapter", type=Path)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.trl_worker:
        return trl_worker(args.trl_worker, args.adapter, args.steps)
    import trl

    work = ROOT / "outputs/bench-grpo"
    adapter = start_adapter(work)
    start = held_out(str(adapter))
    print("start exact match", start, flush=True)
    runs = {}
    for name, runner in (("tunesmith", run_tunesmith), ("trl", run_trl)):
        result = runner(work / name, adapter, args.steps)
        result["held_out_exact_match"] = held_out(result["adapter"])
        runs[name] = result
        print(name, json.dumps(result), flush=True)
    curve = {n: r["reward_curve"] for n, r in runs.items()}
    half = args.steps // 2
    late = {n: sum(c[half:]) / max(len(c[half:]), 1) for n, c in curve.items()}
    out = {
        "date": str(date.today()),
        "device": f"cpu, {args.threads} threads",
        "trl": trl.__version__,
        "recipe": {**RECIPE, "steps": args.steps},
        "start_held_out_exact_match": start,
        "runs": runs,
        "ratios": {
            "wall_time_tunesmith_over_trl": round(
                runs["tunesmith"]["wall_s"] / runs["trl"]["wall_s"], 3
            ),
            "peak_rss_tunesmith_over_trl": round(
                runs["tunesmith"]["peak_rss_bytes"] / runs["trl"]["peak_rss_bytes"], 3
            ),
            "mean_train_reward_second_half": {n: round(v, 4) for n, v in late.items()},
            "held_out_exact_match": {n: r["held_out_exact_match"] for n, r in runs.items()},
        },
        "command": "python bench/grpo_vs_trl.py " + " ".join(sys.argv[1:]),
    }
    path = ROOT / f"bench/results/grpo_vs_trl_cpu_{date.today()}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["ratios"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
