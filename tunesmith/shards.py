"""Reading and writing safetensors checkpoints one tensor at a time, so that host memory holds
about one tensor, never a whole model.

    reader = CheckpointReader("base/")            # every shard's header, nothing else
    tensor = reader.read("model.norm.weight")     # plain file reads into a fresh tensor
    write_checkpoint(staging, plan, produce)      # headers first, then each tensor as produced

`write_checkpoint` knows every output tensor's name, shape and dtype before it computes any
(the plan), so each shard's header is written first and each tensor is streamed to disk as soon
as `produce` returns it: no shard is ever assembled in memory. Output folders are built under a
temporary name and renamed into place (`staging_dir`), so an interrupted write never leaves a
partial checkpoint under the final name."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.io import reporting_full_disk, share_like_umask
from tunesmith.paths import is_within

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def checkpoint_files(path: str, revision: str | None = None) -> list[Path]:
    """The safetensors files of a checkpoint folder (or hub id, downloaded), in index order."""
    folder = Path(path).expanduser()
    if not folder.is_dir():  # a hub id (callers have refused missing local paths)
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(path, revision=revision, allow_patterns=["*.json", "*.safetensors"])
        )
    index = folder / INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TunesmithError(
            f"model.path: {folder} has no .safetensors weights (pickle checkpoints are not "
            "loaded); convert the checkpoint to safetensors"
        )
    return files


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """(header without metadata, byte offset of the data) of a safetensors file, after checking
    that the file is whole: a readable header, and exactly the bytes its tensors need."""

    def damaged(reason: str) -> TunesmithError:
        return TunesmithError(
            f"{path}: damaged or incomplete safetensors file ({reason}); copy or save it again"
        )

    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise damaged("too short")
        size = int.from_bytes(raw, "little")
        if size > 100_000_000:
            raise damaged(f"header size {size}")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise damaged("unreadable header") from None
        file_size = os.fstat(f.fileno()).st_size
    if not isinstance(header, dict):
        raise damaged("unreadable header")
    header.pop("__metadata__", None)
    try:
        needed = 8 + size + max((i["data_offsets"][1] for i in header.values()), default=0)
    except (KeyError, TypeError, IndexError):
        raise damaged("unreadable header") from None
    if file_size != needed:
        raise damaged(f"{file_size:,} bytes, its header describes {needed:,}")
    return header, 8 + size


def check_safetensors_folder(folder: str | os.PathLike) -> None:
    """Raise, naming the file, if any safetensors file in a local folder is damaged."""
    folder = Path(folder).expanduser()
    if folder.is_dir():
        for path in sorted(folder.glob("*.safetensors")):
            read_header(path)


def iter_safetensors(path: Path, wanted=None):
    """(name, tensor) for each tensor of a safetensors file, read one at a time with plain file
    reads into one reused buffer: unlike a memory map, the pages of tensors already processed
    do not stay resident, so peak memory is about one tensor. Each tensor is only valid until
    the next one is read (copy or quantize it first)."""
    header, start = read_header(path)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    items = [(n, i) for n, i in items if wanted is None or n in wanted]
    largest = max((i["data_offsets"][1] - i["data_offsets"][0] for _, i in items), default=0)
    buffer = bytearray(largest)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        for name, info in items:
            begin, end = info["data_offsets"]
            dtype = _dtype(path, name, info)
            f.seek(start + begin)
            f.readinto(view[: end - begin])
            if end > begin:
                tensor = torch.frombuffer(view[: end - begin], dtype=dtype)
            else:
                tensor = torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(info["shape"])


def _dtype(path: Path, name: str, info: dict) -> torch.dtype:
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise TunesmithError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    return dtype


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class CheckpointReader:
    """Random access to the tensors of a safetensors checkpoint (a folder with one file or
    sharded files and an index). Only the headers are read up front; `read` reads one tensor
    into a fresh tensor with plain file reads (no memory map, so nothing stays resident)."""

    def __init__(self, path: str | os.PathLike, revision: str | None = None) -> None:
        self.path = str(path)
        self.tensors: dict[str, TensorInfo] = {}
        for file in checkpoint_files(self.path, revision):
            header, start = read_header(file)
            ordered = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
            for name, info in ordered:
                begin, end = info["data_offsets"]
                self.tensors[name] = TensorInfo(
                    file,
                    _dtype(file, name, info),
                    tuple(info["shape"]),
                    start + begin,
                    start + end,
                )

    @property
    def names(self) -> list[str]:
        """Tensor names in storage order (file by file, by offset): reading in this order is
        sequential I/O."""
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        tensor = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            with open(info.file, "rb") as f:
                f.seek(info.begin)
                f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        return tensor

    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())


# --- writing ---------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int, what: str = "--max-shard-size") -> int:
    """Bytes from "5GB", "500MB", "2GiB" or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise TunesmithError(f"{what}: {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()]
    if value < 1:
        raise TunesmithError(f"{what}: {text!r} must be at least one byte")
    return int(value)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def shard_plan(plan: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Split tensors into shards of at most `max_shard_size` bytes (a larger tensor gets a
    shard of its own), keeping their order."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in plan:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_checkpoint(
    folder: Path,
    plan: list[PlannedTensor],
    produce: Callable[[PlannedTensor], torch.Tensor],
    max_shard_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write the planned tensors as sharded safetensors (plus the index when there are several
    shards) into `folder`. `produce(t)` returns tensor `t` (it must have the planned shape and
    dtype); each is written to disk at once, so memory holds about one tensor. Returns the
    shard paths."""
    shards = shard_plan(plan, max_shard_size)
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    done = 0
    for shard, file_name in zip(shards, names, strict=True):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in shard:
            header[t.name] = {
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
            weight_map[t.name] = file_name
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        with open(folder / file_name, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for t in shard:
                tensor = produce(t)
                if tuple(tensor.shape) != t.shape or tensor.dtype != t.dtype:
                    raise RuntimeError(
                        f"internal error: {t.name} came out {tuple(tensor.shape)} "
                        f"{tensor.dtype}, planned {t.shape} {t.dtype}"
                    )
                data = tensor.detach().to("cpu").contiguous().reshape(-1)
                if data.numel():
                    f.write(memoryview(data.view(torch.uint8).numpy()))
                del tensor, data
                done += 1
                if progress is not None:
                    progress(done, len(plan))
            f.flush()
            os.fsync(f.fileno())
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in plan)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [folder / n for n in names]


def check_output(
    out: Path,
    overwrite: bool,
    what: str = "--out",
    folder: bool = True,
    inputs: Sequence[str | os.PathLike | None] = (),
) -> None:
    """Refuse an existing output path unless `overwrite`, one of the wrong kind (`folder`:
    the output is a folder, else a file), and one that holds any of `inputs` (replacing it
    would delete them)."""
    for source in inputs:
        if source and out.exists() and is_within(source, out):
            raise TunesmithError(
                f"{what}: {out} holds the input {source}; replacing it would delete the input. "
                "Write to another path"
            )
    if out.exists() and not overwrite:
        raise TunesmithError(f"{what}: {out} already exists; choose a new path or pass --overwrite")
    if folder and out.exists() and not out.is_dir():
        raise TunesmithError(f"{what}: {out} exists and is not a folder")
    if not folder and out.is_dir():
        raise TunesmithError(f"{what}: {out} is a folder; give a file name ending in .gguf")


@contextmanager
def staging_dir(
    out: str | os.PathLike, overwrite: bool = False, needed_bytes: int | None = None
) -> Iterator[Path]:
    """A temporary folder beside `out` that becomes `out` (one rename) when the block ends
    without an error; on an error it is removed and `out` is untouched (a full disk is
    reported in one line, with `needed_bytes` when given)."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    share_like_umask(tmp)  # mkdtemp's 0700 would make the checkpoint private
    with reporting_full_disk(out, needed_bytes):
        try:
            yield tmp
            if out.exists():
                old = out.with_name(f".{out.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def large_allocations_via_mmap():
    """While streaming tensors, make glibc serve allocations of 1 MiB and more with mmap, so
    that per-tensor temporaries go back to the OS when freed (with glibc's default the process
    kept, on a 428 MB checkpoint, about as much memory as the fp32 model). Afterwards the
    threshold goes to 32 MiB (what glibc's own adaptive threshold tends to): left at 1 MiB,
    every activation of a training step would be a fresh mmap (measured: steps 1.7x slower).
    Linux/glibc only; a no-op elsewhere."""
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            # what glibc's adaptive mode settles at: large mmap threshold, trim at twice that
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
            libc.malloc_trim(0)
