"""Time the data pipeline on synthetic chat data: render + tokenize + pack, no cache.

    python bench/data_prep.py --records 20000 --procs 1 2

Writes bench/results/data_prep_<host>.json and prints seconds and tokens/s per process count.
Uses the bundled tokenizer (examples/tiny-llama), so no download."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_records(path: Path, count: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(count):
            messages = []
            for _ in range(rng.randint(1, 3)):
                question = " ".join(
                    rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(30)
                )
                answer = " ".join(rng.choice(["one", "two", "three"]) for _ in range(40))
                messages += [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from tunesmith.config import DataSection, ModelSection
    from tunesmith.data import prepare_data
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(ModelSection(path=str(ROOT / "examples/tiny-llama")))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "chat.jsonl"
        make_records(data_file, args.records)
        for procs in args.procs:
            data = DataSection(
                datasets=[{"path": str(data_file), "format": "chat"}],
                max_seq_len=512,
                packing=True,
                num_proc=procs,
            )
            start = time.perf_counter()
            prepared = prepare_data(data, tokenizer, use_cache=False)
            seconds = time.perf_counter() - start
            tokens = prepared.train.num_tokens
            results.append(
                {
                    "procs": procs,
                    "seconds": round(seconds, 2),
                    "tokens": tokens,
                    "tokens_per_s": round(tokens / seconds),
                }
            )
            print(f"{procs} process(es): {seconds:.1f} s, {tokens / seconds:,.0f} tokens/s")
    out = ROOT / "bench/results" / f"data_prep_{platform.node() or 'host'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"records": args.records, "cpus": os.cpu_count(), "results": results}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
