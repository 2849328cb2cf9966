"""Fixtures shared by the tests (helpers live in the `helpers` package beside this file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.data import chat_tokenizer
from helpers.models import ARCHS, VARIANTS, llama_config
from transformers import LlamaForCausalLM


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama with the bundled tokenizer (vocabulary and chat template)."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = chat_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = llama_config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.3,
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]),
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
