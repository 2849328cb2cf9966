"""ggml's own reference quantizers, as an oracle: `ggml-quants.c` from a llama.cpp source
tree (`TUNESMITH_GGML_SRC`: its `ggml/` folder; `.ci/run` unpacks llama-cpp-python's source
distribution for it) compiled alone with the C compiler into a shared library and called
through ctypes. None when no source tree or compiler is at hand (the tests skip, naming why)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

STUBS = Path(__file__).with_name("ggml_stubs.c")


def build() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not)."""
    source = os.environ.get("TUNESMITH_GGML_SRC")
    if not source:
        return None, "TUNESMITH_GGML_SRC names no llama.cpp ggml/ folder"
    quants = Path(source) / "src" / "ggml-quants.c"
    if not quants.is_file():
        return None, f"{quants}: no such file"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler"
    lib = Path(tempfile.mkdtemp(prefix="ggml-ref-")) / "libggml_ref.so"
    cmd = [
        compiler, "-O2", "-fPIC", "-shared", "-ffp-contract=off",
        f"-I{Path(source) / 'include'}", f"-I{Path(source) / 'src'}",
        str(quants), str(STUBS), "-o", str(lib), "-lm",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return None, f"compiling ggml-quants.c failed: {done.stderr[-300:]}"
    return ctypes.CDLL(str(lib)), ""


def quantize(lib: ctypes.CDLL, kind: str, x: np.ndarray, block_bytes: int) -> np.ndarray:
    """ggml's quantize_row_<kind>_ref over every row of x (float32, rows of 256·k)."""
    fn = getattr(lib, f"quantize_row_{kind}_ref")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    data = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // 256 * block_bytes), dtype=np.uint8)
    fn(data.ctypes.data, out.ctypes.data, data.size)
    return out


def quantize_rows(
    lib: ctypes.CDLL, kind: str, x: np.ndarray, row_bytes: int, importance=None
) -> np.ndarray:
    """ggml's quantize_<kind>(src, dst, rows, row length, importance): what llama-quantize
    calls per tensor (with an importance matrix when given, one weight per column)."""
    fn = getattr(lib, f"quantize_{kind}")
    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    fn.restype = ctypes.c_size_t
    data = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], row_bytes), dtype=np.uint8)
    weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    fn(
        data.ctypes.data,
        out.ctypes.data,
        x.shape[0],
        x.shape[1],
        None if weights is None else weights.ctypes.data,
    )
    return out
