"""The config and preprocess verbs, as a user runs them: output, exit codes, no tracebacks."""

from __future__ import annotations

from pathlib import Path

from helpers.runs import run_cli

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = "examples/quickstart.yaml"


def test_config_schema_prints_documented_fields():
    result = run_cli("config", "schema")
    assert result.returncode == 0, result.stderr
    assert "  r: 16  # int. Rank of the update B·A." in result.stdout
    assert "  max_seq_len: 2048  # int. Longest sample in tokens" in result.stdout
    assert "trust_remote_code: false  # bool. Run Python code shipped with the checkpoint." in (
        result.stdout
    )


def test_config_check_ok_and_errors(tmp_path):
    result = run_cli("config", "check", QUICKSTART)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"{QUICKSTART}: ok (model examples/tiny-llama, method lora r=16, 1 training source(s), "
        "lr 0.004)\n"
    )
    result = run_cli("config", "check", QUICKSTART, "train.lr=fast", "method.rr=3")
    assert result.returncode == 2
    assert result.stderr == (
        f'error: {QUICKSTART} (command-line override): method.rr: unknown key for method "lora"; '
        'did you mean "r"?\n'
        f'error: {QUICKSTART} (command-line override): train.lr: expected a number, got "fast"\n'
    )
    missing = run_cli("config", "check", QUICKSTART, "data.datasets.0.path=nope.jsonl")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr == (
        f"error: {QUICKSTART}: data.datasets.0.path: nope.jsonl: no such file or folder\n"
    )
    shown = run_cli("config", "check", QUICKSTART, "method.r=4", "--show")
    assert "  r: 4\n" in shown.stdout and "  lr: 0.004\n" in shown.stdout


def test_preprocess_shows_masked_samples_and_counts(tmp_path):
    result = run_cli("preprocess", QUICKSTART, "--show", "2", f"data.cache_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("--- sample ") == 2
    assert (
        "⟦<|im_start|>user\nAre these all from nature: quartz planet olive lemon valley ocean"
        "<|im_end|>\n" in out
    )
    assert "<|im_start|>assistant\n⟧Yes, all of them.<|im_end|>⟦\n⟧" in out
    assert (
        "train source examples/data/quickstart_train.jsonl (chat): 1,200 records -> 1,200 samples"
        in out
    )
    assert "packing: 1,200 samples into " in out and "efficiency " in out
    assert "[cached]" not in out
    again = run_cli("preprocess", QUICKSTART, "--show", "0", f"data.cache_dir={tmp_path}")
    assert again.returncode == 0 and again.stdout.count("[cached]") == 2


def test_preprocess_reports_bad_data_in_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    result = run_cli(
        "preprocess", QUICKSTART, f"data.datasets.0.path={bad}", f"data.cache_dir={tmp_path}"
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"error: {bad}, line 1: conversation has no assistant turn, so nothing would train; fix "
        "the roles or map them with data.datasets.0.roles\n"
    )


def test_preprocess_with_a_missing_model_directory():
    result = run_cli("preprocess", QUICKSTART, "model.path=./no-such-model")
    assert result.returncode == 2
    assert result.stderr == (
        f"error: model.path: ./no-such-model: no such folder (relative to {Path.cwd()})\n"
    )


def test_config_check_on_a_bad_file_needs_no_torch(tmp_path):
    """The CLI's error path imports nothing heavy: with torch unimportable, `config check` of a
    missing file still prints its one line (TrainingInterrupted lives in errors.py)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; from tunesmith.cli import main; "
        f"sys.argv = ['tunesmith', 'config', 'check', {str(tmp_path / 'none.yaml')!r}]; main()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'none.yaml'}: no such config file\n"
