"""Quality and size of each quantization method on the bundled model, in one run.

Every method quantizes examples/tiny-llama with `tunesmith.quantize.pipeline.quantize_checkpoint`
(the code `tunesmith quantize` runs), calibrated on the first 32 windows of 256 tokens of
examples/data/pydoc_heldout.jsonl (Python documentation the model never trained on) and measured
on the next 32: perplexity of the original and of the reloaded quantized checkpoint, size on
disk, wall time. Settings: 4-bit group size 128 (and, with --all, 3-bit/128 and 4-bit per-row),
GPTQ with and without act-order, AWQ, RTN, bitsandbytes int8 and nf4. Results go to
bench/results/quantize_quality_<device>_<date>.json and a Markdown table to stdout.

    python bench/quantize_quality.py            # CPU, about 3 minutes on 2 cores
    python bench/quantize_quality.py --all      # also 3-bit and per-row grids
    python bench/quantize_quality.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tunesmith.quantize.pipeline import QuantizeSettings, quantize_checkpoint  # noqa: E402

MODEL = ROOT / "examples" / "tiny-llama"
TEXT = ROOT / "examples" / "data" / "pydoc_heldout.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = [
        ("rtn", 4, 128, False),
        ("gptq", 4, 128, False),
        ("gptq", 4, 128, True),
        ("awq", 4, 128, False),
        ("int8", None, None, False),
        ("nf4", None, None, False),
    ]
    if args.all:
        for bits, group in ((3, 128), (4, -1)):
            runs += [
                ("rtn", bits, group, False),
                ("gptq", bits, group, False),
                ("gptq", bits, group, True),
                ("awq", bits, group, False),
            ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunesmith-quantize-") as folder:
        for i, (method, bits, group, act_order) in enumerate(runs):
            report = quantize_checkpoint(
                str(MODEL),
                Path(folder) / str(i),
                QuantizeSettings(
                    method,
                    bits=bits,
                    group_size=group,
                    calib=str(TEXT),
                    calib_samples=32,
                    eval_samples=32,
                    seq_len=256,
                    act_order=act_order,
                ),
                device=args.device,
            )
            rows.append(
                dict(
                    method=method + (" act-order" if act_order else ""),
                    bits=report.bits,
                    group_size=report.group_size,
                    ppl_original=round(report.perplexity_original, 3),
                    ppl_quantized=round(report.perplexity_quantized, 3),
                    mb_original=round(report.bytes_original / 1e6, 2),
                    mb_quantized=round(report.bytes_quantized / 1e6, 2),
                    seconds=round(report.seconds, 1),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    import torch

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = dict(
        bench="quantize_quality",
        date=str(date.today()),
        device=device,
        model=str(MODEL.name),
        calibration="first 32 windows of 256 tokens of pydoc_heldout.jsonl",
        evaluation="next 32 windows",
        torch=torch.__version__,
        results=rows,
        command=" ".join(["python", "bench/quantize_quality.py", *sys.argv[1:]]),
    )
    out = args.out or ROOT / "bench" / "results" / (
        f"quantize_quality_{'cuda' if args.device == 'cuda' else 'cpu'}_{date.today()}.json"
    )
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| method | bits | group | perplexity | vs original | size | time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        change = r["ppl_quantized"] / r["ppl_original"] - 1
        group = "—" if r["group_size"] is None else r["group_size"]
        print(
            f"| {r['method']} | {r['bits']} | {group} | {r['ppl_quantized']:.3f} | "
            f"{change:+.2%} | {r['mb_quantized']} MB | {r['seconds']} s |"
        )


if __name__ == "__main__":
    main()
