"""IA3 (`methods/ia3/`): merge, unmerge, stacking and per-row routing."""

from __future__ import annotations

import torch
from helpers.methods import (
    ATOL,
    perturb,
)
from helpers.models import logits, make_model

import tunesmith
from tunesmith.methods.ia3.impl import ia3_layers


def test_ia3_merge_unmerge_stack_and_route(arch):
    model = make_model(arch)
    config = None
    if arch == "phi3":
        config = tunesmith.IA3Config(targets=["qkv_proj", "down_proj"], feedforward=["down_proj"])
    base = logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    tunesmith.add_ia3(model, config, name="a")
    tunesmith.add_ia3(model, config, name="b")
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    assert any(layer.feedforward for _, layer in ia3_layers(model))
    tunesmith.set_active(model, "a")
    only_a = logits(model)
    tunesmith.set_active(model, "b")
    only_b = logits(model)
    tunesmith.set_active(model, ["a", "b"])
    stacked = logits(model)
    tunesmith.merge(model)
    torch.testing.assert_close(logits(model), stacked, atol=ATOL, rtol=1e-5)
    tunesmith.unmerge(model)
    for name, p in model.named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in weights:
            torch.testing.assert_close(p, weights[clean], atol=1e-6, rtol=1e-5)
    with tunesmith.route(model, ["a", "b", None]):
        routed = logits(model)
    for row, expected in enumerate((only_a, only_b, base)):
        torch.testing.assert_close(routed[row], expected[row], atol=ATOL, rtol=1e-5)
    merged = tunesmith.merge_and_unload(model, ["a", "b"])
    assert not list(ia3_layers(merged))
    torch.testing.assert_close(logits(merged), stacked, atol=ATOL, rtol=1e-5)
