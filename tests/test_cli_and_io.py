"""The console script and atomic file writing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import tunesmith
from tunesmith.io import atomic_write


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_version_and_help():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"tunesmith {tunesmith.__version__}"
    result = run_cli("--help")
    assert result.returncode == 0
    assert "Usage: tunesmith" in result.stdout or "Usage: python -m tunesmith.cli" in result.stdout


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def crash(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt  # a kill in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_lazy_top_level_api_matches_the_adapters_package():
    import tunesmith.adapters

    assert sorted(tunesmith._ADAPTER_API) == sorted(tunesmith.adapters.__all__)
    assert tunesmith.add_lora is tunesmith.adapters.add_lora
    with pytest.raises(AttributeError, match="module 'tunesmith' has no attribute 'nope'"):
        tunesmith.nope  # noqa: B018
