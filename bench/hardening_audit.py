"""The hardening audit (issue 18): bad inputs and faults tried from the command line as a new user
would, each with the message printed and the exit code, as a Markdown table.

    python bench/hardening_audit.py [--out bench/results/hardening_audit.md]

Runs from the repository root on the bundled model and data, in a scratch folder (about three
minutes on 2 CPU cores). A case passes when the command exits as expected and its output holds
the expected text; the table shows the first line of what the user sees."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = "examples/quickstart.yaml"
SHORT = ["train.max_steps=4", "train.save_every_steps=2", "eval.generate_samples=0"]


def tunesmith(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def python(code: str):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def shown(result) -> str:
    """What the user sees first: the first error/warning/stopped line, else the last line."""
    lines = [ln for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
    for line in lines:
        if line.startswith(("error:", "warning:", "stopped", "interrupted", "AdapterError")):
            return line
    return lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Write the table here too.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tunesmith-audit-"))
    rows: list[tuple[str, str, int, bool]] = []

    def case(name: str, result, code: int, expect: str) -> None:
        text = result.stderr + result.stdout
        ok = result.returncode == code and expect in text
        rows.append((name, shown(result), result.returncode, ok))
        print(f"{'ok ' if ok else 'BAD'} {name}: rc {result.returncode}: {shown(result)}")

    # a trained adapter to work with (relative model.path, as the quickstart has it)
    run = work / "run"
    trained = tunesmith("train", QUICK, f"output_dir={run}", *SHORT)
    assert trained.returncode == 0, trained.stderr
    adapter = run / "adapter"

    # 0
    case(
        "0 prefix tuning on transformers 5.24",
        tunesmith(
            "train",
            QUICK,
            "method=prefix",
            "data.packing=false",
            f"output_dir={work / 'p'}",
            *SHORT,
        ),
        0,
        "done:",
    )
    case("0 plan with every method", tunesmith("plan", QUICK, "--gpu", "4090"), 0, "prefix")
    # 1
    case(
        "1 adapter name /tmp/x",
        python(
            "import tunesmith; from transformers import AutoModelForCausalLM as A;"
            "m = A.from_pretrained('examples/tiny-llama');"
            "tunesmith.add_lora(m, tunesmith.LoRAConfig(r=2), name='/tmp/x')"
        ),
        1,
        "is not allowed: use 1 to 64 characters",
    )
    # 2
    case(
        "2 adapter used from another folder",
        tunesmith("generate", "--adapter", str(adapter), "--max-new-tokens", "3", "hi", cwd=work),
        0,
        "",
    )
    base_json = json.loads((adapter / "adapter_config.json").read_text())
    rows[-1] = (
        rows[-1][0],
        f"base_model_name_or_path: {base_json['base_model_name_or_path']}",
        *rows[-1][2:],
    )
    # 3
    busy = work / "busy"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunesmith.cli",
            "train",
            QUICK,
            f"output_dir={busy}",
            "train.max_steps=30",
            "eval.generate_samples=0",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not (busy / "config.yaml").exists():
        time.sleep(0.2)
    case(
        "3 two runs into one output_dir",
        tunesmith("train", QUICK, f"output_dir={busy}", *SHORT),
        2,
        "is in use by another run",
    )
    first.wait()
    # 4
    dead = work / "dead"
    dead.mkdir()
    (dead / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    case(
        "4 folder with a dead run's files",
        tunesmith("train", QUICK, f"output_dir={dead}", *SHORT),
        2,
        "already holds a run (metrics.jsonl)",
    )
    # 5
    x = work / "X"
    shutil.copytree(adapter, x / "adapter")
    case(
        "5 merge --out holding its adapter",
        tunesmith("merge", "--adapter", str(x / "adapter"), "--out", str(x), "--overwrite"),
        2,
        "holds the input",
    )
    # 6
    torn = work / "torn"
    shutil.copytree(run, torn)
    (torn / "metrics.jsonl").write_text((torn / "metrics.jsonl").read_text() + '{"step": 9, "l')
    case(
        "6 torn metrics line, --resume",
        tunesmith("train", QUICK, f"output_dir={torn}", *SHORT, "--resume"),
        0,
        "dropped a torn last line",
    )
    # 7
    junk = work / "junk"
    shutil.copytree(run, junk)
    (junk / "checkpoints" / "step-000004" / "trainer_state.json").write_text("{junk")
    case(
        "7 junk trainer_state.json, --resume",
        tunesmith("train", QUICK, f"output_dir={junk}", *SHORT, "--resume"),
        0,
        "skipping",
    )
    # 8, 9, 10
    bad = work / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    case(
        "8 non-UTF-8 JSONL",
        tunesmith(
            "preprocess",
            QUICK,
            f"data.datasets.0.path={bad}",
            "data.datasets.0.format=completion",
            "data.validation=[]",
        ),
        2,
        "not UTF-8 text",
    )
    parquet = work / "bad.parquet"
    parquet.write_bytes(b"PAR1 not really")
    case(
        "9 truncated parquet",
        tunesmith(
            "preprocess",
            QUICK,
            f"data.datasets.0.path={parquet}",
            "data.datasets.0.format=completion",
            "data.validation=[]",
        ),
        2,
        "not a readable Parquet file",
    )
    tokens = work / "tok.jsonl"
    tokens.write_text('{"input_ids": [5, 6, 7]}\n{"input_ids": [5, -3, 7]}\n')
    case(
        "10 token id outside the vocabulary",
        tunesmith(
            "preprocess",
            QUICK,
            f"data.datasets.0.path={tokens}",
            "data.datasets.0.format=tokenized",
            "data.validation=[]",
        ),
        2,
        "outside the tokenizer's vocabulary",
    )
    # 11
    damaged = work / "damaged"
    shutil.copytree(ROOT / "examples" / "tiny-llama", damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    case(
        "11 truncated model.safetensors",
        tunesmith("generate", "--model", str(damaged), "--raw", "x"),
        2,
        "damaged or incomplete safetensors file",
    )
    bad_adapter = work / "bad_adapter"
    shutil.copytree(adapter, bad_adapter)
    (bad_adapter / "adapter_model.safetensors").write_bytes(os.urandom(300))
    case(
        "11 random-bytes adapter safetensors",
        tunesmith("generate", "--adapter", str(bad_adapter), "x"),
        2,
        "damaged or incomplete safetensors file",
    )
    # 12: a 2 MB tmpfs (needs root; skipped where mount is not allowed)
    full = work / "full"
    full.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(full)], capture_output=True
        ).returncode
        == 0
    )
    if mounted:
        try:
            case(
                "12 full disk: train checkpoint",
                tunesmith("train", QUICK, f"output_dir={full / 'run'}", *SHORT),
                2,
                "no space left on the disk",
            )
            case(
                "12 full disk: merge",
                tunesmith("merge", "--adapter", str(adapter), "--out", str(full / "merged")),
                2,
                "it needs about 15.8 MB",
            )
            case(
                "12 full disk: export GGUF",
                tunesmith(
                    "export", "--model", "examples/tiny-llama", "--out", str(full / "m.gguf")
                ),
                2,
                "no space left on the disk",
            )
            case(
                "12 full disk: quantize",
                tunesmith(
                    "quantize",
                    "--model",
                    "examples/tiny-llama",
                    "--method",
                    "rtn",
                    "--calib",
                    "examples/data/pydoc_heldout.jsonl",
                    "--calib-samples",
                    "2",
                    "--eval-samples",
                    "2",
                    "--seq-len",
                    "64",
                    "--out",
                    str(full / "q"),
                ),
                2,
                "no space left on the disk",
            )
            left = sorted(p.name for p in full.rglob("*") if p.is_file())
            rows.append(
                (
                    "12 what the full disk holds afterwards",
                    ", ".join(left),
                    0,
                    left == [".tunesmith.train.lock", "config.yaml"],
                )
            )
        finally:
            subprocess.run(["umount", str(full)], check=False)
    # 13
    case(
        "13 generate --raw ''",
        tunesmith("generate", "--model", "examples/tiny-llama", "--raw", ""),
        2,
        "the prompt is empty",
    )
    # 14
    case(
        "14 config check, missing relative model.path",
        tunesmith("config", "check", QUICK, "model.path=examples/nothing-here"),
        2,
        "no such folder",
    )
    case(
        "14 train, missing relative model.path",
        tunesmith("train", QUICK, "model.path=examples/nothing-here", f"output_dir={work / 'n'}"),
        2,
        "no such folder",
    )
    # 15, 16
    chat = work / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps({"messages": m}) + "\n"
            for m in [
                [
                    {"role": "assistant", "content": "Hi!"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ],
                [
                    {"role": "user", "content": "q"},
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "a"},
                ],
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
            ]
        )
    )
    result = tunesmith("preprocess", QUICK, f"data.datasets.0.path={chat}", "data.validation=[]")
    case("15 chat roles out of order", result, 0, "have roles out of order")
    rows[-1] = (
        rows[-1][0],
        next(ln for ln in result.stderr.splitlines() if "order" in ln),
        *rows[-1][2:],
    )
    case("16 empty assistant turns", result, 0, "whose every assistant turn is empty")
    rows[-1] = (
        rows[-1][0],
        next(ln for ln in result.stderr.splitlines() if "empty" in ln),
        *rows[-1][2:],
    )
    # 17
    custom = work / "custom"
    shutil.copytree(ROOT / "examples" / "tiny-llama", custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="xyz", auto_map={"AutoConfig": "c.X", "AutoModelForCausalLM": "m.X"})
    (custom / "config.json").write_text(json.dumps(config))
    case(
        "17 model with remote code",
        tunesmith("generate", "--model", str(custom), "--raw", "x"),
        2,
        "ships its own Python code",
    )
    # 18
    case(
        "18 merge --adapter missing/",
        tunesmith("merge", "--adapter", "missing/", "--out", str(work / "m")),
        2,
        "--adapter: missing/: no such folder",
    )
    # 19
    ctrl = work / "ctrl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunesmith.cli",
            "train",
            QUICK,
            f"output_dir={ctrl}",
            "train.log_every_steps=1",
            "eval.generate_samples=0",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (ctrl / "metrics.jsonl").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate()
    case(
        "19 Ctrl-C during train",
        subprocess.CompletedProcess([], proc.returncode, out, err),
        130,
        "Continue with: tunesmith train",
    )
    # 20
    modes = sorted({oct(p.stat().st_mode & 0o777) for p in adapter.iterdir()})
    umask = os.umask(0)
    os.umask(umask)
    rows.append(
        (
            "20 file modes of the adapter",
            f"modes {', '.join(modes)} (umask {oct(umask)})",
            0,
            modes == [oct(0o666 & ~umask)],
        )
    )
    # 21
    axolotl = work / "axolotl.yaml"
    axolotl.write_text(
        "base_model: examples/tiny-llama\nlearning_rate: 2e-4\nlora_r: 8\n"
        "sequence_len: 512\ngradient_accumulation_steps: 4\n"
    )
    case(
        "21 Axolotl keys",
        tunesmith("config", "check", str(axolotl)),
        2,
        "tunesmith calls this model.path",
    )
    # 22
    result = tunesmith("train", "--help", env={"COLUMNS": "100"})
    case("22 train --help", result, 0, "Example: tunesmith train")
    rows[-1] = (
        rows[-1][0],
        next(ln.strip() for ln in result.stdout.splitlines() if "Example:" in ln),
        *rows[-1][2:],
    )

    # ten more bad inputs of the same classes
    case(
        "a --resume with nothing to resume",
        tunesmith("train", QUICK, f"output_dir={work / 'empty'}", "--resume"),
        2,
        "no checkpoint in",
    )
    (work / "afile").write_text("x")
    case(
        "b output_dir is a file",
        tunesmith("train", QUICK, f"output_dir={work / 'afile'}", *SHORT),
        2,
        "is a file (or lies under one); give a folder",
    )
    (work / "nodata").mkdir()
    case(
        "c data folder without data files",
        tunesmith("preprocess", QUICK, f"data.datasets.0.path={work / 'nodata'}"),
        2,
        "folder has no",
    )
    broken_yaml = work / "broken.yaml"
    broken_yaml.write_text("model:\n  path: [unclosed\n")
    case("d YAML syntax error", tunesmith("config", "check", str(broken_yaml)), 2, "broken.yaml")
    (work / "not_adapter").mkdir()
    case(
        "e --adapter folder without adapter_config.json",
        tunesmith(
            "generate",
            "--adapter",
            str(work / "not_adapter"),
            "--model",
            "examples/tiny-llama",
            "x",
        ),
        2,
        "adapter_config.json",
    )
    (work / "exists.gguf").write_text("x")
    case(
        "f export over an existing file",
        tunesmith("export", "--model", "examples/tiny-llama", "--out", str(work / "exists.gguf")),
        2,
        "already exists",
    )
    case(
        "g hub id with HF_HUB_OFFLINE",
        tunesmith(
            "merge",
            "--adapter",
            str(adapter),
            "--base",
            "meta-llama/Llama-3.1-8B",
            "--out",
            str(work / "m2"),
            env={"HF_HUB_OFFLINE": "1"},
        ),
        2,
        "HF_HUB_OFFLINE is set",
    )
    case(
        "h adapter loaded under name ../x",
        python(
            "import tunesmith; from transformers import AutoModelForCausalLM as A;"
            f"m = A.from_pretrained('examples/tiny-llama'); tunesmith.load_adapter(m, '{adapter}', "
            "name='../x')"
        ),
        1,
        "is not allowed",
    )
    number = work / "number.json"
    number.write_text("42")
    case(
        "i JSON data file holding a number",
        tunesmith("preprocess", QUICK, f"data.datasets.0.path={number}", "data.validation=[]"),
        2,
        "expected a JSON list of records",
    )
    case(
        "j quantize --bits 5",
        tunesmith(
            "quantize",
            "--model",
            "examples/tiny-llama",
            "--method",
            "rtn",
            "--bits",
            "5",
            "--out",
            str(work / "q"),
        ),
        2,
        "--bits: 5 is not supported",
    )
    case(
        "k missing chat template file",
        tunesmith("preprocess", QUICK, "data.chat_template=./none.jinja"),
        2,
        "no such template file",
    )
    case("l plan for an unknown GPU", tunesmith("plan", QUICK, "--gpu", "5090"), 2, "known:")

    table = ["| case | what the user sees | exit | as expected |", "|---|---|---|---|"]
    for name, text, code, ok in rows:
        table.append(f"| {name} | `{text.replace('|', '/')}` | {code} | {'yes' if ok else 'NO'} |")
    report = "\n".join(table) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    shutil.rmtree(work, ignore_errors=True)
    bad_rows = [r[0] for r in rows if not r[3]]
    print(f"{len(rows) - len(bad_rows)} as expected, {len(bad_rows)} not: {bad_rows}")
    sys.exit(1 if bad_rows else 0)


if __name__ == "__main__":
    main()
