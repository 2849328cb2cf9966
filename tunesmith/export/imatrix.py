"""The importance matrix (llama.cpp's `llama-imatrix`) for K-quant GGUF exports.

For every linear layer the model runs, the mean over calibration tokens of each input column's
square: how much each weight column's error costs on real activations. `llama-quantize
--imatrix` hands these per-column values to ggml's quantizers as their weights, and
`kquants.QUANTIZERS` take them the same way. Calibration text comes from a data file (any
format `tunesmith quantize --calib` reads) or from a run config's training data, tokenized
into one stream by `quantize`'s calibration pipeline and cut into windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.quantize.pipeline import token_stream, windows_of

WINDOWS = 32
SEQ_LEN = 256


@dataclass
class Importance:
    values: dict[str, np.ndarray]
    """Checkpoint weight name (e.g. model.layers.0.mlp.down_proj.weight) → per-column mean x²."""
    source: str
    windows: int
    seq_len: int


def calibration_files(data: str) -> list[str]:
    """The files to read calibration text from: `data` itself, or a run config's data files."""
    path = Path(data).expanduser()
    if not path.exists():
        raise TunesmithError(f"--imatrix-data: {data}: no such file or folder")
    if path.suffix not in (".yaml", ".yml"):
        return [str(path)]
    config = load_config(path)
    files = []
    for source in config.data.datasets:
        local = Path(source.path).expanduser()
        if not local.is_absolute():
            local = path.parent / local if (path.parent / local).exists() else local
        if local.exists():
            files.append(str(local))
    if not files:
        raise TunesmithError(
            f"--imatrix-data: {data} names no local data files; give a data file instead"
        )
    return files


def compute_importance(
    model_dir: str, data: str, tokenizer, windows: int = WINDOWS, seq_len: int = SEQ_LEN
) -> Importance:
    """Run the checkpoint in `model_dir` (fp32, CPU) on `windows` windows of `seq_len` tokens of
    `data` and collect each linear layer's per-column mean squared input."""
    stream = []
    for file in calibration_files(data):
        stream += token_stream(file, tokenizer, "--imatrix-data")
    chunks = windows_of(stream, seq_len)[:windows]
    if len(chunks) == 0:
        raise TunesmithError(
            f"--imatrix-data: {data} has {len(stream):,} tokens, less than one window of "
            f"{seq_len}; give more text"
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True
    ).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue

        def collect(module, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        hooks.append(module.register_forward_pre_hook(collect))
    try:
        with torch.no_grad():
            for chunk in chunks:
                model(input_ids=chunk[None])
    finally:
        for hook in hooks:
            hook.remove()
    values = {f"{name}.weight": (sums[name] / counts[name]).numpy() for name in sums}
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in values:
        # tied: the embedding matrix is the output head's weight, and llama.cpp quantizes it
        # (token_embd) with the output matmul's statistics
        embed = model.get_input_embeddings()
        for name, module in model.named_modules():
            if module is embed:
                values[f"{name}.weight"] = values["lm_head.weight"]
    return Importance(values, data, len(chunks), seq_len)
