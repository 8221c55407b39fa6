"""Shared helpers of the benchmark scripts: the machine they ran on, library versions, atomic JSON output."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM and whether a GPU was visible (numbers are only comparable on the same machine)."""
    import psutil
    import torch

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def versions(*extra: str) -> dict[str, str | None]:
    """Installed versions of torch and the libraries the benchmark exercises."""
    out = {}
    for name in ("mmpref", "torch", "transformers", "diffusers", "accelerate", "peft", "datasets", *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def timed(fn: Any, *args: Any) -> tuple[Any, float, float]:
    """``fn(*args)`` with the wall-clock and process CPU seconds it took (CPU > wall: several threads were busy)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - start, time.process_time() - cpu


# ----- measuring one run (inside its own subprocess) ----------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set size of this process."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepClock:
    """Wall-clock and process CPU seconds at the end of every optimizer step."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), time.process_time())
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def reset(self) -> None:
        self.start = (time.perf_counter(), time.process_time())

    def tick(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # GPU work is asynchronous: stamp when the step's kernels have finished
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def summary(self, warmup: int) -> dict[str, float]:
        """Steps per second after ``warmup`` steps; CPU seconds per step, a view less sensitive to other load."""
        if len(self.wall) <= warmup:
            raise RuntimeError(f"only {len(self.wall)} steps were timed; need more than warmup={warmup}")
        first = (self.wall[warmup - 1], self.cpu[warmup - 1]) if warmup else self.start
        n = len(self.wall) - warmup
        wall, cpu = self.wall[-1] - first[0], self.cpu[-1] - first[1]
        return {"steps_per_s": n / wall, "s_per_step": wall / n, "cpu_s_per_step": cpu / n, "timed_steps": n}


@contextmanager
def engine_step_clock(clock: StepClock) -> Iterator[None]:
    """Tick ``clock`` at every logged step of :func:`mmpref.training.train` (run it with ``run.log_every=1``)."""
    import mmpref.training.engine as engine

    log = engine._log
    engine._log = lambda *a: (clock.tick(), log(*a))[1]
    try:
        yield
    finally:
        engine._log = log


def memory_report(baseline: int) -> dict[str, float]:
    """Peak RSS and its increase over ``baseline`` (RSS once the libraries were imported), in MiB; on a GPU run also
    the peak of GPU memory allocated by tensors and reserved by torch's caching allocator (from process start)."""
    import torch

    peak = peak_rss_bytes()
    out = {
        "peak_rss_delta_mib": (peak - baseline) / 2**20,
        "peak_rss_mib": peak / 2**20,
        "baseline_rss_mib": baseline / 2**20,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def spawn(script: str, argv: list[str], root: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run ``script argv`` in a fresh interpreter (clean peak memory); its last stdout line is a JSON result."""
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))  # keep the caller's entries
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, env=env, cwd=root, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
