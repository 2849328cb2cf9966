"""Optimizer states through a checkpoint's files."""

from __future__ import annotations

import pytest
import torch

from tunesmith.io import atomic_write_safetensors
from tunesmith.train.checkpoint import optimizer_from_files, optimizer_to_files


def test_8bit_states_sharing_quantization_maps_save_and_load_back(tmp_path):
    """bitsandbytes' 8-bit AdamW gives every 8-bit state the same qmap tensors; safetensors
    refuses shared storage, so a real 8B QLoRA run with paged_adamw_8bit could not checkpoint.
    Each shared tensor is written once and referred to."""
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    params = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(70, 80))]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    tensors, rest = optimizer_to_files(optimizer)
    assert [k for k in tensors if k.endswith("qmap1")] == [
        "state/0/__bnb_optimizer_quant_state__/qmap1"
    ]
    atomic_write_safetensors(tensors, tmp_path / "optimizer.safetensors")
    state = optimizer_from_files(load_file(tmp_path / "optimizer.safetensors"), rest)
    original = optimizer.state_dict()
    for i in (0, 1):
        for key, value in original["state"][i].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(state["state"][i][key], value, rtol=0, atol=0)
    fresh = bnb.optim.AdamW8bit(params, lr=1e-2)
    fresh.load_state_dict(state)  # and bitsandbytes takes it back
