"""Adding a method is one module: a method defined here, registered, then trained, saved,
loaded, merged (refused), deleted and planned through the public API and a YAML run, with no
change to the package. The "shift" method adds a trainable vector to the output of each
decoder layer's MLP."""

from __future__ import annotations

import json
import re
from typing import Literal

import pytest
import torch
import yaml
from helpers.models import input_ids, logits, make_model
from helpers.runs import ROOT, quiet, run_cli
from pydantic import Field
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import tunesmith
from tunesmith.adapters import (
    PREFIX,
    AdapterHolder,
    common_peft_keys,
    hidden_size,
    modules_of,
    register_adapter,
)
from tunesmith.config import TrainSection, config_from_dict, load_config
from tunesmith.errors import AdapterError
from tunesmith.methods.schema import field_name, method_config
from tunesmith.plan.recommend import methods_to_compare
from tunesmith.plan.trace import trace_step
from tunesmith.registry import Method, method_names, register_method, unregister_method
from tunesmith.train.loop import train


# --- the whole method --------------------------------------------------------------------------
@method_config
class ShiftConfig:
    """A trainable shift of each decoder layer's MLP output."""

    name: Literal["shift"] = field_name("shift")
    targets: list[str] = Field(default_factory=lambda: ["mlp"])
    """Sub-layers (names inside a numbered layer) whose output is shifted."""
    init: float = 0.0
    """Starting value of every shift (0: the fresh adapter changes nothing)."""


class Shifts(AdapterHolder):
    """The shifts of one sub-layer, applied by a forward hook on it."""

    on_output = True

    def __init__(self, sublayer: nn.Module) -> None:
        super().__init__()
        self._handle = sublayer.register_forward_hook(self._apply)

    def _apply(self, module, args, output):
        names = [n for n in self.active if n in self.adapters]
        if self.disabled or not names:
            return None
        h = output[0] if isinstance(output, tuple) else output
        for name in names:
            h = h + self.adapters[name].shift.to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def detach_from(self, model: nn.Module, module_name: str) -> None:
        self._handle.remove()
        parent, _, attr = module_name.rpartition(".")
        delattr(model.get_submodule(parent), attr)


class ShiftImplementation:
    def attach(self, model, config, *, name, trainable, tokenizer=None):
        hidden = hidden_size(model, "shift adapters")
        sublayers = [
            (n, m)
            for n, m in model.named_modules()
            if re.search(r"\.\d+\.", n + ".") and n.rsplit(".", 1)[-1] in config.targets
        ]
        if not sublayers:
            raise AdapterError(f"shift targets {config.targets} match no sub-layer")
        device = model.get_input_embeddings().weight.device
        for _, sublayer in sublayers:
            holder = getattr(sublayer, "test_shifts", None)
            if holder is None:
                holder = Shifts(sublayer)
                sublayer.add_module("test_shifts", holder)
            vector = nn.Module()
            vector.shift = nn.Parameter(torch.full((hidden,), config.init, device=device))
            holder.adapters[name] = vector
        register_adapter(model, name, config, trainable)

    def tensor_homes(self, model, name):
        return {
            f"{PREFIX}{n}.shift": (holder.adapters[name], "shift")
            for n, holder in modules_of(model, Shifts)
            if name in holder.adapters
        }

    def peft_config(self, model, name, config, *, base_path):
        return {
            **common_peft_keys(base_path),
            "peft_type": "TEST_SHIFT",
            "targets": config.targets,
            "init": config.init,
        }

    def config_from_peft(self, raw, *, source, model, folder):
        return ShiftConfig(targets=raw["targets"], init=raw["init"])


SHIFT = Method(
    name="shift",
    config=ShiftConfig,
    summary="Shift: a trainable vector added to each MLP output.",
    default_lr=1e-2,
    implementation=ShiftImplementation(),
    peft_types=("TEST_SHIFT",),
    merge_refusal="it shifts sub-layer outputs",
)


@pytest.fixture
def shift():
    register_method(SHIFT)
    yield SHIFT
    unregister_method("shift")


# --- through the public API ----------------------------------------------------------------------
def test_a_registered_method_works_through_the_public_api(shift, tmp_path):
    model = make_model("llama")
    before = logits(model)
    tunesmith.add_adapter(model, ShiftConfig(), name="s")
    assert torch.equal(logits(model), before)  # init 0 changes nothing
    counts = tunesmith.trainable_parameters(model)
    assert counts.trainable == 2 * 32  # two layers × hidden size
    with torch.no_grad():
        for _, holder in modules_of(model, Shifts):
            holder.adapters["s"].shift.normal_(0, 0.5)
    tuned = logits(model)
    assert not torch.allclose(tuned, before)
    with tunesmith.disabled(model):
        assert torch.equal(logits(model), before)

    tunesmith.save_adapter(model, tmp_path / "a", names=["s"])
    saved = json.loads((tmp_path / "a" / "s" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TEST_SHIFT" and saved["targets"] == ["mlp"]
    fresh = make_model("llama")
    tunesmith.load_adapter(fresh, tmp_path / "a", name="s")
    assert torch.allclose(logits(fresh), tuned, atol=1e-6)

    with pytest.raises(AdapterError, match="^adapter 's' \\(shift\\) cannot be merged: it shifts"):
        tunesmith.merge(model, ["s"])
    tunesmith.delete_adapter(model, "s")
    assert torch.equal(logits(model), before)
    assert not list(modules_of(model, Shifts))


def test_a_registered_method_is_validated_by_its_own_schema(shift):
    with pytest.raises(AdapterError, match="^ShiftConfig has no setting 'r'"):
        ShiftConfig(r=4)
    raw = {"model": {"path": "m"}, "data": {"datasets": ["d.jsonl"]}}
    cfg = config_from_dict({**raw, "method": {"name": "shift", "init": 0.5}})
    assert cfg.method == ShiftConfig(init=0.5)
    assert cfg.train.lr == 1e-2 and cfg.train.gradient_checkpointing is True
    with pytest.raises(tunesmith.TunesmithError) as err:
        config_from_dict({**raw, "method": {"name": "shift", "inti": 0.5}})
    assert str(err.value) == (
        '<config>: method.inti: unknown key for method "shift"; did you mean "init"?'
    )
    assert "shift" in method_names()


def test_a_registered_method_trains_from_a_yaml_run_and_is_planned(shift, tmp_path, tiny_dir):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"},
            ]
        }
    ] * 16
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tiny_dir), "dtype": "fp32", "device": "cpu"},
                "method": {"name": "shift"},
                "data": {
                    "datasets": [str(data)],
                    "max_seq_len": 32,
                    "cache_dir": str(tmp_path / "cache"),
                },
                "train": {
                    "max_steps": 8,
                    "micro_batch_size": 4,
                    "grad_accum_steps": 1,
                    "lr": 5e-2,
                    "log_every_steps": 1,
                },
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    summary = train(load_config(run_yaml), progress=quiet())
    assert summary["method"] == "shift"
    assert summary["trainable_parameters"] == 2 * 32
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out/metrics.jsonl").open()]
    assert losses[-1] < losses[0]
    folder = tmp_path / "out" / "adapter"
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "TEST_SHIFT"
    saved = load_file(folder / "adapter_model.safetensors")
    keys = [f"base_model.model.model.layers.{i}.mlp.test_shifts.shift" for i in range(2)]
    assert sorted(saved) == keys and all(float(t.abs().max()) > 0 for t in saved.values())
    base = tunesmith.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), folder)
    assert tunesmith.adapter_names(base) == ["default"]
    loaded = [holder.adapters["default"].shift for _, holder in modules_of(base, Shifts)]
    assert all(torch.equal(t, saved[k]) for t, k in zip(loaded, keys, strict=True))

    model_config = AutoConfig.from_pretrained(tiny_dir)
    train_section = TrainSection(gradient_checkpointing=True)
    traced = trace_step(model_config, ShiftConfig(), train_section, 32, 2, torch.float32, "eager")
    assert traced.trainable_params == 2 * 32
    assert traced.peak_bytes > traced.weights_bytes > 0
    assert "shift" in dict(methods_to_compare(ShiftConfig()))


def test_a_method_needs_a_name_field_and_a_new_name():
    class NoName:
        pass

    with pytest.raises(AdapterError, match="needs a field name"):
        register_method(Method("x", NoName, "x", 1e-3, implementation=object()))
    with pytest.raises(AdapterError, match="a method named 'lora' is already registered"):
        register_method(Method("lora", tunesmith.LoRAConfig, "another", 1e-3, object()))


def test_config_check_lists_registered_methods():
    run = run_cli("config", "check", str(ROOT / "examples/quickstart.yaml"), "method.name=shiftt")
    assert run.returncode == 2
    assert "method.name: expected one of full, lora, qlora, prompt, prefix, bottleneck, ia3" in (
        run.stderr
    )
    assert input_ids().shape == (3, 10)


def test_a_misspelt_hook_is_an_error_not_a_missing_hook():
    from tunesmith.registry import HOOKS, method_named

    lora = method_named("lora")
    assert lora.hook("prepare_training") is not None and lora.hook("load_base") is None
    with pytest.raises(AdapterError) as err:
        lora.hook("prepare_trainig")
    assert str(err.value) == (
        f"'prepare_trainig' is not a method hook; hooks: {', '.join(sorted(HOOKS))}"
    )
    assert method_named("qlora").hook("compute_dtype") is not None
