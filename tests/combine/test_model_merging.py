"""Model merging (`combine/model_merging.py`, tunesmith merge-models) against task-vector
formulas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.adapters import reference_ties, save_base
from helpers.models import input_ids, logits, make_model
from transformers import AutoModelForCausalLM

from tunesmith.combine import merge_models
from tunesmith.errors import TunesmithError
from tunesmith.shards import CheckpointReader


# --- model merging ---------------------------------------------------------------------------
def tuned(base: Path, folder: Path, seed: int, scale: float = 0.05) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(folder)
    return folder


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {n: reader.read(n) for n in reader.names}


@pytest.mark.parametrize(
    "method", ["task_arithmetic", "ties", "dare_ties", "dare_linear", "magnitude_prune"]
)
def test_merging_identical_models_returns_the_input(tmp_path, method):
    base = save_base("llama", tmp_path / "base")
    x = tuned(base, tmp_path / "x", seed=1)
    weights = (
        [0.5, 0.5]
        if method in ("task_arithmetic", "dare_linear", "magnitude_prune")
        else [1.0, 1.0]
    )
    merge_models(str(base), [str(x), str(x)], tmp_path / "m", method, weights, density=1.0)
    expected, got = tensors_of(x), tensors_of(tmp_path / "m")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    merge_models(str(base), [str(base)], tmp_path / "b", method, density=0.3)
    for key, value in tensors_of(base).items():
        assert torch.equal(tensors_of(tmp_path / "b")[key], value), key


def test_model_merging_matches_task_vector_formulas(tmp_path):
    base = save_base("gpt2", tmp_path / "base")
    x, y = tuned(base, tmp_path / "x", 1), tuned(base, tmp_path / "y", 2)
    b, tx, ty = tensors_of(base), tensors_of(x), tensors_of(y)
    merge_models(str(base), [str(x), str(y)], tmp_path / "ta", "task_arithmetic", [0.3, 0.6])
    merge_models(str(base), [str(x), str(y)], tmp_path / "ties", "ties", [1.0, 0.5], density=0.4)
    ta, ties = tensors_of(tmp_path / "ta"), tensors_of(tmp_path / "ties")
    key = "transformer.h.0.attn.c_attn.weight"
    expected = b[key] + 0.3 * (tx[key] - b[key]) + 0.6 * (ty[key] - b[key])
    torch.testing.assert_close(ta[key], expected, rtol=0, atol=1e-6)
    small = "transformer.h.1.ln_1.weight"
    expected = b[small] + reference_ties(
        [tx[small] - b[small], ty[small] - b[small]], [1.0, 0.5], 0.4
    )
    torch.testing.assert_close(ties[small], expected, rtol=0, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "ties")
    assert torch.isfinite(logits(merged, input_ids())).all()


def test_model_merging_mismatch_errors(tmp_path):
    from transformers import LlamaConfig

    base = save_base("llama", tmp_path / "base")
    gpt2 = save_base("gpt2", tmp_path / "gpt2")
    wider = LlamaConfig(**{**make_model("llama").config.to_dict(), "intermediate_size": 48})
    AutoModelForCausalLM.from_config(wider).save_pretrained(tmp_path / "wider")

    def error(*models) -> str:
        with pytest.raises(TunesmithError) as err:
            merge_models(str(base), [str(m) for m in models], tmp_path / "m")
        return str(err.value)

    assert error(gpt2) == (
        f"--model {gpt2} (model 1): model_type is 'gpt2' but the base {base} has 'llama'; merge "
        "models of one architecture"
    )
    assert error(base, tmp_path / "wider") == (
        f"--model {tmp_path / 'wider'} (model 2): tensor model.layers.0.mlp.down_proj.weight has "
        "shape [32, 48] but the base has [32, 64]; the models differ in structure"
    )
    assert not (tmp_path / "m").exists()
    with pytest.raises(TunesmithError, match="--weights: 1 models but 2 weights"):
        merge_models(str(base), [str(base)], tmp_path / "m", weights=[1, 2])
