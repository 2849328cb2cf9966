"""The run builder: one model for train, plan, eval, generate and chat. What the planner builds
from a config is the model `train` runs; full fine-tuning and adapters differ by the method."""

from __future__ import annotations

import pytest
import torch
from helpers.data import chat_tokenizer
from transformers import AutoConfig

import tunesmith
from tunesmith.builder import (
    build_model,
    load_for_inference,
    load_trained,
    output_name,
    run_dtypes,
    save_trained,
)
from tunesmith.config import ModelSection, TrainSection, config_from_dict
from tunesmith.methods import FullConfig, IA3Config, LoRAConfig, PrefixTuningConfig
from tunesmith.registry import method_named


def run_config(tiny_dir, method, **train):
    return config_from_dict(
        {
            "model": {"path": str(tiny_dir), "dtype": "fp32", "device": "cpu"},
            "method": method,
            "data": {"datasets": ["unused.jsonl"]},
            "train": train,
        }
    )


def shapes(model) -> dict:
    return {n: (tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "section",
    [
        {"name": "lora", "r": 4, "dropout": 0.0},
        {"name": "ia3"},
        {"name": "prefix", "num_virtual_tokens": 4, "init": "random"},
        {"name": "full"},
    ],
    ids=["lora", "ia3", "prefix", "full"],
)
def test_the_planner_builds_the_model_train_runs(tiny_dir, section):
    cfg = run_config(tiny_dir, section)
    method, train = cfg.method, cfg.train
    assert (
        type(method)
        is {"lora": LoRAConfig, "ia3": IA3Config, "prefix": PrefixTuningConfig, "full": FullConfig}[
            section["name"]
        ]
    )
    real = build_model(method, model=cfg.model, train=train, compute_dtype=torch.float32)
    assert real.training and real.config.use_cache is False
    assert real.is_gradient_checkpointing is (method.name != "full")
    with torch.device("meta"):
        planned = build_model(
            method,
            model_config=AutoConfig.from_pretrained(tiny_dir),
            train=train,
            compute_dtype=torch.float32,
            attention="eager",
        )
    assert shapes(planned) == shapes(real)


def test_dtypes_and_output_by_method(tiny_dir):
    cfg = run_config(tiny_dir, "full")
    cfg.model.dtype = "bf16"
    assert run_dtypes(cfg, "cpu") == (torch.bfloat16, torch.float32)  # fp32 master weights
    cfg.train.fp32_master_weights = False
    assert run_dtypes(cfg, "cpu") == (torch.bfloat16, torch.bfloat16)
    lora = run_config(tiny_dir, "lora")
    lora.model.dtype = "bf16"
    assert run_dtypes(lora, "cpu") == (torch.bfloat16, torch.bfloat16)
    qlora = run_config(tiny_dir, {"name": "qlora", "compute_dtype": "fp32"})
    qlora.model.dtype = "bf16"
    assert run_dtypes(qlora, "cpu").compute == torch.float32  # the method's compute dtype wins
    assert output_name(method_named("full")) == "model"
    assert output_name(method_named("ia3")) == "adapter"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_save_trained_and_load_trained_round_trip(tiny_dir, tmp_path, method):
    cfg = run_config(tiny_dir, method)
    spec = method_named(method)
    model = build_model(cfg.method, model=cfg.model, train=cfg.train, compute_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    save_trained(model, spec, tmp_path / "w")
    fresh = build_model(cfg.method, model=cfg.model, train=cfg.train, compute_dtype=torch.float32)
    load_trained(fresh, spec, tmp_path / "w", "cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_load_for_inference_names_adapters_by_folder(tiny_dir, tmp_path):
    model = build_model(
        LoRAConfig(r=2),
        model=ModelSection(path=str(tiny_dir)),
        train=TrainSection(),
        compute_dtype=torch.float32,
    )
    tunesmith.save_adapter(model, tmp_path / "chat")
    chat_tokenizer().save_pretrained(tmp_path / "chat")
    loaded, tokenizer, names = load_for_inference(None, [str(tmp_path / "chat")], device="cpu")
    assert names == ["chat"] and tunesmith.active_adapters(loaded) == ["chat"]
    assert not loaded.training and tokenizer.pad_token is not None
