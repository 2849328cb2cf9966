"""The training step's speed switches on CPU: activation offloading (logic, gradients and the
planner's account of it), the kernel wiring against the torch references (and liger-kernel's
Triton kernels run by Triton's CPU interpreter), regional compilation without recompiles,
padding-free packing and random-weight benchmark runs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.models import (
    ARCHS,
    input_ids,
    llama_config,
    lora_config,
    make_model,
    randomize_adapter,
)
from helpers.runs import ROOT, losses, make_config, quiet

import tunesmith
from tunesmith.config import TrainSection, config_from_dict
from tunesmith.errors import TunesmithError
from tunesmith.methods.lora import LoRAConfig
from tunesmith.plan.planner import planned_peak
from tunesmith.plan.trace import trace_step
from tunesmith.train.kernels import KERNELS, apply_kernels, resolve_kernels, torch_functions
from tunesmith.train.loop import Run
from tunesmith.train.loss import model_loss_sum
from tunesmith.train.offload import ActivationOffload


def _batch() -> dict:
    ids = input_ids(batch=2, seq=12)
    return {"input_ids": ids, "labels": ids.clone()}


def _grads(model, context=None) -> tuple[float, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with context or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss, count = model_loss_sum(model, _batch())
    (loss / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach() / count), grads


def _lora_model(arch: str = "llama", checkpointing: bool = True):
    model = make_model(arch)
    tunesmith.add_lora(model, lora_config())
    randomize_adapter(model, "default")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# --- activation offloading ----------------------------------------------------------------
def test_offloading_moves_each_checkpointed_input_once_and_keeps_the_gradients():
    model = _lora_model()
    loss, grads = _grads(model)
    offload = ActivationOffload("cpu", min_bytes=0, record=True)
    offload_loss, offload_grads = _grads(model, offload)
    assert offload_loss == loss
    for name, grad in grads.items():
        torch.testing.assert_close(offload_grads[name], grad, rtol=0, atol=0, msg=name)
    # 2 checkpointed decoder layers: their hidden-state inputs, rotary cos and sin (handed to
    # both layers, moved once), the final hidden state and the loss head's rows
    assert offload.stats["tensors"] == 7
    events = offload.events
    outs = [h for kind, h in events if kind == "out"]
    assert outs == list(range(7)) and events[:7] == [("out", h) for h in outs]
    first_in = {}
    for at, (kind, h) in enumerate(events):
        if kind == "in":
            first_in.setdefault(h, at)
    assert set(first_in) == set(outs)  # everything came back
    for at, (kind, h) in enumerate(events):
        if kind == "prefetch":  # fetched ahead of its first use, at most two ahead
            assert at < first_in[h]
            pending = [p for k, p in events[:at] if k == "prefetch" and first_in[p] > at]
            assert len(pending) <= 1
    assert offload.stats["prefetched"] >= offload.stats["tensors"] - 2
    assert offload.moved == {}  # and was released


def test_offloading_leaves_small_tensors_and_parameters_alone():
    model = _lora_model()
    offload = ActivationOffload("cpu", min_bytes=1 << 30)
    _grads(model, offload)
    assert offload.stats == {"tensors": 0, "bytes": 0, "prefetched": 0}


def test_the_planner_traces_offloading_as_inputs_off_the_device():
    config = llama_config(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    method = LoRAConfig()
    plain = trace_step(
        config, method, TrainSection(gradient_checkpointing=True), 2048, 2, torch.bfloat16
    )
    offloaded = trace_step(
        config,
        method,
        TrainSection(gradient_checkpointing=True, offload_activations=True),
        2048,
        2,
        torch.bfloat16,
    )
    layer_input = 2 * 2048 * 1024 * 2  # bf16
    # of 8 checkpointed inputs at most two are on the device at once in the backward
    saved = plain.peak_bytes - offloaded.peak_bytes
    assert 5 * layer_input <= saved <= 8 * layer_input


def test_offloading_without_checkpointing_is_refused(tmp_path, tiny_dir):
    with pytest.raises(ValueError) as err:
        make_config(
            tmp_path, tiny_dir, train={"offload_activations": True, "gradient_checkpointing": False}
        )
    assert (
        "train.offload_activations moves the checkpointed layer inputs, so it needs "
        "train.gradient_checkpointing: true" in str(err.value)
    )


# --- kernels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gpt2"])
def test_kernel_wiring_with_the_torch_references_changes_nothing(arch):
    model = _lora_model(arch, checkpointing=False)
    patched = copy.deepcopy(model)
    lines = apply_kernels(patched, KERNELS, torch_functions())
    assert any(line.startswith("rms_norm: ") for line in lines)
    if arch in ("llama", "mistral", "qwen2"):  # gemma: GeGLU; phi3: one gate_up_proj
        assert "swiglu: 2 modules" in lines
    loss, grads = _grads(model)
    patched_loss, patched_grads = _grads(patched)
    assert patched_loss == pytest.approx(loss, abs=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(patched_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_kernels_resolve_by_device_and_installation(monkeypatch):
    import tunesmith.train.kernels as kernels

    assert resolve_kernels("auto", "cpu") == ()
    assert resolve_kernels("torch", "cuda") == ()
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    assert resolve_kernels("auto", "cuda") == ()
    with pytest.raises(TunesmithError) as err:
        resolve_kernels("liger", "cuda")
    assert str(err.value) == (
        "train.kernels: liger needs liger-kernel (and Triton); pip install 'tunesmith[gpu]', "
        "or set train.kernels: torch"
    )


LIGER_ON_CPU = """
import sys, torch
sys.path.insert(0, "tests")
from helpers.models import make_model, lora_config, randomize_adapter, input_ids
import tunesmith
from tunesmith.train.kernels import apply_kernels, liger_functions
from tunesmith.train.loss import model_loss_sum
import copy
torch.manual_seed(0)
model = make_model("llama")
tunesmith.add_lora(model, lora_config())
randomize_adapter(model, "default")
patched = copy.deepcopy(model)
print(apply_kernels(patched, ["rope", "cross_entropy"], liger_functions()))
ids = input_ids(batch=2, seq=12)
out = {}
for name, m in (("torch", model), ("liger", patched)):
    m.train()
    loss, n = model_loss_sum(m, {"input_ids": ids, "labels": ids})
    loss.backward()
    out[name] = (float(loss), {k: p.grad for k, p in m.named_parameters() if p.grad is not None})
assert abs(out["torch"][0] - out["liger"][0]) < 1e-4, out
for k, g in out["torch"][1].items():
    torch.testing.assert_close(out["liger"][1][k], g, atol=1e-5, rtol=1e-4)
print("same", out["torch"][0], out["liger"][0])
from tunesmith.train.kernels import KERNELS, checked_kernels
print("checked", checked_kernels(KERNELS, "cpu"))
"""


def test_liger_kernels_under_the_triton_interpreter_match_the_torch_path():
    """liger-kernel's rotary and fused linear cross-entropy kernels, run by Triton's CPU
    interpreter, give the torch path's loss and gradients. (Its RMSNorm and SwiGLU kernels
    call `.to()` on scalar arguments, which the interpreter of Triton 3.9 cannot run: those two
    are compared on the GPU, by bench/gpu_step.py --check, and the first-use check falls back
    from them here.)"""
    pytest.importorskip("liger_kernel")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LIGER_ON_CPU)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "['rope: on', 'cross_entropy: on']" in result.stdout
    assert "same" in result.stdout
    # the first-use check passes the two that run here and leaves the other two to torch
    assert "checked ('rope', 'cross_entropy')" in result.stdout
    assert "liger's rms_norm kernel was checked against torch on cpu and it failed" in (
        result.stderr
    )


# --- runs: compile, padding-free, random weights --------------------------------------------


def test_padding_free_packing_trains_with_the_same_losses(tmp_path, tiny_dir):
    common = {
        "data": {"packing": True, "max_seq_len": 64},  # no dropout: same masks
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"log_every_steps": 1, "max_steps": 3},
    }
    summaries = {}
    for setting in ("off", "on"):
        config = make_config(tmp_path / setting, tiny_dir, **common)
        config.train.padding_free = setting
        run = Run(config, progress=quiet())
        run.setup()
        batch = run.plan.micro_batches(0)[0]
        assert batch["input_ids"].shape[0] == (1 if setting == "on" else 4)
        summaries[setting] = run.run()
    assert summaries["on"]["padding_free"] is True
    assert summaries["on"]["tokens"] < summaries["off"]["tokens"]  # no padding tokens
    assert summaries["on"]["trained_tokens"] == summaries["off"]["trained_tokens"]
    off, on = losses(tmp_path / "off" / "out"), losses(tmp_path / "on" / "out")
    assert on == pytest.approx(off, abs=1e-5)


@pytest.mark.slow
def test_compiled_layers_train_with_the_same_losses_and_no_recompiles(tmp_path, tiny_dir):
    import torch._dynamo

    by_setting = {}
    for compiled in (False, True):
        config = make_config(
            tmp_path / str(compiled),
            tiny_dir,
            data={"packing": True, "max_seq_len": 64},
            train={
                "compile": compiled,
                "max_steps": 4,
                "log_every_steps": 1,
                "gradient_checkpointing": True,
                "micro_batch_size": 2,
            },
        )
        torch._dynamo.reset()
        recompiles: list[int] = []

        def no_recompile_after_the_first(step, entry, recompiles=recompiles):
            # steps 2-4 must reuse step 1's graphs; validation after the last step (no
            # gradients) compiles its own once
            torch._dynamo.config.error_on_recompile = step < 4
            recompiles.append(step)

        run = Run(config, progress=quiet(), on_step=no_recompile_after_the_first)
        run.setup()
        widths = {run.plan.micro_batches(s)[0]["input_ids"].shape[1] for s in range(4)}
        try:
            summary = run.run()
        finally:
            torch._dynamo.config.error_on_recompile = False
        by_setting[compiled] = losses(tmp_path / str(compiled) / "out")
        if compiled:
            assert "torch.compile: 2 decoder layers" in summary["speedups"]
            assert len(widths) > 1  # packed rows of several lengths, one graph
            assert recompiles == [1, 2, 3, 4]
    assert by_setting[True] == pytest.approx(by_setting[False], abs=1e-5)


def test_a_random_weight_benchmark_run_needs_only_config_and_tokenizer(tmp_path, tiny_dir):
    folder = tmp_path / "shape-only"
    folder.mkdir()
    for path in tiny_dir.iterdir():
        if not path.name.endswith(".safetensors"):
            (folder / path.name).write_bytes(path.read_bytes())
    config = make_config(tmp_path, folder, train={"max_steps": 2})
    with pytest.raises(TunesmithError):
        Run(config, progress=quiet()).setup()  # no weights: refused
    raw = config.model_dump()
    raw["model"]["init"] = "random"
    raw["output_dir"] = str(tmp_path / "bench")
    run = Run(config_from_dict(raw), progress=quiet(), planned_peak=planned_peak)
    run.setup()
    result = run.run()
    assert result["tokens_per_s"] > 0
    assert result["planned_peak_bytes"] == planned_peak(run.config)
    assert "fused LoRA step" in result["speedups"]


def test_the_device_scripts_correctness_checks_run_on_cpu():
    """bench/gpu_step.py --check, as the lent GPU runs it (there also liger's kernels)."""
    done = subprocess.run(
        [sys.executable, "bench/gpu_step.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    checks = json.loads(done.stdout)
    assert checks["fused_lora"]["loss_diff"] < 1e-5
    assert checks["fused_lora"]["max_rel_grad_diff"] < 1e-5
    assert checks["offload"] == {"loss_diff": 0.0, "max_rel_grad_diff": 0.0, "tensors_moved": 7}


def test_a_kernel_that_differs_from_torch_falls_back_with_a_warning():
    """The first-use check: a stand-in for liger whose RMSNorm is off by 1% and whose SwiGLU
    raises keeps only the kernels that agree with torch's, naming the others."""
    from tunesmith.train.kernels import checked_kernels, kernel_problem, torch_functions

    reference = torch_functions()
    wrong = dict(reference)
    wrong["rms_norm"] = lambda x, w, eps, offset, casting: (
        reference["rms_norm"](x, w, eps, offset, casting) * 1.01
    )

    def broken(a, b):
        raise RuntimeError("no kernel image is available for execution on the device")

    wrong["swiglu"] = broken
    with pytest.warns(UserWarning) as caught:
        kept = checked_kernels(("rms_norm", "rope", "swiglu", "cross_entropy"), "cpu", wrong)
    assert kept == ("rope", "cross_entropy")
    assert [str(w.message) for w in caught] == [
        "train.kernels: liger's rms_norm kernel was checked against torch on cpu and it differs "
        "from torch's by 1.0e-02 (relative, on small fp32 tensors); torch's rms_norm is used "
        "instead",
        "train.kernels: liger's swiglu kernel was checked against torch on cpu and it failed "
        "(RuntimeError: no kernel image is available for execution on the device); torch's "
        "swiglu is used instead",
    ]
    for kernel in ("rms_norm", "rope", "swiglu", "cross_entropy"):  # torch agrees with itself
        assert kernel_problem(kernel, "cpu", reference, reference) is None
