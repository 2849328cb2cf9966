"""Distillation's side of the loop: `DistillLoss` (the loss module of objective distill, in
place of `UnitLoss`), the teacher (loaded beside the student, frozen, refused when its
tokenizer is not the student's), and its top-k log-probabilities precomputed once into the data
cache (`precompute_teacher`). The loss formulas are `tunesmith.objectives.distill.impl`'s.

Like the supervised loss, the (batch, seq, vocab) logits are never built for architectures
with a plain head: both models' hidden states at the answer positions go through their heads
chunk by chunk, each chunk recomputed in the backward pass."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from torch.utils.checkpoint import checkpoint

from tunesmith.builder import load_for_inference
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.pack import collate
from tunesmith.data.prepare import default_cache_dir
from tunesmith.errors import TrainingError
from tunesmith.io import atomic_write
from tunesmith.objectives.distill.impl import chunk_terms
from tunesmith.objectives.rows import TEACHER_IDS, TEACHER_LOGPS
from tunesmith.train.logps import answer_states, kept_targets
from tunesmith.train.loss import autocast_for
from tunesmith.train.objective import eval_mode, samples_digest

CHUNK_ELEMENTS = 1 << 23
"""fp32 logits per chunk (32 MiB)."""


def vocab_of(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    return int(model.config.vocab_size)


class DistillLoss:
    """`(model, batch) -> (loss summed over answer tokens, answer tokens, metrics)`: the
    student's divergence from `teacher` (a model, or None when the batches carry the
    precomputed top-k), blended with cross-entropy by `alpha`."""

    def __init__(self, config, teacher=None, vocab: int | None = None):
        self.config = config
        self.teacher = teacher
        self.vocab = vocab
        self.group = 1

    def units(self, batch: dict) -> int:
        """What a step's summed loss is divided by: its answer tokens."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def _teacher_states(self, batch: dict):
        with torch.no_grad(), eval_mode(self.teacher):
            return answer_states(self.teacher, batch)

    def __call__(self, model, batch: dict):
        cfg = self.config
        targets = kept_targets(batch["labels"])
        hidden, head = answer_states(model, batch)
        n = int(targets.numel())
        precomputed = TEACHER_IDS in batch
        if precomputed:
            ids, logps = batch[TEACHER_IDS].long(), batch[TEACHER_LOGPS]
            if len(ids) != n:
                raise ValueError(
                    f"the precomputed teacher has {len(ids)} answer tokens for this batch and "
                    f"the batch has {n}; set data.packing: false, or objective."
                    "precompute_teacher: false"
                )
            teacher_hidden, teacher_head = logps, None
        else:
            teacher_hidden, teacher_head = self._teacher_states(batch)
        vocab = self.vocab  # None: the student's whole head
        if n == 0:
            zero = hidden.sum() * 0.0
            return zero, 0, {}
        width = vocab or (head.weight.shape[0] if head is not None else hidden.shape[-1])
        step = max(1, CHUNK_ELEMENTS // max(width, 1))
        total = None
        for at in range(0, n, step):
            part = slice(at, at + step)
            if precomputed:
                teacher, chunk_ids = logps[part], ids[part]
            else:
                chunk_ids = None
                with torch.no_grad():
                    teacher = teacher_hidden[part]
                    if teacher_head is not None:
                        teacher = teacher_head(teacher).float()
            args = (head, hidden[part], teacher, targets[part], cfg, vocab, chunk_ids)
            if torch.is_grad_enabled() and hidden.requires_grad:
                terms = checkpoint(chunk_terms, *args, use_reentrant=False)
            else:
                terms = chunk_terms(*args)
            total = terms if total is None else total + terms
        div, ce, agree = total[0], total[1], total[2]
        loss = cfg.alpha * div + (1 - cfg.alpha) * ce if cfg.alpha < 1 else div
        metrics = {
            "kl": (div.detach(), n),
            "agreement": (agree.detach(), n),
            "ce": (ce.detach(), n),
        }
        return loss, n, metrics


# --- the teacher ------------------------------------------------------------------------------


def load_teacher(config, student_tokenizer, device: str, dtype):
    """The teacher of `objective.teacher` in eval mode without gradients: a model folder or
    hub id, or an adapter folder (its base with the adapter). Refused in one line when its
    tokenizer is not the student's."""

    path = config.teacher
    is_adapter = (Path(path) / "adapter_config.json").is_file()
    setting = config.teacher_dtype
    if setting == "auto":
        setting = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    try:
        model, tokenizer, _ = load_for_inference(
            None if is_adapter else path, [path] if is_adapter else [], device, setting
        )
    except TrainingError:
        raise
    except Exception as err:  # noqa: BLE001 - any loading failure, named with its key
        raise TrainingError(f"objective.teacher: cannot load {path}: {err}") from None
    theirs, ours = tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if theirs != ours:
        differ = len(set(theirs.items()) ^ set(ours.items()))
        raise TrainingError(
            f"objective.teacher: {path} uses another tokenizer than the student "
            f"({len(theirs)} vs {len(ours)} tokens, {differ} entries differ); distillation "
            "compares the two distributions token by token, so pick a teacher of the "
            "student's family"
        )
    return model.eval().requires_grad_(False)


def teacher_fingerprint(path: str) -> dict:
    """What identifies the teacher's weights: its path, and for a local folder the names,
    sizes and times of its files."""
    folder = Path(path)
    files = []
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.is_file():
                st = f.stat()
                files.append((f.name, st.st_size, st.st_mtime_ns))
    return {"teacher": os.path.abspath(path) if folder.exists() else path, "files": files}


class TeacherTopK:
    """The teacher's top-k log-probabilities of every answer token of a SampleSet: flat
    (tokens, k) arrays with each sample's first row in `starts`; `entries(rows)` gives a
    batch's (samples in batch order)."""

    def __init__(self, ids: np.ndarray, logps: np.ndarray, starts: np.ndarray):
        self.ids, self.logps, self.starts = ids, logps, starts

    def entries(self, rows) -> dict:
        parts = [slice(int(self.starts[i]), int(self.starts[i + 1])) for i in rows]
        ids = np.concatenate([self.ids[p] for p in parts]) if parts else self.ids[:0]
        logps = np.concatenate([self.logps[p] for p in parts]) if parts else self.logps[:0]
        return {TEACHER_IDS: torch.as_tensor(ids), TEACHER_LOGPS: torch.as_tensor(logps)}


@torch.no_grad()
def teacher_topk(teacher, samples, k: int, batch_size: int, pad_id: int, device: str, autocast):
    """Every sample's answer tokens' top-k teacher log-probabilities (temperature 1)."""
    vocab = vocab_of(teacher)
    k = min(k, vocab)
    ids_parts, logp_parts = [], []
    starts = np.zeros(len(samples) + 1, dtype=np.int64)
    for at in range(0, len(samples), batch_size):
        rows = list(range(at, min(len(samples), at + batch_size)))
        batch = collate([samples[i] for i in rows], pad_id)
        batch = {key: v.to(device) for key, v in batch.items()}
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        with autocast():
            hidden, head = answer_states(teacher, batch)
        per_row = keep.sum(-1).tolist()
        for i, count in zip(rows, per_row, strict=True):
            starts[i + 1] = count
        step = max(1, CHUNK_ELEMENTS // vocab)
        for c in range(0, len(hidden), step):
            logits = head(hidden[c : c + step]) if head is not None else hidden[c : c + step]
            top = F.log_softmax(logits.float()[:, :vocab], dim=-1).topk(k, dim=-1)
            ids_parts.append(top.indices.to(torch.int32).cpu().numpy())
            logp_parts.append(top.values.cpu().numpy())
    starts = np.cumsum(starts)
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros((0, k), np.int32)
    logps = np.concatenate(logp_parts) if logp_parts else np.zeros((0, k), np.float32)
    return TeacherTopK(ids, logps, starts)


def teacher_cache_key(run) -> str:
    """What the precomputed top-k depends on: the encoded data, the teacher's weights and
    dtype, and k."""
    digest = samples_digest(run)
    cfg = run.config.objective
    identity = {
        **teacher_fingerprint(cfg.teacher),
        "k": cfg.top_k,
        "dtype": cfg.teacher_dtype,
        "run_dtype": str(run.dtype),
    }
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def precomputed_teacher(run, device: str) -> dict:
    """`objective.precompute_teacher`: the top-k of every train and validation sample, read
    from the data cache or computed with the teacher, loaded for it (then kept there)."""
    cfg = run.config
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
    path = cache_dir / f"teacher-{teacher_cache_key(run)}.safetensors"
    splits = {"train": run.prepared.train, "validation": run.prepared.validation}
    if run.use_cache and path.is_file():
        found = load_file(str(path))
        run.progress.log(f"teacher top-{cfg.objective.top_k}: read from {path}")
        return {
            name: TeacherTopK(found[f"{name}.ids"], found[f"{name}.logps"], found[f"{name}.starts"])
            if f"{name}.ids" in found
            else None
            for name in splits
        }
    teacher = load_teacher(cfg.objective, run.tokenizer, device, run.dtype)
    size = cfg.eval.batch_size or cfg.train.micro_batch_size
    autocast = lambda: autocast_for(device.split(":")[0], run.dtype)  # noqa: E731
    pad = run.tokenizer.pad_token_id or 0
    out = {}
    for name, samples in splits.items():
        out[name] = None
        if samples is not None and len(samples):
            out[name] = teacher_topk(
                teacher, samples, cfg.objective.top_k, size, pad, device, autocast
            )
    if run.use_cache:
        arrays = {}
        for name, top in out.items():
            if top is not None:
                arrays[f"{name}.ids"] = top.ids
                arrays[f"{name}.logps"] = top.logps
                arrays[f"{name}.starts"] = top.starts
        atomic_write(path, lambda tmp: save_file(arrays, tmp))
    tokens = sum(len(t.ids) for t in out.values() if t is not None)
    run.progress.log(
        f"teacher top-{cfg.objective.top_k}: computed for {tokens} answer tokens"
        + (f", kept in {path}" if run.use_cache else "")
    )
    return out
