"""What machine a run measured, and how busy other processes kept it meanwhile.

The second matters on a shared box: a 2-thread training step slows far more than a large GEMM when
another process takes a core (every small op waits at a thread barrier), so a paired ratio cannot
cancel that load. Entries record the CPU share other processes used during each sample, and the
report shows it next to the figures.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# A sample taken while other processes used more than this share of the machine's CPU is
# contended: entries re-run it (within a time allowance) and flag figures that still include one.
QUIET_SHARE = 0.10


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        cpu = platform.processor() or "unknown"

    def ver(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu_model": cpu,
        "cpu_features": sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags),
        "cores_logical": os.cpu_count(),
        "cores_usable": usable_cores(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": ver("transformers"),
        "accelerate": ver("accelerate"),
        "step3vl": ver("step3vl"),
    }


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class CpuSnapshot:
    """Wall clock, CPU-seconds the whole machine spent busy, CPU-seconds this process and its
    finished child processes spent (a benchmarked subprocess is not "another process")."""

    wall: float
    machine_busy: float
    own: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        t = os.times()
        try:
            with open("/proc/stat") as f:  # cpu  user nice system idle iowait irq softirq steal …
                v = [int(x) for x in f.readline().split()[1:9]]
            busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            busy = float("nan")  # not Linux: others' share is unknown, reported as NaN
        return cls(time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system)

    def others_share_since(self, start: CpuSnapshot) -> float:
        """Fraction of the machine's usable CPU that other processes used between two snapshots."""
        wall = self.wall - start.wall
        if wall <= 0:
            return 0.0
        others = (self.machine_busy - start.machine_busy) - (self.own - start.own)
        # /proc/stat and os.times tick at 10 ms: clamp the rounding
        return min(max(others / (wall * usable_cores()), 0.0), 1.0)


@dataclass(frozen=True)
class Timed:
    """Wall seconds per call of a timed function, the CPU share other processes took meanwhile,
    and the last call's return value."""

    seconds: float
    others: float
    value: Any = None
    calls: int = 1


def timed(fn: Any, *, min_s: float = 0.0) -> Timed:
    """Call ``fn()`` once, or repeatedly until ``min_s`` seconds have passed (short calls are too
    noisy to time one by one); seconds are per call."""
    start = CpuSnapshot.take()
    k, value = 0, None
    while True:
        value = fn()
        k += 1
        end = CpuSnapshot.take()
        if end.wall - start.wall >= min_s:
            return Timed((end.wall - start.wall) / k, end.others_share_since(start), value, k)


def quiet(res: dict[str, Timed]) -> bool:
    """``stats.interleave``'s ``accept`` for arms returning :class:`Timed`: no arm was contended."""
    return all(t.others < QUIET_SHARE for t in res.values())


class Gemm:
    """FLOP/s of ``a @ b`` for square ``n``-matrices of ``dtype``, repeated for at least ``min_s``: the
    matmul peak (``mfu``) and the speed probe between single-run arms (``pipeline_overhead``)."""

    def __init__(self, dtype: Any, n: int = 2048, min_s: float = 0.2) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=g).to(dtype)
        self.b = torch.randn(n, n, generator=g).to(dtype)
        self.n, self.min_s, self.mm = n, min_s, torch.mm
        self()  # first call picks kernels and touches memory

    def __call__(self) -> float:
        k, t0 = 0, time.perf_counter()
        while True:
            self.mm(self.a, self.b)
            k += 1
            dt = time.perf_counter() - t0
            if k >= 2 and dt >= self.min_s:
                return 2 * self.n**3 * k / dt
