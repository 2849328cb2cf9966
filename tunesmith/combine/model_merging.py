"""`tunesmith merge-models`: merge whole fine-tuned checkpoints of one base, tensor by tensor.

    merge_models("base/", ["math/", "code/"], "merged/", method="ties", weights=[1, 1])

For each tensor, τᵢ = modelᵢ − base is combined with `tunesmith.task_vectors.combine_tasks`
(task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune) and added back to the base.
Every checkpoint is read one tensor at a time, so memory holds about one tensor per model. All
headers are compared before anything is written: same architecture, same tensor names, same
shapes, and the first mismatch is named."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tunesmith.combine.merge import (
    MergeReport,
    output_dtype,
    output_plan,
    planned_report,
    write_output,
)
from tunesmith.combine.skeleton import base_config
from tunesmith.errors import TunesmithError
from tunesmith.shards import CheckpointReader, PlannedTensor, check_output, parse_size
from tunesmith.task_vectors import MAJORITY_SIGN, PRUNING_METHODS, check_density, combine_tasks

MODEL_MERGE_METHODS = ("task_arithmetic", *PRUNING_METHODS)


def _check_models(base: str, base_reader: CheckpointReader, models: list[str], readers, configs):
    base_cfg = configs[0]
    for i, (path, reader, config) in enumerate(zip(models, readers, configs[1:], strict=True)):
        where = f"--model {path} (model {i + 1})"
        for attr in ("model_type", "architectures"):
            if getattr(config, attr, None) != getattr(base_cfg, attr, None):
                raise TunesmithError(
                    f"{where}: {attr} is {getattr(config, attr, None)!r} but the base {base} has "
                    f"{getattr(base_cfg, attr, None)!r}; merge models of one architecture"
                )
        for name, info in base_reader.tensors.items():
            if name not in reader:
                raise TunesmithError(
                    f"{where}: has no tensor {name}, which the base has; the models differ in "
                    "structure"
                )
            if reader.tensors[name].shape != info.shape:
                raise TunesmithError(
                    f"{where}: tensor {name} has shape {list(reader.tensors[name].shape)} but the "
                    f"base has {list(info.shape)}; the models differ in structure"
                )
        extra = [n for n in reader.names if n not in base_reader]
        if extra:
            raise TunesmithError(
                f"{where}: has tensor {extra[0]}, which the base lacks; the models differ in "
                "structure"
            )


@torch.no_grad()
def _check_settings(models, method, weights, density, majority_sign) -> list[float]:
    """Refuse settings that cannot work, before anything is read; returns the weights."""
    if not models:
        raise TunesmithError("--model: give at least one fine-tuned model to merge")
    if method not in MODEL_MERGE_METHODS:
        raise TunesmithError(f"--method: {method!r} is not one of {', '.join(MODEL_MERGE_METHODS)}")
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models):
        raise TunesmithError(f"--weights: {len(models)} models but {len(weights)} weights")
    if method in PRUNING_METHODS:
        try:
            check_density(density)
        except TunesmithError as err:
            raise TunesmithError(f"--density: {err}") from None
    if majority_sign not in MAJORITY_SIGN:
        raise TunesmithError(f"--majority-sign: must be one of {', '.join(MAJORITY_SIGN)}")
    return weights


def merge_models(
    base: str,
    models: Sequence[str],
    out: str | Path,
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    *,
    density: float = 0.5,
    seed: int = 0,
    majority_sign: str = "total",
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    dry_run: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MergeReport:
    """Merge fine-tuned checkpoints `models` against their common `base` and write the result
    to `out` (sharded safetensors, config, generation config and the base's tokenizer).
    `weights` default to 1 each (task arithmetic then adds every task vector in full; pass
    1/n each to average)."""
    models = [str(m) for m in models]
    weights = _check_settings(models, method, weights, density, majority_sign)
    out = Path(out)
    shard_bytes = parse_size(max_shard_size)
    if not dry_run:
        check_output(out, overwrite, inputs=[base, *models])
    configs = [base_config(base, trust_remote_code)]
    for path in models:
        try:
            configs.append(base_config(path, trust_remote_code))
        except TunesmithError as err:
            raise TunesmithError(str(err).replace("--base", "--model", 1)) from None
    base_reader = CheckpointReader(base)
    readers = [CheckpointReader(path) for path in models]
    _check_models(base, base_reader, models, readers, configs)
    out_dtype = output_dtype(dtype, configs[0])
    plan = output_plan(base_reader, out_dtype)
    index = {name: i for i, name in enumerate(base_reader.names)}

    def produce(planned: PlannedTensor) -> torch.Tensor:
        base_tensor = base_reader.read(planned.name)
        if not base_tensor.is_floating_point():
            return base_tensor
        base32 = base_tensor.float()
        del base_tensor
        # τᵢ = modelᵢ − base, in place on each freshly read tensor
        tasks = [reader.read(planned.name).float().sub_(base32) for reader in readers]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index[planned.name])
        task = "linear" if method == "task_arithmetic" else method
        merged = combine_tasks(tasks, weights, task, density, generator, majority_sign)
        del tasks
        return merged.add_(base32).to(planned.dtype)

    report = planned_report(
        out, out_dtype, plan, shard_bytes, merged_modules=0, adapters=[], dry_run=dry_run
    )
    w = ", ".join(f"{x:g}" for x in weights)
    detail = f"density {density:g}, " if method in PRUNING_METHODS else ""
    report.notes.append(f"{method} of {len(models)} model(s) ({detail}weights {w}) on {base}")
    if dry_run:
        return report
    write_output(
        out,
        overwrite,
        plan,
        produce,
        shard_bytes,
        progress,
        configs[0],
        out_dtype,
        base_reader,
        base,
        report,
    )
    return report
