"""The fused LoRA training step (`train.fused_lora`) against the plain layer: the same loss and
gradients on every test architecture, one pass per group of projections that share an input,
the same dropout maths, and fewer bytes kept for the backward."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import ARCHS, input_ids, lora_config, make_model, randomize_adapter
from torch import nn

import tunesmith
from tunesmith.adapters import set_active
from tunesmith.methods.lora.fused import FusedLoRA
from tunesmith.methods.lora.impl import fuse_lora_layers, lora_layers
from tunesmith.methods.lora.layer import LoRALayer
from tunesmith.quantized.bnb import QuantConfig, quantize_model
from tunesmith.train.loss import model_loss_sum


def _batch(seed: int = 123) -> dict:
    ids = input_ids(batch=2, seq=9, seed=seed)
    return {"input_ids": ids, "labels": ids.clone()}


def _loss_and_grads(model) -> tuple[float, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # GPT-2's own dropout
    loss, count = model_loss_sum(model, _batch())
    (loss / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach() / count), grads


def _pair(arch: str, variant: str = "lora", dtype=torch.float32, **overrides):
    plain = make_model(arch).to(dtype)
    tunesmith.add_lora(plain, lora_config(variant, **overrides))
    randomize_adapter(plain, "default")
    fused = copy.deepcopy(plain)
    fuse_lora_layers(fused)
    return plain, fused


def _assert_same(plain, fused, atol: float = 1e-5) -> None:
    loss_p, grads_p = _loss_and_grads(plain)
    loss_f, grads_f = _loss_and_grads(fused)
    assert loss_f == pytest.approx(loss_p, abs=atol)
    assert grads_p.keys() == grads_f.keys() and grads_p
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_f[name], grad, atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_step_gives_the_plain_layers_loss_and_gradients(arch):
    plain, fused = _pair(arch)
    calls = []
    original = FusedLoRA.forward

    def counting(ctx, x, p, site, a, slots, *rest):
        calls.append(len(slots))
        return original(ctx, x, p, site, a, slots, *rest)

    FusedLoRA.forward = staticmethod(counting)
    try:
        _assert_same(plain, fused)
    finally:
        FusedLoRA.forward = staticmethod(original)
    layers = len(list(lora_layers(fused)))
    assert sum(calls) == layers  # every LoRA layer went through the fused step, once
    if arch in ("llama", "mistral", "qwen2", "gemma"):
        # q/k/v in one call and gate/up in one call: 2 grouped calls + o and down per layer
        assert sorted(calls) == sorted([3, 2, 1, 1] * 2)


def test_groups_are_the_sibling_projections_that_read_one_input():
    model = make_model("llama")
    tunesmith.add_lora(model, lora_config())
    assert fuse_lora_layers(model) == 4  # (q, k, v) and (gate, up) in each of 2 layers
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.group is attention.v_proj.group is not None
    assert attention.o_proj.group is None
    gpt2 = make_model("gpt2")
    tunesmith.add_lora(gpt2, lora_config())
    assert fuse_lora_layers(gpt2) == 0  # c_attn is already one projection


def test_stacked_adapters_and_rslora_fuse_with_the_same_gradients():
    # float64: rsLoRA's scale of 4 puts fp32 rounding of the two summation orders near 1e-5
    plain, fused = _pair("llama", "rslora", dtype=torch.float64)
    for model in (plain, fused):
        tunesmith.add_lora(model, lora_config(r=2, alpha=4), name="second")
        randomize_adapter(model, "second", seed=5)
        set_active(model, ["default", "second"])
        for p in model.parameters():
            p.requires_grad_(False)
        for _, layer in lora_layers(model):
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.requires_grad_(True)
    _assert_same(plain, fused, atol=1e-10)


def test_dora_and_routed_rows_keep_the_plain_layer():
    plain, fused = _pair("llama", "dora")
    layer = next(layer for _, layer in lora_layers(fused.train()))
    assert layer.fusable() is None  # DoRA
    _assert_same(plain, fused)
    model = make_model("llama")
    tunesmith.add_lora(model, lora_config())
    fuse_lora_layers(model.train())
    layer = next(layer for _, layer in lora_layers(model))
    assert layer.fusable() == 0.0
    with tunesmith.route(model, ["default", None]):
        assert layer.fusable() is None
    with torch.no_grad():
        assert layer.fusable() is None  # evaluation and generation take the plain layer
    model.eval()
    assert layer.fusable() is None


def test_gradient_checkpointing_and_fused_step_together():
    plain, fused = _pair("qwen2")
    for model in (plain, fused):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_same(plain, fused)


def test_dropout_is_one_mask_per_shared_input_with_the_plain_dropout_maths():
    torch.manual_seed(0)
    q, k = nn.Linear(8, 6), nn.Linear(8, 5)
    parent = nn.ModuleDict({"q_proj": q, "k_proj": k})
    config = tunesmith.LoRAConfig(r=3, alpha=6, dropout=0.4, targets=["q_proj", "k_proj"])
    tunesmith.add_lora(parent, config)
    randomize_adapter(parent, "default")
    assert fuse_lora_layers(parent) == 1
    parent.train()
    x = torch.randn(4, 8, requires_grad=True)
    torch.manual_seed(7)
    yq, yk = parent["q_proj"](x), parent["k_proj"](x)
    (yq.square().sum() + yk.sum()).backward()
    torch.manual_seed(7)
    mask = torch.empty_like(x).bernoulli_(0.6).bool()

    x_ref = x.detach().clone().requires_grad_(True)
    ref_grads = {}
    outputs = []
    for name in ("q_proj", "k_proj"):
        layer: LoRALayer = parent[name]
        adapter = layer.adapters["default"]
        a = adapter.lora_A.detach().clone().requires_grad_(True)
        b = adapter.lora_B.detach().clone().requires_grad_(True)
        dropped = x_ref * mask / 0.6
        outputs.append(layer.base_layer(x_ref) + dropped @ a.T @ b.T * 2.0)
        ref_grads[name] = (a, b)
    (outputs[0].square().sum() + outputs[1].sum()).backward()
    torch.testing.assert_close(yq, outputs[0])
    torch.testing.assert_close(yk, outputs[1])
    torch.testing.assert_close(x.grad, x_ref.grad)
    for name, (a, b) in ref_grads.items():
        adapter = parent[name].adapters["default"]
        torch.testing.assert_close(adapter.lora_A.grad, a.grad)
        torch.testing.assert_close(adapter.lora_B.grad, b.grad)


def _saved_bytes(model) -> int:
    """Bytes of the distinct activation tensors the forward keeps for the backward."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model_loss_sum(model, _batch())
    loss.backward()
    return sum(seen.values())


def test_the_fused_step_keeps_fewer_bytes_for_the_backward():
    plain, fused = _pair("llama", dropout=0.1)
    # 18 tokens, hidden 32, intermediate 64, 2 layers. Plain: a dropped fp32 copy of the input
    # per projection (6 of width 32, down of 64); fused: none, a bool mask per shared input
    # (q/k/v, o, gate/up: 32; down: 64) and the rank-wide stacked A and sB instead.
    copies = 18 * (6 * 32 + 64) * 4
    masks = 18 * (3 * 32 + 64)
    small = 4 * (64 + 32 + 16 + 16 + 32 + 64 + 64 + 32) + 4 * 32 * 12 + 4 * 18 * 20
    per_layer = copies - masks - small
    assert _saved_bytes(plain) - _saved_bytes(fused) >= 2 * per_layer


def test_a_quantized_base_keeps_bitsandbytes_autograd_for_the_base_term():
    pytest.importorskip("bitsandbytes")
    plain = make_model("llama")
    quantize_model(plain, QuantConfig("nf4", blocksize=64))
    tunesmith.add_lora(plain, lora_config())
    randomize_adapter(plain, "default")
    fused = copy.deepcopy(plain)
    fuse_lora_layers(fused)
    _assert_same(plain, fused, atol=1e-4)


def test_a_quantized_base_keeps_no_dequantized_weight_for_the_backward():
    """QLoRA's fused step saves x, x·Aᵀ and the small adapter tensors; bitsandbytes' 4-bit
    matmul keeps its packed weight, never the (out × in) dequantized one."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    parent = nn.ModuleDict({"q_proj": nn.Linear(256, 128, bias=False)})
    quantize_model(parent, QuantConfig("nf4", blocksize=64))
    tunesmith.add_lora(parent, tunesmith.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj"]))
    fuse_lora_layers(parent)
    parent.train()
    saved = []
    x = torch.randn(3, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = parent["q_proj"](x)
    y.sum().backward()
    assert x.grad is not None and parent["q_proj"].adapters["default"].lora_A.grad is not None
    floats = [t for t in saved if t.is_floating_point()]
    assert floats and max(t.numel() for t in floats) < 128 * 256
