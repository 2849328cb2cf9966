"""Every training method on the bundled quickstart task, with the same budget, in one run.

Each method (full, LoRA, DoRA, QLoRA, prompt, prefix, bottleneck, IA3) trains the bundled
tiny Llama (examples/tiny-llama) on examples/data/quickstart_train.jsonl for the same number of
optimizer steps, micro-batch and data order (packing off for all, since prompt and prefix
tuning cannot pack), each with its own learning rate (listed in the table; for prompt, prefix,
bottleneck and IA3 the best of a 150-step sweep over 2-3 values), in a process of its own so its
peak memory is its own. Reported per method:

- trainable parameters, and the size of the saved adapter (or model) files;
- peak host memory (process peak RSS, CPU) or peak GPU memory (CUDA);
- training time per step;
- held-out accuracy: exact match of greedy answers on 100 validation prompts (eval.json);
- inference: greedy tokens/s (16 prompts × 32 new tokens, KV cache) of the base model, of the
  model with the adapter unmerged, and merged where the method can merge.

    python bench/methods.py                      # CPU, about 20 minutes on 2 cores
    python bench/methods.py --steps 100 --only lora,prompt
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_step import run_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS: dict[str, tuple[dict, float]] = {
    "full": ({"name": "full"}, 1e-3),
    "lora": ({"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0}, 4e-3),
    "dora": ({"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "use_dora": True}, 4e-3),
    "qlora": ({"name": "qlora", "r": 16, "alpha": 32, "dropout": 0.0}, 4e-3),
    "prompt": ({"name": "prompt", "num_virtual_tokens": 20}, 3e-2),
    "prefix": ({"name": "prefix", "num_virtual_tokens": 20}, 1e-1),
    "bottleneck": ({"name": "bottleneck", "style": "houlsby", "reduction_factor": 16}, 4e-3),
    "ia3": ({"name": "ia3"}, 1e-1),
}
WEIGHT_FILES = ("adapter_model.safetensors", "prefix_projection.safetensors")


def config_for(method: str, steps: int, out: Path):
    from tunesmith.config import load_config

    settings, lr = METHODS[method]
    config = load_config(ROOT / "examples" / "quickstart.yaml")
    raw = config.model_dump()
    raw["model"]["path"] = str(ROOT / "examples" / "tiny-llama")
    raw["method"] = settings
    for source in raw["data"]["datasets"] + raw["data"]["validation"]:
        source["path"] = str(ROOT / source["path"])
    raw["data"]["packing"] = False
    raw["train"].update(max_steps=steps, lr=lr, save_every_steps=steps, log_every_steps=steps)
    raw["eval"].update(every_steps=None, generate_samples=100, show_samples=0)
    raw["output_dir"] = str(out)
    from tunesmith.config import config_from_dict

    return config_from_dict(raw)


def tokens_per_second(model, prompts, new_tokens: int = 32) -> float:
    import torch

    ids = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(p[::-1]) for p in prompts], batch_first=True, padding_value=0
    ).flip(1)  # left padding
    mask = (ids != 0).long()
    for p, row in zip(prompts, mask, strict=True):
        row[-len(p) :] = 1
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        use_cache=True,
    )
    with torch.no_grad():
        model.generate(
            ids[:2],
            **{**kwargs, "attention_mask": mask[:2], "max_new_tokens": 4, "min_new_tokens": 4},
        )
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        seconds = time.perf_counter() - start
    return len(prompts) * new_tokens / seconds


def worker(method: str, steps: int) -> dict:
    import torch

    from tunesmith.adapters import disabled, load_adapter, merge_and_unload
    from tunesmith.builder import load_base
    from tunesmith.generation import prompt_ids
    from tunesmith.judge.evaluate import (
        _template_and_bos,
        compare_after_training,
        prompt_answer_pairs,
    )
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.train.loop import Run
    from tunesmith.train.progress import Progress

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / method
        config = config_for(method, steps, out)
        run = Run(config, progress=Progress(log_every=10**9, live=False))
        run.setup()
        summary = run.run()
        compare_after_training(run, echo=lambda text: None)
        del run
        scores = json.loads((out / "eval.json").read_text())["columns"]["tuned"]
        folder = out / ("model" if method == "full" else "adapter")
        files = [
            f for f in folder.iterdir() if f.name in WEIGHT_FILES or f.name.startswith("model")
        ]
        size = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")

        tokenizer = load_tokenizer(config.model)
        pairs = prompt_answer_pairs(config.data.validation, config.data, 16)
        template, add_bos = _template_and_bos(config.data, tokenizer)
        prompts = [prompt_ids(p.messages, template, tokenizer, add_bos) for p in pairs]
        if method == "full":
            base = load_model(config.model, "cpu", torch.float32).eval()
            base_tps = tokens_per_second(base, prompts)
            tuned = load_model(
                config.model.model_copy(update={"path": str(folder)}), "cpu", torch.float32
            ).eval()
            unmerged_tps, merged_tps = tokens_per_second(tuned, prompts), None
        else:
            model = load_base(config.method, config.model, "cpu", torch.float32).eval()
            load_adapter(model, folder)
            with disabled(model):
                base_tps = tokens_per_second(model, prompts)
            unmerged_tps = tokens_per_second(model, prompts)
            merged_tps = None
            if method not in ("prompt", "prefix", "bottleneck"):
                merged_tps = tokens_per_second(merge_and_unload(model), prompts)
    return {
        "method": method,
        "lr": METHODS[method][1],
        "steps": summary["steps"],
        "trainable_parameters": summary["trainable_parameters"],
        "weights_file_bytes": size,
        "peak_rss_bytes": summary["host_peak_rss_bytes"],
        "peak_gpu_bytes": summary.get("gpu_peak_allocated_bytes"),
        "seconds_per_step": summary["seconds"] / summary["steps"],
        "final_val_loss": summary["final_val_loss"],
        "exact_match": scores["exact_match"],
        "rouge_l": scores["rouge_l"],
        "samples": 100,
        "base_tokens_per_s": base_tps,
        "unmerged_tokens_per_s": unmerged_tps,
        "merged_tokens_per_s": merged_tps,
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def table(results: list[dict]) -> str:
    lines = [
        "| method | lr | trainable params | weights file | peak RSS | s/step | val loss | "
        "exact match | tok/s unmerged (vs base) | tok/s merged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        merged = f"{r['merged_tokens_per_s']:.0f}" if r["merged_tokens_per_s"] else "n/a"
        ratio = r["unmerged_tokens_per_s"] / r["base_tokens_per_s"]
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable_parameters']:,} | "
            f"{_size(r['weights_file_bytes'])} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
            f"{r['seconds_per_step']:.3f} | {r['final_val_loss']:.3f} | "
            f"{100 * r['exact_match']:.0f}% | {r['unmerged_tokens_per_s']:.0f} ({ratio:.2f}×) | "
            f"{merged} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=750, help="optimizer steps per method")
    parser.add_argument("--only", default=None, help="comma-separated methods")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    methods = args.only.split(",") if args.only else list(METHODS)
    results = []
    for method in methods:
        cmd = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps)]
        results.append(run_json(cmd, method))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    out = args.out or ROOT / "bench" / "results" / f"methods_cpu_{date.today().isoformat()}.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
