"""QLoRA: quantized bases (bitsandbytes NF4 / FP4 / int8, on CPU), LoRA on them, merging from
them, loading them tensor by tensor, and training through the run config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.models import llama_config, make_model
from transformers import LlamaForCausalLM

import tunesmith
from tunesmith.errors import TunesmithError
from tunesmith.methods.lora.impl import lora_layers

bnb = pytest.importorskip("bitsandbytes")  # a dev dependency: CI installs it

from tunesmith.quantized.bnb import (  # noqa: E402
    QuantConfig,
    dequantized_weight,
    guard_cpu_packing,
    is_quantized,
    load_quantized,
    quantize_model,
    quantized_size_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
QUANTS = ["nf4", "fp4", "int8"]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """A random Llama with 64-wide layers, saved as fp32 safetensors."""
    folder = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    config = llama_config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def dequantized_reference(model_dir: Path, quantized) -> LlamaForCausalLM:
    """The fp32 model with every quantized layer's weight replaced by its dequantized value."""
    ref = LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if is_quantized(module):
                target = name.removesuffix(".base_layer")  # the base of a LoRA layer
                ref.get_submodule(target).weight.copy_(dequantized_weight(module))
    return ref


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize, double", [(64, True), (64, False), (128, True)])
def test_4bit_dequantization_matches_bitsandbytes_reference(quant, blocksize, double):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=False)
    model = torch.nn.Sequential(linear)
    quantize_model(model, QuantConfig(quant, double, blocksize))
    layer = model[0]
    assert is_quantized(layer) and layer.weight.quant_state.blocksize == blocksize
    q, state = bnb.functional.quantize_4bit(
        linear.weight.detach(), blocksize=blocksize, quant_type=quant, compress_statistics=double
    )
    reference = bnb.functional.dequantize_4bit(q, state)
    assert torch.equal(dequantized_weight(layer), reference)
    w = linear.weight.detach()
    assert (reference - w).abs().mean() < 0.12 * w.abs().mean()  # 4-bit: ~10% mean error


def test_int8_dequantization_is_within_about_half_a_step_per_row():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=False)
    model = torch.nn.Sequential(linear)
    quantize_model(model, QuantConfig("int8"))
    w = linear.weight.detach()
    step = w.abs().amax(dim=1, keepdim=True) / 127
    # half a step, plus the fp16 rounding bitsandbytes applies before quantizing
    assert ((dequantized_weight(model[0]) - w).abs() <= 0.55 * step).all()


@pytest.mark.parametrize("quant", QUANTS)
def test_qlora_layer_equals_lora_on_the_dequantized_weight(small_dir, quant):
    model = load_quantized(str(small_dir), QuantConfig(quant))
    reference = dequantized_reference(small_dir, model)
    for m in (model, reference):
        torch.manual_seed(1)
        tunesmith.add_lora(m, tunesmith.LoRAConfig(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    if quant == "int8":  # LLM.int8 also quantizes the activations
        assert (got - want).abs().max() < 0.05 * want.abs().max()
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", QUANTS)
def test_loading_keeps_norms_embeddings_and_head_in_the_compute_dtype(small_dir, quant):
    model = load_quantized(str(small_dir), QuantConfig(quant, compute_dtype=torch.bfloat16))
    layer = model.model.layers[0]
    assert is_quantized(layer.self_attn.q_proj) and is_quantized(layer.mlp.down_proj)
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert layer.input_layernorm.weight.dtype == torch.bfloat16
    full = sum(p.numel() * 4 for p in LlamaForCausalLM.from_pretrained(small_dir).parameters())
    assert quantized_size_bytes(model) < full


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merge_and_unload_from_a_quantized_base_uses_the_dequantized_weights(small_dir, quant):
    model = load_quantized(str(small_dir), QuantConfig(quant))
    torch.manual_seed(1)
    tunesmith.add_lora(model, tunesmith.LoRAConfig(r=4, alpha=8, dropout=0.0, use_dora=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    reference = dequantized_reference(small_dir, model)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    adapter_dir_logits = None
    with torch.no_grad():
        adapter_dir_logits = model(ids).logits
    merged = tunesmith.merge_and_unload(model)
    assert not any(is_quantized(m) for m in merged.modules())
    assert merged.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    with torch.no_grad():
        out = merged(ids).logits
    if quant == "nf4":
        torch.testing.assert_close(out, adapter_dir_logits, rtol=1e-4, atol=1e-4)
    # the merge starts from the dequantized weights, not the original fp32 ones
    for name, module in merged.named_modules():
        if name.endswith("mlp.down_proj"):
            original = LlamaForCausalLM.from_pretrained(small_dir).get_submodule(name).weight
            assert not torch.allclose(module.weight, original, atol=1e-3)
    del reference


def test_merge_unmerge_and_routing_on_quantized_layers(small_dir):
    model = load_quantized(str(small_dir), QuantConfig("nf4"))
    for name in ("a", "b"):
        torch.manual_seed(len(name) + ord(name))
        tunesmith.add_lora(model, tunesmith.LoRAConfig(r=4, alpha=8, dropout=0.0), name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        tunesmith.set_active(model, "a")
        a = model(ids).logits
        tunesmith.set_active(model, "b")
        b = model(ids).logits
        with tunesmith.disabled(model):
            base = model(ids).logits
        with tunesmith.route(model, ["a", None, "b"]):
            routed = model(ids).logits
    torch.testing.assert_close(routed[0], a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(routed[1], base[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(routed[2], b[2], rtol=0, atol=1e-5)
    # merging into a 4-bit weight re-quantizes W + s·BA (lossy, with a warning), exactly as
    # bitsandbytes would quantize it
    name, layer = next(iter(lora_layers(model)))
    before = layer.base_weight()
    delta = layer.adapters["a"].delta_weight()
    tunesmith.set_active(model, "a")
    with pytest.warns(UserWarning, match="re-quantizes"):
        tunesmith.merge(model, ["a"])
    assert all(layer.merged == ("a",) for _, layer in lora_layers(model))
    q, state = bnb.functional.quantize_4bit(
        before + delta, blocksize=64, quant_type="nf4", compress_statistics=True
    )
    torch.testing.assert_close(
        layer.base_weight(), bnb.functional.dequantize_4bit(q, state), rtol=0, atol=1e-6
    )
    tunesmith.unmerge(model)
    assert layer.merged == ()
    assert (layer.base_weight() - before).abs().mean() < 0.15 * before.abs().mean()


def test_a_missing_or_pickled_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TunesmithError, match="model.path: ./nope: no such folder"):
        load_quantized("./nope", QuantConfig())
    (tmp_path / "config.json").write_text(make_model("llama").config.to_json_string())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(TunesmithError, match="has no .safetensors weights .pickle checkpoints"):
        load_quantized(str(tmp_path), QuantConfig())
    with pytest.raises(TunesmithError, match="blocksize: 100 is not supported"):
        QuantConfig("nf4", blocksize=100)


def test_loading_a_400_mb_checkpoint_quantized_stays_well_under_its_size(tmp_path):
    """Peak RSS growth while loading a 428 MB fp32 checkpoint as NF4, measured in a fresh
    process after a warm-up load of a small model of the same class (imports, bitsandbytes'
    one-time setup)."""
    torch.manual_seed(0)
    config = llama_config(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    big = tmp_path / "big"
    LlamaForCausalLM(config).save_pretrained(big)
    size = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    assert size > 400e6
    script = f"""
import json, resource
from tunesmith.quantized.bnb import QuantConfig, load_quantized
load_quantized({str(ROOT / "examples/tiny-llama")!r}, QuantConfig("nf4"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = load_quantized({str(big)!r}, QuantConfig("nf4"))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"growth": after - before}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])["growth"]
    assert growth < 0.5 * size, f"peak RSS grew {growth / 2**20:.0f} MiB for {size / 2**20:.0f}"


@pytest.mark.parametrize("quant", QUANTS)
def test_qlora_training_lowers_the_loss(tmp_path, quant):
    from tunesmith.config import config_from_dict
    from tunesmith.train import train
    from tunesmith.train.progress import Progress

    config = config_from_dict(
        {
            "model": {"path": str(ROOT / "examples/tiny-llama"), "device": "cpu"},
            "method": {"name": "qlora", "quant": quant, "r": 8, "alpha": 16},
            "data": {
                "datasets": [
                    {"path": str(ROOT / "examples/data/quickstart_train.jsonl"), "max_samples": 64}
                ],
                "max_seq_len": 128,
                "packing": True,
                "cache_dir": str(tmp_path / "cache"),
            },
            "train": {
                "max_steps": 12,
                "micro_batch_size": 4,
                "grad_accum_steps": 1,
                "lr": 4e-3,
            },
            "output_dir": str(tmp_path / "out"),
        }
    )
    losses = []
    summary = train(
        config, on_step=lambda s, e: losses.append(e["loss"]), progress=Progress(live=False)
    )
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3])
    saved = json.loads((tmp_path / "out/adapter/adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 8
    assert summary["method"] == "qlora"


def _transformers_quantized(model_dir: Path, quant: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, dtype=torch.float32, device_map="cpu"
    ).eval()
    guard_cpu_packing(model)  # the same generic 4-bit path as ours, whatever the CPU
    return model


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_qlora_adapters_move_between_tunesmith_and_peft_with_the_same_logits(
    small_dir, tmp_path, quant
):
    from peft import LoraConfig, PeftModel, get_peft_model

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    # ours -> PEFT
    ours = load_quantized(str(small_dir), QuantConfig(quant))
    torch.manual_seed(0)
    tunesmith.add_lora(ours, tunesmith.LoRAConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        ours_logits = ours(ids).logits
    tunesmith.save_adapter(ours, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(
        _transformers_quantized(small_dir, quant), tmp_path / "ours"
    )
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours_logits, rtol=1e-4, atol=1e-4)
    # PEFT -> ours
    torch.manual_seed(1)
    theirs = get_peft_model(
        _transformers_quantized(small_dir, quant),
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules="all-linear",
            init_lora_weights="gaussian",
        ),
    )
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        theirs_logits = theirs(ids).logits
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_quantized(str(small_dir), QuantConfig(quant))
    tunesmith.load_adapter(loaded, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, theirs_logits, rtol=1e-4, atol=1e-4)


def test_an_already_quantized_checkpoint_loads_as_it_is(small_dir, tmp_path):
    quantized = _transformers_quantized(small_dir, "nf4")
    quantized.save_pretrained(tmp_path / "q")
    assert "quantization_config" in json.loads((tmp_path / "q/config.json").read_text())
    loaded = load_quantized(str(tmp_path / "q"), QuantConfig("nf4"))
    assert is_quantized(loaded.model.layers[0].self_attn.q_proj)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, quantized(ids).logits)
    ours = load_quantized(str(small_dir), QuantConfig("nf4"))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, quantized(ids).logits)
