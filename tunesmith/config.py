"""The run schema: one YAML file describes a whole run, in sections (`model`, `method`, `data`,
`train`, `eval`, `output_dir`). The docstring under each field is its documentation, shown by
`tunesmith config schema`.

`load_config(path, overrides)` reads the YAML, applies `key=value` overrides and validates,
reporting every problem at once with its YAML path and line (`ConfigError`)."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.errors import TunesmithError

BUILTIN_TEMPLATE_NAMES = ("alpaca", "chatml", "llama-3")
FIELD_ROLES = {
    "alpaca": ("instruction", "input", "output", "system"),
    "chat": ("messages", "role", "content", "system"),
    "completion": ("text",),
    "tokenized": ("input_ids", "labels"),
}


class ConfigError(TunesmithError):
    """A run config with problems. `problems` holds one line per problem, each naming the file,
    line and YAML path; `str()` joins them with newlines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True
    )


class ModelSection(Section):
    path: str
    """Base model: a local checkpoint directory or a Hugging Face hub id."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id, when it is not the model's own."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Weights and compute dtype. "auto": bf16 on a GPU that supports it, fp16 on other GPUs,
    fp32 on CPU."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to run. "auto": cuda if present, then mps, then cpu."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel. "auto": transformers' choice (sdpa where available)."""
    trust_remote_code: bool = False
    """Run Python code shipped with the checkpoint. Off unless you trust its author."""


class FullMethod(Section):
    name: Literal["full"] = "full"
    """Full fine-tuning: every weight trains (about 16 bytes per parameter with AdamW)."""


class LoRAMethod(Section):
    name: Literal["lora"] = "lora"
    """LoRA: W + s·B·A with small trainable A and B; the base stays frozen."""
    r: int = Field(16, gt=0)
    """Rank of the update B·A."""
    alpha: float = Field(32.0, gt=0)
    """Scale numerator: s = alpha / r, or alpha / sqrt(r) with use_rslora."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter branch's input during training."""
    targets: str | list[str] = "all-linear"
    """Modules to adapt: "all-linear", a list of name suffixes (["q_proj", "v_proj"]) or a
    regex that matches the whole module name."""
    exclude: str | list[str] | None = None
    """Modules never to adapt: suffixes or a regex, as for targets."""
    layers: list[int] | None = None
    """Only adapt modules in these layer indices."""
    layers_pattern: str | list[str] | None = None
    """Name of the layer list ("layers", "h") used to find the layer index."""
    rank_pattern: dict[str, int] = {}
    """Per-module ranks: {regex matching the end of a module name: r}."""
    alpha_pattern: dict[str, float] = {}
    """Per-module alphas: {regex matching the end of a module name: alpha}."""
    use_rslora: bool = False
    """Rank-stabilised scaling s = alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): a trainable magnitude per output row."""
    init: Literal["default", "gaussian", "pissa"] = "default"
    """A/B initialisation: "default" (Kaiming A, zero B), "gaussian" or "pissa"."""
    modules_to_save: list[str] | None = None
    """Modules trained in full as a copy saved with the adapter, e.g. ["lm_head"]."""

    def to_lora_config(self):
        """The adapter library's `LoRAConfig` with these settings."""
        from tunesmith.adapters.lora import LoRAConfig

        names = {f.name for f in dataclass_fields(LoRAConfig)}
        return LoRAConfig(**{k: v for k, v in self.model_dump().items() if k in names})

    def to_adapter_config(self):
        return self.to_lora_config()


class QLoRAMethod(LoRAMethod):
    name: Literal["qlora"] = "qlora"
    """QLoRA: LoRA on a frozen base quantized to 4 or 8 bits (bitsandbytes)."""
    quant: Literal["nf4", "fp4", "int8"] = "nf4"
    """Base weight format: nf4 / fp4 (4-bit blockwise) or int8 (LLM.int8)."""
    double_quant: bool = True
    """4-bit: quantize the block constants too (about 4.127 bits per weight instead of 4.5)."""
    blocksize: Literal[64, 128, 256, 512, 1024, 2048, 4096] = 64
    """4-bit: weights per quantization block."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype of activations, norms, embeddings and the output head. "auto": model.dtype (bf16
    on a GPU that supports it, fp32 on CPU). Nothing is upcast to fp32 on a GPU."""


class _AdapterMethod(Section):
    """A method whose settings become one of the adapter library's config dataclasses."""

    def to_adapter_config(self):
        raise NotImplementedError

    @model_validator(mode="after")
    def _check_adapter_config(self):
        from tunesmith.errors import AdapterError

        try:
            self.to_adapter_config()
        except AdapterError as err:
            raise ValueError(str(err)) from None
        return self


class PromptMethod(_AdapterMethod):
    name: Literal["prompt"] = "prompt"
    """Prompt tuning: trainable virtual-token embeddings prepended to every input."""
    num_virtual_tokens: int = Field(20, gt=0)
    """How many virtual tokens."""
    init: Literal["vocab", "random", "text"] = "vocab"
    """Start from embeddings of random vocabulary tokens ("vocab"), of init_text ("text"), or
    random normal ones with the embeddings' scale ("random")."""
    init_text: str | None = None
    """Text whose token embeddings start the prompt (init "text")."""

    def to_adapter_config(self):
        from tunesmith.adapters.prompt import PromptTuningConfig

        return PromptTuningConfig(self.num_virtual_tokens, self.init, self.init_text)


class PrefixMethod(_AdapterMethod):
    name: Literal["prefix"] = "prefix"
    """Prefix tuning: trainable key/value prefixes in every attention layer."""
    num_virtual_tokens: int = Field(20, gt=0)
    """Prefix length in virtual tokens."""
    projection: bool = False
    """Train the prefix through an MLP (saved as its output, as PEFT does)."""
    encoder_hidden_size: int | None = Field(None, gt=0)
    """Hidden size of that MLP (default: the model's hidden size)."""
    init: Literal["vocab", "random", "text"] = "vocab"
    """Start from the keys/values of random vocabulary tokens ("vocab"), of init_text ("text"),
    or standard normal ones ("random", the only choice with projection)."""
    init_text: str | None = None
    """Text whose keys/values start the prefix (init "text")."""

    def to_adapter_config(self):
        from tunesmith.adapters.prompt import PrefixTuningConfig

        return PrefixTuningConfig(
            self.num_virtual_tokens, self.projection, self.encoder_hidden_size, self.init,
            self.init_text,
        )  # fmt: skip


class BottleneckMethod(_AdapterMethod):
    name: Literal["bottleneck"] = "bottleneck"
    """Bottleneck adapters: small residual MLPs after the attention and/or MLP sub-layers."""
    style: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    """"houlsby": after attention and after the MLP; "pfeiffer": after the MLP only."""
    reduction_factor: int = Field(16, gt=0)
    """Bottleneck width = hidden size / reduction_factor."""
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """Activation inside the bottleneck."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input during training."""
    targets: list[str] | None = None
    """Sub-layers to adapt (e.g. ["mlp"]); default from style."""
    layers: list[int] | None = None
    """Only adapt these layer indices."""

    def to_adapter_config(self):
        from tunesmith.adapters.bottleneck import BottleneckConfig

        return BottleneckConfig(
            self.style, self.reduction_factor, self.nonlinearity, self.dropout, self.targets,
            self.layers,
        )  # fmt: skip


class IA3Method(_AdapterMethod):
    name: Literal["ia3"] = "ia3"
    """IA3: learned scaling vectors on keys, values and the MLP's intermediate activation."""
    targets: str | list[str] | None = None
    """Modules to scale (default: PEFT's per architecture, e.g. k_proj, v_proj, down_proj)."""
    feedforward: str | list[str] | None = None
    """Which targets scale their input (default: the MLP's down projection)."""
    exclude: str | list[str] | None = None
    """Modules never to adapt."""
    modules_to_save: list[str] | None = None
    """Modules trained in full as a copy saved with the adapter."""

    def to_adapter_config(self):
        from tunesmith.adapters.ia3 import IA3Config

        return IA3Config(self.targets, self.feedforward, self.exclude, self.modules_to_save)


Method = Annotated[
    Union[  # noqa: UP007
        FullMethod,
        LoRAMethod,
        QLoRAMethod,
        PromptMethod,
        PrefixMethod,
        BottleneckMethod,
        IA3Method,
    ],  # fmt: skip
    Field(discriminator="name"),
]
METHOD_CLASSES = {
    "full": FullMethod, "lora": LoRAMethod, "qlora": QLoRAMethod, "prompt": PromptMethod,
    "prefix": PrefixMethod, "bottleneck": BottleneckMethod, "ia3": IA3Method,
}  # fmt: skip
DEFAULT_LR = {
    "full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "prompt": 3e-2, "prefix": 1e-2,
    "bottleneck": 1e-3, "ia3": 3e-3,
}  # fmt: skip
"""Peak learning rates when train.lr is not set: the usual choices for each method."""


class DatasetSource(Section):
    path: str
    """A .jsonl, .json, .csv or .parquet file, a folder of them, or a hub dataset id."""
    format: Literal["auto", "alpaca", "chat", "completion", "tokenized"] = "auto"
    """Record format: alpaca (instruction/input/output), chat (a list of messages, OpenAI
    role/content or ShareGPT from/value), completion (raw text; every token trains) or
    tokenized (input_ids, optional labels). "auto" decides from the first record's fields."""
    fields: dict[str, str] = {}
    """Field mapping {tunesmith's name: your field}. alpaca: instruction, input, output,
    system; chat: messages, role, content, system; completion: text; tokenized: input_ids,
    labels. Example: {output: response}."""
    roles: dict[str, str] = {}
    """Extra chat role names {your role: system|user|assistant|tool}. Built in: human→user,
    gpt→assistant, model→assistant, bot→assistant."""
    weight: float = Field(1.0, gt=0)
    """Mixing weight: each epoch draws weight × (number of samples) from this dataset
    (2.0 repeats it twice, 0.5 takes a random half)."""
    split: str = "train"
    """Split to read from a hub dataset (local files have one split)."""
    subset: str | None = None
    """Hub dataset configuration name (the `name` argument of datasets.load_dataset)."""
    revision: str | None = None
    """Hub revision of the dataset."""
    max_samples: int | None = Field(None, gt=0)
    """Read only the first N records."""

    @model_validator(mode="after")
    def _check_fields(self) -> DatasetSource:
        if self.format == "auto":
            known = sorted({k for keys in FIELD_ROLES.values() for k in keys})
        else:
            known = list(FIELD_ROLES[self.format])
        for key in self.fields:
            if key not in known:
                raise ValueError(
                    f"fields: unknown key {_shown(key)} for format {self.format}"
                    f"{_did_you_mean(key, known)}"
                    f" (known: {', '.join(known)})"
                )
        for role in self.roles.values():
            if role not in ("system", "user", "assistant", "tool"):
                raise ValueError(
                    f"roles: {_shown(role)} is not a role; map to system, user, assistant or tool"
                )
        return self


class DataSection(Section):
    datasets: list[DatasetSource] = Field(min_length=1)
    """Training data: one or more sources, mixed by weight. A plain string is a path."""
    validation: list[DatasetSource] = []
    """Validation data from files. Alternatively set val_fraction."""
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Hold out this fraction of each training dataset for validation (before weighting)."""
    max_seq_len: int = Field(2048, gt=1)
    """Longest sample in tokens; longer ones follow `truncation`."""
    truncation: Literal["truncate", "drop", "split"] = "truncate"
    """Samples longer than max_seq_len: "truncate" keeps the first max_seq_len tokens, "drop"
    skips them, "split" cuts them into consecutive pieces (for continued pre-training)."""
    packing: bool = False
    """Pack several samples into each row of max_seq_len tokens, with positions restarting per
    sample and no attention across samples."""
    train_on_inputs: bool = False
    """Train on every token, prompts included. Default: only assistant turns (with their
    end-of-turn token) and completion text train."""
    chat_template: str = "auto"
    """How chat and alpaca records become text. "auto": the tokenizer's chat template, else the
    built-in "alpaca" template for alpaca data; "tokenizer": the tokenizer's (an error if it has
    none); a built-in name (alpaca, chatml, llama-3); or a path to a .jinja file."""
    system_prompt: str | None = None
    """System message added to records that have none."""
    add_eos: bool = True
    """Append the EOS token to completion samples (chat templates end turns themselves)."""
    cache_dir: str | None = None
    """Tokenized-data cache. Default: $TUNESMITH_CACHE, else ~/.cache/tunesmith/data."""
    num_proc: int | None = Field(None, gt=0)
    """Tokenizer processes. Default: one per CPU core, at most 8, for sources of 5,000
    records or more; 1 otherwise."""

    @field_validator("datasets", "validation", mode="before")
    @classmethod
    def _paths_as_sources(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("chat_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        if value in ("auto", "tokenizer", *BUILTIN_TEMPLATE_NAMES) or value.endswith(".jinja"):
            return value
        choices = ["auto", "tokenizer", *BUILTIN_TEMPLATE_NAMES]
        raise ValueError(
            f"unknown template {_shown(value)}{_did_you_mean(value, choices)} "
            f"(choose {', '.join(choices)}, or a .jinja file)"
        )

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataSection:
        if self.validation and self.val_fraction:
            raise ValueError("set either validation (files) or val_fraction, not both")
        return self


class TrainSection(Section):
    lr: float | None = Field(None, gt=0)
    """Peak learning rate. Default by method: full 2e-5, lora/qlora 2e-4, prompt 3e-2,
    prefix 1e-2, bottleneck 1e-3, ia3 3e-3."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps."""
    micro_batch_size: int = Field(2, gt=0)
    """Samples (or packed rows) per forward pass."""
    grad_accum_steps: int = Field(4, gt=0)
    """Micro-batches per optimizer step; the loss is normalised by the trained tokens of the
    whole accumulated batch."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    """Warm-up length as a fraction of all steps."""
    warmup_steps: int | None = Field(None, ge=0)
    """Warm-up length in steps (overrides warmup_ratio)."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    """AdamW (fused where available), or bitsandbytes' 8-bit / paged AdamW."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Decoupled weight decay."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""
    fp32_master_weights: bool = True
    """Full fine-tuning: keep the trained weights in fp32 and autocast the compute to
    model.dtype (mixed precision). false stores them in model.dtype (pure bf16: half the
    memory, e.g. an 8B model on one 80 GB GPU with adamw_8bit, at some precision cost)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass. Default: on for adapters, off for full."""
    seed: int = 42
    """Seed for initialisation, data order, splits and dropout."""
    deterministic: bool = False
    """Use deterministic kernels (slower), for exactly repeatable runs."""
    save_every_steps: int | None = Field(None, gt=0)
    """Write a checkpoint every N steps (and always at the end)."""
    keep_last: int = Field(2, gt=0)
    """Checkpoints to keep."""
    log_every_steps: int = Field(10, gt=0)
    """Log loss, lr and tokens/s every N steps."""


class EvalSection(Section):
    every_steps: int | None = Field(None, gt=0)
    """Validation loss and perplexity every N steps (and at the end when validation data
    exists)."""
    batch_size: int | None = Field(None, gt=0)
    """Samples per evaluation batch (default: train.micro_batch_size)."""
    generate_samples: int = Field(0, ge=0)
    """After training, answer this many validation prompts with the base model and the tuned
    one and print exact match, contains and ROUGE-L side by side (0: skip)."""
    max_new_tokens: int = Field(64, gt=0)
    """Longest generated answer in evaluation."""
    show_samples: int = Field(1, ge=0)
    """Example generations (prompt, reference, base and tuned answers) to print."""


class RunConfig(Section):
    model: ModelSection
    """The base model and how to load it."""
    method: Method = LoRAMethod()
    """How to train: a method name (lora, qlora, full, prompt, prefix, bottleneck, ia3) or a
    mapping with `name` and settings."""
    data: DataSection
    """Training and validation data."""
    train: TrainSection = TrainSection()
    """The optimisation loop."""
    eval: EvalSection = EvalSection()
    """Evaluation during and after training."""
    output_dir: str = "outputs/run"
    """Where checkpoints, metrics and the final adapter or model are written."""

    @field_validator("method", mode="before")
    @classmethod
    def _method_name_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "name" not in value:
            return {"name": "lora", **value}
        return value

    @model_validator(mode="after")
    def _method_defaults(self) -> RunConfig:
        full = self.method.name == "full"
        if self.method.name in ("prompt", "prefix") and self.data.packing:
            raise ValueError(
                f"data.packing cannot be used with method {self.method.name}: every sequence "
                "needs its own virtual tokens in front; set data.packing: false"
            )
        if self.train.lr is None:
            self.train.lr = DEFAULT_LR[self.method.name]
        if self.train.gradient_checkpointing is None:
            self.train.gradient_checkpointing = not full
        return self


# --- loading ---------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config from YAML, apply `key=value` overrides (dotted paths, list indices as
    numbers: `data.datasets.0.weight=2`) and validate. Raises `ConfigError` listing every
    problem, each as `file:line: yaml.path: what is wrong`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    text = path.read_text(encoding="utf-8")
    loader = yaml.SafeLoader(text)
    try:  # one parse: the node tree gives line numbers, and the values are built from it
        node = loader.get_single_node()
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{where}: not valid YAML ({problem})"]) from None
    finally:
        loader.dispose()
    lines = _line_numbers(node)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of sections (model, data, ...)"])
    return config_from_dict(raw, overrides, source=str(path), lines=lines)


def config_from_dict(
    raw: dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    source: str = "<config>",
    lines: dict[tuple, int] | None = None,
) -> RunConfig:
    """Validate a config given as a dict (after applying overrides); see `load_config`."""
    raw = json.loads(json.dumps(raw, default=str))  # deep copy, plain types
    lines = dict(lines or {})
    overridden: set[tuple] = set()
    problems = []
    for item in overrides:
        try:
            overridden.add(apply_override(raw, item))
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        errors = [(_clean_loc(tuple(e["loc"]), raw), e) for e in err.errors()]
        # A str-or-list field reports once per alternative; keep the most specific path.
        errors = [
            (loc, e)
            for loc, e in errors
            if not any(len(o) > len(loc) and o[: len(loc)] == loc for o, _ in errors)
        ]
        described = [_describe(loc, e, raw, source, lines, overridden) for loc, e in errors]
        raise ConfigError(sorted(described, key=_line_order)) from None


def _line_order(problem: str) -> tuple[int, int]:
    head = problem.split(": ", 1)[0]
    line = head.rsplit(":", 1)[-1]
    return (0, int(line)) if line.isdigit() else (1, 0)


def apply_override(raw: dict[str, Any], item: str) -> tuple:
    """Set one `dotted.key=value` in `raw` (the value parsed as YAML). Returns the key path."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError([f"override {item!r}: expected key=value, e.g. train.lr=1e-4"])
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    parts: list[Any] = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node, parts[depth] = _list_item(node, part, parts[: depth + 1], item), int(part)
            continue
        child = node.get(part)
        if depth == 0 and part == "method" and not isinstance(child, dict):
            child = node[part] = {"name": child or "lora"}  # `method: lora` then `method.r=8`
        elif isinstance(child, str) and part in ("datasets", "validation"):
            child = node[part] = [{"path": child}]
        elif child is None:
            child = node[part] = {}
        elif not isinstance(child, (dict, list)):
            where = ".".join(map(str, parts[: depth + 1]))
            raise ConfigError([f"override {item!r}: {where} is a value, not a section"])
        node = child
    last = parts[-1]
    if isinstance(node, list):
        _list_item(node, last, parts, item)
        node[int(last)] = value
        parts[-1] = int(last)
    else:
        node[last] = value
    return tuple(parts)


def _list_item(node: list, part: str, parts: list, item: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        where = ".".join(map(str, parts[:-1]))
        raise ConfigError(
            [f"override {item!r}: {where} has {len(node)} entries; index with 0..{len(node) - 1}"]
        )
    return node[int(part)]


def _line_numbers(node: yaml.Node | None, path: tuple = (), out: dict | None = None) -> dict:
    """Map each YAML path (keys and list indices) to its 1-based line."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, key_node.value)
            out[child] = key_node.start_mark.line + 1
            _line_numbers(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, value_node in enumerate(node.value):
            child = (*path, index)
            out[child] = value_node.start_mark.line + 1
            _line_numbers(value_node, child, out)
    return out


# --- error messages --------------------------------------------------------------------------


FOREIGN_KEYS = {
    # Axolotl, LLaMA-Factory, TRL / transformers TrainingArguments, PEFT: their key -> ours
    "base_model": "model.path", "model_name_or_path": "model.path",
    "base_model_config": "model.path", "tokenizer_config": "model.tokenizer",
    "tokenizer_name_or_path": "model.tokenizer", "trust_remote_code": "model.trust_remote_code",
    "bf16": "model.dtype (bf16)", "fp16": "model.dtype (fp16)", "torch_dtype": "model.dtype",
    "adapter": "method.name (lora or qlora)", "finetuning_type": "method.name",
    "load_in_4bit": "method.name: qlora", "load_in_8bit": "method.name: qlora with quant: int8",
    "lora_r": "method.r", "lora_rank": "method.r", "lora_alpha": "method.alpha",
    "lora_dropout": "method.dropout", "lora_target_modules": "method.targets",
    "lora_target": "method.targets", "target_modules": "method.targets",
    "lora_target_linear": "method.targets: all-linear", "use_rslora": "method.use_rslora",
    "use_dora": "method.use_dora", "peft_use_dora": "method.use_dora",
    "learning_rate": "train.lr", "lr": "train.lr", "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs", "micro_batch_size": "train.micro_batch_size",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps", "max_steps": "train.max_steps",
    "lr_scheduler": "train.schedule", "lr_scheduler_type": "train.schedule",
    "warmup_steps": "train.warmup_steps", "warmup_ratio": "train.warmup_ratio",
    "optimizer": "train.optimizer", "optim": "train.optimizer",
    "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "gradient_checkpointing": "train.gradient_checkpointing", "seed": "train.seed",
    "save_steps": "train.save_every_steps", "save_total_limit": "train.keep_last",
    "logging_steps": "train.log_every_steps", "eval_steps": "eval.every_steps",
    "sequence_len": "data.max_seq_len", "cutoff_len": "data.max_seq_len",
    "max_seq_length": "data.max_seq_len", "max_length": "data.max_seq_len",
    "sample_packing": "data.packing", "packing": "data.packing",
    "train_on_inputs": "data.train_on_inputs", "chat_template": "data.chat_template",
    "template": "data.chat_template", "datasets": "data.datasets", "dataset": "data.datasets",
    "val_set_size": "data.val_fraction", "eval_dataset": "data.validation",
    "dataset_text_field": "data.datasets[].fields (text: your field)",
    "type": "data.datasets[].format (alpaca, chat, completion or tokenized)",
    "data_files": "data.datasets[].path", "output_dir": "output_dir",
}  # fmt: skip
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


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    text = json.dumps(value, default=str)
    if isinstance(value, (str, int, float, bool)) or len(text) <= 60:
        return text
    return text[:57] + "..."


def _clean_loc(loc: tuple, raw: dict) -> tuple:
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
    return node.get("name") == part or part in METHOD_CLASSES


def _section_class(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model at `loc` (a cleaned path), for did-you-mean on unknown keys."""
    cls: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(part)
        if field is None:
            return None
        cls = _model_in(field.annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _describe(
    loc: tuple, error: dict, raw: dict, source: str, lines: dict[tuple, int], overridden: set
) -> str:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "missing":
        what = "required; add it"
    elif kind == "extra_forbidden":
        parent = _section_class(loc[:-1])
        if loc[:1] == ("method",):
            method = raw.get("method", {}).get("name", "lora")
            parent = METHOD_CLASSES.get(method, parent)
        known = list(parent.model_fields) if parent else []
        foreign = _foreign_hint(loc)
        hint = f"; {foreign}" if foreign else _did_you_mean(loc[-1], known)
        scope = (
            f' for method "{parent.model_fields["name"].default}"'
            if loc[:1] == ("method",) and parent
            else ""
        )
        what = f"unknown key{scope}{hint or ''}" + ("" if hint else _known(known))
    elif kind in ("float_parsing", "float_type"):
        what = f"expected a number, got {_shown(value)}"
    elif kind in ("int_parsing", "int_type", "int_from_float"):
        what = f"expected a whole number, got {_shown(value)}"
    elif kind in ("bool_parsing", "bool_type"):
        what = f"expected true or false, got {_shown(value)}"
    elif kind in ("string_type",):
        what = f"expected text, got {_shown(value)}"
    elif kind in ("list_type",):
        what = f"expected a list, got {_shown(value)}"
    elif kind in ("dict_type", "model_type", "model_attributes_type"):
        what = f"expected a mapping, got {_shown(value)}"
    elif kind == "literal_error":
        choices = [
            c.strip(" '\"") for c in ctx.get("expected", "").replace(" or ", ", ").split(",")
        ]
        what = (
            f"expected one of {', '.join(choices)}, got {_shown(value)}"
            f"{_did_you_mean(value, choices)}"
        )
    elif kind == "union_tag_invalid":
        choices = list(METHOD_CLASSES)
        loc = (*loc, "name") if loc[-1:] != ("name",) else loc
        what = (
            f"expected one of {', '.join(choices)}, got {_shown(ctx.get('tag'))}"
            f"{_did_you_mean(ctx.get('tag'), choices)}"
        )
    elif kind == "union_tag_not_found":
        what = f"missing name (one of {', '.join(METHOD_CLASSES)})"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}.get(kind, "<=")
        bound = next(iter(ctx.values()))
        what = f"must be {sign} {bound}, got {_shown(value)}"
    elif kind == "too_short":
        what = "must not be empty"
    elif kind == "value_error":
        what = str(ctx.get("error", error["msg"]))
    else:
        what = f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {_shown(value)}"
    dotted = ".".join(map(str, loc)) or "(top level)"
    if any(loc[: len(o)] == o or o[: len(loc)] == loc for o in overridden):
        where = f"{source} (command-line override)"
    else:
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = f"{source}:{line}" if line else source
    return f"{where}: {dotted}: {what}"


def _known(known: list[str]) -> str:
    return f" (known: {', '.join(known)})" if known else ""


# --- documentation and output ----------------------------------------------------------------


def schema_text() -> str:
    """The documented schema as commented YAML: every section and field with its default."""
    out = [
        "# tunesmith run config. Required fields are marked (required).",
        "# Override any field on the command line: tunesmith <verb> run.yaml train.lr=1e-4",
    ]
    _schema_lines(RunConfig, 0, out)
    return "\n".join(out) + "\n"


def _schema_lines(cls: type[BaseModel], indent: int, out: list[str]) -> None:
    pad = "  " * indent
    for name, field in cls.model_fields.items():
        doc = " ".join((field.description or "").split())
        sub = _model_in(field.annotation)
        if name == "method":
            out.append(f"{pad}# {doc}")
            for method_name, method_cls in METHOD_CLASSES.items():
                out.append(f"{pad}method:  # method {method_name}")
                _schema_lines(method_cls, indent + 1, out)
            continue
        if sub is not None and get_origin(field.annotation) is None:
            out.append(f"{pad}{name}:  # {doc}")
            _schema_lines(sub, indent + 1, out)
            continue
        if sub is not None:  # a list of sources
            out.append(f"{pad}{name}:  # {doc}")
            out.append(f"{pad}  - # each entry:")
            _schema_lines(sub, indent + 2, out)
            continue
        default = "(required)" if field.is_required() else _yaml_value(field.default)
        out.append(f"{pad}{name}: {default}  # {_type_name(field.annotation)}. {doc}")


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(str(a) for a in get_args(annotation))
    text = str(annotation).replace("typing.", "")
    for plain in ("int", "float", "str", "bool"):
        text = text.replace(f"<class '{plain}'>", plain)
    return text.replace("NoneType", "null").replace(" | None", " | null")


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def config_yaml(config: RunConfig) -> str:
    """The resolved config (defaults filled in) as YAML, as written next to a run's outputs."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
