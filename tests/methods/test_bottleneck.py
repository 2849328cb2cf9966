"""Bottleneck adapters (`methods/bottleneck/`): placement, width, the file format and hot swap;
and a fresh IA3 or bottleneck adapter changes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.methods import (
    ours,
    perturb,
)
from helpers.models import logits, make_model
from safetensors.torch import load_file

import tunesmith
from tunesmith.errors import AdapterError


@pytest.mark.parametrize("kind", ["ia3", "bottleneck", "houlsby"])
def test_a_fresh_adapter_changes_nothing(arch, kind):
    model = make_model(arch)
    before = logits(model)
    config = ours("bottleneck", style="houlsby") if kind == "houlsby" else ours(kind)
    if kind == "ia3" and arch == "phi3":
        config = tunesmith.IA3Config(targets=["qkv_proj", "down_proj"], feedforward=["down_proj"])
    tunesmith.add_adapter(model, config)
    assert tunesmith.trainable_parameters(model).trainable > 0
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_bottleneck_placement_and_width():
    model = make_model("llama")
    tunesmith.add_bottleneck(model, tunesmith.BottleneckConfig(style="houlsby", reduction_factor=4))
    tunesmith.add_bottleneck(model, tunesmith.BottleneckConfig(style="pfeiffer"), name="p")
    houlsby = [n for n, _ in model.named_parameters() if ".default.down.weight" in n]
    assert [n.split(".tunesmith")[0] for n in houlsby] == [
        "model.layers.0.self_attn",
        "model.layers.0.mlp",
        "model.layers.1.self_attn",
        "model.layers.1.mlp",
    ]
    assert model.get_parameter(houlsby[0]).shape == (8, 32)  # hidden 32 / 4
    pfeiffer = [n for n, _ in model.named_parameters() if ".p.down.weight" in n]
    assert [n.split(".tunesmith")[0] for n in pfeiffer] == [
        "model.layers.0.mlp",
        "model.layers.1.mlp",
    ]
    gpt2 = make_model("gpt2")
    tunesmith.add_bottleneck(gpt2, tunesmith.BottleneckConfig(style="houlsby"))
    assert {n.split(".tunesmith")[0] for n, _ in gpt2.named_parameters() if "bottleneck" in n} == {
        "transformer.h.0.attn",
        "transformer.h.0.mlp",
        "transformer.h.1.attn",
        "transformer.h.1.mlp",
    }


def test_bottleneck_format_round_trip_and_hot_swap(tmp_path):
    model = make_model("llama")
    tunesmith.add_bottleneck(
        model, tunesmith.BottleneckConfig(style="houlsby", nonlinearity="gelu")
    )
    perturb(model)
    expected = logits(model)
    tunesmith.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["format"] == "tunesmith-bottleneck"
    assert config["format_version"] == 1 and config["bottleneck_size"] == 2
    assert config["target_modules"][:2] == ["model.layers.0.self_attn", "model.layers.0.mlp"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.bottleneck_"
    assert tensors[key + "down.weight"].shape == (2, 32)
    assert tensors[key + "up.weight"].shape == (32, 2) and tensors[key + "up.bias"].shape == (32,)
    fresh = make_model("llama")
    tunesmith.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), expected, atol=0, rtol=0)
    # hot swap: the same module objects get the new weights
    other = make_model("llama")
    tunesmith.add_bottleneck(
        other, tunesmith.BottleneckConfig(style="houlsby", nonlinearity="gelu")
    )
    params = dict(other.named_parameters())
    tunesmith.load_adapter(other, tmp_path, name="default")
    assert all(p is params[n] for n, p in other.named_parameters())
    torch.testing.assert_close(logits(other), expected, atol=0, rtol=0)
    config["format_version"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="format_version 2 is not supported"):
        tunesmith.load_adapter(make_model("llama"), tmp_path)
