"""Every adapter method through `tunesmith train`: exact resume, learning the task, and one-line
errors for bad settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.methods import (
    ours,
)
from helpers.models import ARCHS, VOCAB, logits, make_model
from helpers.runs import make_config, quiet
from torch import nn

import tunesmith
from tunesmith.config import config_from_dict
from tunesmith.errors import AdapterError, TunesmithError
from tunesmith.methods.prompt.layer import virtual_tokens
from tunesmith.train import checkpoint as checkpoint_module
from tunesmith.train.loop import train

# --- training through `tunesmith train` --------------------------------------------------------
METHOD_SETTINGS = {
    "prompt": ({"name": "prompt", "num_virtual_tokens": 4, "init": "random"}, 3e-1),
    "prefix": ({"name": "prefix", "num_virtual_tokens": 4}, 1e-1),
    "prefix-mlp": (
        {
            "name": "prefix",
            "num_virtual_tokens": 4,
            "projection": True,
            "encoder_hidden_size": 16,
            "init": "random",
        },
        2e-2,
    ),
    "bottleneck": (
        {"name": "bottleneck", "style": "houlsby", "reduction_factor": 4, "dropout": 0.1},
        2e-2,
    ),
    "ia3": ({"name": "ia3"}, 1.5e-1),
}


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_training_resumes_exactly(tmp_path, tiny_dir, method):  # noqa: F811
    settings, lr = METHOD_SETTINGS[method]
    steps = {
        "max_steps": 8,
        "save_every_steps": 4,
        "micro_batch_size": 2,
        "lr": lr,
        "gradient_checkpointing": True,
    }
    straight_cfg = make_config(tmp_path / "a", tiny_dir, method=settings, train=steps)
    straight: list[float] = []
    summary = train(straight_cfg, on_step=lambda s, e: straight.append(e["loss"]), progress=quiet())
    assert summary["method"] == settings["name"]
    cfg = make_config(tmp_path / "b", tiny_dir, method=settings, train=steps)

    class Killed(Exception):
        pass

    first: list[float] = []

    def kill_at_4(step, entry):
        first.append(entry["loss"])
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_4, progress=quiet())
    assert [p.name for p in checkpoint_module.list_checkpoints(cfg.output_dir)] == ["step-000004"]
    resumed: list[float] = []
    train(cfg, resume="latest", on_step=lambda s, e: resumed.append(e["loss"]), progress=quiet())
    assert first + resumed == straight  # exact
    # the final adapter is written
    out = Path(cfg.output_dir)
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_longer_training_of_each_method_learns_the_task(tmp_path, tiny_dir):  # noqa: F811
    for method, (settings, lr) in METHOD_SETTINGS.items():
        cfg = make_config(
            tmp_path / method, tiny_dir, method=settings, train={"max_steps": 30, "lr": lr}
        )
        losses: list[float] = []
        train(cfg, on_step=lambda s, e, out=losses: out.append(e["loss"]), progress=quiet())
        # virtual tokens only steer a random model's attention: a smaller, still clear drop
        ratio = 0.9 if method.startswith(("prompt", "prefix")) else 0.8
        assert sum(losses[-5:]) < ratio * sum(losses[:5]), method


# --- bad settings ------------------------------------------------------------------------------
def test_zero_virtual_tokens_is_refused(tmp_path, tiny_dir):  # noqa: F811
    with pytest.raises(
        AdapterError, match="^num_virtual_tokens must be a positive integer, got 0$"
    ):
        tunesmith.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(TunesmithError, match="method.num_virtual_tokens"):
        make_config(tmp_path, tiny_dir, method={"name": "prefix", "num_virtual_tokens": 0})


def test_config_errors_name_the_problem(tmp_path, tiny_dir):  # noqa: F811
    with pytest.raises(TunesmithError, match="data.packing cannot be used with method prompt"):
        make_config(tmp_path, tiny_dir, method="prompt", data={"packing": True})
    with pytest.raises(TunesmithError, match='init "text" needs init_text'):
        make_config(tmp_path, tiny_dir, method={"name": "prompt", "init": "text"})
    with pytest.raises(TunesmithError, match="projection=true computes from an MLP"):
        make_config(tmp_path, tiny_dir, method={"name": "prefix", "projection": True})
    config = make_config(tmp_path, tiny_dir, method="ia3", train={"lr": None})
    assert config.train.lr == 3e-3  # the method's default


class NoCacheBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        return self.embed(input_ids) if inputs_embeds is None else inputs_embeds


class NoCacheModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type(
            "Config", (), {"num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 8}
        )()
        self.backbone = NoCacheBackbone()

    @property
    def base_model(self):
        return self.backbone

    def get_input_embeddings(self):
        return self.backbone.embed


def test_prefix_needs_attention_that_takes_past_key_values():
    with pytest.raises(
        AdapterError,
        match=r"^prefix tuning cannot be used with NoCacheBackbone: its attention takes no past "
        r"key/values \(forward has neither a cache nor a past_key_values argument\); use prompt "
        r"tuning or LoRA$",
    ):
        tunesmith.add_prefix_tuning(NoCacheModel())
    tunesmith.add_prompt_tuning(NoCacheModel(), ours("prompt", init="random"))  # prompt is fine


def test_adapter_errors():
    model = make_model("llama")
    tunesmith.add_prompt_tuning(model, ours("prompt", init="random"), name="p")
    tunesmith.add_prefix_tuning(model, ours("prefix"), name="q")
    with pytest.raises(AdapterError, match="only one set of virtual tokens can be active"):
        tunesmith.set_active(model, ["p", "q"])
    with pytest.raises(AdapterError, match=r"adapter 'q' \(prefix\) cannot be merged"):
        tunesmith.merge(model, ["q"])
    with pytest.raises(AdapterError, match="route\\(\\) cannot give rows different virtual"):
        with tunesmith.route(model, ["p", None, None]):
            pass
    tunesmith.add_bottleneck(model, name="b")
    with pytest.raises(AdapterError, match=r"adapter 'b' \(bottleneck\) cannot be merged"):
        tunesmith.merge(model, ["b"])
    tunesmith.add_lora(model, tunesmith.LoRAConfig(r=2, targets=["k_proj"]), name="l")
    with pytest.raises(AdapterError, match="already has LoRA adapters; LoRA and IA3 cannot share"):
        tunesmith.add_ia3(model)
    with pytest.raises(AdapterError, match="feedforward must be a subset of targets"):
        tunesmith.add_ia3(model, tunesmith.IA3Config(targets=["v_proj"], feedforward=["down_proj"]))
    with pytest.raises(AdapterError, match="reduction_factor 64 leaves no bottleneck"):
        tunesmith.add_bottleneck(model, tunesmith.BottleneckConfig(reduction_factor=64), name="c")
    for name in ("p", "q", "b", "l"):
        tunesmith.delete_adapter(model, name)
    assert virtual_tokens(model) is None
    assert not [n for n, _ in model.named_modules() if "tunesmith" in n]
    torch.testing.assert_close(logits(model), logits(make_model("llama")), atol=0, rtol=0)


def test_a_prefix_for_another_model_is_refused(tmp_path):
    model = make_model("llama")
    tunesmith.add_prefix_tuning(model, ours("prefix"))
    tunesmith.save_adapter(model, tmp_path)
    with pytest.raises(
        AdapterError,
        match="the prefix is for 2 layers × 16 key/value dims but GPT2LMHeadModel has 2 × 32",
    ):
        tunesmith.load_adapter(make_model("gpt2"), tmp_path)


def test_every_method_is_in_the_schema():
    from tunesmith.config import schema_text

    text = schema_text()
    for name in ("prompt", "prefix", "bottleneck", "ia3"):
        assert f"method {name}" in text
    assert config_from_dict  # imported for make_config's users
    assert ARCHS
