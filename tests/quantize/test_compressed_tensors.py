"""`tunesmith quantize --format compressed-tensors`: GPTQ and AWQ results in llm-compressor's
pack-quantized layout. The oracle is the compressed-tensors package: its packing of the same
codes, and transformers loading the checkpoint through it, must equal tunesmith's own loader
(which must equal the GPTQ-format checkpoint of the same quantization)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from transformers import AutoModelForCausalLM

from tunesmith.config import ModelSection
from tunesmith.errors import TunesmithError
from tunesmith.models import load_model
from tunesmith.quantize.pipeline import QuantizeSettings, quantize_checkpoint
from tunesmith.quantized.gptq.compressed import _pack, pack_compressed, unpack_compressed
from tunesmith.quantized.gptq.weights import QuantizedWeight

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "examples" / "tiny-llama"
HELD_OUT = str(ROOT / "examples" / "data" / "pydoc_heldout.jsonl")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_compressed_tensors(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (48, 70), generator=gen)
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)  # the library's codes are signed
    assert torch.equal(_pack(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(_pack(codes.T, bits).T, pack_to_int32(signed, bits, packed_dim=0))
    groups = 5
    qw = QuantizedWeight(
        codes.to(torch.uint8),
        torch.rand(48, groups, generator=gen) + 0.1,
        torch.randint(1, 2**bits, (48, groups), generator=gen).float(),
        torch.arange(70) // 14,
        bits,
    )
    back = unpack_compressed(pack_compressed(qw, torch.float32, act_order=True), bits, 14)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    made = {}
    for method in ("gptq", "awq"):
        for layout in ("gptq", "compressed-tensors"):
            made[(method, layout)] = root / f"{method}-{layout}"
            quantize_checkpoint(
                str(BUNDLED),
                made[(method, layout)],
                QuantizeSettings(
                    method,
                    group_size=16,
                    calib=HELD_OUT,
                    calib_samples=8,
                    eval_samples=4,
                    seq_len=128,
                    layout=layout,
                ),
                device="cpu",
            )
    return made


IDS = torch.tensor([[5, 60, 700, 33, 12, 900, 4000, 7, 81, 2]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_transformers_loads_it_with_the_same_outputs_as_tunesmith(outputs, method):
    folder = outputs[(method, "compressed-tensors")]
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    assert qconfig["ignore"] == ["lm_head"]
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 16, False)
    ours = _logits(load_model(ModelSection(path=str(folder)), "cpu", torch.float32))
    gptq_section = ModelSection(path=str(outputs[(method, "gptq")]))
    gptq_format = load_model(gptq_section, "cpu", torch.float32)
    assert torch.equal(ours, _logits(gptq_format))  # one quantization, two layouts
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(theirs.model.layers[0].mlp.down_proj).__name__ != "GPTQLinear"
    torch.testing.assert_close(_logits(theirs), ours, rtol=0, atol=1e-5)
    report = json.loads((folder / "quantize_report.json").read_text())
    gptq_report = json.loads((outputs[(method, "gptq")] / "quantize_report.json").read_text())
    assert report["perplexity_quantized"] == gptq_report["perplexity_quantized"]


def test_format_errors(tmp_path):
    with pytest.raises(TunesmithError) as err:
        quantize_checkpoint(
            str(BUNDLED),
            tmp_path / "x",
            QuantizeSettings(
                "gptq",
                group_size=64,
                calib=HELD_OUT,
                calib_samples=4,
                eval_samples=2,
                seq_len=64,
                layout="compressed-tensors",
            ),
            device="cpu",
        )
    assert str(err.value) == (
        "--format compressed-tensors: --group-size 64 does not divide "
        "model.layers.0.mlp.down_proj's 688 input columns, and that format stores whole groups "
        "only; choose a group size that divides every width (or -1), or keep --format gptq"
    )
    with pytest.raises(TunesmithError) as err:
        quantize_checkpoint(
            str(BUNDLED), tmp_path / "y", QuantizeSettings("int8", layout="compressed-tensors")
        )
    assert str(err.value).startswith("--format compressed-tensors: only rtn, gptq and awq")
    with pytest.raises(TunesmithError) as err:
        quantize_checkpoint(str(BUNDLED), tmp_path / "z", QuantizeSettings("gptq", layout="awq"))
    assert str(err.value) == "--format: 'awq' is not one of gptq, compressed-tensors"


def test_skip_keeps_the_matching_linears_in_floating_point(tmp_path):
    out = tmp_path / "attn"
    quantize_checkpoint(
        str(BUNDLED),
        out,
        QuantizeSettings(
            "gptq",
            group_size=64,
            calib=HELD_OUT,
            calib_samples=4,
            eval_samples=2,
            seq_len=64,
            layout="compressed-tensors",
            skip=r"mlp\.",
        ),
        device="cpu",
    )
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head"] + [
        f"model.layers.{i}.mlp.{p}" for i in range(4) for p in ("down_proj", "gate_proj", "up_proj")
    ]
    ours = load_model(ModelSection(path=str(out)), "cpu", torch.float32)
    layer = ours.model.layers[0]
    assert type(layer.mlp.down_proj) is torch.nn.Linear
    assert type(layer.self_attn.q_proj).__name__ == "GPTQLinear"
    original = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32)
    assert torch.equal(layer.mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(theirs), _logits(ours), rtol=0, atol=1e-5)
    awq = tmp_path / "awq"
    quantize_checkpoint(
        str(BUNDLED),
        awq,
        QuantizeSettings(
            "awq",
            group_size=64,
            calib=HELD_OUT,
            calib_samples=4,
            eval_samples=2,
            seq_len=64,
            layout="compressed-tensors",
            skip=r"mlp\.",
        ),
        device="cpu",
    )
    awq_model = load_model(ModelSection(path=str(awq)), "cpu", torch.float32)
    assert type(awq_model.model.layers[1].mlp.gate_proj) is torch.nn.Linear
    assert type(awq_model.model.layers[1].self_attn.o_proj).__name__ == "GPTQLinear"
    with pytest.raises(TunesmithError) as err:
        quantize_checkpoint(
            str(BUNDLED),
            tmp_path / "a",
            QuantizeSettings(
                "awq", calib=HELD_OUT, calib_samples=4, eval_samples=2, seq_len=64, skip="up_proj"
            ),
            device="cpu",
        )
    assert str(err.value) == (
        "--skip: AWQ scales mlp.gate_proj, mlp.up_proj together (they read the same input); "
        "skip all of them or none"
    )
    with pytest.raises(TunesmithError) as err:
        quantize_checkpoint(str(BUNDLED), tmp_path / "c", QuantizeSettings("nf4", skip="mlp"))
    assert str(err.value) == "--skip: only rtn, gptq and awq leave linears out, not nf4"
    with pytest.raises(TunesmithError) as err:
        quantize_checkpoint(str(BUNDLED), tmp_path / "b", QuantizeSettings("gptq", skip="("))
    assert str(err.value).startswith("--skip: '(' is not a regular expression")
