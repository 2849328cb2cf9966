"""Tiny causal LMs built from configs (no network), shared by the tests: six architectures,
LoRA configs and adapters with non-trivial weights, inputs and logits."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

import tunesmith
from tunesmith.methods.lora.impl import lora_layers

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=8),
    "phi3": lambda: Phi3Config(**_COMMON),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
}
ARCHS = list(CONFIGS)
SHAPE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
"""The shape a test's own Llama starts from (each test states what it changes)."""


def llama_config(**fields) -> LlamaConfig:
    """A Llama config of `SHAPE` with `fields` changed: the one place tests spell a Llama."""
    return LlamaConfig(**{**SHAPE, **fields})


VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
}


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def lora_config(variant: str = "lora", **overrides) -> tunesmith.LoRAConfig:
    fields = dict(r=4, alpha=8, dropout=0.0, targets="all-linear")
    fields.update(VARIANTS[variant])
    fields.update(overrides)
    return tunesmith.LoRAConfig(**fields)


@torch.no_grad()
def randomize_adapter(model: torch.nn.Module, name: str, seed: int = 1) -> None:
    """Give adapter `name` non-trivial weights (a fresh adapter's B is zero)."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            for p in (adapter.lora_A, adapter.lora_B):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if adapter.use_dora:
                m = adapter.lora_magnitude_vector
                m.mul_(1 + 0.2 * torch.rand(m.shape, generator=gen))


def input_ids(batch: int = 3, seq: int = 10, seed: int = 123) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = input_ids() if ids is None else ids
    return model(input_ids=ids).logits


def save_tiny_llama(folder: Path, tokenizer, seed: int = 0, **fields) -> Path:
    """A random 2-layer Llama of `tokenizer`'s vocabulary, saved with it in `folder`."""
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = llama_config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **fields,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
