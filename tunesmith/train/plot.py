"""The loss and learning-rate curves of a run, from output_dir/metrics.jsonl to loss.png."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.io import atomic_write


def read_metrics(output_dir: str | Path, log: Callable[[str], None] | None = None) -> list[dict]:
    """The entries of output_dir/metrics.jsonl. A torn last line (a run killed mid-write, or
    still writing) is left out and reported through `log`; damage anywhere else is an error
    naming the line."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise TunesmithError(f"{path}: no such file; is {output_dir} a tunesmith run's output_dir?")
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            if number == len(lines):  # no newline after it: the write was cut short
                if log is not None:
                    log(f"{path}: dropped a torn last line (line {number})")
                continue
            raise TunesmithError(
                f"{path}:{number}: not a JSON line; the metrics file is damaged: delete or fix "
                "that line"
            ) from None
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def plot_metrics(output_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render train loss, validation loss and lr against the step to `out` (default
    output_dir/loss.png), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_metrics(output_dir)
    train = [e for e in entries if "loss" in e]
    val = [e for e in entries if "val_loss" in e]
    fig, loss_ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        loss_ax.plot([e["step"] for e in train], [e["loss"] for e in train], label="train loss")
    if val:
        loss_ax.plot(
            [e["step"] for e in val], [e["val_loss"] for e in val], "o-", label="validation loss"
        )
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    handles, labels = loss_ax.get_legend_handles_labels()
    if train:
        lr_ax = loss_ax.twinx()
        lr_ax.plot(
            [e["step"] for e in train], [e["lr"] for e in train], "--", color="gray", label="lr"
        )
        lr_ax.set_ylabel("learning rate")
        more = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    loss_ax.legend(handles, labels, loc="upper right")
    loss_ax.set_title(Path(output_dir).name)
    fig.tight_layout()
    target = Path(out) if out else Path(output_dir) / "loss.png"
    atomic_write(target, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return target
