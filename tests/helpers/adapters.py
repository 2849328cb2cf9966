"""Adapters and checkpoints on disk for the combine tests: a saved tiny base, adapter folders
of each kind with non-trivial weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from helpers.models import lora_config, make_model, randomize_adapter
from tunesmith.adapters import save_adapter
from tunesmith.methods import IA3Config
from tunesmith.methods.ia3.impl import add_ia3, ia3_layers
from tunesmith.methods.lora.impl import add_lora, lora_layers

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "examples" / "tiny-llama"


def save_base(arch: str, folder: Path, seed: int = 0) -> Path:
    make_model(arch, seed).save_pretrained(folder)
    return folder


@torch.no_grad()
def randomize_ia3(model, name: str, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, layer in ia3_layers(model):
        if name in layer.adapters:
            v = layer.adapters[name].weight
            v.copy_(1 + 0.5 * torch.randn(v.shape, generator=gen))


def adapter_folder(
    tmp_path: Path, base: Path, kind: str, name: str = "a", seed: int = 1, b_scale: float = 1.0
) -> Path:
    """An adapter of `kind` with random weights (B scaled by `b_scale`), saved under
    tmp_path/name."""
    model = AutoModelForCausalLM.from_pretrained(base)
    if kind == "ia3":
        add_ia3(model, IA3Config(), name)
        randomize_ia3(model, name, seed)
    else:
        variant = {"lora": "lora", "rslora": "rslora", "dora": "dora"}[kind]
        add_lora(model, lora_config(variant, r=4 + seed % 3, alpha=8 + seed), name)
        randomize_adapter(model, name, seed)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.adapters[name].lora_B.mul_(b_scale)
    out = tmp_path / name
    save_adapter(model, out, names=[name])
    return out / name if (out / name).is_dir() else out


def reference_ties(tasks, weights, density, majority="total"):
    """TIES written out entry by entry on flattened tensors (independent of the library)."""
    flat = [t.flatten() for t in tasks]
    pruned = []
    for t in flat:
        k = int(density * t.numel())
        keep = set(torch.argsort(t.abs(), descending=True)[:k].tolist())
        pruned.append(torch.tensor([v if i in keep else 0.0 for i, v in enumerate(t.tolist())]))
    weighted = [w * p for w, p in zip(weights, pruned, strict=True)]
    out = torch.zeros_like(flat[0])
    for j in range(out.numel()):
        values = [float(x[j]) for x in weighted]
        votes = sum(values) if majority == "total" else sum((v > 0) - (v < 0) for v in values)
        sign = 1.0 if votes >= 0 else -1.0
        agree = [v for v in values if v != 0 and (v > 0) == (sign > 0)]
        out[j] = sum(agree) / max(len(agree), 1)
    return out.reshape(tasks[0].shape)
