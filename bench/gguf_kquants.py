"""K-quant GGUF exports of the bundled model: size, the perplexity of the weights as the file
holds them, and the time to quantize; and the quantizer's speed on a wider random-init Llama.

Each --outtype is written with `tunesmith.export.gguf.export_gguf`, read back with the gguf
package (which dequantizes every type), loaded into the Hugging Face model, and scored on the
last 16 windows of 256 tokens of examples/data/pydoc_heldout.jsonl (torch, fp32). This measures
what quantization does to the weights; llama.cpp's own perplexity on the same files is
bench/gguf_llamacpp.py's (it needs llama-cpp-python). Speed: seconds per GB of fp32 weights to
export a random-init Llama of hidden 1024, intermediate 2816, 8 layers (~150 M parameters),
and there, where perplexity means nothing (random weights), the mean KL divergence of each
export's next-token distribution from the fp32 model's on 4 random sequences of 128 tokens.

    python bench/gguf_kquants.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "export"))

from test_gguf import hf_state_from_gguf  # noqa: E402

from tunesmith.export.gguf import export_gguf  # noqa: E402
from tunesmith.quantize.pipeline import token_stream, windows_of  # noqa: E402

MODEL = ROOT / "examples" / "tiny-llama"
TEXT = ROOT / "examples" / "data" / "pydoc_heldout.jsonl"
OUTTYPES = (
    "f16",
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q5_k_s",
    "q4_k_m",
    "q4_k_s",
    "q4_0",
    "q3_k_l",
    "q3_k_m",
    "q3_k_s",
    "q2_k",
)
WIDE_TYPES = ("q8_0", "q4_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")


def perplexity(model, windows) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(torch.tensor([row])).logits[0]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:-1], torch.tensor(row[1:]), reduction="sum"
                )
            )
            count += len(row) - 1
    return float(np.exp(total / count))


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    windows = windows_of(token_stream(str(TEXT), tokenizer), 256)[-16:].tolist()
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [dict(outtype="fp32 (the model)", perplexity=round(perplexity(model, windows), 3))]
    with tempfile.TemporaryDirectory() as folder:
        for outtype in OUTTYPES:
            path = Path(folder) / f"{outtype}.gguf"
            started = time.perf_counter()
            report = export_gguf(str(MODEL), path, outtype=outtype)
            seconds = time.perf_counter() - started
            model.load_state_dict(original)
            model.load_state_dict(hf_state_from_gguf(path, model), strict=False)
            rows.append(
                dict(
                    outtype=outtype,
                    mb=round(path.stat().st_size / 1e6, 2),
                    perplexity=round(perplexity(model, windows), 3),
                    export_s=round(seconds, 2),
                    types=next((n for n in report.notes if n.startswith("tensor types")), ""),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
        wide = LlamaConfig(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            vocab_size=32000,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        big = AutoModelForCausalLM.from_config(wide, dtype=torch.float32)
        big_dir = Path(folder) / "wide"
        big.save_pretrained(big_dir)
        tokenizer.save_pretrained(big_dir)
        gb = sum(p.numel() for p in big.parameters()) * 4 / 1e9
        big.eval()
        kept = {k: v.clone() for k, v in big.state_dict().items()}
        probe = torch.randint(0, 32000, (4, 128), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = torch.log_softmax(big(probe).logits, -1)
        speed = []
        for outtype in WIDE_TYPES:
            path = Path(folder) / f"wide-{outtype}.gguf"
            started = time.perf_counter()
            export_gguf(str(big_dir), path, outtype=outtype)
            seconds = time.perf_counter() - started
            big.load_state_dict(kept)
            big.load_state_dict(hf_state_from_gguf(path, big), strict=False)
            with torch.no_grad():
                got = torch.log_softmax(big(probe).logits, -1)
            kl = float((reference.exp() * (reference - got)).sum(-1).mean())
            speed.append(
                dict(
                    outtype=outtype,
                    seconds_per_gb=round(seconds / gb, 1),
                    mb=round(path.stat().st_size / 1e6, 1),
                    kl_to_fp32=float(f"{kl:.3g}"),
                )
            )
            path.unlink()
            print(json.dumps(speed[-1]), flush=True)
    result = dict(
        bench="gguf_kquants",
        date=str(date.today()),
        windows=f"last {len(windows)} windows of 256 tokens of pydoc_heldout.jsonl",
        bundled=rows,
        wide_model=dict(parameters_gb_fp32=round(gb, 3), export=speed),
        command="python bench/gguf_kquants.py",
    )
    out = ROOT / "bench" / "results" / f"gguf_kquants_cpu_{date.today()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
