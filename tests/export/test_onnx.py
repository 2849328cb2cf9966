"""ONNX export: on the six test architectures, through both exporters where they take the
model, the graph's logits and greedy tokens (through its own KV cache, several steps) equal
torch's, and onnxruntime-genai generates the same tokens from the folder; int8/int4/fp16 run;
merge-first; the card and genai_config.json; errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import chat_tokenizer
from helpers.models import CONFIGS
from helpers.runs import run_cli
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import tunesmith
from tunesmith.errors import TunesmithError
from tunesmith.export.onnx import (
    FP32_TOLERANCE,
    OnnxDecoder,
    export_onnx,
    genai_greedy,
    genai_refusal,
    read_prompts,
)
from tunesmith.methods.lora.impl import lora_layers

pytest.importorskip("onnxruntime_genai")

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "examples" / "tiny-llama"
PROMPTS = ["The list type", "def open(file, mode='r'):"]
STEPS = 6
# onnxruntime's CPU attention needs a head size that is a multiple of 16: 64 / 4 heads
WIDE = dict(
    hidden_size=64, num_attention_heads=4, intermediate_size=96, max_position_embeddings=128
)
EXPORTS = [(arch, "genai") for arch in CONFIGS if arch != "gpt2"] + [
    (arch, "torch") for arch in CONFIGS
]


def make_checkpoint(arch: str, folder: Path) -> Path:
    config = CONFIGS[arch]()
    if arch == "gpt2":
        config.n_embd, config.n_positions = 64, 128
    else:
        for key, value in WIDE.items():
            setattr(config, key, value)
        if hasattr(config, "head_dim"):
            config.head_dim = 16
    if arch == "phi3":
        config.original_max_position_embeddings = config.max_position_embeddings
    config.vocab_size = len(chat_tokenizer())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # a peaked distribution, so greedy tokens are decided clearly
        model.get_output_embeddings().weight.mul_(4)
    model.save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-sources")
    return {arch: make_checkpoint(arch, root / arch) for arch in CONFIGS}


@pytest.fixture(scope="module")
def fp32_bytes(checkpoints, tmp_path_factory) -> dict[str, int]:
    root = tmp_path_factory.mktemp("onnx-fp32")
    source = str(checkpoints["llama"])
    return {e: export_onnx(source, root / e, exporter=e).bytes for e in ("genai", "torch")}


def torch_greedy(folder: Path, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Torch's greedy tokens (no end-of-text stop) and its logits for prompt + tokens."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        logits = model(torch.tensor([tokens])).logits[0].numpy()
    return tokens[len(ids) :], logits


@pytest.mark.parametrize(("arch", "exporter"), EXPORTS, ids=[f"{a}-{e}" for a, e in EXPORTS])
def test_onnx_equals_torch_with_kv_cache(checkpoints, tmp_path, arch, exporter):
    out = tmp_path / "onnx"
    report = export_onnx(
        str(checkpoints[arch]), out, exporter=exporter, verify=True, prompts=PROMPTS, steps=STEPS
    )
    assert report.exporter == exporter
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    decoder = OnnxDecoder(out)
    tokenizer = chat_tokenizer()
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        wanted, logits = torch_greedy(checkpoints[arch], ids, STEPS)
        # the graph's own greedy loop: the prompt in one call, then one token per call
        assert decoder.greedy(ids, STEPS) == wanted
        # its logits at every step, teacher-forced through the cache
        got, cache = decoder.step(np.array([ids]), decoder.start(), 0)
        rows = [got[0]]
        for i, token in enumerate(wanted[:-1]):
            got, cache = decoder.step(np.array([[token]]), cache, len(ids) + i)
            rows.append(got[0])
        assert np.abs(np.concatenate(rows) - logits[:-1]).max() < FP32_TOLERANCE
        # onnxruntime-genai reads the folder and generates the same tokens
        assert genai_greedy(out, ids, STEPS) == wanted[: len(genai_greedy(out, ids, STEPS))]
        assert len(genai_greedy(out, ids, STEPS)) >= 1
    for row in report.checks:
        assert row.max_diff < FP32_TOLERANCE
        assert row.agree == row.steps == STEPS
        assert row.genai_equal is True


def test_auto_picks_the_builder_where_it_takes_the_model(checkpoints):
    from transformers import AutoConfig

    for arch in CONFIGS:
        refusal = genai_refusal(AutoConfig.from_pretrained(checkpoints[arch]))
        assert (refusal is None) == (arch != "gpt2"), (arch, refusal)
    narrow = CONFIGS["llama"]()  # head size 8
    narrow.architectures = ["LlamaForCausalLM"]
    assert "head size 8 is not a multiple of 16" in genai_refusal(narrow)


@pytest.mark.parametrize(
    ("exporter", "outtype"),
    [("genai", "int8"), ("genai", "int4"), ("torch", "int8"), ("torch", "int4"), ("torch", "fp16")],
)
def test_quantized_graphs_run_and_shrink(checkpoints, fp32_bytes, tmp_path, exporter, outtype):
    source = checkpoints["llama"]
    small = export_onnx(
        str(source),
        tmp_path / outtype,
        exporter=exporter,
        outtype=outtype,
        verify=True,
        prompts=PROMPTS,
        steps=STEPS,
    )
    assert small.bytes < 0.75 * fp32_bytes[exporter]
    for row in small.checks:
        assert 0 < row.max_diff < 5.0  # quantized: close, not equal
        assert row.genai_equal is True  # genai runs the graph it was given, token for token
    decoder = OnnxDecoder(tmp_path / outtype)
    kind = {i.name: i.type for i in decoder.session.get_inputs()}["past_key_values.0.key"]
    assert kind == ("tensor(float16)" if outtype == "fp16" else "tensor(float)")
    graph = (tmp_path / outtype / "model.onnx").read_bytes()
    if outtype == "int4":
        assert b"MatMulNBits" in graph


def test_adapters_are_merged_first(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(BUNDLED)
    tunesmith.add_lora(model, tunesmith.LoRAConfig(r=4, alpha=8, dropout=0.0, targets="all-linear"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (layer.adapters["default"].lora_A, layer.adapters["default"].lora_B):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    adapter = tmp_path / "adapter"
    tunesmith.save_adapter(model, adapter)
    out = tmp_path / "onnx"
    report = export_onnx(None, out, [str(adapter)], verify=True, prompts=PROMPTS, steps=4)
    # the reference: the base with the adapter applied at run time, not a merged copy
    tuned = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    tunesmith.load_adapter(tuned, adapter)
    ids = chat_tokenizer()(PROMPTS[0])["input_ids"]
    decoder = OnnxDecoder(out)
    with torch.no_grad():
        expected = tuned(torch.tensor([ids])).logits[0].numpy()
        base = AutoModelForCausalLM.from_pretrained(BUNDLED).eval()(torch.tensor([ids])).logits
    got, _ = decoder.step(np.array([ids]), decoder.start(), 0)
    assert np.abs(got[0] - expected).max() < FP32_TOLERANCE
    assert np.abs(got[0] - base[0].numpy()).max() > 100 * FP32_TOLERANCE  # the adapter is in
    assert all(row.max_diff < FP32_TOLERANCE for row in report.checks)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None  # a local path is named in the text, not as a hub id
    assert str(BUNDLED) in card.text
    assert "onnx" in card.data.tags and "merge" in card.data.tags
    assert "Checked against torch" in card.text


def test_genai_config_and_card(checkpoints, tmp_path):
    out = tmp_path / "onnx"
    export_onnx(str(checkpoints["gpt2"]), out, verify=True, prompts=PROMPTS, steps=2, threads=2)
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert genai["decoder"]["session_options"]["intra_op_num_threads"] == 2
    assert genai["eos_token_id"] == 2 and genai["bos_token_id"] == 1 and genai["pad_token_id"] == 0
    assert genai["decoder"]["inputs"]["position_ids"] == "position_ids"
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "onnxruntime-genai"
    assert "| exporter | torch |" in card.text


def test_errors(checkpoints, tmp_path):
    source = str(checkpoints["llama"])
    with pytest.raises(
        TunesmithError, match=r"^--outtype: 'q4_0' is not one of fp32, fp16, int8, int4$"
    ):
        export_onnx(source, tmp_path / "a", outtype="q4_0")
    with pytest.raises(
        TunesmithError, match=r"^--exporter: 'optimum' is not one of auto, genai, torch$"
    ):
        export_onnx(source, tmp_path / "a", exporter="optimum")
    with pytest.raises(
        TunesmithError,
        match="onnxruntime-genai's builder failed on .*gpt2.*; try --exporter torch$",
    ):
        export_onnx(str(checkpoints["gpt2"]), tmp_path / "b", exporter="genai")
    assert not (tmp_path / "b").exists()  # nothing half-written
    with pytest.raises(TunesmithError, match="fp16 for CUDA only"):
        export_onnx(source, tmp_path / "c", exporter="genai", outtype="fp16", verify=True)
    (tmp_path / "d").mkdir()
    with pytest.raises(
        TunesmithError, match="already exists; choose a new path or pass --overwrite"
    ):
        export_onnx(source, tmp_path / "d")
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"text": "fine"}\n{"answer": 1}\n')
    with pytest.raises(
        TunesmithError, match=r'prompts.jsonl:2: needs a "prompt" or "text" string$'
    ):
        read_prompts(bad)


def test_cli_exports_the_bundled_model_and_verifies(tmp_path):
    out = tmp_path / "onnx"
    done = run_cli(
        "export",
        "--format",
        "onnx",
        "--model",
        str(BUNDLED),
        "--out",
        str(out),
        "--verify",
        "--verify-data",
        str(ROOT / "examples" / "data" / "pydoc_heldout.jsonl"),
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: ONNX fp32 via genai exporter" in done.stdout
    assert "max |dlogit|" in done.stdout and " same" in done.stdout
    refused = run_cli(
        "export",
        "--format",
        "onnx",
        "--model",
        str(BUNDLED),
        "--out",
        str(tmp_path / "x"),
        "--ollama",
    )
    assert refused.returncode != 0
    assert "--ollama: a gguf option; leave it out with --format onnx" in refused.stderr
