"""GGUF exports of the bundled model, run by llama.cpp (llama-cpp-python), against tunesmith.

For each --outtype the bundled model is exported with `tunesmith.export.gguf.export_gguf` and
loaded by llama.cpp; reported: file size, perplexity on the last 16 windows of 256 tokens of
examples/data/pydoc_heldout.jsonl (llama.cpp's logits; tunesmith's fp32 model for reference),
and how many of 8 prompts llama.cpp decodes greedily to the same 32 tokens as tunesmith; and,
for the same file, the perplexity of its weights dequantized by the gguf package into the
Hugging Face model (torch): where the two agree, llama.cpp reads tunesmith's blocks as written.
`q3_k_m+imatrix` is q3_k_m with `--imatrix-data` (the first 32 windows of the same file).
Needs `pip install llama-cpp-python` (it builds llama.cpp; about 35 minutes on 2 cores).

    python bench/gguf_llamacpp.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "export"))

from test_gguf import hf_state_from_gguf  # noqa: E402

from tunesmith.export.gguf import export_gguf  # noqa: E402
from tunesmith.quantize.pipeline import token_stream, windows_of  # noqa: E402

MODEL = ROOT / "examples" / "tiny-llama"
TEXT = ROOT / "examples" / "data" / "pydoc_heldout.jsonl"
PROMPTS = [
    "The list type",
    "def open(file, mode='r'):",
    "Return a new dictionary",
    "Exceptions are raised when",
    "class Counter(dict):",
    "The for statement is used",
    "import os\nimport sys\n",
    "Raise ValueError if",
]
STOPS = (0, 3)
OUTTYPES = (
    "f32",
    "f16",
    "bf16",
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q4_k_m",
    "q4_0",
    "q3_k_m",
    "q3_k_m+imatrix",
    "q2_k",
)


def llama_greedy(llm, ids, n):
    llm.reset()
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if token in STOPS or len(out) == n:
            break
        out.append(token)
    return out


def ours_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=list(STOPS),
            pad_token_id=1,
        )[0, len(ids) :].tolist()
    return [t for t in out if t not in STOPS][:n]


def nll(logits: torch.Tensor, row: list[int]) -> float:
    return float(
        torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(row[1:]), reduction="sum")
    )


def main() -> None:
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    windows = windows_of(token_stream(str(TEXT), tokenizer), 256)[-16:].tolist()
    count = sum(len(r) - 1 for r in windows)
    with torch.no_grad():
        ours = sum(nll(model(torch.tensor([r])).logits[0], r) for r in windows)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    reference = [ours_greedy(model, ids, 32) for ids in prompts]
    rows = [dict(outtype="tunesmith fp32", perplexity=round(float(np.exp(ours / count)), 3))]
    with tempfile.TemporaryDirectory() as folder:
        original = {k: v.clone() for k, v in model.state_dict().items()}
        for outtype in OUTTYPES:
            path = Path(folder) / f"{outtype}.gguf"
            kind, _, imatrix = outtype.partition("+")
            export_gguf(str(MODEL), path, outtype=kind, imatrix_data=str(TEXT) if imatrix else None)
            model.load_state_dict(original)
            model.load_state_dict(hf_state_from_gguf(path, model), strict=False)
            with torch.no_grad():
                dequantized = sum(nll(model(torch.tensor([r])).logits[0], r) for r in windows)
            model.load_state_dict(original)
            llm = Llama(str(path), n_ctx=512, logits_all=True, verbose=False)
            total = 0.0
            for r in windows:
                llm.reset()
                llm.eval(r)
                total += nll(torch.tensor(np.asarray(llm.scores[: len(r)])), r)
            pairs = zip(prompts, reference, strict=True)
            same = sum(llama_greedy(llm, ids, 32) == ref for ids, ref in pairs)
            llm.close()
            rows.append(
                dict(
                    outtype=outtype,
                    mb=round(path.stat().st_size / 1e6, 2),
                    perplexity=round(float(np.exp(total / count)), 3),
                    torch_dequantized=round(float(np.exp(dequantized / count)), 3),
                    greedy_same=f"{same}/{len(prompts)}",
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    import llama_cpp

    result = dict(
        bench="gguf_llamacpp",
        date=str(date.today()),
        llama_cpp_python=llama_cpp.__version__,
        windows=f"last {len(windows)} windows of 256 tokens of pydoc_heldout.jsonl",
        results=rows,
        command="python bench/gguf_llamacpp.py",
    )
    out = ROOT / "bench" / "results" / f"gguf_llamacpp_cpu_{date.today()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
