"""The run config: defaults, every problem reported at once with its YAML path and line,
did-you-mean, overrides, and the documented schema."""

from __future__ import annotations

import textwrap

import pytest

from tunesmith import LoRAConfig
from tunesmith.config import (
    ConfigError,
    DataSection,
    DatasetSource,
    EvalSection,
    ModelSection,
    RunConfig,
    TrainSection,
    config_from_dict,
    config_yaml,
    load_config,
    schema_text,
)
from tunesmith.methods.schema import fields_of
from tunesmith.objectives import registered_objectives
from tunesmith.registry import registered_methods

MINIMAL = {"model": {"path": "m"}, "data": {"datasets": ["train.jsonl"]}}


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(call) -> list[str]:
    with pytest.raises(ConfigError) as info:
        call()
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_defaults_follow_the_cheat_sheet():
    cfg = config_from_dict(MINIMAL)
    assert cfg.method.name == "lora"
    assert (cfg.method.r, cfg.method.alpha, cfg.method.dropout) == (16, 32.0, 0.05)
    assert cfg.method.targets == "all-linear"
    assert cfg.train.lr == 2e-4 and cfg.train.gradient_checkpointing is True
    assert cfg.model.trust_remote_code is False
    assert cfg.data.datasets[0].path == "train.jsonl" and cfg.data.datasets[0].format == "auto"
    full = config_from_dict({**MINIMAL, "method": "full"})
    assert full.method.name == "full"
    assert full.train.lr == 2e-5 and full.train.gradient_checkpointing is False
    explicit = config_from_dict({**MINIMAL, "method": "full", "train": {"lr": 1e-3}})
    assert explicit.train.lr == 1e-3


def test_lora_section_becomes_the_library_config():
    cfg = config_from_dict({**MINIMAL, "method": {"r": 8, "use_dora": True, "targets": ["q_proj"]}})
    assert cfg.method == LoRAConfig(r=8, use_dora=True, targets=["q_proj"])


def test_every_problem_at_once_with_path_and_line(tmp_path):
    path = write(
        tmp_path,
        """\
        model:
          path: ./m
          dtype: bf17
        method:
          name: lora
          r: 0
          alpah: 16
        data:
          datasets:
            - path: a.jsonl
              format: chatt
          chat_template: chatm
        train:
          lr: fast
          epoch: 3
          gradient_checkpointing: maybe
        modle: {}
        """,
    )
    p = str(path)
    assert problems(lambda: load_config(path)) == [
        f'{p}:3: model.dtype: expected one of auto, bf16, fp16, fp32, got "bf17"; '
        'did you mean "bf16"?',
        f"{p}:6: method.r: must be > 0, got 0",
        f'{p}:7: method.alpah: unknown key for method "lora"; did you mean "alpha"?',
        f"{p}:11: data.datasets.0.format: expected one of auto, alpaca, chat, completion, "
        f'tokenized, preference, unpaired, prompt, got "chatt"; did you mean "chat"?',
        f'{p}:12: data.chat_template: unknown template "chatm"; did you mean "chatml"? (choose '
        "auto, tokenizer, alpaca, chatml, llama-3, or a .jinja file)",
        f'{p}:14: train.lr: expected a number, got "fast"',
        f'{p}:15: train.epoch: unknown key; did you mean "epochs"?',
        f'{p}:16: train.gradient_checkpointing: expected true or false, got "maybe"',
        f'{p}:17: modle: unknown key; did you mean "model"?',
    ]


def test_missing_sections_and_method_names():
    assert problems(lambda: config_from_dict({"data": {"datasets": []}})) == [
        "<config>: model: required; add it",
        "<config>: data.datasets: must not be empty",
    ]
    assert problems(lambda: config_from_dict({**MINIMAL, "method": "lorra"})) == [
        "<config>: method.name: expected one of full, lora, qlora, prompt, prefix, bottleneck, "
        'ia3, got "lorra"; '
        'did you mean "lora"?'
    ]
    assert problems(lambda: config_from_dict({**MINIMAL, "method": {"name": "full", "r": 8}})) == [
        '<config>: method.r: unknown key for method "full" (known: name)'
    ]


def test_section_level_rules():
    data = {"datasets": [{"path": "a", "format": "alpaca", "fields": {"outptu": "x"}}]}
    assert problems(lambda: config_from_dict({**MINIMAL, "data": data})) == [
        '<config>: data.datasets.0: fields: unknown key "outptu" for format alpaca; did you '
        'mean "output"? (known: instruction, input, output, system)'
    ]
    both = {"datasets": ["a.jsonl"], "validation": ["b.jsonl"], "val_fraction": 0.1}
    assert problems(lambda: config_from_dict({**MINIMAL, "data": both})) == [
        "<config>: data: set either validation (files) or val_fraction, not both"
    ]
    roles = {"datasets": [{"path": "a", "roles": {"bot": "helper"}}]}
    assert problems(lambda: config_from_dict({**MINIMAL, "data": roles})) == [
        '<config>: data.datasets.0: roles: "helper" is not a role; map to system, user, '
        "assistant or tool"
    ]


def test_overrides(tmp_path):
    path = write(
        tmp_path,
        """\
        model: {path: m}
        method: lora
        data:
          datasets:
            - path: a.jsonl
        """,
    )
    cfg = load_config(
        path, ["train.lr=1e-4", "method.r=8", "data.datasets.0.weight=2", "data.packing=true"]
    )
    assert cfg.train.lr == 1e-4 and cfg.method.r == 8
    assert cfg.data.datasets[0].weight == 2.0 and cfg.data.packing is True
    assert load_config(path, ["method=full"]).method.name == "full"
    # a section given by name takes a key: `objective.beta` on `objective: dpo` (or none: sft)
    dpo = load_config(path, ["objective=dpo", "objective.beta=0.3", "data.packing=false"])
    assert dpo.objective.name == "dpo" and dpo.objective.beta == 0.3
    assert load_config(path, ["method.targets=[q_proj, v_proj]"]).method.targets == [
        "q_proj",
        "v_proj",
    ]
    p = str(path)
    assert problems(lambda: load_config(path, ["train.lr=fast", "method.rr=3"])) == [
        f'{p} (command-line override): method.rr: unknown key for method "lora"; did you mean "r"?',
        f'{p} (command-line override): train.lr: expected a number, got "fast"',
    ]
    assert problems(lambda: load_config(path, ["train.lr"])) == [
        "override 'train.lr': expected key=value, e.g. train.lr=1e-4"
    ]
    assert problems(lambda: load_config(path, ["data.datasets.3.path=x"])) == [
        "override 'data.datasets.3.path=x': data.datasets has 1 entries; index with 0..0"
    ]
    assert problems(lambda: load_config(path, ["model.path.x=1"])) == [
        "override 'model.path.x=1': model.path is a value, not a section"
    ]


def test_file_errors(tmp_path):
    assert problems(lambda: load_config(tmp_path / "nope.yaml")) == [
        f"{tmp_path / 'nope.yaml'}: no such config file"
    ]
    bad = write(tmp_path, "model:\n  path: [unclosed\n")
    (line,) = problems(lambda: load_config(bad))
    assert line.startswith(f"{bad}:3: not valid YAML (")
    listed = write(tmp_path, "- a\n- b\n")
    assert problems(lambda: load_config(listed)) == [
        f"{listed}: expected a mapping of sections (model, data, ...)"
    ]


def test_every_field_is_documented_in_the_schema():
    text = schema_text()
    for cls in [RunConfig, ModelSection, DataSection, DatasetSource, TrainSection, EvalSection]:
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no docstring"
            assert f"{name}:" in text
    for cls in [method.config for method in registered_methods()]:
        for name, field in fields_of(cls).items():
            assert field.description, f"{cls.__name__}.{name} has no docstring"
    for objective in registered_objectives():
        for name, field in objective.config.model_fields.items():
            assert name == "name" or field.description, f"{objective.name}.{name}: no docstring"
        assert f"objective:  # objective {objective.name}" in text
    assert "  lr: null  # float | null. Peak learning rate. Default: the method's own" in text
    assert "  path: (required)  # str. Base model" in text


def test_resolved_yaml_round_trips(tmp_path):
    cfg = config_from_dict({**MINIMAL, "method": {"r": 4}})
    path = tmp_path / "resolved.yaml"
    path.write_text(config_yaml(cfg))
    assert load_config(path) == cfg
