"""DPO side by side: `tunesmith train` against TRL's DPOTrainer, same data, model and recipe.

The bundled preference task (examples/build_preference.py: the quickstart's questions, the
right answer chosen, a wrong one of the same kind rejected), the bundled 4M-parameter Llama,
LoRA r16 alpha 32 on every linear layer, beta 0.1, sigmoid loss, one epoch, 8 pairs per step,
lr 2e-3 with 10% warm-up then cosine, fp32 on the CPU; the reference is the base with the
adapter off in both. Each trainer runs in its own process (alternating, `--rounds` times);
wall time is the whole process (imports, data, training, saving) measured from outside, peak
memory the process's own peak RSS. Both adapters are then scored by one evaluator, through
PEFT (`PeftModel.from_pretrained`, so it also shows PEFT loads tunesmith's adapter): on the
100 held-out pairs, the implicit reward accuracy (β·(log π − log π_ref) of chosen above
rejected) and the margin. Neither side reuses tokenized data from an earlier run
(tunesmith's --no-cache, datasets' caching off).

    python bench/dpo_vs_trl.py [--rounds 2] [--threads 2]

Needs `pip install trl` (1.16 tested). Writes bench/results/dpo_vs_trl_cpu_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples/tiny-llama"
TRAIN = ROOT / "examples/data/preference_train.jsonl"
VAL = ROOT / "examples/data/preference_val.jsonl"
RECIPE = {
    "r": 16,
    "alpha": 32,
    "beta": 0.1,
    "epochs": 1,
    "batch": 8,
    "lr": 2e-3,
    "warmup_ratio": 0.1,
    "max_len": 256,
    "seed": 42,
}


def run_tunesmith(out: Path) -> dict:
    args = [
        sys.executable, "-m", "tunesmith", "train", str(ROOT / "examples/dpo.yaml"),
        f"output_dir={out}", "--overwrite", "--no-cache",
        f"method.r={RECIPE['r']}", f"method.alpha={RECIPE['alpha']}",
        f"objective.beta={RECIPE['beta']}", f"train.epochs={RECIPE['epochs']}",
        f"train.micro_batch_size={RECIPE['batch']}", "train.grad_accum_steps=1",
        f"train.lr={RECIPE['lr']}", f"train.warmup_ratio={RECIPE['warmup_ratio']}",
        f"data.max_seq_len={RECIPE['max_len']}", f"train.seed={RECIPE['seed']}",
        "eval.every_steps=null", "data.validation=[]",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    return {
        "wall_s": round(wall, 2),
        "train_s": summary["seconds"],
        "peak_rss_bytes": summary["host_peak_rss_bytes"],
        "adapter": str(out / "adapter"),
    }


def trl_worker(out: Path) -> None:
    """TRL's DPOTrainer as its docs show it, with a PEFT LoRA config (this process)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    datasets.disable_caching()  # tokenized anew every run, as tunesmith's side (--no-cache)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    data = datasets.load_dataset("json", data_files=str(TRAIN), split="train")
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=RECIPE["batch"],
        gradient_accumulation_steps=1,
        num_train_epochs=RECIPE["epochs"],
        learning_rate=RECIPE["lr"],
        # tunesmith's warm-up: ceil(ratio x steps)
        warmup_steps=math.ceil(RECIPE["warmup_ratio"] * math.ceil(len(data) / RECIPE["batch"])),
        lr_scheduler_type="cosine",
        beta=RECIPE["beta"],
        max_length=RECIPE["max_len"],
        seed=RECIPE["seed"],
        report_to=[],
        save_strategy="no",
        logging_steps=10,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=RECIPE["r"], lora_alpha=RECIPE["alpha"], lora_dropout=0.0, target_modules="all-linear"
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer,
        peft_config=peft_config,
    )  # fmt: skip
    trained = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - trained
    trainer.model.save_pretrained(out / "adapter")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (out / "worker.json").write_text(
        json.dumps({"train_s": round(train_s, 2), "peak_rss_bytes": peak,
                    "setup_s": round(trained - started, 2)})
    )  # fmt: skip


def run_trl(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--trl-worker", str(out)],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wall = time.perf_counter() - started
    worker = json.loads((out / "worker.json").read_text())
    return {"wall_s": round(wall, 2), **worker, "adapter": str(out / "adapter")}


def held_out(adapter: str) -> dict:
    """Implicit reward accuracy and margin of an adapter on the held-out pairs, through PEFT,
    tokenized by one encoder (tunesmith's, the chat template's) for every adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.encode import EncodeSettings
    from tunesmith.data.preference import encode_preference
    from tunesmith.data.sources import read_records
    from tunesmith.data.templates import resolve_chat_template
    from tunesmith.objectives.losses import answer_logps

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    template, _ = resolve_chat_template("auto", tokenizer, {"preference"})
    settings = EncodeSettings(max_seq_len=RECIPE["max_len"], template=template, add_bos=False)
    records = list(read_records(str(VAL), "train", None, None))
    samples, _ = encode_preference(records, "preference", tokenizer, settings)
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    policy, reference = [], []
    with torch.no_grad():
        for i in range(len(samples)):
            ids, labels = (torch.as_tensor(a, dtype=torch.long)[None] for a in samples[i])
            policy.append(float(answer_logps(model(input_ids=ids).logits, labels)[0][0]))
            with model.disable_adapter():
                reference.append(float(answer_logps(model(input_ids=ids).logits, labels)[0][0]))
    policy, reference = torch.tensor(policy), torch.tensor(reference)
    reward = RECIPE["beta"] * (policy - reference)
    chosen, rejected = reward[0::2], reward[1::2]
    return {
        "reward_accuracy": float((chosen > rejected).float().mean()),
        "reward_margin": float((chosen - rejected).mean()),
        "base_prefers_chosen": float((reference[0::2] > reference[1::2]).float().mean()),
        "tuned_prefers_chosen": float((policy[0::2] > policy[1::2]).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-worker", type=Path)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    import trl

    work = ROOT / "outputs/bench-dpo"
    runs = {"tunesmith": [], "trl": []}
    for round_ in range(args.rounds):
        for name, runner in (("tunesmith", run_tunesmith), ("trl", run_trl)):
            result = runner(work / f"{name}-{round_}")
            result.update(held_out(result["adapter"]))
            runs[name].append(result)
            print(name, round_, json.dumps(result), flush=True)
    best = {name: min(r["wall_s"] for r in rs) for name, rs in runs.items()}
    last = {name: rs[-1] for name, rs in runs.items()}
    out = {
        "date": str(date.today()),
        "device": f"cpu, {args.threads} threads",
        "trl": trl.__version__,
        "recipe": RECIPE,
        "runs": runs,
        "ratios": {
            "wall_time_tunesmith_over_trl": round(best["tunesmith"] / best["trl"], 3),
            "peak_rss_tunesmith_over_trl": round(
                max(r["peak_rss_bytes"] for r in runs["tunesmith"])
                / max(r["peak_rss_bytes"] for r in runs["trl"]),
                3,
            ),
            "reward_accuracy_tunesmith_minus_trl": round(
                last["tunesmith"]["reward_accuracy"] - last["trl"]["reward_accuracy"], 3
            ),
        },
        "command": "python bench/dpo_vs_trl.py " + " ".join(sys.argv[1:]),
    }
    path = ROOT / f"bench/results/dpo_vs_trl_cpu_{date.today()}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["ratios"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
