"""The loss of a batch of units for an objective other than sft, and its evaluation.

A batch holds whole units of consecutive rows (a preference pair: chosen, rejected). The policy
pass gives each row's summed answer log-probability (or a reward head's score); objectives with
a reference get the reference's from the batch (precomputed) or from a pass without gradient:
the same model with its adapters switched off, or a frozen copy (full fine-tuning). Both passes
run in one module call, so DDP and FSDP see a single forward per micro-batch."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from tunesmith.adapters import disabled
from tunesmith.data.encode import IGNORE_INDEX, SampleSet
from tunesmith.data.prepare import default_cache_dir
from tunesmith.errors import TrainingError
from tunesmith.io import atomic_write
from tunesmith.methods.schema import settings
from tunesmith.objectives.grpo.impl import grpo_loss
from tunesmith.objectives.registry import Objective
from tunesmith.objectives.rows import (
    ADVANTAGES,
    OLD_LOGPS,
    REFERENCE_LOGPS,
    REFERENCE_TOKEN_LOGPS,
    SCORE_HEAD,
    UNIT_FLAGS,
    Rows,
)
from tunesmith.train.batches import collate_units
from tunesmith.train.logps import sequence_logps, sequence_scores, token_logps
from tunesmith.train.loss import ALL_TRAINED, autocast_for


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether train mode changes the model's output: a dropout module with p > 0, or an
    attention dropout in its config."""
    config = getattr(model, "config", None)
    if any(getattr(config, k, 0) for k in ("attention_dropout", "attn_pdrop", "resid_pdrop")):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, needed: bool = True):
    """The model's own dropout off for the duration (the reference is deterministic); a
    no-op when `needed` is false (walking every module costs ~3 ms a step on a small model)."""
    was = model.training
    if needed:
        model.eval()
    try:
        yield
    finally:
        if needed:
            model.train(was)


@torch.no_grad()
def reference_pass(model, batch: dict, reference_model=None, dropout: bool | None = True) -> Rows:
    """The reference's log-probabilities of a batch, without gradient: `reference_model` (full
    fine-tuning's frozen copy), or `model` with its adapters off, in eval mode where train mode
    would change it (`dropout`: `has_dropout(model)`)."""
    if reference_model is not None:
        return sequence_logps(reference_model, batch)
    with eval_mode(model, dropout is not False), disabled(model):
        return sequence_logps(model, batch)


class UnitLoss:
    """`(model, batch) -> (sum of the units' losses, units, {metric: (sum, count)})`."""

    def __init__(self, objective: Objective, config, reference_model=None, group: int = 2):
        self.objective = objective
        self.config = config
        self.reference_model = reference_model
        """Full fine-tuning's frozen copy; None: the model itself with its adapters off."""
        self.group = group
        self._dropout: dict[int, bool] = {}

    def units(self, batch: dict) -> int:
        """What a step's summed loss is divided by: its units (pairs)."""
        return int(batch["input_ids"].shape[0]) // self.group

    def policy(self, model, batch: dict) -> Rows:
        if self.objective.output == "score":
            return sequence_scores(model, batch)
        return sequence_logps(model, batch)

    def reference(self, model, batch: dict) -> Rows:
        """The reference's log-probabilities: precomputed in the batch, or `reference_pass`."""
        if REFERENCE_LOGPS in batch:
            counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
            return Rows(batch[REFERENCE_LOGPS].float(), counts)
        if self.reference_model is None and id(model) not in self._dropout:
            self._dropout[id(model)] = has_dropout(model)
        return reference_pass(model, batch, self.reference_model, self._dropout.get(id(model)))

    def __call__(self, model, batch: dict):
        policy = self.policy(model, batch)
        reference = self.reference(model, batch) if self.objective.reference else None
        flags = batch.get(UNIT_FLAGS)
        per_unit, metrics = self.objective.impl.loss(self.config, policy, reference, flags)
        if self.objective.output == "logps" and "preference" in self.objective.formats:
            chosen, rejected = policy.pairs()
            metrics["logps_accuracy"] = ((chosen > rejected).float().sum(), len(chosen))
        return per_unit.sum(), len(per_unit), metrics


def unit_batches(
    samples: SampleSet,
    group: int,
    batch_size: int,
    pad_id: int,
    reference: np.ndarray | None = None,
    extras: object | None = None,
) -> Iterator[dict]:
    """Batches of `batch_size` whole units, in order (for evaluation and precomputing)."""
    units = len(samples) // group
    for at in range(0, units, batch_size):
        rows = list(range(at * group, min(units, at + batch_size) * group))
        yield collate_units(samples, rows, pad_id, reference, extras)


def add_metrics(totals: dict, metrics: dict) -> None:
    for name, (value, count) in metrics.items():
        s, c = totals.get(name, (0.0, 0))
        totals[name] = (s + float(value), c + int(count))


def means(totals: dict, prefix: str = "") -> dict:
    return {f"{prefix}{name}": s / c for name, (s, c) in totals.items() if c}


@torch.no_grad()
def evaluate_units(
    loss: UnitLoss,
    model,
    samples: SampleSet,
    batch_size: int,
    pad_id: int,
    device: str,
    autocast,
    reference: np.ndarray | None = None,
    loss_module=None,
    extras: object | None = None,
) -> dict:
    """The mean loss per unit (per answer token for distillation) and each metric's mean on
    `samples`: `val_loss`, `val_<metric>`."""
    was_training = model.training
    model.eval()
    total, units, totals = 0.0, 0, {}
    try:
        for batch in unit_batches(samples, loss.group, batch_size, pad_id, reference, extras):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                if loss_module is not None:
                    value, n, metrics = loss_module(batch)
                else:
                    value, n, metrics = loss(model, batch)
            total += float(value)
            units += n
            add_metrics(totals, metrics)
    finally:
        model.train(was_training)
    return {"val_loss": total / max(units, 1), **means(totals, "val_"), "val_units": units}


@torch.no_grad()
def reference_logps(
    model,
    samples: SampleSet,
    batch_size: int,
    pad_id: int,
    device: str,
    autocast,
    reference_model=None,
) -> np.ndarray:
    """Every sample's reference log-probability (summed over its answer tokens), once: the
    model with its adapters off (or `reference_model`), in eval mode."""
    out = np.zeros(len(samples), dtype=np.float32)
    dropout = reference_model is None and has_dropout(model)
    for at in range(0, len(samples), batch_size):
        rows = list(range(at, min(len(samples), at + batch_size)))
        batch = {k: v.to(device) for k, v in collate_units(samples, rows, pad_id).items()}
        with autocast():
            rows_logps = reference_pass(model, batch, reference_model, dropout)
            out[rows] = rows_logps.values.float().cpu().numpy()
    return out


def add_score_head(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A reward model's head: one scalar from the last hidden state (`model.score`, as
    transformers' sequence-classification models name it), fp32, trainable, initialised as
    transformers initialises it (normal, the config's initializer_range)."""
    hidden = model.config.hidden_size
    std = getattr(model.config, "initializer_range", 0.02)
    head = torch.nn.Linear(hidden, 1, bias=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
    device = model.get_input_embeddings().weight.device
    setattr(model, SCORE_HEAD, head.to(device))
    return head


def samples_digest(run):
    """A sha256 fed with the run's encoded train and validation samples."""
    digest = hashlib.sha256()
    for samples in (run.prepared.train, run.prepared.validation):
        if samples is not None:
            for array in (samples.input_ids, samples.labels, samples.offsets):
                digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(b"|")
    return digest


def reference_cache_key(run) -> str:
    """What the precomputed reference log-probabilities depend on: the encoded data (train and
    validation), the base model and how it is loaded, and the method's settings (a quantized or
    PiSSA-initialised base is another reference)."""
    cfg = run.config
    digest = samples_digest(run)
    identity = {
        "model": cfg.model.model_dump(exclude={"device"}),
        "method": {"name": cfg.method.name, **settings(cfg.method)},
        "dtype": str(run.dtype),
        "seed": cfg.train.seed,
    }
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def reference_logps_cached(run, device: str) -> dict:
    """`objective.precompute_reference`: every train and validation sample's reference
    log-probability, computed once with the model as built (adapters off) and kept in the
    data cache (`data.cache_dir`), so a resumed or repeated run reads them back."""
    cfg = run.config
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
    path = cache_dir / f"reference-{reference_cache_key(run)}.safetensors"
    if run.use_cache and path.is_file():
        found = load_file(str(path))
        run.progress.log(f"reference log-probabilities: read from {path}")
        return {"train": found["train"], "validation": found.get("validation")}
    size = cfg.eval.batch_size or cfg.train.micro_batch_size
    autocast = lambda: autocast_for(device.split(":")[0], run.dtype)  # noqa: E731
    pad = run.tokenizer.pad_token_id or 0
    out = {"train": reference_logps(run.model, run.prepared.train, size, pad, device, autocast)}
    if run.prepared.validation is not None and len(run.prepared.validation):
        out["validation"] = reference_logps(
            run.model, run.prepared.validation, size, pad, device, autocast
        )
    if run.use_cache:
        arrays = {k: v for k, v in out.items() if v is not None}
        atomic_write(path, lambda tmp: save_file(arrays, tmp))
    run.progress.log(
        f"reference log-probabilities: computed for {sum(len(v) for v in out.values())} "
        f"sequences" + (f", kept in {path}" if run.use_cache else "")
    )
    return {"train": out["train"], "validation": out.get("validation")}


def reward_method_config(method_config, method):
    """The method config a reward model trains with: the score head trained in full beside
    the adapter (`modules_to_save`, so PEFT loads it with the adapter), or with every weight
    (full fine-tuning). Methods that cannot save a whole module are refused in one line."""
    if not method.trains_adapter:
        return method_config
    if not hasattr(method_config, "modules_to_save"):
        raise TrainingError(
            f"objective reward trains a score head beside the adapter, which method "
            f"{method.name} cannot save; use method lora, qlora or ia3 (the head goes in "
            "modules_to_save) or full"
        )
    kept = list(method_config.modules_to_save or [])
    return dataclasses.replace(method_config, modules_to_save=[*kept, SCORE_HEAD])


def finish_reward_output(folder: Path, trains_adapter: bool, pad_token_id: int | None) -> None:
    """Make a reward model's output folder load as a sequence classifier: an adapter is a
    PEFT SEQ_CLS adapter (`AutoModelForSequenceClassification` + `PeftModel.from_pretrained`);
    a whole model's config names the architecture's ...ForSequenceClassification with one
    label (`AutoModelForSequenceClassification.from_pretrained(folder)`)."""
    name = "adapter_config.json" if trains_adapter else "config.json"
    path = folder / name
    config = json.loads(path.read_text())
    if trains_adapter:
        config["task_type"] = "SEQ_CLS"
    else:
        config["architectures"] = [
            a.replace("ForCausalLM", "ForSequenceClassification")
            for a in config.get("architectures") or []
        ]
        config["num_labels"] = 1
        config["id2label"] = {"0": "LABEL_0"}
        config["label2id"] = {"LABEL_0": 0}
        if config.get("pad_token_id") is None and pad_token_id is not None:
            config["pad_token_id"] = pad_token_id
    path.write_text(json.dumps(config, indent=2) + "\n")


class GRPOLoss:
    """`(model, batch) -> (summed loss, units, metrics)` on a micro-batch of generated
    completions (prompt tokens unlabelled); the batch carries each row's advantage, and the
    generating policy's and the reference's token log-probabilities where needed."""

    def __init__(self, config):
        self.config = config
        self.group = 1

    def units(self, batch: dict) -> int:
        rows = int(batch["input_ids"].shape[0])
        if self.config.loss_type == "grpo":
            return rows
        if self.config.loss_type == "dr_grpo":
            return rows * self.config.max_completion_tokens
        if ALL_TRAINED.get():  # the planner's fake tensors
            return rows * (int(batch["labels"].shape[1]) - 1)
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, model, batch: dict):
        logps, keep = token_logps(model, batch)
        if ALL_TRAINED.get():  # the planner's fake tensors: every position is a token
            b, t = keep.shape
            rows = torch.arange(b, device=keep.device).repeat_interleave(t)
            lengths = torch.full((b,), t, device=keep.device)
        else:
            rows, lengths = keep.nonzero()[:, 0], keep.sum(-1)
        old = batch.get(OLD_LOGPS)
        old = logps.detach() if old is None else old.to(logps.dtype)
        ref = batch.get(REFERENCE_TOKEN_LOGPS)
        adv = batch[ADVANTAGES]
        total, metrics = grpo_loss(logps, old, ref, adv, rows, lengths, self.config)
        return total, self.units(batch), metrics
