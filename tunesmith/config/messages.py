"""Rendering a run config's problems: one line per problem, `file:line: yaml.path: what is
wrong`, with did-you-mean for misspelt keys and values and the tunesmith key for keys other
tools use (`FOREIGN_KEYS`)."""

from __future__ import annotations

import difflib
import json
from typing import Any, get_args

from pydantic import BaseModel

from tunesmith.errors import TunesmithError
from tunesmith.methods.schema import fields_of
from tunesmith.objectives import find_objective
from tunesmith.registry import find_method, method_names


class ConfigError(TunesmithError):
    """A run config with problems. `problems` holds one line per problem, each naming the file,
    line and YAML path; `str()` joins them with newlines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


FOREIGN_KEYS = {
    # Axolotl, LLaMA-Factory, TRL / transformers TrainingArguments, PEFT: their key -> ours
    "base_model": "model.path",
    "model_name_or_path": "model.path",
    "base_model_config": "model.path",
    "tokenizer_config": "model.tokenizer",
    "tokenizer_name_or_path": "model.tokenizer",
    "trust_remote_code": "model.trust_remote_code",
    "bf16": "model.dtype (bf16)",
    "fp16": "model.dtype (fp16)",
    "torch_dtype": "model.dtype",
    "adapter": "method.name (lora or qlora)",
    "finetuning_type": "method.name",
    "load_in_4bit": "method.name: qlora",
    "load_in_8bit": "method.name: qlora with quant: int8",
    "lora_r": "method.r",
    "lora_rank": "method.r",
    "lora_alpha": "method.alpha",
    "lora_dropout": "method.dropout",
    "lora_target_modules": "method.targets",
    "lora_target": "method.targets",
    "target_modules": "method.targets",
    "lora_target_linear": "method.targets: all-linear",
    "use_rslora": "method.use_rslora",
    "use_dora": "method.use_dora",
    "peft_use_dora": "method.use_dora",
    "learning_rate": "train.lr",
    "lr": "train.lr",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "micro_batch_size": "train.micro_batch_size",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "max_steps": "train.max_steps",
    "lr_scheduler": "train.schedule",
    "lr_scheduler_type": "train.schedule",
    "warmup_steps": "train.warmup_steps",
    "warmup_ratio": "train.warmup_ratio",
    "optimizer": "train.optimizer",
    "optim": "train.optimizer",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "seed": "train.seed",
    "torch_compile": "train.compile",
    "use_liger_kernel": "train.kernels: liger",
    "liger_kernel": "train.kernels: liger",
    "activation_offloading": "train.offload_activations",
    "offload_activations": "train.offload_activations",
    "padding_free": "train.padding_free",
    "save_steps": "train.save_every_steps",
    "save_total_limit": "train.keep_last",
    "logging_steps": "train.log_every_steps",
    "eval_steps": "eval.every_steps",
    "sequence_len": "data.max_seq_len",
    "cutoff_len": "data.max_seq_len",
    "max_seq_length": "data.max_seq_len",
    "max_length": "data.max_seq_len",
    "sample_packing": "data.packing",
    "packing": "data.packing",
    "train_on_inputs": "data.train_on_inputs",
    "chat_template": "data.chat_template",
    "template": "data.chat_template",
    "datasets": "data.datasets",
    "dataset": "data.datasets",
    "val_set_size": "data.val_fraction",
    "eval_dataset": "data.validation",
    "dataset_text_field": "data.datasets[].fields (text: your field)",
    "type": "data.datasets[].format (alpaca, chat, completion or tokenized)",
    "data_files": "data.datasets[].path",
    "output_dir": "output_dir",
}
"""Keys people bring from other tools, with the tunesmith key each one means."""


def _foreign_hint(loc: tuple) -> str | None:
    """ "tunesmith calls this X" for a key another tool uses, unless X is where it stands."""
    name = loc[-1]
    ours = FOREIGN_KEYS.get(name) if isinstance(name, str) else None
    if ours is None:
        return None
    here = ".".join(str(p) if not isinstance(p, int) else "[]" for p in loc).replace(".[]", "[]")
    if ours.split(" ")[0] == here:
        return None
    return f"tunesmith calls this {ours}"


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""


def shown(value: Any) -> str:
    if value is None:
        return "null"
    text = json.dumps(value, default=str)
    if isinstance(value, (str, int, float, bool)) or len(text) <= 60:
        return text
    return text[:57] + "..."


def clean_loc(loc: tuple, raw: dict) -> tuple:
    """Drop the tags pydantic puts in paths through discriminated unions (method.lora.r ->
    method.r) and through str-or-list unions (targets.list[str] -> targets)."""
    out: list[Any] = []
    node: Any = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict) and not out[-1:] == [part] and _is_tag(part, node):
            continue
        elif isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool")):
            continue
        else:
            node = None
        out.append(part)
    return tuple(out)


def _is_tag(part: Any, node: dict) -> bool:
    return node.get("name") == part or find_method(part) is not None


def _section_class(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model at `loc` (a cleaned path), for did-you-mean on unknown keys."""
    cls: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(part)
        if field is None:
            return None
        cls = model_in(field.annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None


TYPE_PHRASES = {
    ("float_parsing", "float_type"): "expected a number",
    ("int_parsing", "int_type", "int_from_float"): "expected a whole number",
    ("bool_parsing", "bool_type"): "expected true or false",
    ("string_type",): "expected text",
    ("list_type",): "expected a list",
    ("dict_type", "model_type", "model_attributes_type"): "expected a mapping",
}
"""pydantic's type errors, as said to a user (followed by `got <value>`)."""


def describe(
    root: type[BaseModel],
    loc: tuple,
    error: dict,
    raw: dict,
    source: str,
    lines: dict[tuple, int],
    overridden: set,
) -> str:
    """One problem as `where: yaml.path: what`; `root` is the schema's top-level model."""
    if error["type"] == "union_tag_invalid" and loc[-1:] != ("name",):
        loc = (*loc, "name")
    dotted = ".".join(map(str, loc)) or "(top level)"
    if any(loc[: len(o)] == o or o[: len(loc)] == loc for o in overridden):
        where = f"{source} (command-line override)"
    else:
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = f"{source}:{line}" if line else source
    return f"{where}: {dotted}: {_what(root, loc, error, raw)}"


def _what(root: type[BaseModel], loc: tuple, error: dict, raw: dict) -> str:
    """What is wrong, for one pydantic error at `loc`."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    for kinds, phrase in TYPE_PHRASES.items():
        if kind in kinds:
            return f"{phrase}, got {shown(value)}"
    if kind == "missing":
        return "required; add it"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return _unknown_key(root, loc, raw)
    if kind == "literal_error":
        choices = [
            c.strip(" '\"") for c in ctx.get("expected", "").replace(" or ", ", ").split(",")
        ]
        return f"expected one of {', '.join(choices)}, got {shown(value)}" + did_you_mean(
            value, choices
        )
    if kind == "union_tag_invalid":
        choices, tag = ctx.get("choices") or method_names(), ctx.get("tag")
        return f"expected one of {', '.join(choices)}, got {shown(tag)}" + did_you_mean(
            tag, choices
        )
    if kind == "union_tag_not_found":
        return f"missing name (one of {', '.join(method_names())})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}.get(kind, "<=")
        return f"must be {sign} {next(iter(ctx.values()))}, got {shown(value)}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {shown(value)}"


def _unknown_key(root: type[BaseModel], loc: tuple, raw: dict) -> str:
    """An unknown key: another tool's name for a tunesmith key, or did-you-mean, or the keys
    that section knows (a method section: that method's)."""
    parent = _section_class(root, loc[:-1])
    method = None
    if loc[:1] == ("method",):
        section = raw.get("method")
        method = find_method(section.get("name", "lora") if isinstance(section, dict) else None)
        parent = method.config if method else parent
    scope = f' for method "{method.name}"' if method else ""
    if loc[:1] == ("objective",):
        section = raw.get("objective")
        objective = find_objective(
            section.get("name", "sft") if isinstance(section, dict) else None
        )
        parent = objective.config if objective else parent
        scope = f' for objective "{objective.name}"' if objective else ""
    known = list(fields_of(parent)) if parent else []
    foreign = _foreign_hint(loc)
    hint = f"; {foreign}" if foreign else did_you_mean(loc[-1], known)
    return f"unknown key{scope}{hint or ''}" + ("" if hint else _known(known))


def _known(known: list[str]) -> str:
    return f" (known: {', '.join(known)})" if known else ""
