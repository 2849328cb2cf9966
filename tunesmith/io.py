"""File writing that never leaves a half-written file: write a temp file beside the target,
flush it to disk, then rename it over the target (atomic on POSIX and Windows)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    import torch


def human_bytes(n: float) -> str:
    """A byte count in decimal units: 512 B, 1.5 KB, 3.2 MB, 7.0 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def is_disk_full(err: BaseException) -> bool:
    """An error from writing to a full disk: OSError ENOSPC (or EDQUOT), the same reported by a
    library in its own error type (safetensors: "No space left on device (os error 28)"), or a
    short write (numpy's tofile, which GGUF writing uses: "1048576 requested and 977984
    written")."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if isinstance(err, OSError) and SHORT_WRITE.fullmatch(text):
        return True
    return "No space left on device" in text or "os error 28" in text


@contextmanager
def reporting_full_disk(target: str | os.PathLike, needed_bytes: int | None = None):
    """Turn a full-disk error while writing `target` into one line naming it, the free space
    and (when known) the space needed. The writer must already clean up what it left."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        folder = Path(target).expanduser().absolute()
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        needs = f"; it needs about {human_bytes(needed_bytes)}" if needed_bytes else ""
        raise TunesmithError(
            f"{target}: no space left on the disk while writing it ({human_bytes(free)} free "
            f"in {folder}{needs}); nothing half-written was kept. Free up space or write "
            "elsewhere, then run again"
        ) from None


SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def share_like_umask(path: str | os.PathLike) -> None:
    """Give a file or folder made by `tempfile` (0600 / 0700) the mode an ordinary `open` or
    `mkdir` would: 0666 / 0777 less the umask, so a group can read results where the umask
    lets it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` and move the result to `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        share_like_umask(tmp)  # after writing: a writer may replace the file (safetensors does)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 `text` to `path` in one rename."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(data: dict, path: str | os.PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    return atomic_write(path, write)


def atomic_write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    from safetensors.torch import save_file  # imports torch; the data pipeline needs neither

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
