"""Loading tokenizers and models: the dtype and device policy and one-line errors."""

from __future__ import annotations

import pytest
import torch
from helpers.models import llama_config

from tunesmith.config import ModelSection
from tunesmith.errors import TunesmithError
from tunesmith.model_config import read_model_config
from tunesmith.models import load_model, load_tokenizer, resolve_device, resolve_dtype


def test_dtype_and_device_policy():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cuda") == torch.float16
    if not torch.cuda.is_available():
        assert resolve_device("auto") in ("cpu", "mps")
        with pytest.raises(TunesmithError) as err:
            resolve_device("cuda")
        assert str(err.value) == "model.device: cuda was asked for but no CUDA GPU is visible"


def test_a_model_folder_needs_a_config_and_safetensors(tmp_path):
    with pytest.raises(TunesmithError) as err:
        read_model_config(str(tmp_path))
    assert str(err.value) == f"model.path: {tmp_path}: no config.json there (no such model folder)"
    llama_config(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=32,
    ).save_pretrained(tmp_path)
    assert read_model_config(str(tmp_path)).hidden_size == 16
    with pytest.raises(TunesmithError, match="no file named model.safetensors"):
        load_model(ModelSection(path=str(tmp_path)), "cpu", torch.float32)


def test_the_tokenizer_gets_a_pad_token(tiny_dir):
    tokenizer = load_tokenizer(ModelSection(path=str(tiny_dir)))
    assert tokenizer.pad_token is not None
    model = load_model(ModelSection(path=str(tiny_dir)), "cpu", torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
