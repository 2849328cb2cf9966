"""LoRA / rsLoRA / DoRA invariants over a matrix of architectures (fp32, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.models import input_ids, logits, lora_config, make_model, randomize_adapter
from torch import nn
from transformers.pytorch_utils import Conv1D

import tunesmith
from tunesmith.methods.lora.impl import lora_layers
from tunesmith.methods.lora.layer import LoRALayer

ATOL = 1e-5


def test_fresh_adapter_changes_nothing(arch, variant):
    model = make_model(arch)
    base = logits(model)
    tunesmith.add_lora(model, lora_config(variant))
    torch.testing.assert_close(logits(model), base, atol=ATOL, rtol=0)


def test_training_touches_only_adapters(arch, variant):
    model = make_model(arch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    tunesmith.add_lora(model, lora_config(variant, dropout=0.1))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = input_ids()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for name, p in model.named_parameters():
            is_adapter = ".adapters." in name
            assert (p.grad is not None) == is_adapter, name
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # Every base tensor is bit-identical (keys gain `.base_layer` inside wrapped modules).
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    for key, value in base_state.items():
        assert torch.equal(state[key], value), key
    counts = tunesmith.trainable_parameters(model)
    assert counts.trainable == sum(p.numel() for p in trainable)
    assert counts.percent == pytest.approx(100 * counts.trainable / counts.total)


def test_merge_unmerge_disable(arch, variant):
    model = make_model(arch)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model)
    tunesmith.add_lora(model, lora_config(variant))
    randomize_adapter(model, "default")
    adapted = logits(model)
    assert (adapted - base).abs().max() > 1e-2  # the adapter does something

    tunesmith.merge(model)
    torch.testing.assert_close(logits(model), adapted, atol=ATOL, rtol=0)
    with tunesmith.disabled(model):  # merged adapters are unmerged for the duration
        torch.testing.assert_close(logits(model), base, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(model), adapted, atol=ATOL, rtol=0)

    tunesmith.unmerge(model)
    torch.testing.assert_close(logits(model), adapted, atol=ATOL, rtol=0)
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    for key, value in base_weights.items():
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0)
    with tunesmith.disabled(model):
        torch.testing.assert_close(logits(model), base, atol=ATOL, rtol=0)


def test_merge_and_unload_gives_plain_model(arch, variant):
    model = make_model(arch)
    tunesmith.add_lora(model, lora_config(variant, modules_to_save=["lm_head"]))
    randomize_adapter(model, "default")
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.add_(0.05)
    adapted = logits(model)
    plain = tunesmith.merge_and_unload(model)
    assert plain is model
    kinds = {type(m) for m in plain.modules()}
    assert not any(k.__module__.startswith("tunesmith") for k in kinds)
    assert not hasattr(plain, "tunesmith_adapters")
    assert isinstance(plain.lm_head, nn.Linear)
    torch.testing.assert_close(logits(plain), adapted, atol=ATOL, rtol=0)


def test_stacking_is_sum_of_deltas(arch, variant):
    model = make_model(arch)
    base = logits(model)
    tunesmith.add_lora(model, lora_config(variant), name="a")
    targets = ["o_proj", "c_proj", "down_proj"]  # one list for every architecture
    with pytest.warns(UserWarning, match="match no linear module"):
        tunesmith.add_lora(model, lora_config(variant, r=2, alpha=3, targets=targets), name="b")
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    # Compare at the layer level, where stacking is defined: each layer's output delta.
    x = torch.randn(2, 5, 32)
    for _, layer in lora_layers(model):
        base_x = x if layer.in_features == 32 else torch.randn(2, 5, layer.in_features)
        deltas = {}
        for names in (["a"], ["b"], ["a", "b"]):
            layer.active = tuple(n for n in names if n in layer.adapters)
            with torch.no_grad():
                deltas[tuple(names)] = layer(base_x) - layer.base_layer(base_x)
        torch.testing.assert_close(
            deltas[("a", "b")], deltas[("a",)] + deltas[("b",)], atol=ATOL, rtol=0
        )
    tunesmith.set_active(model, ["a", "b"])
    stacked = logits(model)
    assert tunesmith.active_adapters(model) == ["a", "b"]
    tunesmith.merge(model)  # merging a stack equals running it
    torch.testing.assert_close(logits(model), stacked, atol=ATOL, rtol=0)
    tunesmith.unmerge(model)
    with tunesmith.disabled(model):
        torch.testing.assert_close(logits(model), base, atol=ATOL, rtol=0)


def test_route_equals_separate_runs(arch, variant):
    model = make_model(arch)
    tunesmith.add_lora(model, lora_config(variant, modules_to_save=["lm_head"]), name="a")
    tunesmith.add_lora(model, lora_config(variant, r=2), name="b")
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    with torch.no_grad():
        model.lm_head.modules_to_save["a"].weight.mul_(1.5)
    ids = input_ids(batch=4)
    plan = ["a", None, "b", ["a", "b"]]
    with tunesmith.route(model, plan):
        routed = logits(model, ids)
    for row, names in enumerate(plan):
        if names is None:
            with tunesmith.disabled(model):
                alone = logits(model, ids[row : row + 1])
        else:
            tunesmith.set_active(model, names)
            alone = logits(model, ids[row : row + 1])
        torch.testing.assert_close(routed[row : row + 1], alone, atol=ATOL, rtol=0)


def test_route_works_with_generate():
    model = make_model("llama")
    tunesmith.add_lora(model, lora_config(), name="a")
    randomize_adapter(model, "a")
    ids = input_ids(batch=2, seq=6)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with tunesmith.route(model, ["a", None]):
        both = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    tunesmith.set_active(model, "a")
    with_a = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), **kwargs)
    with tunesmith.disabled(model):
        base = model.generate(input_ids=ids[1:], attention_mask=torch.ones_like(ids[1:]), **kwargs)
    assert torch.equal(both[0], with_a[0])
    assert torch.equal(both[1], base[0])


def test_route_rows_must_match_batch():
    model = make_model("llama")
    tunesmith.add_lora(model, lora_config(), name="a")
    with (
        tunesmith.route(model, ["a", None]),
        pytest.raises(
            tunesmith.AdapterError, match=r"route\(\) was given 2 rows but the batch has 3"
        ),
    ):
        logits(model, input_ids(batch=3))


def test_delete_adapter_restores_plain_modules():
    model = make_model("qwen2")
    base = logits(model)
    tunesmith.add_lora(model, lora_config(modules_to_save=["lm_head"]), name="a")
    tunesmith.add_lora(model, lora_config(targets=["q_proj"]), name="b")
    randomize_adapter(model, "a")
    randomize_adapter(model, "b")
    tunesmith.set_active(model, ["a", "b"])
    tunesmith.merge(model)
    tunesmith.delete_adapter(model, "a")
    assert tunesmith.adapter_names(model) == ["b"]
    assert tunesmith.active_adapters(model) == ["b"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALayer)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    assert isinstance(model.lm_head, nn.Linear)
    tunesmith.delete_adapter(model, "b")
    assert not list(lora_layers(model))
    torch.testing.assert_close(logits(model), base, atol=ATOL, rtol=0)


def test_scaling_variants():
    model = make_model("llama")
    tunesmith.add_lora(model, lora_config(r=4, alpha=8), name="plain")
    tunesmith.add_lora(model, lora_config(r=4, alpha=8, use_rslora=True), name="rs")
    tunesmith.add_lora(
        model,
        lora_config(r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\..*": 1}),
        name="pat",
    )
    layer0 = model.model.layers[0].self_attn
    layer1 = model.model.layers[1].self_attn
    assert layer0.q_proj.adapters["plain"].scaling.item() == pytest.approx(2.0)
    assert layer0.q_proj.adapters["rs"].scaling.item() == pytest.approx(8 / math.sqrt(4))
    assert layer0.v_proj.adapters["pat"].r == 2
    assert layer0.v_proj.adapters["pat"].scaling.item() == pytest.approx(4.0)
    assert layer1.q_proj.adapters["pat"].scaling.item() == pytest.approx(1 / 4)


def test_targets_exclude_layers_and_conv1d():
    model = make_model("llama")
    config = lora_config(targets=["q_proj", "v_proj"], layers=[1], exclude=["v_proj"])
    tunesmith.add_lora(model, config)
    adapted = [n for n, _ in lora_layers(model)]
    assert adapted == ["model.layers.1.self_attn.q_proj"]

    model = make_model("llama")
    tunesmith.add_lora(model, lora_config(targets=r".*\.(gate|up)_proj"))
    assert {n.rsplit(".", 1)[1] for n, _ in lora_layers(model)} == {"gate_proj", "up_proj"}

    gpt2 = make_model("gpt2")
    tunesmith.add_lora(gpt2, lora_config())  # all-linear: Conv1D layers, not lm_head
    names = [n for n, _ in lora_layers(gpt2)]
    assert "lm_head" not in names and len(names) == 8
    layer = gpt2.transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, Conv1D)
    assert layer.adapters["default"].lora_A.shape == (4, 32)  # r × in
    assert layer.adapters["default"].lora_B.shape == (96, 4)  # out × r


def test_init_methods():
    model = make_model("llama")
    tunesmith.add_lora(model, lora_config(init="gaussian"))
    a = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert torch.all(a.lora_B == 0)
    assert a.lora_A.std().item() == pytest.approx(1 / 4, rel=0.25)

    model = make_model("llama")
    base = logits(model)
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    tunesmith.add_lora(model, lora_config(init="pissa"))
    layer = model.model.layers[0].self_attn.q_proj
    adapter = layer.adapters["default"]
    # the layer still computes W x; the adapter holds W's top-4 singular directions
    torch.testing.assert_close(logits(model), base, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        layer.base_layer.weight + adapter.delta_weight(), w, atol=1e-5, rtol=0
    )
    top = torch.linalg.svdvals(w)[:4]
    torch.testing.assert_close(torch.linalg.svdvals(adapter.delta_weight())[:4], top)
    assert torch.linalg.svdvals(layer.base_layer.weight)[0] < top[-1] + 1e-5


def test_safe_merge_refuses_nan_and_changes_nothing():
    model = make_model("llama")
    tunesmith.add_lora(model, lora_config())
    randomize_adapter(model, "default")
    before = logits(model)
    w = model.model.layers[1].mlp.down_proj.base_layer.weight.clone()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.adapters["default"].lora_B[0, 0] = float("nan")
    with pytest.raises(
        tunesmith.AdapterError,
        match=r"merging adapter\(s\) default into model.layers.1.mlp.down_proj gives NaN/Inf",
    ):
        tunesmith.merge(model)
    assert torch.equal(model.model.layers[1].mlp.down_proj.base_layer.weight, w)
    assert all(not layer.merged for _, layer in lora_layers(model))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.adapters["default"].lora_B[0, 0] = 0.0
    assert logits(model).shape == before.shape


def test_half_precision_base_keeps_fp32_adapter_and_bf16_activations():
    model = make_model("llama").to(torch.bfloat16)
    tunesmith.add_lora(model, lora_config())
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.adapters["default"].lora_A.dtype == torch.float32
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_new_adapters_follow_the_models_mode():
    model = make_model("llama")  # eval mode
    tunesmith.add_lora(model, lora_config(dropout=0.5, modules_to_save=["lm_head"]))
    randomize_adapter(model, "default")
    assert not any(m.training for m in model.modules())
    first = logits(model)
    torch.testing.assert_close(logits(model), first, atol=0, rtol=0)  # no dropout in eval
    model.train()
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].dropout.training
