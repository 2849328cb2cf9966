"""Full fine-tuning on a model: nothing to attach; the weights are the model's own, saved as a
Hugging Face checkpoint (safetensors) and read back from one."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from tunesmith.errors import TunesmithError


def save(model: nn.Module, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)


def load_weights(model: nn.Module, folder: Path, device: str) -> None:
    """Restore the weights saved by `save` (tied weights may be saved once)."""
    tensors = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        tensors.update(load_file(f, device=device))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    loaded = {p.data_ptr() for n, p in model.named_parameters() if n in tensors}
    really_missing = [
        n for n, p in model.named_parameters() if n in missing and p.data_ptr() not in loaded
    ]
    if really_missing or unexpected:
        raise TunesmithError(
            f"--resume: {folder} does not match the model: missing {really_missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
