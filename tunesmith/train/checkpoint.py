"""Training checkpoints: the trained weights plus everything needed to continue exactly
(optimizer, scheduler, RNG states, data position), with no pickle anywhere.

    output_dir/checkpoints/step-000050/
        adapter_config.json, adapter_model.safetensors   (LoRA: PEFT format)
        config.json, model.safetensors                   (full: a Hugging Face checkpoint)
        optimizer.safetensors                            optimizer state tensors
        rng.safetensors                                  torch CPU (and CUDA) generator states
        trainer_state.json                               step, scheduler, scalars, progress

A checkpoint is written into a hidden temp folder beside its final name and renamed when
complete, so a kill at any moment leaves either the whole checkpoint or none of it.

The rest of the output folder's bookkeeping lives here too: what a run writes there
(`RUN_FILES`), claiming the folder for a run (`claim_output_dir`: the lock, an earlier run's
files refused or removed), undoing a run that could not start (`remove_new_entries`), and on
resume the checks and the metrics cut back to the checkpoint's step."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from tunesmith.errors import TrainingError, TunesmithError, first_line
from tunesmith.io import (
    atomic_write,
    atomic_write_json,
    atomic_write_safetensors,
    reporting_full_disk,
    share_like_umask,
)
from tunesmith.shards import read_header
from tunesmith.train.lock import FolderLock, stale_message
from tunesmith.train.plot import read_metrics

STATE_NAME = "trainer_state.json"
PREFIX = "step-"

RUN_FILES = (
    "checkpoints",
    "adapter",
    "model",
    "metrics.jsonl",
    "config.yaml",
    "summary.json",
    "loss.png",
    "eval.json",
    "samples.jsonl",
    "tensorboard",
    "trackers.json",
    "wandb",
    "mlflow.db",
    "mlartifacts",
    "bench",
    "report.html",
)
"""What a run writes into output_dir (or a command writes about the trained model): a new run
refuses a folder holding any of them. data_report.json (about the data) and review.jsonl (a
person's votes; stale ones are left out) are kept."""


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def step_of(folder: Path) -> int:
    """The optimizer step a checkpoint folder (`step-NNNNNN`) was written after."""
    return int(json.loads((folder / STATE_NAME).read_text())["step"])


def remove_partial(output_dir: str | os.PathLike) -> None:
    """Delete temp folders left by a run killed while writing a checkpoint."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An optimizer state dict as (tensors, JSON-able rest). Nested state (bitsandbytes keeps
    its quantization state in a dict per parameter) is flattened to "state/<index>/<key>/...".
    A tensor held by several entries (bitsandbytes' 8-bit states share their quantization maps)
    is written once and referred to from the others; safetensors refuses shared storage."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()

    def split(value, path: str):
        if isinstance(value, torch.Tensor):
            ptr = value.untyped_storage().data_ptr()
            key = (ptr, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
            if ptr and key in seen:
                return {"__tensor__": seen[key]}
            tensors[path] = value.clone() if ptr and ptr in storages else value
            seen[key] = path
            storages.add(ptr)
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {str(k): split(v, f"{path}/{k}") for k, v in value.items()}
        return value

    rest = {str(i): split(entry, f"state/{i}") for i, entry in state["state"].items()}
    return tensors, {"param_groups": state["param_groups"], "state": rest}


def optimizer_from_files(tensors: dict, rest: dict) -> dict:
    def join(value):
        if isinstance(value, dict):
            if set(value) == {"__tensor__"}:
                return tensors[value["__tensor__"]]
            return {k: join(v) for k, v in value.items()}
        return value

    state = {int(i): join(entry) for i, entry in rest["state"].items()}
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    save_weights,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically (temp folder, then rename) and delete all but the
    newest `keep_last`. `save_weights(folder)` writes the model or adapter files."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    with reporting_full_disk(final):
        _write_checkpoint(
            tmp_dir(root, final), final, step, save_weights, optimizer, scheduler, state
        )
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def tmp_dir(root: Path, final: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    share_like_umask(tmp)
    return tmp


def _write_checkpoint(tmp, final, step, save_weights, optimizer, scheduler, state) -> None:
    try:
        save_weights(tmp)
        tensors, rest = optimizer_to_files(optimizer)
        atomic_write_safetensors(tensors, tmp / "optimizer.safetensors")
        atomic_write_safetensors(rng_tensors(), tmp / "rng.safetensors")
        full_state = {
            **state,
            "step": step,
            "optimizer": rest,
            "scheduler": scheduler.state_dict(),
        }
        atomic_write_json(full_state, tmp / STATE_NAME)  # last: marks the folder complete
        if final.exists():  # re-saving a step (a resumed run): replace the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_resume(output_dir: str | os.PathLike, resume: str | None, log=print) -> Path | None:
    """The checkpoint folder `--resume` names: "latest" (the newest in output_dir that reads
    back whole; each newer one skipped is reported through `log`) or a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise TunesmithError(
                f"--resume: no checkpoint in {checkpoint_root(output_dir)}; start without "
                "--resume (with --overwrite if output_dir holds the files of a run that never "
                "checkpointed), or give a checkpoint folder"
            )
        for folder in reversed(found):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            log(f"warning: --resume: skipping {folder}: {problem}")
        raise TunesmithError(
            f"--resume: no checkpoint in {checkpoint_root(output_dir)} reads back whole (see "
            "the warnings above); start over with --overwrite"
        )
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise TunesmithError(
            f"--resume: {path} is not a checkpoint folder (no {STATE_NAME}); checkpoints are "
            f"{checkpoint_root(output_dir)}/step-NNNNNN"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TunesmithError(f"--resume: {path}: {problem}; resume from an older checkpoint")
    return path


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be resumed from (None: it reads back whole). Reads
    the state and every safetensors header; tensor data is checked against the file sizes."""
    try:
        state = json.loads((folder / STATE_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{STATE_NAME} does not read back ({first_line(err)})"
    needed = ("step", "optimizer", "scheduler", "counters", "total_steps")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        return f"{STATE_NAME} lacks the trainer's state ({', '.join(needed)})"
    weights = sorted(folder.glob("*.safetensors"))
    names = {p.name for p in weights}
    if state.get("format") == "dcp":  # an FSDP run's shards (tunesmith.train.sharded)
        if not (folder / ".metadata").is_file() or "rng.safetensors" not in names:
            return "the sharded checkpoint's .metadata or rng.safetensors is missing"
    elif not {"optimizer.safetensors", "rng.safetensors"} <= names or len(names) < 3:
        return "weights, optimizer.safetensors or rng.safetensors missing"
    for path in weights:
        try:
            read_header(path)
        except TunesmithError as err:
            return f"{path.name}: {str(err).removeprefix(f'{path}: ')}"
    return None


def read_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """(trainer state, optimizer state dict, rng tensors) of a checkpoint folder that
    `resolve_resume` has checked (`checkpoint_problem`)."""

    state = json.loads((folder / STATE_NAME).read_text())
    optimizer = optimizer_from_files(
        load_file(folder / "optimizer.safetensors"), state["optimizer"]
    )
    return state, optimizer, load_file(folder / "rng.safetensors")


def prepare_output_dir(
    out: Path, lock: FolderLock, resume: str | None, overwrite: bool, log
) -> None:
    """With `out` locked for this run: remove a killed run's partial checkpoint, then make
    sure it holds no other run's files: refused, unless resuming or told to `overwrite`."""
    if lock.took_over:
        log(f"warning: {stale_message(lock.took_over, out)}")
    remove_partial(out)  # only now: a running run's temp checkpoint is not partial
    if resume is not None:
        return
    existing = [name for name in RUN_FILES if (out / name).exists()]
    checkpoints = list_checkpoints(out)
    if checkpoints:
        existing[existing.index("checkpoints")] = f"checkpoints/{checkpoints[-1].name}"
    if existing and not overwrite:
        again = "continue it with --resume, " if checkpoints else ""
        raise TunesmithError(
            f"output_dir {out} already holds a run ({', '.join(existing)}); "
            f"{again}start over with --overwrite, or set another output_dir"
        )
    if overwrite:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def folder_entries(folder: Path) -> set[str] | None:
    """The names in `folder`, or None when it does not exist."""
    return set(os.listdir(folder)) if folder.is_dir() else None


def remove_new_entries(folder: Path, before: set[str] | None) -> None:
    """Remove what was added to `folder` since `before` (`folder_entries`), and the folder itself
    when it did not exist then and is empty now."""
    for name in sorted((folder_entries(folder) or set()) - (before or set())):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if before is None:
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_same_plan(folder: Path, state: dict, plan: dict, out: Path) -> None:
    """A checkpoint resumes only the run that wrote it: the same step count and epoch length."""
    saved = {k: state.get(k) for k in plan}
    if saved != plan:
        raise TrainingError(
            f"--resume: {folder} was written by a run with {saved}, but this config gives "
            f"{plan}; resume with the run's own config ({out / 'config.yaml'})"
        )


def truncate_metrics(out: Path, step: int, log) -> None:
    """Cut out/metrics.jsonl back to `step`. A torn last line (a kill mid-write) is dropped;
    damage anywhere else is an error naming the line."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [e for e in read_metrics(out, log) if e.get("step", 0) <= step]
    text = "".join(json.dumps(entry) + "\n" for entry in kept)  # as the loop writes them
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
