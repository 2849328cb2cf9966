"""oneDNN prepacking of bf16 linear weights for serving (`tunesmith.serve.prepack`): outputs bit
for bit the unpacked model's, a weight changed after packing is followed, copies and gradients
take the plain layer; and `tunesmith serve` hands its engine options to the engine."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from helpers.data import chat_tokenizer
from helpers.models import lora_config, make_model, randomize_adapter
from torch import nn
from typer.testing import CliRunner

import tunesmith
from tunesmith.adapters import set_active
from tunesmith.cli import app
from tunesmith.serve import engine as engine_module
from tunesmith.serve.engine import Engine, Params, Sequence
from tunesmith.serve.prepack import PackedLinear, can_prepack, prepack, unpack

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"
)


def _bf16_model():
    model = make_model("llama")
    tunesmith.add_lora(model, lora_config(), "a")
    randomize_adapter(model, "a")
    return model.to(torch.bfloat16).eval()


def _linears(model) -> int:
    return sum(type(m) in (nn.Linear, PackedLinear) for m in model.modules())


def test_packed_bf16_layers_give_the_same_bits():
    model = _bf16_model()
    ids = torch.tensor([[3, 9, 27, 81, 5, 6], [7, 8, 9, 10, 11, 12]])
    expected = {}
    with torch.no_grad():
        for adapter in ("a", None):
            set_active(model, adapter or [])
            expected[adapter] = model(ids).logits
    assert can_prepack(model)
    assert prepack(model) == _linears(model) == 15  # 2 layers × 7, and the output head
    assert not can_prepack(model)  # packed already
    with torch.no_grad():
        for adapter in ("a", None):
            set_active(model, adapter or [])
            assert torch.equal(model(ids).logits, expected[adapter])
    assert unpack(model) == 15 and not any(type(m) is PackedLinear for m in model.modules())


def test_fp32_is_left_alone():
    model = make_model("llama")
    assert not can_prepack(model) and prepack(model) == 0


def test_a_changed_weight_a_copy_and_gradients_take_the_plain_path():
    layer = nn.Linear(16, 8, dtype=torch.bfloat16)
    holder = nn.Sequential(layer)
    assert prepack(holder) == 1 and type(layer) is PackedLinear
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.mul_(2)  # packed before this: packed again at the next call
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    twin = copy.deepcopy(layer)  # modules_to_save's per-adapter copy
    assert type(twin) is nn.Linear and torch.equal(twin.weight, layer.weight)
    assert twin.weight.data_ptr() != layer.weight.data_ptr()
    layer(x).float().sum().backward()  # with gradients: F.linear, which has a backward
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def _tokens(engine: Engine, jobs) -> list[list[int]]:
    done = threading.Semaphore(0)
    sequences = [
        Sequence(p, a, Params(max_tokens=10), lambda k, v: k != "text" and done.release())
        for p, a in jobs
    ]
    engine.start()
    try:
        engine.submit(sequences)
        for _ in sequences:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    return [s.tokens for s in sequences]


def test_the_engine_gives_the_same_tokens_packed():
    model = _bf16_model()
    tokenizer = chat_tokenizer()
    jobs = [(list(range(3, 30)), None), ([5, 6, 7], "a"), (list(range(40, 52)), "a")]
    set_active(model, [])
    expected = _tokens(Engine(model, tokenizer), jobs)
    engine = Engine(model, tokenizer, pack_weights=True)
    assert engine.packed_layers == 15
    assert _tokens(engine, jobs) == expected


def test_serve_hands_its_options_to_the_engine(monkeypatch, tmp_path):
    seen = {}

    class Recorded(Engine):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            raise SystemExit(0)  # stop before serving

    monkeypatch.setattr(engine_module, "Engine", Recorded)
    from helpers.adapters import BUNDLED

    args = ["serve", "--model", str(BUNDLED), "--port", "0", "--prefill-tokens", "64"]
    result = CliRunner().invoke(app, [*args, "--prefix-cache-mb", "3", "--max-running", "5"])
    assert result.exit_code == 0, result.output
    assert seen["prefill_tokens"] == 64 and seen["prefix_cache_bytes"] == 3 << 20
    assert seen["max_running"] == 5 and seen["pack_weights"] is True
