"""K-quant GGUF exports of the bundled model with and without an importance matrix
(`tunesmith export --imatrix-data`): perplexity of the weights as the file holds them, as
bench/gguf_kquants.py measures it (gguf's dequantizer, torch, the last 16 windows of 256 tokens
of examples/data/pydoc_heldout.jsonl). The importance matrix comes from the first 32 windows of
the same file, which do not overlap the scored ones (the script checks).

    python bench/gguf_imatrix.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "export"))

from gguf_kquants import MODEL, TEXT, perplexity  # noqa: E402
from test_gguf import hf_state_from_gguf  # noqa: E402

from tunesmith.export.gguf import export_gguf  # noqa: E402
from tunesmith.export.imatrix import SEQ_LEN, WINDOWS  # noqa: E402
from tunesmith.quantize.pipeline import token_stream, windows_of  # noqa: E402

OUTTYPES = ("q4_k_m", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    every = windows_of(token_stream(str(TEXT), tokenizer), SEQ_LEN)
    assert len(every) >= WINDOWS + 16, "the calibration and scored windows would overlap"
    windows = every[-16:].tolist()
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [dict(outtype="fp32 (the model)", perplexity=round(perplexity(model, windows), 3))]
    with tempfile.TemporaryDirectory() as folder:
        for outtype in OUTTYPES:
            row = dict(outtype=outtype)
            for label, data in (("plain", None), ("imatrix", str(TEXT))):
                path = Path(folder) / f"{outtype}-{label}.gguf"
                export_gguf(str(MODEL), path, outtype=outtype, imatrix_data=data)
                model.load_state_dict(original)
                model.load_state_dict(hf_state_from_gguf(path, model), strict=False)
                row[label] = round(perplexity(model, windows), 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = dict(
        bench="gguf_imatrix",
        date=str(date.today()),
        calibration=f"first {WINDOWS} windows of {SEQ_LEN} tokens of pydoc_heldout.jsonl",
        scored=f"last 16 windows of {SEQ_LEN} tokens of the same file ({len(every)} in all)",
        rows=rows,
        command="python bench/gguf_imatrix.py",
    )
    out = ROOT / "bench" / "results" / f"gguf_imatrix_cpu_{date.today()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
