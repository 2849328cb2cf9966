"""Adapter arithmetic against the exact answer: tunesmith's combine_adapters and PEFT's
add_weighted_adapter, on two adapters with different ranks and alphas, for plain LoRA, rsLoRA
and DoRA.

The exact answer for cat/svd with weights w is the base with W + Σ wᵢ ΔWᵢ, where ΔWᵢ is what
adapter i really adds to W (s·BA, with s = alpha/r or alpha/√r; for DoRA k(W + sBA) − W). The
error is ‖logits − exact‖ / ‖exact − base logits‖ on fixed random tokens: 0 is exact, 1 is as
wrong as the whole change. Runs on CPU in seconds; writes bench/results/combine_vs_peft.json.

    python bench/combine_vs_peft.py
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import input_ids, logits, lora_config, make_model, randomize_adapter  # noqa: E402

from tunesmith.adapters import save_adapter, set_active  # noqa: E402
from tunesmith.combine import combine_adapters  # noqa: E402
from tunesmith.methods.lora.impl import add_lora, lora_layers  # noqa: E402

WEIGHTS = [0.7, 0.3]


def exact_logits(model, names, weights) -> torch.Tensor:
    reference = make_model("llama")
    with torch.no_grad():
        for module_name, layer in lora_layers(model):
            weight = layer.base_weight().float()
            delta = sum(
                w * (layer.merged_linear([n], torch.float32).weight - weight)
                for n, w in zip(names, weights, strict=True)
            )
            reference.get_submodule(module_name).weight.add_(delta)
    return logits(reference)


def main() -> None:
    import peft

    warnings.filterwarnings("ignore")
    ids = input_ids()
    base = logits(make_model("llama"), ids)
    rows = []
    for kind in ("lora", "rslora", "dora"):
        model = make_model("llama")
        add_lora(model, lora_config(kind, r=4, alpha=8), "a")
        randomize_adapter(model, "a", 1)
        add_lora(model, lora_config(kind, r=8, alpha=32), "b")
        randomize_adapter(model, "b", 2)
        exact = exact_logits(model, ["a", "b"], WEIGHTS)
        folder = ROOT / "bench" / "results" / f".combine-{kind}.tmp"
        save_adapter(model, folder, names=["a", "b"])
        peft_model = peft.PeftModel.from_pretrained(make_model("llama"), folder / "a", "a")
        peft_model.load_adapter(folder / "b", adapter_name="b")
        for method in ("cat", "svd"):
            row = {"adapters": kind, "method": method}
            if not (kind == "dora" and method == "cat"):
                combine_adapters(model, ["a", "b"], WEIGHTS, method, method, rank=32)
                set_active(model, method)
                row["tunesmith"] = rel_error(logits(model, ids), exact, base)
            try:
                extra = {"svd_rank": 12} if method == "svd" else {}
                peft_model.add_weighted_adapter(["a", "b"], WEIGHTS, method, method, **extra)
                peft_model.set_adapter(method)
                row["peft"] = rel_error(logits(peft_model, ids), exact, base)
            except Exception as err:  # noqa: BLE001 - report what PEFT does
                row["peft"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            rows.append(row)
            print(json.dumps(row))
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    out = ROOT / "bench" / "results" / "combine_vs_peft.json"
    versions = {"torch": torch.__version__, "peft": peft.__version__}
    out.write_text(json.dumps({"versions": versions, "weights": WEIGHTS, "rows": rows}, indent=2))
    print(f"wrote {out}")


def rel_error(got: torch.Tensor, exact: torch.Tensor, base: torch.Tensor) -> float:
    return round(float((got - exact).norm() / (exact - base).norm()), 6)


if __name__ == "__main__":
    main()
