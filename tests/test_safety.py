"""Safety and failure handling, tried as a hostile user would: names that would escape their
folder, bases that would be fetched from the hub, two runs in one folder, damaged files, broken
inputs, Ctrl-C, file modes, other tools' config keys and the help texts. Each case asserts the
exact message (one line, exit 2, no traceback, from the CLI) or the invariant that was broken."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers.data import BUNDLED, chat_tokenizer, data_section, write_jsonl
from helpers.models import make_model
from helpers.runs import ROOT, make_config, quiet, run_cli
from transformers import AutoModelForCausalLM

import tunesmith
from tunesmith.data import prepare_data
from tunesmith.errors import AdapterError, TunesmithError
from tunesmith.paths import NAME_RULE, check_name, inside, model_source
from tunesmith.provenance import RECORD_NAME
from tunesmith.shards import check_output
from tunesmith.train.checkpoint import list_checkpoints
from tunesmith.train.lock import LOCK_NAME, FolderLock
from tunesmith.train.loop import Run, TrainingInterrupted, train
from tunesmith.train.plot import plot_metrics

LORA = tunesmith.LoRAConfig(r=2, alpha=4, targets=["q_proj"])


# --- 1. names never become paths outside their folder -------------------------------------
@pytest.mark.parametrize("name", ["/tmp/x", "sub/dir", "~", "..", "a.b", "", "-x", "a b", "é"])
def test_adapter_names_are_plain(name):
    model = make_model("llama")
    with pytest.raises(AdapterError) as err:
        tunesmith.add_lora(model, LORA, name=name)
    assert str(err.value) == f"adapter name {name!r} is not allowed: use {NAME_RULE}"
    for good in ("default", "task_2", "My-Adapter", "_x"):
        assert check_name(good) == good


def test_save_and_load_refuse_names_that_leave_the_folder(tmp_path):
    model = make_model("llama")
    tunesmith.add_lora(model, LORA, name="ok")
    tunesmith.save_adapter(model, tmp_path / "out", names=["ok"])
    assert (tmp_path / "out" / "ok" / "adapter_model.safetensors").is_file()
    with pytest.raises(AdapterError, match=r"^unknown adapter '/tmp/x'"):
        tunesmith.save_adapter(model, tmp_path / "out", names=["/tmp/x"])
    with pytest.raises(AdapterError, match=r"^adapter name '\.\./ok' is not allowed"):
        tunesmith.load_adapter(make_model("llama"), tmp_path / "out", name="../ok")
    # a link inside the folder that leads out is caught on the resolved path
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "ok").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AdapterError, match=r"^adapter 'ok''s folder .*/out2/ok leads outside"):
        tunesmith.save_adapter(model, tmp_path / "out2", names=["ok"])
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert inside(tmp_path, "a", "b") == tmp_path / "a" / "b"


# --- 2 and 14. local paths stay local; the base is recorded and checked -------------------
def test_relative_base_is_stored_absolute_and_checked(tmp_path, tiny_dir):
    # train from a relative model.path (as the quickstart does), then use the adapter elsewhere
    rel = os.path.relpath(tiny_dir, Path.cwd())
    config = make_config(tmp_path, tiny_dir, model={"path": rel}, train={"max_steps": 2})
    train(config, progress=quiet())
    adapter = Path(config.output_dir) / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(Path(tiny_dir).resolve())
    record = json.loads((adapter / RECORD_NAME).read_text())
    assert record["path"] == str(Path(tiny_dir).resolve()) and record["weights"]
    result = run_cli(
        "generate", "--adapter", str(adapter), "--max-new-tokens", "2", "hi", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    # the same adapter on a base with other weights: a one-line warning naming both
    other = tmp_path / "other"
    m = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        m.model.embed_tokens.weight.add_(1.0)
    m.save_pretrained(other)
    chat_tokenizer().save_pretrained(other)
    result = run_cli(
        "generate", "--adapter", str(adapter), "--model", str(other), "--max-new-tokens", "1", "hi"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == (
        f"warning: adapter {adapter} was trained on the base {Path(tiny_dir).resolve()}, and "
        f"{other} is not that model (the weight files differ); its outputs will not be the "
        "trained ones. Give the base it was trained on with --model (or --base)"
    )


def test_a_missing_local_path_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    started = time.perf_counter()
    result = run_cli(
        "config", "check", "examples/quickstart.yaml", "model.path=examples/nothing-here"
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: examples/quickstart.yaml: model.path: examples/nothing-here: no such folder "
        f"(relative to {ROOT})\n"
    )
    result = run_cli(
        "train",
        "examples/quickstart.yaml",
        "model.path=examples/nothing-here",
        f"output_dir={tmp_path / 'o'}",
    )
    assert result.returncode == 2 and result.stderr == (
        f"error: model.path: examples/nothing-here: no such folder (relative to {ROOT})\n"
    )
    assert time.perf_counter() - started < 60  # no hub retries (they take about a minute)
    # a hub id passes (no network is asked here); offline, it is refused at once
    assert model_source("someone/some-model", "model.path") == "someone/some-model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunesmithError) as err:
        model_source("someone/some-model", "model.path")
    assert str(err.value) == (
        "model.path: someone/some-model is not a local folder, and HF_HUB_OFFLINE is set, so the "
        "hub is not asked; give a local checkpoint folder or unset HF_HUB_OFFLINE"
    )


# --- 3 and 4. one run per output folder; no appending to another run's files -------------
def test_a_second_run_into_a_busy_output_dir_is_refused(tmp_path, tiny_dir):
    config = make_config(tmp_path, tiny_dir)
    out = Path(config.output_dir)
    holder = FolderLock(out).acquire()
    try:
        run = Run(config, progress=quiet())
        with pytest.raises(TunesmithError) as err:
            run.setup()
        assert str(err.value).startswith(f"output_dir {out} is in use by another run (pid ")
        assert str(err.value).endswith("); wait for it to finish, or use another output_dir")
    finally:
        holder.release()
    assert not (out / "metrics.jsonl").exists()


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, tiny_dir):
    config = make_config(tmp_path, tiny_dir, train={"max_steps": 1})
    out = Path(config.output_dir)
    out.mkdir(parents=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "h", "started": 0}))
    lines = []
    progress = quiet()
    progress.log = lines.append
    train(config, progress=progress)
    assert lines[0].startswith(f"warning: {out}: the previous run (pid 999999 on h, started ")
    assert lines[0].endswith("ended without releasing its lock (killed?); taking it over")
    # released at the end: the next run (resuming) gets it without a message
    lines.clear()
    run = Run(config, resume="latest", progress=progress)
    run.setup()
    run.close()
    assert not any("taking it over" in line for line in lines)


@pytest.fixture
def held_output_dir(tmp_path):
    """An output_dir whose lock another run holds (this process, as a run would hold it)."""
    out = tmp_path / "o"
    lock = FolderLock(out).acquire()
    try:
        yield out
    finally:
        lock.release()


def test_a_run_on_an_output_dir_in_use_is_refused(held_output_dir):
    """The lock is held for as long as the test needs, however slow the machine: no race
    against a run that trains in the background."""
    out = held_output_dir
    args = [
        "train",
        "examples/quickstart.yaml",
        f"output_dir={out}",
        "train.max_steps=2",
        "eval.generate_samples=0",
    ]
    second = run_cli(*args)
    assert second.returncode == 2
    assert second.stderr.startswith(
        f"error: output_dir {out} is in use by another run (pid {os.getpid()} on "
    )
    assert second.stderr.endswith("); wait for it to finish, or use another output_dir\n")
    assert sorted(p.name for p in out.iterdir()) == [".tunesmith.train.lock"]  # nothing written


def test_a_folder_with_a_dead_runs_files_is_refused(tmp_path, tiny_dir):
    config = make_config(tmp_path, tiny_dir)
    out = Path(config.output_dir)
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (out / "config.yaml").write_text("old: run\n")
    with pytest.raises(TunesmithError) as err:
        Run(config, progress=quiet()).setup()
    assert str(err.value) == (
        f"output_dir {out} already holds a run (metrics.jsonl, config.yaml); start over with "
        "--overwrite, or set another output_dir"
    )
    with pytest.raises(TunesmithError, match=r"^--resume: no checkpoint in .*--overwrite"):
        Run(config, resume="latest", progress=quiet()).setup()
    train(config, overwrite=True, progress=quiet())
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert '"loss": 9.0' not in lines[0]


# --- 5. an input inside the output to be replaced ------------------------------------------
def test_an_input_inside_the_output_is_refused(tmp_path):
    out = tmp_path / "X"
    (out / "adapter").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(TunesmithError) as err:
        check_output(out, True, inputs=[str(out / "adapter")])
    assert str(err.value) == (
        f"--out: {out} holds the input {out / 'adapter'}; replacing it would delete the input. "
        "Write to another path"
    )
    check_output(out, True, inputs=[str(tmp_path / "elsewhere"), None])  # others are fine
    result = run_cli(
        "merge",
        "--adapter",
        str(out / "adapter"),
        "--base",
        str(BUNDLED),
        "--out",
        str(out),
        "--overwrite",
    )
    assert result.returncode == 2 and result.stderr == (
        f"error: --out: {out} holds the input {out / 'adapter'}; replacing it would delete the "
        "input. Write to another path\n"
    )
    assert (out / "notes.txt").read_text() == "keep me"
    for args in (
        ["export", "--model", str(out / "adapter"), "--out", str(out), "--overwrite"],
        [
            "quantize",
            "--model",
            str(out / "adapter"),
            "--method",
            "rtn",
            "--out",
            str(out),
            "--overwrite",
        ],
        [
            "combine",
            "--adapter",
            str(out / "adapter"),
            "--base",
            str(BUNDLED),
            "--out",
            str(out),
            "--overwrite",
        ],
        [
            "merge-models",
            "--base",
            str(BUNDLED),
            "--model",
            str(out / "adapter"),
            "--out",
            str(out),
            "--overwrite",
        ],
    ):
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert f"holds the input {out / 'adapter'}; replacing it would delete" in result.stderr
    assert (out / "notes.txt").read_text() == "keep me"


# --- 6 and 7. resume survives damage to its own files -------------------------------------
def _run_with_checkpoints(tmp_path, tiny_dir):
    config = make_config(
        tmp_path, tiny_dir, train={"max_steps": 4, "save_every_steps": 2, "log_every_steps": 1}
    )
    train(config, progress=quiet())
    return config, Path(config.output_dir)


def test_resume_drops_a_torn_last_metrics_line(tmp_path, tiny_dir):
    config, out = _run_with_checkpoints(tmp_path, tiny_dir)
    metrics = out / "metrics.jsonl"
    torn = len(metrics.read_text().splitlines()) + 1
    metrics.write_text(metrics.read_text() + '{"step": 5, "lo')  # a kill mid-write
    assert plot_metrics(out).is_file()  # `tunesmith plot` reads it too (a live run's file)
    lines = []
    progress = quiet()
    progress.log = lines.append
    run = Run(config, resume=str(list_checkpoints(out)[0]), progress=progress)
    run.setup()
    run.close()
    assert f"{metrics}: dropped a torn last line (line {torn})" in lines
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2]
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(TunesmithError) as err:
        Run(config, resume="latest", progress=quiet()).setup()
    assert str(err.value) == (
        f"{metrics}:2: not a JSON line; the metrics file is damaged: delete or fix that line"
    )


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, tiny_dir):
    config, out = _run_with_checkpoints(tmp_path, tiny_dir)
    older, newest = list_checkpoints(out)
    (newest / "trainer_state.json").write_text("{junk")
    lines = []
    progress = quiet()
    progress.log = lines.append
    run = Run(config, resume="latest", progress=progress)
    run.setup()
    run.close()
    assert lines[0].startswith(
        f"warning: --resume: skipping {newest}: trainer_state.json does not read back ("
    )
    assert run.start_step == 2 and lines[1] == f"resumed from {older} at step 2"
    with pytest.raises(TunesmithError) as err:
        Run(config, resume=str(newest), progress=quiet()).setup()
    assert str(err.value).startswith(f"--resume: {newest}: trainer_state.json does not read back")
    # a truncated optimizer file is caught as well
    data = (older / "optimizer.safetensors").read_bytes()
    (older / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TunesmithError) as err:
        Run(config, resume="latest", progress=quiet()).setup()
    assert "reads back whole" in str(err.value)


# --- 8, 9, 10. broken data files name the file and the line or record ----------------------
@pytest.mark.parametrize(
    "name, content, where",
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2"),
        ("bad.json", b'[{"text": "ok"},\n {"text": "caf\xe9"}]', "line 2"),
        ("bad.csv", b"text\nok\ncaf\xe9\n", "line 3"),
    ],
)
def test_non_utf8_data_names_the_file_and_line(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_bytes(content)
    data = data_section(tmp_path, [{"path": str(path), "format": "completion"}])
    with pytest.raises(TunesmithError) as err:
        prepare_data(data, chat_tokenizer(), seed=0)
    assert str(err.value) == (
        f"{path}, {where}: not UTF-8 text (byte 0xe9); save the file as UTF-8 (e.g. iconv -f "
        "latin1 -t utf-8)"
    )


@pytest.mark.parametrize("content", [b"PAR1 truncated", b"\x00" * 64])
def test_a_broken_parquet_file_is_named(tmp_path, content):
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    data = data_section(tmp_path, [{"path": str(path), "format": "completion"}])
    with pytest.raises(TunesmithError) as err:
        prepare_data(data, chat_tokenizer(), seed=0)
    assert str(err.value).startswith(f"{path}: not a readable Parquet file (")
    assert str(err.value).endswith("); it is damaged, incomplete or in another format")


@pytest.mark.parametrize(
    "record, what",
    [
        ({"input_ids": [5, 6, 99999]}, "input_ids[2] is 99999"),
        ({"input_ids": [5, -1, 6]}, "input_ids[1] is -1"),
        ({"input_ids": [5, 6, 7], "labels": [-100, 6, -5]}, "labels[2] is -5"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, record, what):
    path = write_jsonl(tmp_path / "tok.jsonl", [{"input_ids": [5, 6, 7]}, record])
    tokenizer = chat_tokenizer()
    data = data_section(tmp_path, [{"path": str(path), "format": "tokenized"}])
    with pytest.raises(TunesmithError) as err:
        prepare_data(data, tokenizer, seed=0)
    masked = " or -100 (masked)" if what.startswith("labels") else ""
    assert str(err.value) == (
        f"{path}, line 2: {what}, outside the tokenizer's vocabulary (0 … {len(tokenizer) - 1}"
        f"{masked}); was the data tokenized with another tokenizer?"
    )


# --- 15, 16. chat turn order and empty responses -------------------------------------------
def test_out_of_order_and_empty_conversations_are_counted_and_masked_right(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "assistant", "content": "Hello, I help."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yes"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    tokenizer = chat_tokenizer()
    data = data_section(tmp_path, [{"path": str(path), "format": "chat"}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = prepare_data(data, tokenizer, seed=0, use_cache=False)
    messages = [str(w.message) for w in caught]
    assert (
        f"{path}: dropped 1 of 4 conversations whose every assistant turn is empty (only "
        "end-of-turn tokens would train); fill in the responses or remove those records"
    ) in messages
    assert (
        f"{path}: 2 of 4 conversations have roles out of order (an assistant turn before any user "
        "turn, two user or two assistant turns in a row, or a system message after the start); "
        "they are kept, and an assistant turn before any user turn is masked as context, not "
        "trained"
    ) in messages
    stats = prepared.sources[0]
    assert (stats.out_of_order, stats.dropped_empty_response, stats.samples) == (2, 1, 3)
    # read back from the cache, the source says the same
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert prepare_data(data, tokenizer, seed=0).sources[0].from_cache is False
        assert prepare_data(data, tokenizer, seed=0).sources[0].from_cache is True
    assert [str(w.message) for w in again][-2:] == messages[-2:]
    # the assistant-first record trains its answer to the user, not its greeting or header
    ids, labels = prepared.train[0]
    trained = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100])
    assert trained == "yes<|im_end|>\n" or trained.startswith("yes<|im_end|>")
    assert "Hello" not in trained and "assistant" not in trained


# --- 11. damaged safetensors files ----------------------------------------------------------
def test_damaged_safetensors_are_named(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in BUNDLED.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    result = run_cli("generate", "--model", str(model_dir), "--raw", "x")
    assert result.returncode == 2
    assert result.stderr == (
        f"error: {weights}: damaged or incomplete safetensors file ({len(data) // 2:,} bytes, its "
        f"header describes {len(data):,}); copy or save it again\n"
    )
    weights.write_bytes(os.urandom(4096))
    result = run_cli("generate", "--model", str(model_dir), "--raw", "x")
    assert result.returncode == 2 and result.stderr.startswith(f"error: {weights}: damaged or ")
    model = make_model("llama")
    tunesmith.add_lora(model, LORA)
    tunesmith.save_adapter(model, tmp_path / "a")
    adapter_file = tmp_path / "a" / "adapter_model.safetensors"
    adapter_file.write_bytes(adapter_file.read_bytes()[:100])
    with pytest.raises(TunesmithError, match=rf"^{adapter_file}: damaged or incomplete"):
        tunesmith.load_adapter(make_model("llama"), tmp_path / "a")


# --- 12. a full disk while training --------------------------------------------------------
def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_nothing(
    tmp_path, tiny_dir, monkeypatch
):
    from tunesmith.train import checkpoint as checkpoint_module

    config = make_config(tmp_path, tiny_dir, train={"max_steps": 4, "save_every_steps": 2})
    out = Path(config.output_dir)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "atomic_write_safetensors", full)
    with pytest.raises(TunesmithError) as err:
        train(config, progress=quiet())
    assert str(err.value).startswith(
        f"{out / 'checkpoints' / 'step-000002'}: no space left on the disk while writing it ("
    )
    assert list((out / "checkpoints").iterdir()) == []  # no temp folder left
    monkeypatch.undo()
    with pytest.raises(TunesmithError, match="already holds a run"):  # never appended to
        Run(config, progress=quiet()).setup()


# --- 13, 17, 18. generate, remote code, a missing adapter -----------------------------------
def test_generate_with_an_empty_raw_prompt():
    result = run_cli("generate", "--model", str(BUNDLED), "--raw", "")
    assert result.returncode == 2 and result.stderr == (
        "error: the prompt is empty: it gives no tokens (and this tokenizer adds no BOS); give "
        "some text to continue\n"
    )


def test_a_checkpoint_with_remote_code_says_what_trusting_it_means(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    for f in BUNDLED.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="xyz",
        architectures=["XModel"],
        auto_map={
            "AutoConfig": "configuration_x.XConfig",
            "AutoModelForCausalLM": "modeling_x.XModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    expected = (
        f"error: model.path: {folder} ships its own Python code, which transformers must run to "
        "load {what}; model.trust_remote_code: true (generate and chat: --trust-remote-code) "
        "would run that code on this machine: set it only if you trust where the checkpoint came "
        "from\n"
    )
    result = run_cli("generate", "--model", str(folder), "--raw", "x")
    assert result.returncode == 2 and result.stderr == expected.format(what="a model")
    result = run_cli("plan", "examples/quickstart.yaml", f"model.path={folder}")
    assert result.returncode == 2 and result.stderr == expected.format(what="a model config")


def test_merge_with_a_missing_adapter_folder(tmp_path):
    result = run_cli("merge", "--adapter", "missing/", "--out", str(tmp_path / "m"))
    assert result.returncode == 2
    assert result.stderr == "error: --adapter: missing/: no such folder\n"


# --- 19. Ctrl-C ----------------------------------------------------------------------------
def test_ctrl_c_checkpoints_the_step_and_says_how_to_resume(tmp_path, tiny_dir):
    config = make_config(tmp_path, tiny_dir, train={"max_steps": 6, "save_every_steps": 100})
    before = signal.getsignal(signal.SIGINT)  # default, or ignored when launched in background

    def interrupt(step, entry):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as err:
        train(config, on_step=interrupt, progress=quiet())
    checkpoint = Path(config.output_dir) / "checkpoints" / "step-000002"
    assert str(err.value) == f"stopped at step 2 of 6; saved checkpoint {checkpoint}"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    summary = train(config, resume="latest", progress=quiet())
    assert summary["steps"] == 6


def test_ctrl_c_from_the_command_line(tmp_path):
    out = tmp_path / "o"
    args = [
        sys.executable,
        "-m",
        "tunesmith.cli",
        "train",
        "examples/quickstart.yaml",
        f"output_dir={out}",
        "train.log_every_steps=1",
        "eval.generate_samples=0",
    ]
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped at step ") and " of 312; saved checkpoint " in last
    assert last.endswith(
        f"Continue with: tunesmith train examples/quickstart.yaml output_dir={out} "
        "train.log_every_steps=1 eval.generate_samples=0 --resume"
    )
    assert list_checkpoints(out)


# --- 20. file modes follow the umask -------------------------------------------------------
def test_outputs_are_readable_by_the_group_as_the_umask_allows(tmp_path, tiny_dir):
    previous = os.umask(0o022)
    try:
        config = make_config(tmp_path, tiny_dir, train={"max_steps": 2})
        train(config, progress=quiet())
    finally:
        os.umask(previous)
    out = Path(config.output_dir)
    files = [p for p in out.rglob("*") if p.name != LOCK_NAME]
    modes = {stat.S_IMODE(p.stat().st_mode) for p in files if p.is_file()}
    dirs = {stat.S_IMODE(p.stat().st_mode) for p in files if p.is_dir()}
    assert modes == {0o644} and dirs == {0o755}


# --- 21, 22. other tools' keys; the help texts ---------------------------------------------
def test_keys_from_other_tools_get_the_tunesmith_key(tmp_path):
    config = tmp_path / "axolotl.yaml"
    config.write_text(
        "base_model: examples/tiny-llama\nlearning_rate: 2.0e-4\nnum_epochs: 3\nlora_r: 8\n"
        "lora_alpha: 16\nadapter: lora\nsequence_len: 512\ncutoff_len: 512\n"
        "gradient_accumulation_steps: 4\n"
        "data:\n  datasets:\n    - path: examples/data/quickstart_train.jsonl\n      type: chat\n"
    )
    result = run_cli("config", "check", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {config}:1: base_model: unknown key; tunesmith calls this model.path",
        f"error: {config}:2: learning_rate: unknown key; tunesmith calls this train.lr",
        f"error: {config}:3: num_epochs: unknown key; tunesmith calls this train.epochs",
        f"error: {config}:4: lora_r: unknown key; tunesmith calls this method.r",
        f"error: {config}:5: lora_alpha: unknown key; tunesmith calls this method.alpha",
        f"error: {config}:6: adapter: unknown key; tunesmith calls this method.name (lora or "
        "qlora)",
        f"error: {config}:7: sequence_len: unknown key; tunesmith calls this data.max_seq_len",
        f"error: {config}:8: cutoff_len: unknown key; tunesmith calls this data.max_seq_len",
        f"error: {config}:9: gradient_accumulation_steps: unknown key; tunesmith calls this "
        "train.grad_accum_steps",
        f"error: {config}:13: data.datasets.0.type: unknown key; tunesmith calls this "
        "data.datasets[].format (alpaca, chat, completion or tokenized)",
        f"error: {config}: model: required; add it",
    ]


COMMANDS = [
    "preprocess",
    "train",
    "plot",
    "eval",
    "generate",
    "chat",
    "merge",
    "combine",
    "merge-models",
    "quantize",
    "plan",
    "export",
]


@pytest.mark.parametrize("command", [*COMMANDS, "config check", "config schema"])
def test_help_ends_with_examples_and_shows_flags_as_flags(command):
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *command.split(), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    last_panel = max(i for i, line in enumerate(lines) if line.startswith("╰"))
    epilog = lines[last_panel + 1 :]
    assert epilog and epilog[0].startswith(f"Example: tunesmith {command}")
    assert all(not line.startswith(("│", "╭")) for line in epilog)
    assert "<bool>" not in result.stdout
    if command == "train":
        text = " ".join(lines)
        for method in ("lora", "qlora", "full", "prompt", "prefix", "bottleneck", "ia3"):
            assert method in text


# --- 0. the transformers range is declared and CI tests both of its ends ---------------------
def test_ci_tests_both_ends_of_the_declared_transformers_range():
    import re

    import transformers

    pyproject = (ROOT / "pyproject.toml").read_text()
    low, high = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', pyproject).groups()
    ci = (ROOT / ".ci" / "run").read_text()
    lowest = re.search(r"^TRANSFORMERS_LOWEST=([\d.]+)$", ci, re.M).group(1)
    newest = re.search(r"^TRANSFORMERS_NEWEST=([\d.]+)$", ci, re.M).group(1)

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in text.split("."))

    assert version(lowest)[: len(version(low))] == version(low)  # the lower bound itself
    assert version(lowest) <= version(newest) < version(high)
    assert version(newest)[:2] == (version(high)[0], version(high)[1] - 1)  # the last minor
    assert version(low) <= version(transformers.__version__.split(".dev")[0]) < version(high)
    readme = (ROOT / "README.md").read_text()
    assert f"`transformers>={low},<{high}`" in readme
    # 23: the quickstart's figures name the versions they were measured with, both ends included
    measured = re.search(
        r"These figures are the same with transformers (.+?) \(torch", readme, re.S
    )
    assert lowest in measured.group(1) and newest in measured.group(1)


def test_an_output_dir_that_is_a_file(tmp_path, tiny_dir):
    config = make_config(tmp_path, tiny_dir)
    Path(config.output_dir).write_text("not a folder")
    with pytest.raises(TunesmithError) as err:
        Run(config, progress=quiet()).setup()
    assert (
        str(err.value)
        == f"output_dir {config.output_dir} is a file (or lies under one); give a folder"
    )


def test_a_missing_local_dataset_folder_is_not_a_hub_dataset(tmp_path):
    result = run_cli(
        "preprocess", "examples/quickstart.yaml", "data.datasets.0.path=examples/data/missing"
    )
    assert result.returncode == 2
    assert result.stderr == "error: examples/data/missing: no such file or folder\n"


def test_a_short_write_counts_as_a_full_disk():
    from tunesmith.io import is_disk_full

    assert is_disk_full(OSError("1048576 requested and 977984 written"))  # numpy's tofile
    assert is_disk_full(OSError(28, "No space left on device"))
    assert is_disk_full(RuntimeError("I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(13, "Permission denied"))
