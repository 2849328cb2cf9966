"""`tunesmith serve`: continuous batching against one request at a time, on the same machine.

Both runs serve the same model and adapters on 127.0.0.1 and get the same load: `--requests`
streamed completions, `--concurrency` in flight at once, each for an adapter (or the base)
chosen at random, greedy, `--max-tokens` each. "batched" decodes up to `--concurrency`
sequences per step (`--max-running`); "one at a time" is the same server with
`--max-running 1`, so requests wait and run alone. Reports throughput (generated tokens/s),
time to first token and request latency (p50/p95), and the ratios batched / one at a time
(throughput > 1 and latency < 1 mean batching helps). Writes
bench/results/serve_<device>_<date>.json.

    python bench/serve.py                                   # bundled tiny model, 2 random LoRAs
    python bench/serve.py --model meta-llama/Llama-3.2-1B --requests 128 --max-tokens 128
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "examples" / "tiny-llama"
PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "Once upon a time",
    "import numpy as np\n",
    "A list of fruits: apple,",
    "Q: What is 2+2?\nA:",
]


def make_adapters(model_path: str, folder: Path, count: int) -> list[Path]:
    """`count` LoRA adapters (r=8 on the attention and MLP projections) with random B."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith import LoRAConfig, add_lora, save_adapter

    out = []
    for i in range(count):
        model = AutoModelForCausalLM.from_pretrained(model_path)
        name = f"lora{i}"
        add_lora(model, LoRAConfig(r=8, alpha=16), name)
        torch.manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        save_adapter(model, folder / name, names=[name])
        out.append(folder / name / name)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(url: str, key: str, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)

    def one(job):
        model, prompt = job
        start = time.perf_counter()
        first = None
        tokens = 0
        stream = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return first or 0.0, time.perf_counter() - start, tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - start
    ttft = [r[0] for r in results]
    latency = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {
        "wall_s": round(wall, 3),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(percentile(ttft, 0.5), 4),
        "ttft_p95_s": round(percentile(ttft, 0.95), 4),
        "latency_p50_s": round(percentile(latency, 0.5), 4),
        "latency_p95_s": round(percentile(latency, 0.95), 4),
    }


def run_all(args, model, tokenizer, jobs, results: dict, plan) -> None:
    from tunesmith.serve.app import Limits, Server, running
    from tunesmith.serve.engine import Engine

    for label, slots in (("one_at_a_time", 1), ("batched", args.concurrency)):
        engine = Engine(model, tokenizer, max_running=slots, max_queue=args.requests, threads=plan)
        server = Server(engine, "base", api_key="bench", limits=Limits(max_tokens=4096))
        with running(server) as url:
            load(url, "bench", jobs[: min(8, len(jobs))], args.concurrency, 4)  # warm-up
            results[label] = load(url, "bench", jobs, args.concurrency, args.max_tokens)
            results[label]["mean_batch"] = round(
                engine.stats.step_rows / max(1, engine.stats.steps), 2
            )
        print(label, json.dumps(results[label]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(BUNDLED))
    parser.add_argument("--adapters", type=int, default=2, help="random LoRA adapters to make")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="the engine's threads (default: tunesmith serve's, see tunesmith.threads)",
    )
    parser.add_argument("--no-pin", action="store_true", help="leave the threads unpinned")
    parser.add_argument(
        "--busy", type=int, default=0, help="processes spinning on the CPU during the run"
    )
    args = parser.parse_args()

    import torch

    from tunesmith.builder import load_for_inference
    from tunesmith.threads import plan_threads

    plan = plan_threads(args.threads, reserve=1, pin=not args.no_pin)
    print(f"engine: {plan.describe()}; {args.busy} busy process(es)", flush=True)

    prompts = PROMPTS
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(args.model, Path(tmp), args.adapters)
        names = [f.name for f in folders]
        model, tokenizer, _ = load_for_inference(
            args.model, [str(f) for f in folders], device=args.device, names=names
        )
        rng = random.Random(0)
        jobs = [(rng.choice(["base", *names]), rng.choice(prompts)) for _ in range(args.requests)]
        results = {}
        spin = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
        ]
        try:
            run_all(args, model, tokenizer, jobs, results, plan)
        finally:
            for proc in spin:
                proc.kill()
    one, batched = results["one_at_a_time"], results["batched"]
    ratios = {
        "throughput": round(batched["tokens_per_s"] / one["tokens_per_s"], 3),
        "ttft_p50": round(batched["ttft_p50_s"] / one["ttft_p50_s"], 3),
        "ttft_p95": round(batched["ttft_p95_s"] / one["ttft_p95_s"], 3),
        "latency_p50": round(batched["latency_p50_s"] / one["latency_p50_s"], 3),
        "latency_p95": round(batched["latency_p95_s"] / one["latency_p95_s"], 3),
    }
    device = str(next(model.parameters()).device)
    report = {
        "command": "python " + " ".join(sys.argv),
        "date": str(date.today()),
        "device": device if device != "cpu" else f"cpu ({platform.processor() or 'x86_64'})",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "model": args.model,
        "adapters": args.adapters,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "threads": plan.describe(),
        "busy_processes": args.busy,
        "results": results,
        "ratios_batched_over_one_at_a_time": ratios,
    }
    print(json.dumps(ratios, indent=2))
    kind = "cuda" if device.startswith("cuda") else "cpu"
    out = Path(args.out or ROOT / "bench" / "results" / f"serve_{kind}_{date.today()}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
