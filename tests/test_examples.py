"""Every shipped example runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lora_quickstart(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/lora_quickstart.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "per-row routing matches separate runs" in result.stdout
    assert "greedy continuation of 10 11 12 13: 14 15 16 17 18 19 20 21" in result.stdout
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob("*.tmp"))
