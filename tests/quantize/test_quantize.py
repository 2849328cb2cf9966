"""Post-training quantization: the group grid, RTN, GPTQ and AWQ, GPTQ-format packing,
whole-model quantization of the bundled model with its quality report, bitsandbytes outputs,
errors and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.models import llama_config, make_model
from helpers.runs import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.config import ModelSection
from tunesmith.errors import TunesmithError
from tunesmith.models import load_model
from tunesmith.quantize import (
    HessianAccumulator,
    QuantGrid,
    awq_search,
    gptq_quantize,
    rtn_quantize,
)
from tunesmith.quantize.calibrate import awq_groups, fold_scales
from tunesmith.quantize.pipeline import QuantizeSettings, quantize_checkpoint
from tunesmith.quantized.bnb import guard_cpu_packing
from tunesmith.quantized.gptq.layer import GPTQLinear
from tunesmith.quantized.gptq.packing import pack_gptq, pack_rows, unpack_gptq, unpack_rows
from tunesmith.shards import CheckpointReader


def calibration(n=1024, i=128, seed=0):
    """Correlated inputs with a few outlier features, like real activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(i, i, generator=gen) / i**0.5
    x = torch.randn(n, i, generator=gen) @ mix + 0.1 * torch.randn(n, i, generator=gen)
    x = x * (0.1 + 3 * torch.rand(i, generator=gen))
    x[:, :4] *= 10
    return x


def output_error(x, weight, approx) -> float:
    return float(((x @ weight.T - x @ approx.T) ** 2).mean())


def test_grid_round_trip_and_codes():
    grid = QuantGrid(bits=4, group_size=8)
    w = torch.linspace(-1, 2, 16).reshape(2, 8)
    qw = rtn_quantize(w, grid)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
    assert qw.scales.shape == (2, 1) and qw.g_idx.tolist() == [0] * 8
    # each group's extremes are on the grid (up to the zero point's rounding)
    err = (qw.dequantize() - w).abs()
    assert float(err.max()) <= float(qw.scales.max()) / 2 + 1e-6
    # values already on a grid come back unchanged (in two groups of 8 columns)
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    once = rtn_quantize(w, grid).dequantize()
    torch.testing.assert_close(rtn_quantize(once, grid).dequantize(), once)


def test_hessian_accumulates_in_batches():
    x = calibration()
    acc = HessianAccumulator(x.shape[1])
    for part in x.split(100):
        acc.add(part)
    torch.testing.assert_close(acc.h, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 128), (3, 64), (4, -1), (8, 128)])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits, group_size):
    x = calibration()
    weight = 0.05 * torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(128)
    acc.add(x)
    grid = QuantGrid(bits, group_size)
    rtn = output_error(x, weight, rtn_quantize(weight, grid).dequantize())
    gptq = output_error(x, weight, gptq_quantize(weight, acc.h, grid).dequantize())
    ordered = output_error(
        x, weight, gptq_quantize(weight, acc.h, grid, act_order=True).dequantize()
    )
    assert gptq < 0.6 * rtn, (gptq, rtn)
    assert ordered < rtn, (ordered, rtn)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    """With uncorrelated unit inputs there is nothing to compensate: GPTQ rounds to nearest."""
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    grid = QuantGrid(4, 32)
    gptq = gptq_quantize(weight, torch.eye(64), grid, damp=0.0)
    rtn = rtn_quantize(weight, grid)
    assert torch.equal(gptq.q, rtn.q)
    torch.testing.assert_close(gptq.scales, rtn.scales)


def test_gptq_ignores_dead_inputs():
    x = calibration(i=64)
    x[:, 10] = 0.0
    acc = HessianAccumulator(64)
    acc.add(x)
    weight = torch.randn(8, 64)
    qw = gptq_quantize(weight, acc.h, QuantGrid(4, 32))
    assert torch.isfinite(qw.dequantize()).all()


def test_grid_errors():
    with pytest.raises(TunesmithError, match="--bits: 5 is not supported; use one of 2, 3, 4, 8"):
        QuantGrid(bits=5)
    with pytest.raises(TunesmithError, match="--group-size: 100 must be -1"):
        QuantGrid(group_size=100)


def test_ragged_last_group_and_storable_grid():
    """A width the group size does not divide gets a shorter last group (as GPTQ checkpoints
    do); scales are fp16 values and zero points lie in 1..levels (stored as zero - 1)."""
    w = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    w[0] = w[0].abs()  # all positive: would need zero point 0
    qw = rtn_quantize(w, QuantGrid(4, 64))
    assert qw.scales.shape == (4, 2)
    assert qw.g_idx.tolist() == [0] * 64 + [1] * 32
    torch.testing.assert_close(qw.scales, qw.scales.half().float(), rtol=0, atol=0)
    assert int(qw.zeros.min()) >= 1 and int(qw.zeros.max()) <= 15
    err = (qw.dequantize() - w).abs().max(dim=1).values
    assert bool((err <= qw.scales.max(dim=1).values / 2 + 1e-6).all())


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 128), (3, 64)])
def test_awq_scales_beat_round_to_nearest_for_layers_sharing_an_input(bits, group_size):
    x = calibration()
    gen = torch.Generator().manual_seed(3)
    weights = [0.05 * torch.randn(64, 128, generator=gen) for _ in range(3)]  # like q, k, v
    grid = QuantGrid(bits, group_size)
    found = awq_search(weights, x, grid)
    rtn = sum(output_error(x, w, rtn_quantize(w, grid).dequantize()) for w in weights)
    assert found.rtn_error == pytest.approx(rtn, rel=1e-4)  # alpha 0 is round-to-nearest
    assert found.alpha > 0 and found.error < 0.8 * rtn, (found.alpha, found.error, rtn)
    # the scales fold exactly: quantize W·diag(s), divide the input by s
    s = found.scales
    approx = [rtn_quantize(w * s, grid).dequantize() for w in weights]
    error = sum(output_error(x / s, w * s, a) for w, a in zip(weights, approx, strict=True))
    assert error == pytest.approx(found.error, rel=1e-3)


# --- packing in GPTQ's layout ----------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [32, 688, 45])
def test_pack_rows_round_trip(bits, rows):
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (rows, 6), generator=gen)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (-(-rows * bits // 32), 6)
    assert torch.equal(unpack_rows(packed, bits, rows), values)


def test_pack_rows_bit_layout():
    """Little-endian bit stream: 4-bit values 1..8 fill one word as 0x87654321; 3-bit value 10
    straddles the first two words (its low 2 bits end word 0)."""
    four = pack_rows(torch.arange(1, 9).view(8, 1).repeat(4, 1), 4)
    assert four.shape == (4, 1) and int(four[0, 0]) == 0x87654321 - 2**32
    three = torch.zeros(32, 1, dtype=torch.long)
    three[10] = 0b101
    words = pack_rows(three, 3)
    assert (int(words[0, 0]) & 0xFFFFFFFF) >> 30 == 0b01 and int(words[1, 0]) & 1 == 0b1


def test_gptq_tensors_round_trip_and_zero_offset():
    weight = torch.randn(24, 80, generator=torch.Generator().manual_seed(0))
    qw = rtn_quantize(weight, QuantGrid(3, 32))
    tensors = pack_gptq(qw)
    assert tensors["qweight"].shape == (8, 24) and tensors["qzeros"].shape == (3, 3)
    assert tensors["scales"].dtype == torch.float16 and tensors["g_idx"].dtype == torch.int32
    back = unpack_gptq(**tensors, bits=3)
    torch.testing.assert_close(back.dequantize(), qw.dequantize(), rtol=0, atol=0)
    stored = unpack_rows(tensors["qzeros"].T, 3, 24).T
    assert torch.equal(stored + 1, qw.zeros.T.long())  # checkpoints store zero - 1


# --- whole models -----------------------------------------------------------------------------
BUNDLED = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama"
HELD_OUT = str(BUNDLED.parent / "data" / "pydoc_heldout.jsonl")


BUNDLED_TOKENIZER = AutoTokenizer.from_pretrained(BUNDLED)


def mha_llama(seed=0):
    torch.manual_seed(seed)
    config = llama_config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def test_awq_folds_leave_the_function_unchanged():
    """Scaling every foldable group (both norms, v_proj→o_proj with as many kv heads as heads,
    up_proj→down_proj) by random positive factors changes no logit."""
    model = mha_llama()
    for _, layer in enumerate(model.model.layers):  # non-trivial norm weights
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    gen = torch.Generator().manual_seed(2)
    for layer in model.model.layers:
        groups = awq_groups(layer)
        assert [len(mods) for _, mods in groups] == [3, 1, 2, 1]
        for prev, mods in groups:
            fold_scales(prev, mods, 0.2 + 3 * torch.rand(mods[0].in_features, generator=gen))
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    gqa = make_model("llama")  # 2 kv heads for 4 heads: v_proj cannot carry o_proj's scales
    assert [len(mods) for _, mods in awq_groups(gqa.model.layers[0])] == [3, 2, 1]


@pytest.fixture(scope="module")
def quantized_bundled(tmp_path_factory):
    """The bundled model at 4 bits, group size 128, 32 calibration windows of 256 tokens (the
    README's table), with each method."""
    root = tmp_path_factory.mktemp("quantized")
    reports = {}
    for method in ("rtn", "gptq", "awq"):
        reports[method] = quantize_checkpoint(
            str(BUNDLED),
            root / method,
            QuantizeSettings(method, calib=HELD_OUT, calib_samples=32, seq_len=256),
            device="cpu",
        )
    return root, reports


def test_gptq_and_awq_beat_round_to_nearest_on_the_bundled_model(quantized_bundled):
    _, reports = quantized_bundled
    original = {r.perplexity_original for r in reports.values()}
    assert len(original) == 1  # every method measured on the same held-out windows
    rtn = reports["rtn"].perplexity_quantized
    assert reports["gptq"].perplexity_quantized < rtn
    assert reports["awq"].perplexity_quantized < rtn
    assert rtn > original.pop()
    for report in reports.values():
        assert report.eval_windows == 32 and report.bytes_quantized < report.bytes_original / 2.5


def test_gptq_checkpoint_format_and_reload(quantized_bundled):
    root, reports = quantized_bundled
    folder = root / "gptq"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": 4,
        "group_size": 128,
        "desc_act": False,
        "sym": False,
        "true_sequential": False,
        "static_groups": False,
        "damp_percent": 0.01,
        "meta": {"quantizer": ["tunesmith"], "method": "gptq"},
    }
    reader = CheckpointReader(folder)
    name = "model.layers.1.mlp.down_proj"
    assert reader.tensors[f"{name}.qweight"].shape == (688 * 4 // 32, 256)
    assert reader.tensors[f"{name}.qzeros"].shape == (6, 256 * 4 // 32)  # 688 = 5·128 + 48
    assert reader.tensors[f"{name}.scales"].shape == (6, 256)
    assert f"{name}.weight" not in reader.names and "model.norm.weight" in reader.names
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    saved = json.loads((folder / "quantize_report.json").read_text())
    assert saved["perplexity_quantized"] == reports["gptq"].perplexity_quantized
    model = load_model(ModelSection(path=str(folder)), "cpu", torch.float32)
    layer = model.get_submodule(name)
    assert isinstance(layer, GPTQLinear) and layer.bits == 4
    codes = layer.unpacked()
    assert int(codes.q.max()) <= 15 and codes.g_idx.tolist()[-1] == 5
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_awq_scales_are_folded_into_the_norms(quantized_bundled):
    root, _ = quantized_bundled
    original = CheckpointReader(BUNDLED)
    awq = CheckpointReader(root / "awq")
    rtn = CheckpointReader(root / "rtn")
    name = "model.layers.0.input_layernorm.weight"
    assert torch.equal(rtn.read(name), original.read(name))
    assert not torch.allclose(awq.read(name), original.read(name))


def test_bitsandbytes_outputs_load_natively(tmp_path):
    """int8 and nf4 are written by transformers' bitsandbytes integration: from_pretrained
    loads them as bitsandbytes layers, with the logits of quantizing on the fly."""
    from transformers import BitsAndBytesConfig

    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    for method, config in (
        (
            "nf4",
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
        ),
        ("int8", BitsAndBytesConfig(load_in_8bit=True)),
    ):
        report = quantize_checkpoint(
            str(BUNDLED),
            tmp_path / method,
            QuantizeSettings(method, eval_data=HELD_OUT, eval_samples=4, seq_len=128),
            device="cpu",
        )
        assert report.bits == (4 if method == "nf4" else 8) and report.group_size is None
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / method, device_map="cpu")
        layer = loaded.model.layers[0].self_attn.q_proj
        assert type(layer).__name__ == ("Linear4bit" if method == "nf4" else "Linear8bitLt")
        fresh = AutoModelForCausalLM.from_pretrained(
            BUNDLED, quantization_config=config, device_map="cpu"
        )
        for model in (loaded, fresh):  # bitsandbytes' generic 4-bit path, whatever the CPU
            guard_cpu_packing(model)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, fresh(ids).logits)
        ours = load_model(ModelSection(path=str(tmp_path / method)), "cpu", torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, fresh(ids).logits)


def test_quantize_errors(tmp_path):
    def fails(message, model=str(BUNDLED), out=tmp_path / "q", **kwargs):
        settings = QuantizeSettings(**{"calib": HELD_OUT, **kwargs})
        with pytest.raises(TunesmithError) as err:
            quantize_checkpoint(model, out, settings, device="cpu")
        assert str(err.value) == message

    fails(
        "--bits: nf4 is 4-bit; drop --bits, or use --method gptq, awq or rtn for 3 bits",
        method="nf4",
        bits=3,
    )
    fails(
        "--group-size: int8 uses bitsandbytes' own blocks (one scale per row); drop "
        "--group-size, or use --method gptq, awq or rtn",
        method="int8",
        group_size=64,
    )
    fails("--bits: 5 is not supported; use one of 2, 3, 4, 8", method="gptq", bits=5)
    fails("--group-size: 100 must be -1 (per row) or a multiple of 8 (>= 8)", group_size=100)
    fails("--method: 'fp8' is not one of rtn, gptq, awq, int8, nf4", method="fp8")
    fails(
        "--act-order: only GPTQ quantizes in activation order; drop it",
        method="awq",
        act_order=True,
    )
    fails(
        "--calib: GPTQ and AWQ need calibration data; give a data file",
        calib=None,
        eval_data=HELD_OUT,
    )
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "def f(x):\n    return x + 1\n" * 40}) + "\n")
    fails(
        f"--calib: {small} has 441 tokens, 0 windows of 512; 128 calibration windows plus at "
        "least 1 held-out window need 66,048 tokens. Give more text, or lower --calib-samples "
        "or --seq-len",
        calib=str(small),
    )
    fails(
        f"--calib: {tmp_path / 'none.jsonl'}: no such file or folder",
        calib=str(tmp_path / "none.jsonl"),
    )
    (tmp_path / "q").mkdir()
    fails(f"--out: {tmp_path / 'q'} already exists; choose a new path or pass --overwrite")
    gpt2 = tmp_path / "gpt2"
    make_model("gpt2").save_pretrained(gpt2)
    BUNDLED_TOKENIZER.save_pretrained(gpt2)
    fails(
        "--method awq: gpt2 models are not supported (AWQ folds its scales into known "
        "operations); supported: llama, mistral, qwen2, qwen3. Use --method gptq",
        model=str(gpt2),
        out=tmp_path / "g",
        method="awq",
        calib_samples=2,
        seq_len=32,
    )
    fails(
        "quantize: GPT2LMHeadModel has no nn.Linear layers in its decoder layers to "
        "quantize; GPTQ, AWQ and RTN support Llama-style decoders",
        model=str(gpt2),
        out=tmp_path / "g",
        method="gptq",
        calib_samples=2,
        seq_len=32,
    )
    assert not (tmp_path / "g").exists()


def test_interrupted_quantize_leaves_nothing(tmp_path, monkeypatch):
    import tunesmith.quantized.gptq.files as checkpoint

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_checkpoint", broken)
    with pytest.raises(TunesmithError, match=rf"^{tmp_path / 'q'}: no space left on the disk"):
        quantize_checkpoint(
            str(BUNDLED),
            tmp_path / "q",
            QuantizeSettings("rtn", calib=HELD_OUT, calib_samples=1, eval_samples=1, seq_len=64),
            device="cpu",
        )
    assert list(tmp_path.iterdir()) == []


def test_cli_quantize_then_generate(tmp_path):
    out = tmp_path / "q"
    run = run_cli(
        "quantize",
        "--model",
        str(BUNDLED),
        "--method",
        "rtn",
        "--bits",
        "8",
        "--group-size",
        "64",
        "--calib",
        HELD_OUT,
        "--calib-samples",
        "2",
        "--eval-samples",
        "4",
        "--seq-len",
        "128",
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out}: rtn 8-bit, group size 64 (")
    assert lines[2].startswith("perplexity") and "4 held-out windows of 128 tokens" in lines[2]
    original, quantized = (float(v) for v in lines[2].split()[1:3])
    assert abs(quantized / original - 1) < 0.01  # 8 bits: nearly lossless
    args = ["--max-new-tokens", "12", "--raw", "--device", "cpu", "The list type"]
    ours = run_cli("generate", "--model", str(out), *args)
    base = run_cli("generate", "--model", str(BUNDLED), *args)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == base.stdout  # 8-bit greedy decoding keeps the same words here
    run = run_cli(
        "quantize",
        "--model",
        str(BUNDLED),
        "--method",
        "nf4",
        "--bits",
        "3",
        "--calib",
        HELD_OUT,
        "--out",
        str(tmp_path / "x"),
    )
    assert run.returncode == 2 and run.stderr == (
        "error: --bits: nf4 is 4-bit; drop --bits, or use --method gptq, awq or rtn for 3 bits\n"
    )
