"""Shared by the method tests: PEFT's configs and ours for IA3, prompt and prefix tuning, logits
as PEFT returns them, and non-trivial adapter weights."""

from __future__ import annotations

import torch
from peft import IA3Config as PeftIA3Config
from peft import PrefixTuningConfig as PeftPrefixConfig
from peft import PromptTuningConfig as PeftPromptConfig
from torch import nn

import tunesmith

ATOL = 1e-5
N = 3  # virtual tokens


class WordTokenizer:
    """Just enough tokenizer for init "text": the text is space-separated token ids."""

    all_special_ids = [0, 1, 2]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}


def peft_config(kind: str):
    return {
        "ia3": PeftIA3Config(task_type="CAUSAL_LM", init_ia3_weights=False),
        "prompt": PeftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        "prefix": PeftPrefixConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    }[kind]


def ours(kind: str, **overrides):
    return {
        "ia3": tunesmith.IA3Config,
        "prompt": lambda **k: tunesmith.PromptTuningConfig(num_virtual_tokens=N, **k),
        "prefix": lambda **k: tunesmith.PrefixTuningConfig(num_virtual_tokens=N, **k),
        "bottleneck": tunesmith.BottleneckConfig,
    }[kind](**overrides)


@torch.no_grad()
def peft_logits(model, ids, kind: str) -> torch.Tensor:
    out = model(input_ids=ids).logits
    return out[:, N:] if kind == "prompt" else out  # PEFT keeps the prompt positions


@torch.no_grad()
def perturb(model: nn.Module, name: str = "default", seed: int = 3) -> None:
    """Give a fresh adapter non-trivial weights."""
    gen = torch.Generator().manual_seed(seed)
    for param_name, p in model.named_parameters():
        if f".{name}." in f".{param_name}." and p.requires_grad:
            if "ia3" in param_name or ".adapters." in param_name and p.dim() == 2 and 1 in p.shape:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


PEFT_ARCHS = ["llama", "gpt2", "qwen2", "gemma", "mistral"]
