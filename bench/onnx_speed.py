"""Greedy decoding speed on this CPU: torch (transformers' generate, fp32, KV cache) against the
ONNX folders `tunesmith export --format onnx` writes, run by onnxruntime-genai (fp32 and int4,
from each exporter: onnxruntime-genai's builder and torch.onnx), side by side in one run, for
the bundled model and a 140M-parameter random-init Llama (hidden 896, 12 layers, intermediate
3072, 14 heads of 64, the bundled tokenizer's 4096-token vocabulary).

Each engine generates NEW tokens after the same 32-token prompt, batch 1, no end-of-text stop;
the engines take turns for ROUNDS rounds and the median is kept. Both run on the same threads
(torch's default, the cores; the export's --threads for onnxruntime-genai). Tokens/s counts
the generated tokens over the whole call (prompt included), as a user sees it. Also: export
time and size.

    python bench/onnx_speed.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tunesmith.export.onnx import export_onnx  # noqa: E402

BUNDLED = ROOT / "examples" / "tiny-llama"
NEW = 64
ROUNDS = 3
THREADS = torch.get_num_threads()  # torch's own (the cores); onnxruntime-genai gets the same
PROMPT = (
    "The str.format() method and the Formatter class share the same syntax for format "
    "strings, although in the case of Formatter subclasses"
)


def wide_llama(folder: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=896,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=14,
        num_key_value_heads=14,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def torch_run(model, ids: list[int]) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            pad_token_id=0,
        )
    assert out.shape[1] == len(ids) + NEW
    return NEW / (time.perf_counter() - started)


def genai_run(model, ids: list[int]) -> float:
    import onnxruntime_genai as og

    started = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + NEW, min_length=len(ids) + NEW)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == len(ids) + NEW
    return NEW / (time.perf_counter() - started)


def measure(name: str, source: Path, work: Path) -> list[dict]:
    import onnxruntime_genai as og

    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(PROMPT)["input_ids"][:32]
    engines = {"torch fp32": None}
    built = {}
    for exporter in ("genai", "torch"):
        for outtype in ("fp32", "int4"):
            engine = f"onnx {outtype} ({exporter} exporter)"
            folder = work / f"{name}-{exporter}-{outtype}"
            started = time.perf_counter()
            report = export_onnx(
                str(source), folder, outtype=outtype, exporter=exporter, threads=THREADS
            )
            built[engine] = (time.perf_counter() - started, report.bytes)
            engines[engine] = og.Model(str(folder))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    speeds = {engine: [] for engine in engines}
    for runner in engines.values():  # one warm-up each
        torch_run(model, ids) if runner is None else genai_run(runner, ids)
    for _ in range(ROUNDS):
        for engine, runner in engines.items():
            speed = torch_run(model, ids) if runner is None else genai_run(runner, ids)
            speeds[engine].append(speed)
    base = statistics.median(speeds["torch fp32"])
    rows = []
    for engine in engines:
        median = statistics.median(speeds[engine])
        row = dict(
            model=name,
            params_m=round(params / 1e6, 1),
            engine=engine,
            tokens_per_s=round(median, 1),
            vs_torch=round(median / base, 2),
        )
        if engine.startswith("onnx"):
            row.update(export_s=round(built[engine][0], 1), mb=round(built[engine][1] / 1e6, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        rows = measure("bundled (tiny-llama)", BUNDLED, work)
        rows += measure("random Llama 140M", wide_llama(work / "wide"), work)
    import onnxruntime
    import onnxruntime_genai

    result = dict(
        command="python bench/onnx_speed.py",
        date=str(date.today()),
        device=f"CPU, {torch.get_num_threads()} torch threads",
        versions=dict(
            torch=torch.__version__,
            onnxruntime=onnxruntime.__version__,
            onnxruntime_genai=onnxruntime_genai.__version__,
        ),
        new_tokens=NEW,
        rounds=ROUNDS,
        rows=rows,
    )
    out = ROOT / "bench" / "results" / f"onnx_speed_cpu_{date.today()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
