"""The console script and atomic file writing."""

from __future__ import annotations

import os

import pytest
from helpers.runs import run_cli

import tunesmith
from tunesmith.io import atomic_write


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
    import importlib

    import tunesmith.adapters

    for name, module in tunesmith._API.items():
        assert getattr(tunesmith, name) is getattr(importlib.import_module(module), name)
    users = set(tunesmith.adapters.__all__) - {
        "PREFIX",
        "AdapterHolder",
        "LinearWrapper",
        "common_peft_keys",
        "find_targets",
        "hidden_size",
        "modules_of",
        "register_adapter",
    }  # what a method's implementation builds on, not the user's API
    assert users <= set(tunesmith._API)
    assert tunesmith.add_lora is importlib.import_module("tunesmith.methods.lora.impl").add_lora
    with pytest.raises(AttributeError, match="module 'tunesmith' has no attribute 'nope'"):
        tunesmith.nope  # noqa: B018
