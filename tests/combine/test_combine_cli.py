"""tunesmith merge, combine and merge-models as a user runs them."""

from __future__ import annotations

from helpers.adapters import BUNDLED, adapter_folder
from helpers.runs import run_cli

# --- the command line ------------------------------------------------------------------------


def test_cli_merge_combine_and_merge_models(tmp_path):
    a = adapter_folder(tmp_path, BUNDLED, "lora", "a", seed=1, b_scale=0.1)
    b = adapter_folder(tmp_path, BUNDLED, "rslora", "b", seed=2, b_scale=0.1)
    run = run_cli(
        "merge",
        "--adapter",
        str(a),
        "--base",
        str(BUNDLED),
        "--out",
        str(tmp_path / "m"),
        "--verify",
        "--max-shard-size",
        "6MB",
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'm'}: ")
    diff = float(lines[-1].split(": ")[1])
    assert lines[-1].startswith("max |logit difference| vs base + adapter: ") and diff < 1e-4
    run = run_cli(
        "combine",
        "--adapter",
        str(a),
        "--adapter",
        str(b),
        "--weights",
        "0.7,0.3",
        "--method",
        "ties",
        "--density",
        "0.5",
        "--rank",
        "8",
        "--base",
        str(BUNDLED),
        "--out",
        str(tmp_path / "c"),
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote {tmp_path / 'c'}: ties of 2 adapter(s), rank 8; ")
    assert (tmp_path / "c" / "adapter_config.json").is_file()
    run = run_cli(
        "merge-models",
        "--base",
        str(BUNDLED),
        "--model",
        str(tmp_path / "m"),
        "--model",
        str(tmp_path / "m"),
        "--method",
        "ties",
        "--out",
        str(tmp_path / "mm"),
    )
    assert run.returncode == 0, run.stderr
    generated = run_cli(
        "generate", "--model", str(tmp_path / "mm"), "--raw", "hello", "--max-new-tokens", "4"
    )
    assert generated.returncode == 0, generated.stderr
    run = run_cli("combine", "--adapter", str(a), "--weights", "1,2", "--out", str(tmp_path / "x"))
    assert run.returncode == 2
    assert run.stderr.strip() == "error: --weights: 2 weights for 1 inputs; give one each"
