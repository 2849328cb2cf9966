"""Fixtures shared by the tests (helpers live in the `helpers` package beside this file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.data import chat_tokenizer
from helpers.models import ARCHS, VARIANTS, save_tiny_llama


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama with the bundled tokenizer (vocabulary and chat template)."""
    tokenizer = chat_tokenizer()
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny"),
        tokenizer,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.3,
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]),
    )
