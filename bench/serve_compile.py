"""Does `torch.compile` pay for the serving engine's decode on this CPU? (issue 34, item 6)

The engine's offline path (`tunesmith.serve.offline.generate_texts`, the code `tunesmith
generate` and `serve` decode with) on 16 prompts of 30 tokens, 32 greedy tokens each, batched
16 at a time, for the bundled model and the 140M random Llama of bench/onnx_speed.py, on
`--threads` threads (default 1, the server's default here):

- `eager`: as shipped;
- `mlp`: each decoder layer's MLP compiled (`dynamic=True`): the part of a layer that compiles
  into one graph whatever the batch;
- `layer`: each whole decoder layer compiled (`dynamic=True`), as `train.compile` does for
  training; the slot cache's attention reads a per-step plan, so this graph recompiles.

Reports generated tokens/s (median of `--repeats`), the first call's seconds (compiling) and
whether the greedy texts equal eager's. Writes bench/results/serve_compile_<date>.json.

    python bench/serve_compile.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from onnx_speed import wide_llama  # noqa: E402

from tunesmith.builder import load_for_inference  # noqa: E402
from tunesmith.generation import Sampling  # noqa: E402
from tunesmith.serve.offline import generate_texts  # noqa: E402

PROMPTS = [list(range(10 + i, 40 + i)) for i in range(16)]
SAMPLING = Sampling(max_new_tokens=32)


def timed(model, tokenizer) -> tuple[float, list[str]]:
    started = time.perf_counter()
    out = generate_texts(model, tokenizer, PROMPTS, SAMPLING, 16)
    return time.perf_counter() - started, out


def measure(folder: Path, mode: str, repeats: int) -> dict:
    torch._dynamo.reset()
    model, tokenizer, _ = load_for_inference(str(folder), [], dtype="fp32")
    eager_s, reference = timed(model, tokenizer)  # warm-up
    if mode != "eager":
        for layer in model.model.layers:
            (layer.mlp if mode == "mlp" else layer).compile(dynamic=True)
    first_s, out = timed(model, tokenizer)
    times = [timed(model, tokenizer)[0] for _ in range(repeats)]
    tokens = len(PROMPTS) * SAMPLING.max_new_tokens
    return {
        "tokens_per_s": round(tokens / statistics.median(times), 1),
        "first_call_s": round(first_s, 2),
        "same_greedy_texts": out == reference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"command": "python " + " ".join(sys.argv), "date": str(date.today())}
    report["threads"] = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        models = {"bundled": ROOT / "examples" / "tiny-llama", "140m": wide_llama(Path(tmp) / "w")}
        for label, folder in models.items():
            rows = {mode: measure(folder, mode, args.repeats) for mode in ("eager", "mlp", "layer")}
            for mode in ("mlp", "layer"):
                eager = rows["eager"]["tokens_per_s"]
                rows[mode]["speedup"] = round(rows[mode]["tokens_per_s"] / eager, 3)
            report[label] = rows
            print(label, json.dumps(rows), flush=True)
    out = ROOT / "bench" / "results" / f"serve_compile_{date.today()}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
