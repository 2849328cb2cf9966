"""K-quant GGUF (Q4_K, Q5_K, Q6_K and llama-quantize's presets): bytes identical to ggml's own
reference quantizers (compiled from llama.cpp's source when `.ci/run` provides it), every type
dequantized by the gguf package with less error than q4_0, the presets' per-tensor type mix,
and an exported model that decodes close to the original."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ggml_ref
from transformers import AutoModelForCausalLM

from tunesmith.export.gguf import export_gguf
from tunesmith.export.kquants import BLOCK_BYTES, QUANTIZERS, preset_type, use_more_bits

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
QTYPE = {
    "q2_k": Q.Q2_K,
    "q3_k": Q.Q3_K,
    "q4_k": Q.Q4_K,
    "q5_k": Q.Q5_K,
    "q6_k": Q.Q6_K,
    "iq4_nl": Q.IQ4_NL,
}
K_TYPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "examples" / "tiny-llama"


def weights(rows: int = 64, cols: int = 1024, seed: int = 0) -> np.ndarray:
    """Gaussian rows plus the edge cases: an all-zero super-block, a constant row, a block
    with one large outlier, all-negative and all-positive blocks."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[1, :256] = 0
    x[2, :] = 0.5
    x[3, 7] = 4.0
    x[4, 256:512] = -np.abs(x[4, 256:512])
    x[5, 512:768] = np.abs(x[5, 512:768])
    return x


@pytest.fixture(scope="module")
def reference():
    lib, why = ggml_ref.build()
    if lib is None:
        pytest.skip(f"ggml's reference quantizer is not available: {why}")
    return lib


@pytest.mark.parametrize("kind", K_TYPES)
def test_bytes_identical_to_ggmls_reference_quantizer(reference, kind):
    for seed, scale in ((0, 1.0), (1, 40.0)):
        x = weights(seed=seed) * np.float32(scale)
        ours = QUANTIZERS[kind](x)
        theirs = ggml_ref.quantize(reference, kind.replace("_k", "_K"), x, BLOCK_BYTES[kind])
        assert ours.shape == theirs.shape
        differ = ours.reshape(-1, BLOCK_BYTES[kind]) != theirs.reshape(-1, BLOCK_BYTES[kind])
        assert not differ.any(), f"{int(differ.any(1).sum())} super-blocks differ"


def test_iq4_nl_bytes_identical_to_what_llama_quantize_runs(reference):
    """IQ4_NL (the fallback of Q2_K/Q3_K rows that are not whole super-blocks) as ggml's
    quantize_iq4_nl, which llama-quantize calls (its _ref variant searches no scales)."""
    for seed, scale in ((0, 1.0), (1, 40.0)):
        x = weights(cols=96 * 8, seed=seed) * np.float32(scale)  # 768: not whole super-blocks
        ours = QUANTIZERS["iq4_nl"](x)
        theirs = ggml_ref.quantize_rows(reference, "iq4_nl", x, x.shape[1] // 32 * 18)
        differ = ours.reshape(-1, 18) != theirs.reshape(-1, 18)
        assert not differ.any(), f"{int(differ.any(1).sum())} blocks differ"


def rmse_of(kind: str, x: np.ndarray) -> float:
    blocks = QUANTIZERS[kind](x)
    back = gguf.quants.dequantize(blocks, QTYPE[kind])
    assert back.shape == x.shape
    if kind != "iq4_nl":
        assert np.array_equal(back[1, :256], np.zeros(256, np.float32))  # zeros stay zeros
    return float(np.sqrt(((back - x) ** 2).mean()))


@pytest.mark.parametrize("kind", [*K_TYPES, "iq4_nl"])
def test_the_gguf_package_dequantizes_every_type(kind):
    """Every type reads back through gguf's own dequantizer; Q4_K, at q4_0's 4.5 bits per
    weight, with less error than q4_0; and error falls as bits rise."""
    x = weights()
    bits = 8 * QUANTIZERS[kind](x).size / x.size
    assert (
        bits
        == {
            "q2_k": 2.625,
            "q3_k": 3.4375,
            "q4_k": 4.5,
            "iq4_nl": 4.5,
            "q5_k": 5.5,
            "q6_k": 6.5625,
        }[kind]
    )  # q4_0: 4.5
    q4_0 = gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q4_0), Q.Q4_0)
    rmse = rmse_of(kind, x)
    q4_0_rmse = float(np.sqrt(((q4_0 - x) ** 2).mean()))
    if kind == "q4_k":
        assert rmse < q4_0_rmse
    if kind == "iq4_nl":  # a fallback on par with q4_0 (its x²-weighted search favours outliers)
        assert rmse < 1.05 * q4_0_rmse
    up = {"q2_k": "q3_k", "q3_k": "q4_k", "q4_k": "q5_k", "q5_k": "q6_k"}.get(kind)
    if up:  # one bit less: more error than the next type up, by less than 2.5x
        assert rmse_of(up, x) < rmse < 2.5 * rmse_of(up, x)


def test_presets_give_llama_quantizes_type_mix():
    layers = 16
    more = [i for i in range(layers) if use_more_bits(i, layers)]
    assert more == [0, 1, 4, 7, 10, 13, 14, 15]

    def kinds(preset: str, part: str) -> list[str]:
        return [
            preset_type(f"blk.{i}.{part}.weight", 4096, preset, layers, False)
            for i in range(layers)
        ]

    assert kinds("q4_k_m", "attn_v") == ["q6_k" if i in more else "q4_k" for i in range(layers)]
    assert kinds("q5_k_m", "ffn_down") == ["q6_k" if i in more else "q5_k" for i in range(layers)]
    assert kinds("q4_k_s", "attn_v") == ["q5_k"] * 4 + ["q4_k"] * 12
    assert kinds("q4_k_s", "ffn_down") == ["q5_k"] * 2 + ["q4_k"] * 14
    assert set(kinds("q4_k_m", "attn_q")) == {"q4_k"}
    assert set(kinds("q6_k", "ffn_up")) == {"q6_k"}
    assert preset_type("output.weight", 4096, "q4_k_m", layers, False) == "q6_k"
    assert preset_type("token_embd.weight", 4096, "q4_k_m", layers, False) == "q4_k"
    assert preset_type("token_embd.weight", 4096, "q4_k_m", layers, True) == "q6_k"  # tied
    # rows that are not whole super-blocks: llama-quantize's fallbacks
    assert preset_type("blk.5.ffn_up.weight", 11008 + 64, "q4_k_m", layers, False) == "q5_0"
    assert preset_type("blk.5.ffn_up.weight", 11072, "q5_k_s", layers, False) == "q5_1"
    assert preset_type("output.weight", 11072, "q5_k_s", layers, False) == "q8_0"
    assert preset_type("blk.5.ffn_up.weight", 688 + 4, "q6_k", layers, False) == "f16"
    # the 2- and 3-bit presets
    assert kinds("q2_k", "attn_q") == ["q2_k"] * layers
    assert kinds("q2_k", "attn_v") == ["q3_k"] * layers  # gqa 1
    assert [
        preset_type(f"blk.{i}.attn_v.weight", 4096, "q2_k", layers, False, gqa=4) for i in range(2)
    ] == ["q4_k"] * 2
    assert kinds("q2_k", "ffn_down") == kinds("q2_k", "attn_output") == ["q3_k"] * layers
    assert kinds("q3_k_m", "attn_v") == ["q5_k"] * 2 + ["q4_k"] * 14
    assert kinds("q3_k_m", "ffn_down") == ["q5_k"] * 1 + ["q4_k"] * 15  # first sixteenth
    assert kinds("q3_k_m", "attn_output") == ["q4_k"] * layers
    assert set(kinds("q3_k_m", "ffn_up")) == {"q3_k"}
    assert set(kinds("q3_k_s", "ffn_down")) == {"q3_k"}
    assert set(kinds("q3_k_l", "attn_v") + kinds("q3_k_l", "ffn_down")) == {"q5_k"}
    assert preset_type("output.weight", 4096, "q2_k", layers, False) == "q6_k"
    assert preset_type("blk.5.ffn_up.weight", 11072, "q3_k_m", layers, False) == "iq4_nl"
    # an 80-layer model (llama.cpp's 70B): attn_v at 3 or 4 bits is lifted to Q5_K
    assert preset_type("blk.20.attn_v.weight", 8192, "q4_k_m", 80, False) == "q5_k"
    assert preset_type("blk.9.attn_v.weight", 8192, "q3_k_m", 80, False) == "q5_k"


def test_a_q4_k_m_export_reads_back_and_decodes_close_to_the_model(tmp_path):
    from test_gguf import hf_state_from_gguf

    out = tmp_path / "m.gguf"
    report = export_gguf(str(BUNDLED), out, outtype="q4_k_m")
    assert report.notes[0] == "tensor types: f16 4, q4_k 22, q6_k 3"
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == Q.Q6_K  # tied: the output head's type
    assert types["blk.3.attn_v.weight"] == Q.Q6_K and types["blk.1.attn_v.weight"] == Q.Q4_K
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    ids = torch.tensor([list(range(5, 69))])
    with torch.no_grad():
        before = model(ids).logits
        model.load_state_dict(hf_state_from_gguf(out, model), strict=False)
        after = model(ids).logits
    assert (before.argmax(-1) == after.argmax(-1)).float().mean() > 0.9
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("kind", [*K_TYPES, "iq4_nl"])
def test_importance_weighted_bytes_identical_to_llama_quantizes(reference, kind):
    """With an importance matrix (one weight per column), as ggml's quantize_<type> computes
    it when llama-quantize passes --imatrix: the make_qkx3/make_qp searches of the K types."""
    rng = np.random.default_rng(7)
    row_bytes = {"iq4_nl": 4 * 144, **{k: 4 * BLOCK_BYTES[k] for k in K_TYPES}}[kind]
    block = 18 if kind == "iq4_nl" else BLOCK_BYTES[kind]
    for seed, scale in ((0, 1.0), (1, 40.0)):
        x = weights(seed=seed) * np.float32(scale)
        importance = rng.gamma(0.5, 1.0, x.shape[1]).astype(np.float32)
        ours = QUANTIZERS[kind](x, importance)
        ggml_kind = kind.replace("_k", "_K")
        theirs = ggml_ref.quantize_rows(reference, ggml_kind, x, row_bytes, importance)
        differ = ours.reshape(-1, block) != theirs.reshape(-1, block)
        assert not differ.any(), f"{int(differ.any(1).sum())} blocks differ"
        assert (ours != QUANTIZERS[kind](x)).any()  # the importance changed something


@pytest.fixture(scope="module")
def imatrix_exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imatrix")
    held_out = str(ROOT / "examples" / "data" / "pydoc_heldout.jsonl")
    plain = export_gguf(str(BUNDLED), folder / "plain.gguf", outtype="q3_k_m")
    weighted = export_gguf(
        str(BUNDLED), folder / "weighted.gguf", outtype="q3_k_m", imatrix_data=held_out
    )
    return folder, plain, weighted


def test_imatrix_export_weights_the_error_where_activations_are_large(imatrix_exports):
    from tunesmith.export.imatrix import compute_importance
    from tunesmith.models import load_tokenizer

    folder, plain, weighted = imatrix_exports
    held_out = str(ROOT / "examples" / "data" / "pydoc_heldout.jsonl")
    assert weighted.notes[1].startswith("importance matrix: 30 matrices from 32 windows of 256")
    importance = compute_importance(
        str(BUNDLED), held_out, load_tokenizer(tunesmith_model_section())
    ).values
    # the same input feeds q, k and v: the same statistics; the tied head's is the embedding's
    layer = "model.layers.1.self_attn"
    np.testing.assert_array_equal(
        importance[f"{layer}.q_proj.weight"], importance[f"{layer}.v_proj.weight"]
    )
    np.testing.assert_array_equal(
        importance["lm_head.weight"], importance["model.embed_tokens.weight"]
    )
    assert all((v >= 0).all() and v.std() > 0 for v in importance.values())
    reader_plain, reader_weighted = (
        gguf.GGUFReader(folder / "plain.gguf"),
        gguf.GGUFReader(folder / "weighted.gguf"),
    )
    fields = {k: f.contents() for k, f in reader_weighted.fields.items()}
    assert fields["quantize.imatrix.chunks_count"] == 32
    assert fields["quantize.imatrix.entries_count"] == 25  # the K-typed matrices
    state = AutoModelForCausalLM.from_pretrained(BUNDLED).state_dict()
    better = 0
    checked = 0
    by_name = {t.name: t for t in reader_plain.tensors}
    for tensor in reader_weighted.tensors:
        if tensor.tensor_type not in (Q.Q3_K, Q.Q4_K, Q.Q5_K) or not tensor.name.startswith("blk."):
            continue
        key = hf_key(tensor.name)
        original = state[key].numpy()
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            continue  # rows permuted for llama.cpp's rope; compared through the others
        cost = importance[key]
        errors = []
        for t in (by_name[tensor.name], tensor):
            back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(original.shape)
            errors.append(float((((back - original) ** 2) * cost).sum()))
        checked += 1
        better += errors[1] < errors[0]
    assert checked >= 10 and better == checked  # lower importance-weighted error everywhere


def tunesmith_model_section():
    from tunesmith.config import ModelSection

    return ModelSection(path=str(BUNDLED))


def hf_key(name: str) -> str:
    layer, part = name.split(".")[1], ".".join(name.split(".")[2:4])
    return {
        "attn_v.weight": f"model.layers.{layer}.self_attn.v_proj.weight",
        "attn_output.weight": f"model.layers.{layer}.self_attn.o_proj.weight",
        "ffn_gate.weight": f"model.layers.{layer}.mlp.gate_proj.weight",
        "ffn_up.weight": f"model.layers.{layer}.mlp.up_proj.weight",
        "ffn_down.weight": f"model.layers.{layer}.mlp.down_proj.weight",
        "attn_q.weight": f"model.layers.{layer}.self_attn.q_proj.weight",
        "attn_k.weight": f"model.layers.{layer}.self_attn.k_proj.weight",
    }[part]


def test_imatrix_errors_and_run_config_data(tmp_path, monkeypatch):
    from tunesmith.errors import TunesmithError
    from tunesmith.export.imatrix import calibration_files

    with pytest.raises(
        TunesmithError, match=r"^--imatrix-data: only the K-quant presets .* --outtype is q8_0$"
    ):
        export_gguf(str(BUNDLED), tmp_path / "a.gguf", outtype="q8_0", imatrix_data="x.jsonl")
    with pytest.raises(
        TunesmithError, match=r"^--imatrix-data: nowhere.jsonl: no such file or folder$"
    ):
        export_gguf(
            str(BUNDLED), tmp_path / "a.gguf", outtype="q4_k_m", imatrix_data="nowhere.jsonl"
        )
    assert not (tmp_path / "a.gguf").exists()
    monkeypatch.chdir(ROOT)  # the run config's data paths are relative to where it runs
    files = calibration_files("examples/quickstart.yaml")
    assert [Path(f).resolve() for f in files] == [ROOT / "examples/data/quickstart_train.jsonl"]


LLAMA_FTYPES = {
    "q2_k": 10,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q3_k_l": 13,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
}
"""llama.cpp's enum llama_ftype for each preset."""


def llama_quantize(source: Path, out: Path, preset: str) -> None:
    """llama.cpp's own llama-quantize (its C API through llama-cpp-python) on a GGUF file."""
    import ctypes
    import os

    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[preset]
    params.nthread = 1
    quiet, saved = os.open(os.devnull, os.O_WRONLY), os.dup(2)
    os.dup2(quiet, 2)  # it logs every tensor to stderr
    try:
        rc = llama_cpp.llama_model_quantize(
            str(source).encode(), str(out).encode(), ctypes.byref(params)
        )
    finally:
        os.dup2(saved, 2)
        os.close(quiet)
        os.close(saved)
    assert rc == 0


@pytest.mark.llamacpp
def test_presets_equal_llama_quantize_file_for_file(tmp_path):
    """Every preset, on the bundled model (tied head, 688-wide ffn_down rows that fall back to
    f16) and on a random Llama with 16 layers, four query heads per key/value head, an untied
    head and 800-wide ffn_down rows (not whole super-blocks: the Q5_0/Q5_1/Q8_0/IQ4_NL
    fallbacks): each tensor's type and bytes equal llama-quantize's on the f32 export."""
    from helpers.data import chat_tokenizer
    from helpers.models import llama_config
    from transformers import LlamaForCausalLM

    wide = tmp_path / "wide"
    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    config = llama_config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=800,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    for name, source in (("bundled", BUNDLED), ("wide", wide)):
        f32 = tmp_path / f"{name}-f32.gguf"
        export_gguf(str(source), f32, outtype="f32")
        for preset in LLAMA_FTYPES:
            theirs_path = tmp_path / f"{name}-{preset}-llama.gguf"
            llama_quantize(f32, theirs_path, preset)
            export_gguf(str(source), tmp_path / f"{name}-{preset}.gguf", outtype=preset)
            ours = {t.name: t for t in gguf.GGUFReader(tmp_path / f"{name}-{preset}.gguf").tensors}
            theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
            assert ours.keys() == theirs.keys()
            for tensor in ours:
                a, b = ours[tensor], theirs[tensor]
                assert a.tensor_type == b.tensor_type, (name, preset, tensor)
                assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), (
                    name,
                    preset,
                    tensor,
                )
