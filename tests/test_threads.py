"""`--threads`: physical cores from the topology, the defaults, pinning, and the errors."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from helpers.adapters import BUNDLED
from typer.testing import CliRunner

from tunesmith import threads
from tunesmith.cli import app
from tunesmith.errors import TunesmithError
from tunesmith.threads import (
    ThreadPlan,
    apply_threads,
    default_threads,
    physical_cpus,
    plan_threads,
)


def _topology(root, cores: dict[int, tuple[int, int]]):
    """A fake /sys/devices/system/cpu: logical cpu -> (package, core)."""
    for cpu, (package, core) in cores.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


def test_hyperthread_siblings_count_once(tmp_path):
    # 2 packages x 2 cores x 2 threads, siblings numbered as Linux does (cpu n and n+4)
    layout = {cpu: (cpu // 2 % 2, cpu % 2) for cpu in range(8)}
    sys_cpu = _topology(tmp_path, layout)
    assert physical_cpus(list(range(8)), sys_cpu) == [0, 1, 2, 3]
    # only what the affinity mask allows: siblings 1 and 5 are one core
    assert physical_cpus([1, 5, 6], sys_cpu) == [1, 6]


def test_without_a_topology_every_cpu_counts(tmp_path):
    assert physical_cpus([0, 3, 7], tmp_path) == [0, 3, 7]


def test_defaults_keep_a_core_for_serving_and_share_between_processes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "physical_cpus", lambda: [0, 1, 2, 3, 4, 5, 6, 7])
    assert default_threads() == 8
    assert default_threads(reserve=1) == 7
    assert default_threads(share=2) == 4
    assert default_threads(share=3) == 2
    monkeypatch.setattr(threads, "physical_cpus", lambda: [0])
    assert default_threads(reserve=1) == 1  # never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(reserve=1) == 3  # the user's choice wins


def test_plans_pin_one_group_of_physical_cores_per_process(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "physical_cpus", lambda: [0, 2, 4, 6])
    assert plan_threads(None) == ThreadPlan(4, (0, 2, 4, 6))
    assert plan_threads(None, reserve=1) == ThreadPlan(3, (2, 4, 6))  # the HTTP side gets 0
    assert plan_threads(None, share=2, rank=0) == ThreadPlan(2, (4, 6))
    assert plan_threads(None, share=2, rank=1) == ThreadPlan(2, (0, 2))
    assert plan_threads(6) == ThreadPlan(6, ())  # more threads than cores: not pinned
    assert plan_threads(2, pin=False) == ThreadPlan(2, ())
    assert plan_threads(3, reserve=1).describe() == "3 threads pinned to CPUs 2,4,6"
    assert ThreadPlan(1, (0,)).describe() == "1 thread pinned to CPUs 0"
    assert ThreadPlan(4, (0, 1, 2, 5)).describe() == "4 threads pinned to CPUs 0-2,5"
    with pytest.raises(TunesmithError) as err:
        plan_threads(0)
    assert str(err.value) == "--threads: must be at least 1 (got 0)"


def test_apply_pins_the_calling_thread_only():
    cpu = physical_cpus()[-1]
    before, main_threads = os.sched_getaffinity(0), torch.get_num_threads()
    seen = {}

    def worker():
        apply_threads(ThreadPlan(1, (cpu,)))
        seen["cpus"] = os.sched_getaffinity(0)
        seen["threads"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    try:
        assert seen == {"cpus": {cpu}, "threads": 1}
        assert os.sched_getaffinity(0) == before  # the caller's thread is untouched
    finally:
        torch.set_num_threads(main_threads)


def test_the_serving_engine_computes_on_its_pinned_core():
    from tunesmith.builder import load_for_inference
    from tunesmith.serve.engine import Engine, Params, Sequence

    cpu = physical_cpus()[-1]
    model, tokenizer, _ = load_for_inference(str(BUNDLED), [])
    engine = Engine(model, tokenizer, threads=ThreadPlan(1, (cpu,)))
    seen, done = [], threading.Event()

    def on_event(kind, value):
        seen.append(os.sched_getaffinity(0))  # called from the worker thread
        if kind != "text":
            done.set()

    main_threads = torch.get_num_threads()
    engine.start()
    try:
        engine.submit([Sequence([7, 450, 3483], None, Params(max_tokens=4), on_event)])
        assert done.wait(60)
    finally:
        engine.stop()
        torch.set_num_threads(main_threads)
    assert seen and all(cpus == {cpu} for cpus in seen)


def test_a_bad_threads_option_is_one_line():
    result = CliRunner().invoke(
        app, ["generate", "--model", str(BUNDLED), "--raw", "--threads", "0", "hi"]
    )
    assert isinstance(result.exception, TunesmithError)  # the CLI prints it as "error: ..."
    assert str(result.exception) == "--threads: must be at least 1 (got 0)"


def test_a_torchrun_process_takes_its_share(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "physical_cpus", lambda: [0, 1, 2, 3])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert threads.process_threads(None) == ThreadPlan(2, (0, 1))
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    assert threads.process_threads(None) == ThreadPlan(4, (0, 1, 2, 3))


def test_a_library_training_call_leaves_the_callers_threads_alone(monkeypatch):
    from tunesmith import jobs

    called = []
    monkeypatch.setattr(jobs, "apply_threads", called.append)
    monkeypatch.setattr(jobs, "make_run", _Stop)
    with pytest.raises(_Stopped):
        jobs.train_job(object())
    assert called == []
    with pytest.raises(_Stopped):
        jobs.train_job(object(), threads=1)
    assert [plan.threads for plan in called] == [1]


class _Stopped(Exception):
    pass


class _Stop:
    def __init__(self, *args, **kwargs):
        raise _Stopped
