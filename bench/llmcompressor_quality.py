"""tunesmith's GPTQ and AWQ against llm-compressor's, on the bundled model, same data.

llm-compressor (vLLM's quantization library) writes the compressed-tensors format that
`tunesmith quantize --format compressed-tensors` writes, so the question the project asks of
it is: does it quantize as well as ours? Both sides get the same 32 calibration windows of 256
tokens of examples/data/pydoc_heldout.jsonl (tunesmith makes them and hands llm-compressor the
token ids), the same scheme (4-bit asymmetric integers, group size 16: the bundled model's
688-wide MLP needs a group that divides it), and are measured by tunesmith's loader and
perplexity on the same next 32 windows. llm-compressor runs from its own virtualenv
(`--llmc-python`; it pins transformers <= 5.17 and compressed-tensors 0.19):

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    python bench/llmcompressor_quality.py --llmc-python /tmp/llmc/bin/python

Writes bench/results/llmcompressor_quality_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "tiny-llama"
TEXT = ROOT / "examples" / "data" / "pydoc_heldout.jsonl"
GROUP = 16


def worker(method: str, windows_file: str, out: str) -> None:
    """In llm-compressor's virtualenv: quantize the bundled model with its GPTQ or AWQ."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        # llm-compressor 0.14's sequential pipeline pins its cached activations, which fails
        # without an accelerator ("Cannot access accelerator device"); on CPU, pinning is moot
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    windows = load_file(windows_file)["windows"]
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    scheme = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": False,
                "strategy": "group",
                "group_size": GROUP,
            },
        }
    }
    if method == "gptq":
        recipe = GPTQModifier(config_groups=scheme, ignore=["lm_head"], dampening_frac=0.01)
    else:
        recipe = AWQModifier(config_groups=scheme, ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": windows.tolist()})
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=len(windows),
        max_seq_length=windows.shape[1],
    )
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llmc-python", help="python of a virtualenv with llmcompressor")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "WINDOWS", "OUT"))
    parser.add_argument("--methods", default="gptq,awq")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if not args.llmc_python:
        parser.error("--llmc-python is required")

    import torch
    from safetensors.torch import save_file

    from tunesmith.config import ModelSection
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.quantize.calibrate import perplexity
    from tunesmith.quantize.pipeline import (
        QuantizeSettings,
        calibration_and_eval,
        quantize_checkpoint,
    )

    tokenizer = load_tokenizer(ModelSection(path=str(MODEL)))
    calib, held = calibration_and_eval(tokenizer, str(TEXT), None, 32, 32, 256, True)
    version = subprocess.run(
        [args.llmc_python, "-c", "import llmcompressor; print(llmcompressor.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmc-") as tmp:
        windows = Path(tmp) / "windows.safetensors"
        save_file({"windows": calib.contiguous()}, str(windows))
        original = load_model(ModelSection(path=str(MODEL)), "cpu", torch.float32)
        ppl_original = perplexity(original, held, "cpu")
        for method in args.methods.split(","):
            started = time.perf_counter()
            ours = Path(tmp) / f"tunesmith-{method}"
            quantize_checkpoint(
                str(MODEL),
                ours,
                QuantizeSettings(
                    method,
                    bits=4,
                    group_size=GROUP,
                    calib=str(TEXT),
                    calib_samples=32,
                    eval_samples=32,
                    seq_len=256,
                    layout="compressed-tensors",
                ),
                device="cpu",
            )
            ours_s = time.perf_counter() - started
            started = time.perf_counter()
            theirs = Path(tmp) / f"llmcompressor-{method}"
            run = subprocess.run(
                [args.llmc_python, __file__, "--worker", method, str(windows), str(theirs)],
                capture_output=True,
                text=True,
            )
            theirs_s = time.perf_counter() - started
            if run.returncode:
                print(f"llm-compressor {method} failed:\n{run.stderr[-3000:]}")
                rows.append({"method": method, "llmcompressor_error": run.stderr[-3000:]})
                continue
            row = {
                "method": method,
                "bits": 4,
                "group_size": GROUP,
                "ppl_original": round(ppl_original, 3),
            }
            for side, folder, seconds in (
                ("tunesmith", ours, ours_s),
                ("llmcompressor", theirs, theirs_s),
            ):
                model = load_model(ModelSection(path=str(folder)), "cpu", torch.float32)
                row[f"ppl_{side}"] = round(perplexity(model, held, "cpu"), 3)
                row[f"seconds_{side}"] = round(seconds, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "command": "python " + " ".join(sys.argv),
        "date": str(date.today()),
        "llmcompressor": version,
        "calibration": "32 x 256 tokens",
        "held_out": "next 32 x 256 tokens",
        "rows": rows,
    }
    out = Path(
        args.out or ROOT / "bench" / "results" / f"llmcompressor_quality_{date.today()}.json"
    )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
