"""GGUF export: metadata and tokenizer, weights that round-trip to the same logits (Llama with
its q/k permutation, Qwen2 with biases), q8_0/q4_0, merge-first, LoRA GGUF files, errors and
atomic writes. The `llamacpp` tests run llama.cpp itself (llama-cpp-python) when installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

import tunesmith
from tunesmith.errors import TunesmithError
from tunesmith.export import gguf as export
from tunesmith.export.gguf import export_gguf, export_lora_gguf, permute_rope_rows
from tunesmith.methods.lora.impl import lora_layers

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "examples" / "tiny-llama"
HELD_OUT = ROOT / "examples" / "data" / "pydoc_heldout.jsonl"
TOKENIZER = AutoTokenizer.from_pretrained(BUNDLED)
PROMPTS = [
    "The list type",
    "def open(file, mode='r'):",
    "Return a new dictionary",
    "Exceptions are raised when",
]


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_tensors(path) -> dict[str, np.ndarray]:
    """Each tensor dequantized to fp32 in numpy (row-major) shape."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
    return out


def hf_state_from_gguf(path, model) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict the GGUF file holds (names mapped back, q/k un-permuted)."""
    arch = export.gguf_architecture(model.config)
    names = export._tensor_names(arch, model.config.num_hidden_layers)
    tensors = gguf_tensors(path)
    heads = model.config.num_attention_heads
    kv = model.config.num_key_value_heads
    state = {}
    for key in model.state_dict():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name not in tensors:
            continue
        value = torch.from_numpy(tensors[name].copy())
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if "q_proj" in key else kv
            # invert: interleaved pairs back to halves
            value = value.reshape(n, -1, 2, value.shape[-1]).transpose(1, 2).reshape(value.shape)
        state[key] = value
    return state


def test_f16_export_metadata_and_tokenizer(tmp_path):
    out = tmp_path / "m.gguf"
    report = export_gguf(str(BUNDLED), out)
    assert report.lines() == [f"wrote {out}: llama, f16, 38 tensors, 8.0 MB"]
    _, meta = fields(out)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 1
    assert meta["general.name"] == "tiny-llama"
    expected = {
        "llama.context_length": 512,
        "llama.embedding_length": 256,
        "llama.block_count": 4,
        "llama.feed_forward_length": 688,
        "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 4,
        "llama.rope.dimension_count": 32,
        "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": 4096,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.padding_token_id": 1,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta["tokenizer.ggml.tokens"] == TOKENIZER.convert_ids_to_tokens(list(range(4096)))
    types = meta["tokenizer.ggml.token_type"]
    assert types[:4] == [3, 3, 3, 3] and set(types[4:]) == {1}  # control, then normal
    merges = json.loads((BUNDLED / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [
        m if isinstance(m, str) else " ".join(m) for m in merges
    ]
    assert meta["tokenizer.chat_template"] == TOKENIZER.chat_template


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_llama_weights_round_trip_to_the_same_logits(tmp_path, outtype):
    """Mapping every tensor back (and un-permuting q/k) rebuilds the model: the names, shapes
    and permutation are a bijection; f32 is exact."""
    out = tmp_path / "m.gguf"
    export_gguf(str(BUNDLED), out, outtype=outtype)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED).eval()
    state = hf_state_from_gguf(out, model)
    assert "lm_head.weight" not in state and len(state) == 38  # tied head not written
    ids = torch.tensor([TOKENIZER("The list type is a sequence")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
        model.load_state_dict(state, strict=False)
        after = model(ids).logits
    tolerance = {"f32": 1e-5, "f16": 0.05, "bf16": 0.3}[outtype]
    assert float((after - before).abs().max()) < tolerance


def test_qwen2_keeps_rotate_half_layout_and_biases(tmp_path):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path / "qwen"
    model.save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    out = tmp_path / "q.gguf"
    export_gguf(str(folder), out, outtype="f32")
    tensors = gguf_tensors(out)
    assert "blk.0.attn_q.bias" in tensors and "output.weight" in tensors
    k_proj = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"], k_proj)  # not permuted
    fresh = AutoModelForCausalLM.from_config(config).eval()
    fresh.load_state_dict(hf_state_from_gguf(out, model), strict=False)
    ids = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_permutation_interleaves_rotary_halves():
    w = torch.arange(8.0).view(8, 1)  # one head of 8 rows: halves [0..3] and [4..7]
    assert permute_rope_rows(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    two = torch.arange(8.0).view(8, 1)
    assert permute_rope_rows(two, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize(("outtype", "bound"), [("q8_0", 0.6 / 127), ("q4_0", 1.05 / 8)])
def test_block_quantized_types(tmp_path, outtype, bound):
    """q8_0/q4_0 store blocks of 32 with an fp16 scale: q8_0 values are within half a step
    (max|block|/127, plus the scale's fp16 rounding) of the original; q4_0's 16 levels span
    [-8, 7]·max/8, so a value opposite the largest one can be a whole step off. 1-D tensors
    stay f32 and matrices whose rows are not whole blocks (down_proj: 688 inputs) stay f16, as
    the report says."""
    out = tmp_path / "m.gguf"
    report = export_gguf(str(BUNDLED), out, outtype=outtype)
    assert report.kept_f16 == [f"blk.{i}.ffn_down.weight" for i in range(4)]
    assert report.lines()[1] == (
        "note: 4 matrices have rows that are not whole 32-value blocks and stay f16 (e.g. "
        "blk.0.ffn_down.weight)"
    )
    reader = gguf.GGUFReader(out)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.ffn_down.weight"] == "F16"
    assert kinds["blk.0.ffn_up.weight"] == outtype.upper()
    original = AutoModelForCausalLM.from_pretrained(BUNDLED).model.layers[0].mlp.up_proj.weight
    stored = torch.from_numpy(gguf_tensors(out)["blk.0.ffn_up.weight"])
    blocks = original.detach().reshape(-1, 32)
    step = blocks.abs().amax(dim=1, keepdim=True) * bound
    assert bool(((stored.reshape(-1, 32) - blocks).abs() <= step + 1e-7).all())


def adapter(tmp_path, name="a", **overrides) -> Path:
    model = AutoModelForCausalLM.from_pretrained(BUNDLED)
    config = dict(r=4, alpha=8, dropout=0.0, targets="all-linear")
    config.update(overrides)
    tunesmith.add_lora(model, tunesmith.LoRAConfig(**config))
    gen = torch.Generator().manual_seed(3)
    for _, layer in lora_layers(model):
        for p in (layer.adapters["default"].lora_A, layer.adapters["default"].lora_B):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    folder = tmp_path / name
    tunesmith.save_adapter(model, folder)
    return folder


def test_export_merges_the_adapter_first(tmp_path):
    folder = adapter(tmp_path)
    export_gguf(None, tmp_path / "direct.gguf", [str(folder)], outtype="f32")
    tunesmith.merge_checkpoint(str(BUNDLED), [str(folder)], tmp_path / "merged", dtype="fp32")
    export_gguf(str(tmp_path / "merged"), tmp_path / "merged.gguf", outtype="f32")
    a, b = gguf_tensors(tmp_path / "direct.gguf"), gguf_tensors(tmp_path / "merged.gguf")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_lora_gguf_file(tmp_path):
    folder = adapter(tmp_path, r=4, alpha=8)
    out = tmp_path / "lora.gguf"
    report = export_lora_gguf(str(folder), out, outtype="f32")
    assert report.tensors == 4 * 7 * 2 and report.notes == []
    _, meta = fields(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 8.0  # scale alpha / r = 2, as PEFT's
    tensors = gguf_tensors(out)
    saved = tunesmith.adapters.peft_format.read_adapter_weights(folder)
    prefix = "base_model.model.model.layers.2."
    np.testing.assert_array_equal(
        tensors["blk.2.attn_v.weight.lora_a"], saved[prefix + "self_attn.v_proj.lora_A.weight"]
    )
    b = torch.from_numpy(tensors["blk.2.attn_k.weight.lora_b"].copy())
    np.testing.assert_array_equal(
        b.numpy(), permute_rope_rows(saved[prefix + "self_attn.k_proj.lora_B.weight"], 4).numpy()
    )
    # rsLoRA with a per-module alpha: scales differ, so each is folded into lora_b, alpha 0
    folder = adapter(tmp_path, "b", use_rslora=True, alpha_pattern={"down_proj": 2.0})
    report = export_lora_gguf(str(folder), tmp_path / "b.gguf", outtype="f32")
    assert report.notes == ["note: modules differ in rank or scaling; scales folded into lora_b"]
    _, meta = fields(tmp_path / "b.gguf")
    assert meta["adapter.lora.alpha"] == 0.0
    tensors = gguf_tensors(tmp_path / "b.gguf")
    saved = tunesmith.adapters.peft_format.read_adapter_weights(folder)
    np.testing.assert_allclose(
        tensors["blk.0.ffn_down.weight.lora_b"],
        saved["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].numpy() * 1.0,
        rtol=1e-6,
    )  # rsLoRA: alpha 2 / sqrt(4)
    np.testing.assert_allclose(
        tensors["blk.0.ffn_up.weight.lora_b"],
        saved["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].numpy() * 4.0,
        rtol=1e-6,
    )  # alpha 8 / sqrt(4)


def test_export_errors(tmp_path):
    gpt2 = tmp_path / "gpt2"
    from helpers.models import make_model

    make_model("gpt2").save_pretrained(gpt2)
    with pytest.raises(TunesmithError) as err:
        export_gguf(str(gpt2), tmp_path / "g.gguf")
    assert str(err.value) == (
        "--model: GPT2LMHeadModel cannot be exported to GGUF; supported architectures: "
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    )
    (tmp_path / "exists.gguf").write_bytes(b"old")
    with pytest.raises(TunesmithError, match="already exists; choose a new path or pass"):
        export_gguf(str(BUNDLED), tmp_path / "exists.gguf")
    with pytest.raises(TunesmithError, match=r"--outtype: 'q5_k' is not one of f32, f16, bf16"):
        export_gguf(str(BUNDLED), tmp_path / "x.gguf", outtype="q5_k")
    dora = adapter(tmp_path, "dora", use_dora=True)
    with pytest.raises(TunesmithError, match="is a DoRA adapter, which llama.cpp cannot apply"):
        export_lora_gguf(str(dora), tmp_path / "d.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora", "exists.gguf", "gpt2"]


def test_interrupted_export_leaves_no_partial_file(tmp_path, monkeypatch):
    """A disk that fills mid-write: the error propagates, nothing is left under a temporary
    name, and an existing file under the final name is untouched."""
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")
    real = export._encode
    calls = []

    def failing(tensor, qtype, importance=None):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(tensor, qtype, importance)

    monkeypatch.setattr(export, "_encode", failing)
    with pytest.raises(TunesmithError, match=rf"^{out}: no space left on the disk"):
        export_gguf(str(BUNDLED), out, overwrite=True)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_cli_export(tmp_path):
    folder = adapter(tmp_path)
    out = tmp_path / "m.gguf"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith.cli",
            "export",
            "--format",
            "gguf",
            "--adapter",
            str(folder),
            "--outtype",
            "q8_0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote {out}: llama, q8_0, 38 tensors, ")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith.cli",
            "export",
            "--adapter",
            str(folder),
            "--lora-only",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert (
        run.stderr == f"error: --out: {out} already exists; choose a new path or pass --overwrite\n"
    )


# --- llama.cpp itself --------------------------------------------------------------------------
def llama(path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=512, verbose=False, seed=0, **kwargs)


def greedy_llama(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if token in (0, 3) or len(out) == n:
            break
        out.append(token)
    return out


def greedy_tunesmith(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=[0, 3],
            pad_token_id=1,
        )[0, len(ids) :].tolist()
    return [t for t in out if t not in (0, 3)][:n]


@pytest.mark.llamacpp
def test_llamacpp_decodes_the_f16_export_like_tunesmith(tmp_path):
    out = tmp_path / "m.gguf"
    export_gguf(str(BUNDLED), out)
    llm = llama(out)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED).eval()
    for prompt in PROMPTS:
        ids = TOKENIZER(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        assert greedy_llama(llm, ids, 24) == greedy_tunesmith(model, ids, 24), prompt
    llm.close()


def llama_perplexity(llm, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        logits = torch.tensor(np.asarray(llm.scores[: len(row)]), dtype=torch.float32)
        total += float(
            torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(row[1:]), reduction="sum")
        )
        count += len(row) - 1
    return float(np.exp(total / count))


@pytest.mark.llamacpp
def test_llamacpp_q8_0_perplexity_stays_close(tmp_path):
    from tunesmith.quantize.pipeline import token_stream, windows_of

    windows = windows_of(token_stream(str(HELD_OUT), TOKENIZER), 256)[-8:]
    results = {}
    for outtype in ("f16", "q8_0"):
        export_gguf(str(BUNDLED), tmp_path / f"{outtype}.gguf", outtype=outtype)
        llm = llama(tmp_path / f"{outtype}.gguf", logits_all=True)
        results[outtype] = llama_perplexity(llm, windows)
        llm.close()
    assert abs(results["q8_0"] / results["f16"] - 1) < 0.01


@pytest.mark.llamacpp
def test_llamacpp_applies_the_lora_file_like_the_merged_model(tmp_path):
    folder = adapter(tmp_path)
    export_gguf(str(BUNDLED), tmp_path / "base.gguf")
    export_lora_gguf(str(folder), tmp_path / "lora.gguf", outtype="f32")
    export_gguf(None, tmp_path / "merged.gguf", [str(folder)])
    with_lora = llama(tmp_path / "base.gguf", lora_path=str(tmp_path / "lora.gguf"))
    merged = llama(tmp_path / "merged.gguf")
    model = AutoModelForCausalLM.from_pretrained(BUNDLED).eval()
    tunesmith.load_adapter(model, folder)
    for prompt in PROMPTS:
        ids = TOKENIZER(prompt)["input_ids"]
        ours = greedy_tunesmith(model, ids, 16)
        assert greedy_llama(merged, ids, 16) == ours, prompt
        assert greedy_llama(with_lora, ids, 16) == ours, prompt
    with_lora.close()
    merged.close()


def test_mistral_exports_as_llama_with_permuted_rope(tmp_path):
    from transformers import MistralConfig

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path / "mistral"
    model.save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    out = tmp_path / "m.gguf"
    assert export_gguf(str(folder), out, outtype="f32").arch == "llama"
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach()
    np.testing.assert_array_equal(
        gguf_tensors(out)["blk.0.attn_q.weight"], permute_rope_rows(q_proj, 4).numpy()
    )
    fresh = AutoModelForCausalLM.from_config(config).eval()
    fresh.load_state_dict(hf_state_from_gguf(out, model), strict=False)
    ids = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


@pytest.mark.llamacpp
@pytest.mark.parametrize("outtype", ["q6_k", "q4_k_m", "q3_k_m", "q2_k"])
def test_llamacpp_reads_the_k_quant_blocks_as_written(tmp_path, outtype):
    """llama.cpp's perplexity on a K-quant export equals (within its int8 activations' rounding)
    the perplexity of the same file's weights dequantized by the gguf package into torch."""
    from tunesmith.quantize.pipeline import token_stream, windows_of

    windows = windows_of(token_stream(str(HELD_OUT), TOKENIZER), 256)[-8:]
    path = tmp_path / f"{outtype}.gguf"
    export_gguf(str(BUNDLED), path, outtype=outtype)
    llm = llama(path, logits_all=True)
    theirs = llama_perplexity(llm, windows)
    llm.close()
    model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    model.load_state_dict(hf_state_from_gguf(path, model), strict=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows.tolist():
            logits = model(torch.tensor([row])).logits[0]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:-1], torch.tensor(row[1:]), reduction="sum"
                )
            )
            count += len(row) - 1
    ours = float(np.exp(total / count))
    assert abs(theirs / ours - 1) < 0.002, (theirs, ours)
