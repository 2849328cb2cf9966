"""How many CPU threads torch computes with, and on which cores (`--threads` of `train`,
`generate`, `chat` and `serve`).

PyTorch's default is one intra-op thread per logical CPU it sees, each free to run anywhere.
On a machine that is busy with other work that oversubscribes it: every parallel region waits
for its slowest thread, and a thread that the system has parked stalls all of them (the serving
benchmark measured a 20-50x collapse). What vLLM's CPU backend does instead, and what tunesmith
does by default:

- one thread per **physical core** this process may use (hyperthread siblings and CPUs outside
  its affinity mask are not counted);
- `serve` keeps one core for the HTTP side (tokenizing, streaming, Python's share of every
  step) when there are 2 or more: on this project's 2-core machine under load from two other
  processes that is 580 generated tokens/s against 52-375 with both cores, for 12% less on a
  quiet machine (`bench/serve.py --busy 2`);
- under torchrun the cores are shared out between the processes of this machine;
- the computing thread (and the OpenMP team it starts) is **pinned** to that many cores, one
  logical CPU per physical core, so the threads do not wander onto a core the HTTP side or
  another process is using.

`OMP_NUM_THREADS` in the environment is the user's choice and wins over the default (not over
`--threads`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError

_SYS_CPU = Path("/sys/devices/system/cpu")


def allowed_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cpus(cpus: list[int] | None = None, sys_cpu: Path = _SYS_CPU) -> list[int]:
    """One logical CPU per physical core among `cpus` (default: `allowed_cpus()`): the first of
    each core's hyperthread siblings. Where the topology cannot be read, every CPU counts."""
    chosen, seen = [], set()
    for cpu in allowed_cpus() if cpus is None else cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
            key = (package, core)
        except OSError:
            key = ("cpu", str(cpu))
        if key not in seen:
            seen.add(key)
            chosen.append(cpu)
    return chosen


def default_threads(*, reserve: int = 0, share: int = 1) -> int:
    """Physical cores, less `reserve` kept for other work, divided between `share` processes;
    at least 1. `OMP_NUM_THREADS` wins when set."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(physical_cpus()) - reserve
    return max(1, cores // max(1, share))


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    cpus: tuple[int, ...]
    """The logical CPUs the computing thread is pinned to (empty: not pinned)."""

    def describe(self) -> str:
        where = f" pinned to CPUs {_ranges(self.cpus)}" if self.cpus else " (not pinned)"
        return f"{self.threads} thread{'s' * (self.threads != 1)}{where}"


def plan_threads(
    threads: int | None,
    *,
    reserve: int = 0,
    share: int = 1,
    rank: int = 0,
    pin: bool = True,
    flag: str = "--threads",
) -> ThreadPlan:
    """How many threads and which CPUs: `threads` (None: `default_threads`); pinned to that many
    physical cores (the `rank`-th such group under torchrun) unless `pin` is off or there are
    fewer physical cores than threads (then the system places them)."""
    if threads is not None and threads < 1:
        raise TunesmithError(f"{flag}: must be at least 1 (got {threads})")
    n = threads if threads is not None else default_threads(reserve=reserve, share=share)
    cores = physical_cpus()
    start = rank * n
    if not pin or start + n > len(cores):
        return ThreadPlan(n, ())
    # the last cores: the HTTP side and the system tend to run on the first
    group = cores[len(cores) - start - n : len(cores) - start]
    return ThreadPlan(n, tuple(group))


def process_threads(threads: int | None) -> ThreadPlan:
    """The plan for this process of a run: under torchrun its share of this machine's cores
    (LOCAL_WORLD_SIZE, LOCAL_RANK), else all of them."""
    share = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    return plan_threads(threads, share=share, rank=rank)


def apply_threads(plan: ThreadPlan) -> None:
    """Set torch's intra-op threads and pin the calling thread (and the OpenMP team it starts
    from now on) to the plan's CPUs. Call it from the thread that will run the model."""
    import torch

    torch.set_num_threads(plan.threads)
    if plan.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, plan.cpus)  # 0: the calling thread (Linux)


def _ranges(cpus: tuple[int, ...]) -> str:
    parts, run = [], []
    for cpu in cpus:
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [cpu]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)
