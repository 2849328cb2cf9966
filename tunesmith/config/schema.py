"""The run schema: one YAML file describes a whole run, in sections (`model`, `method`, `data`,
`train`, `eval`, `output_dir`). The docstring under each field is its documentation, shown by
`tunesmith config schema`. The `method` section is the chosen method's own config class (see
`tunesmith.methods`), looked up in the registry by `method.name`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from tunesmith.config.messages import did_you_mean, shown
from tunesmith.errors import AdapterError
from tunesmith.methods import LoRAConfig
from tunesmith.methods.schema import library_message
from tunesmith.objectives import find_objective, objective_names, objective_of
from tunesmith.objectives.sft import SFTConfig
from tunesmith.registry import find_method, method_names, method_of

BUILTIN_TEMPLATE_NAMES = ("alpaca", "chatml", "llama-3")
FIELD_ROLES = {
    "alpaca": ("instruction", "input", "output", "system"),
    "chat": ("messages", "role", "content", "system"),
    "completion": ("text",),
    "tokenized": ("input_ids", "labels"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt": ("prompt", "system"),
}


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
    attn_implementation: Literal[
        "auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = "auto"
    """Attention kernel. "auto": transformers' choice (sdpa where available). The flash
    attention ones take packed rows as variable-length sequences (see train.padding_free)."""
    init: Literal["pretrained", "random"] = "pretrained"
    """random: build the model from path's config.json with random weights instead of
    loading them (benchmarks of the real shape: a folder with config.json and a tokenizer is
    enough). The run's results mean nothing for a real task."""
    trust_remote_code: bool = False
    """Run Python code shipped with the checkpoint. Off unless you trust its author."""
    adapter: str | None = None
    """Start training from this adapter's weights (a folder `tunesmith train` or PEFT wrote,
    made with the same method settings): a GRPO or DPO run after a supervised one. Adapter
    methods only."""


class DatasetSource(Section):
    path: str
    """A .jsonl, .json, .csv or .parquet file, a folder of them, or a hub dataset id."""
    format: Literal[
        "auto", "alpaca", "chat", "completion", "tokenized", "preference", "unpaired", "prompt"
    ] = "auto"
    """Record format: alpaca (instruction/input/output), chat (a list of messages, OpenAI
    role/content or ShareGPT from/value), completion (raw text; every token trains),
    tokenized (input_ids, optional labels); for preference objectives, preference (prompt,
    chosen, rejected, as text or messages; or chosen and rejected sharing the prompt) and
    unpaired (prompt, completion, label true/false; KTO); for grpo, prompt (a prompt as text
    or messages, and any other columns, which the reward functions receive). "auto" decides
    from the first record's fields."""
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
                    f"fields: unknown key {shown(key)} for format {self.format}"
                    f"{did_you_mean(key, known)}"
                    f" (known: {', '.join(known)})"
                )
        for role in self.roles.values():
            if role not in ("system", "user", "assistant", "tool"):
                raise ValueError(
                    f"roles: {shown(role)} is not a role; map to system, user, assistant or tool"
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
    skips them, "split" cuts them into consecutive pieces (for continued pre-training). A
    preference pair is kept or dropped whole: "truncate" cuts the ends of both answers (the
    prompt stays whole), "drop" leaves the pair out; the counts are reported."""
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
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More arguments for the chat template, as `apply_chat_template(..., **kwargs)` takes
    them, e.g. `{enable_thinking: false}` for Qwen3."""
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
            f"unknown template {shown(value)}{did_you_mean(value, choices)} "
            f"(choose {', '.join(choices)}, or a .jinja file)"
        )

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataSection:
        if self.validation and self.val_fraction:
            raise ValueError("set either validation (files) or val_fraction, not both")
        return self


class TrainSection(Section):
    lr: float | None = Field(None, gt=0)
    """Peak learning rate. Default: the method's own (each method's `default_lr`; `tunesmith
    config check run.yaml --show` prints the value a run resolves to)."""
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
    fused_lora: bool = True
    """LoRA/QLoRA: train with tunesmith's own LoRA autograd (one pass and one saved input for
    q/k/v and for gate/up, fused matmuls). false uses the plain layer, as PEFT computes it."""
    kernels: Literal["auto", "torch", "liger"] = "auto"
    """RMSNorm, rotary embeddings, SwiGLU and the output head's cross-entropy: liger-kernel's
    Triton kernels (`pip install 'tunesmith[gpu]'`), or the model's own torch code. auto:
    liger on a CUDA device where it is installed, torch otherwise."""
    offload_activations: bool = False
    """Move each checkpointed layer input to pinned host memory during the forward (a side
    CUDA stream) and bring it back ahead of the backward. Needs gradient_checkpointing."""
    compile: bool = False
    """torch.compile each decoder layer (regional compilation, dynamic sequence length: no
    recompiles from step to step)."""
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """Under torchrun with several processes: ddp (the model replicated, every adapter method)
    or fsdp (FSDP2: parameters, gradients and optimizer states sharded per decoder layer).
    auto: fsdp for full fine-tuning, ddp for adapters. One process: ignored."""
    fsdp_cpu_offload: bool = False
    """fsdp on GPUs: keep each process's parameter shards, gradients and optimizer states in
    host memory (FSDP2's CPUOffloadPolicy; the optimizer steps on the CPU): the least GPU
    memory, at a large cost in speed."""
    dist_timeout_s: float = Field(600.0, gt=0)
    """Seconds a collective waits for the other processes before the run stops with an
    error naming the rank (a process that died or hangs)."""
    padding_free: Literal["auto", "on", "off"] = "auto"
    """With data.packing: give each micro-batch to the model as one row of variable-length
    sequences (no padding tokens at all). auto: on where attention runs a variable-length
    kernel (flash attention); "on" also elsewhere (transformers then masks per sequence)."""
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
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Experiment trackers that also get what metrics.jsonl records, the config and the
    evaluation table: tensorboard (event files in output_dir/tensorboard), wandb (WANDB_MODE,
    WANDB_PROJECT), mlflow (MLFLOW_TRACKING_URI, else a local store in output_dir). Each needs
    its extra: pip install -e ".[tensorboard]" (or wandb, mlflow)."""


class EvalSection(Section):
    every_steps: int | None = Field(None, gt=0)
    """Validation loss and perplexity every N steps (and at the end when validation data
    exists)."""
    batch_size: int | None = Field(None, gt=0)
    """Samples per evaluation batch (default: train.micro_batch_size)."""
    generate_samples: int = Field(0, ge=0)
    """After training, answer this many validation prompts with the base model and the tuned
    one and print exact match, contains, BLEU, chrF and ROUGE side by side (eval.json), with
    every answer in samples.jsonl for `tunesmith report` and `tunesmith review` (0: skip)."""
    max_new_tokens: int = Field(64, gt=0)
    """Longest generated answer in evaluation."""
    show_samples: int = Field(1, ge=0)
    """Example generations (prompt, reference, base and tuned answers) to print."""


class SweepRange(Section):
    """A range to sample from: floats, or integers when `low`, `high` (and `step`) are."""

    low: int | float
    high: int | float
    log: bool = False
    """Sample on a log scale (learning rates)."""
    step: int | float | None = Field(None, gt=0)
    """Only values `low + k * step` (and a finite grid for `sampler: grid`)."""

    @model_validator(mode="after")
    def _ordered(self) -> SweepRange:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("give log or step, not both")
        return self

    @property
    def integer(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))


LOWER_IS_BETTER = ("loss", "ppl", "perplexity")


class SweepSection(Section):
    space: dict[str, list[Any] | SweepRange] = Field(min_length=1)
    """What to search: each key a dotted config path (`train.lr`, `method.r`), each value a list
    of choices or a range `{low, high, log, step}`."""
    trials: int = Field(20, gt=0)
    """Trials in the whole study, across every worker sharing its storage."""
    metric: str = "val_loss"
    """What a trial is judged by: `val_loss`, `val_ppl`, `train_loss`, or a score of the
    end-of-training evaluation (`exact_match`, `rouge_l`, ..., with eval.generate_samples)."""
    direction: Literal["minimize", "maximize"] | None = None
    """Default: minimize for losses and perplexities, maximize for anything else."""
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    """Optuna's TPE, random search, or every combination (lists, and ranges with a step)."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Stop a trial whose validation loss (every eval.every_steps) falls behind: Optuna's
    median or Hyperband pruner, or none."""
    storage: str | None = None
    """Optuna's storage, any SQLAlchemy URL (`postgresql://user@host/db` for several machines);
    default: `sqlite:///OUTPUT_DIR/sweep/sweep.db`."""
    study: str | None = None
    """The study's name in the storage (default: output_dir's folder name)."""
    seed: int | None = None
    """The sampler's seed: the same trials again from scratch with one worker. Without it each
    worker seeds itself, so that several workers do not repeat each other's samples."""
    gpu: str | None = None
    """Plan every trial against this GPU (`4090`, `h100`, ... as `tunesmith plan --gpu`); a
    trial whose planned peak memory does not fit is skipped. Default: the GPU in use."""
    gpu_mem: str | None = None
    """Or against this much memory (`24GiB`)."""
    heartbeat_s: int = Field(30, gt=0)
    """A running trial's heartbeat: a trial silent for twice this (its worker was killed) is
    marked failed by the next worker."""

    @property
    def minimize(self) -> bool:
        if self.direction is not None:
            return self.direction == "minimize"
        return any(word in self.metric.lower() for word in LOWER_IS_BETTER)

    @field_validator("space")
    @classmethod
    def _choices(cls, space: dict) -> dict:
        for key, value in space.items():
            if isinstance(value, list) and not value:
                raise ValueError(f"{key}: give at least one choice")
        return space


class RunConfig(Section):
    model: ModelSection
    """The base model and how to load it."""
    method: Any = Field(default_factory=LoRAConfig)
    """How to train: a registered method's name (each is listed below) or a mapping with
    `name` and the method's settings."""
    objective: Any = Field(default_factory=SFTConfig)
    """What the loss is computed from: a registered objective's name (each is listed below) or
    a mapping with `name` and its settings. sft (the default): the answers' next-token loss;
    dpo, simpo, orpo and reward train on preference pairs, kto on unpaired examples."""
    data: DataSection
    """Training and validation data."""
    train: TrainSection = TrainSection()
    """The optimisation loop."""
    eval: EvalSection = EvalSection()
    """Evaluation during and after training."""
    output_dir: str = "outputs/run"
    """Where checkpoints, metrics and the final adapter or model are written."""
    sweep: SweepSection | None = None
    """A hyperparameter search for `tunesmith sweep` (ignored by `tunesmith train`)."""

    @field_validator("method", mode="before")
    @classmethod
    def _method_config(cls, value: Any) -> Any:
        # `config_from_dict` validates the section itself (for file:line errors); this serves
        # RunConfig(...) built in code.
        if _is_method_config(value):
            return value
        value = method_section(value)
        method = find_method(value.get("name")) if isinstance(value, dict) else None
        if method is None:
            raise ValueError(f"expected one of {', '.join(method_names())}")
        try:
            return TypeAdapter(method.config).validate_python(value)
        except ValidationError as err:
            raise ValueError(library_message(method.config, err)) from None

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_config(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            objective_of(value)  # a config object: refused unless registered
            return value
        objective = find_objective(value.get("name"))
        if objective is None:
            raise ValueError(f"expected one of {', '.join(objective_names())}")
        return objective.config.model_validate(value)

    @model_validator(mode="after")
    def _objective_data(self) -> RunConfig:
        objective = objective_of(self.objective)
        if objective.token_level:
            wants = {
                "preference": "dpo, simpo, orpo or reward",
                "unpaired": "kto",
                "prompt": "grpo",
            }
            for at, src in self._sources():
                if src.format in wants:
                    raise ValueError(
                        f"{at}.format is {src.format}, which the sft objective cannot train on; "
                        f"set objective.name to {wants[src.format]}"
                    )
            return self
        for at, src in self._sources():
            if src.format not in ("auto", *objective.formats):
                raise ValueError(
                    f"{at}.format is {src.format}, but objective {objective.name} trains on "
                    f"{' or '.join(objective.formats)} data"
                )
        if objective.output == "logits":  # distillation: supervised data, token by token
            return self
        if objective.output == "generation":  # grpo: prompts, whole completions
            if self.data.packing:
                raise ValueError(
                    f"data.packing cannot be used with objective {objective.name}: each "
                    "completion is scored whole; set data.packing: false"
                )
            return self
        if self.data.packing:
            raise ValueError(
                f"data.packing cannot be used with objective {objective.name}: each pair is "
                "scored as two whole sequences; set data.packing: false"
            )
        if self.data.truncation == "split":
            raise ValueError(
                f"data.truncation: split cannot be used with objective {objective.name}: a pair "
                "is never split; use truncate or drop"
            )
        return self

    def _sources(self):
        for name in ("datasets", "validation"):
            for i, src in enumerate(getattr(self.data, name)):
                yield f"data.{name}.{i}", src

    @model_validator(mode="after")
    def _method_defaults(self) -> RunConfig:
        method = method_of(self.method)
        if method.virtual_tokens and self.data.packing:
            raise ValueError(
                f"data.packing cannot be used with method {method.name}: every sequence "
                "needs its own virtual tokens in front; set data.packing: false"
            )
        if self.train.lr is None:
            self.train.lr = method.default_lr
        if self.train.gradient_checkpointing is None:
            self.train.gradient_checkpointing = method.trains_adapter
        if self.train.offload_activations and not self.train.gradient_checkpointing:
            raise ValueError(
                "train.offload_activations moves the checkpointed layer inputs, so it needs "
                "train.gradient_checkpointing: true"
            )
        return self


def method_section(value: Any) -> Any:
    """The `method:` shorthands: a bare name (`method: qlora`), or a mapping without `name`
    (LoRA)."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and "name" not in value:
        return {"name": "lora", **value}
    return value


def _is_method_config(value: Any) -> bool:
    try:
        method_of(value)
    except AdapterError:
        return False
    return True
