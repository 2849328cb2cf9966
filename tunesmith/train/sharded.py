"""Checkpoints of FSDP runs: every process writes its shards with
`torch.distributed.checkpoint` (DCP) into one hidden folder, rank 0 adds the trainer state and
renames the folder into place, so a kill at any moment leaves whole checkpoints only, as for
one process. DCP reshards on load: a run resumes on another number of processes. The final
adapter or model is gathered whole on rank 0 and written in the usual format.

    checkpoints/step-000100/
      .metadata, __0_0.distcp, __1_0.distcp ...   model (trained parameters) and optimizer
      rng.safetensors, trainer_state.json          as one process writes them ("format": "dcp")
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from tunesmith.io import atomic_write_json, atomic_write_safetensors
from tunesmith.train.checkpoint import (
    PREFIX,
    STATE_NAME,
    checkpoint_root,
    list_checkpoints,
    rng_tensors,
)

FORMAT = "dcp"


def _options(trains_adapter: bool) -> StateDictOptions:
    # an adapter run saves its adapter; the frozen base is the model it was loaded from
    return StateDictOptions(ignore_frozen_params=trains_adapter)


def is_sharded(folder: Path) -> bool:
    return (folder / ".metadata").is_file()


def save_sharded(
    output_dir: Path,
    step: int,
    step_module,
    optimizer,
    scheduler,
    state: dict,
    keep_last: int,
    trains_adapter: bool,
    main: bool,
) -> Path:
    """Checkpoint `step` of an FSDP run (a collective: every process calls it)."""
    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-dcp"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_state, optimizer_state = get_state_dict(
        step_module, optimizer, options=_options(trains_adapter)
    )
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    dist.barrier()
    if main:
        atomic_write_safetensors(rng_tensors(), tmp / "rng.safetensors")
        full = {
            **state,
            "step": step,
            "optimizer": {},
            "scheduler": scheduler.state_dict(),
            "format": FORMAT,
        }
        atomic_write_json(full, tmp / STATE_NAME)  # last: marks the folder complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded(folder: Path, step_module, optimizer, trains_adapter: bool) -> dict:
    """Restore an FSDP checkpoint into the sharded model and optimizer (resharded to this
    run's processes); returns the trainer state."""
    model_state, optimizer_state = get_state_dict(
        step_module, optimizer, options=_options(trains_adapter)
    )
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=str(folder))
    # not strict: an adapter run's checkpoint holds the trained parameters only
    options = StateDictOptions(ignore_frozen_params=trains_adapter, strict=False)
    set_state_dict(
        step_module,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optimizer"],
        options=options,
    )
    return json.loads((folder / STATE_NAME).read_text())


def gather_full(step_module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0, on the CPU (a collective; other ranks get an
    empty dict). Keys are the model's own (the loss module's "model." prefix dropped)."""
    state = get_model_state_dict(
        step_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return {k.removeprefix("model."): v for k, v in state.items()}
