"""What every benchmark here shares: alternating timing, peak-memory measurement, markdown tables, JSON results.

Kept small on purpose. The rules it encodes:

- Ratios come from one run. `time_alternating` runs the variants in turn (A B, B A, A B, ...) after a warm-up, so
  drift in the machine's speed (other jobs, frequency scaling) hits both alike; we report the median.
- Peak memory on CPU is measured in a fresh process per variant (`peak_memory`): the process records its resident
  set after setup, resets the kernel's high-water mark, runs one step and reads the new high-water mark. glibc is
  told to return every block of 64 KiB or more to the OS when it is freed (MALLOC_MMAP_THRESHOLD_), so the
  resident set follows live memory instead of what the allocator keeps cached. On CUDA the same step runs in
  process and `torch.cuda.max_memory_allocated` is used.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20

# ------------------------------------------------------------------------------------------------- timing


def synchronize(device: str | torch.device = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_alternating(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each step, measured in turn: `warmup` untimed rounds, then `repeats` timed rounds whose
    order flips every round (A B, B A, ...). Returns {name: [seconds, ...]}."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    synchronize(device)
    samples = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


# ------------------------------------------------------------------------------------------------- peak memory


def _rss_kib(field: str) -> int | None:
    """VmRSS / VmHWM of this process in KiB (Linux), or None where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_step_rss(step: Callable[[], object]) -> int:
    """Peak resident-set growth in bytes of one `step()` call over the resident set just before it.

    Meant for a fresh process (see `peak_memory`). Linux: resets the high-water mark (/proc/self/clear_refs, 5)
    after recording the baseline. Elsewhere: ru_maxrss, which is only right if setup never peaked above the
    baseline (hence the fresh process).
    """
    gc.collect()
    baseline = _rss_kib("VmRSS")
    if baseline is not None and _reset_high_water_mark():
        step()
        return (_rss_kib("VmHWM") - baseline) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * scale


def _reset_high_water_mark() -> bool:
    """Set VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_step_cuda(step: Callable[[], object]) -> int:
    """Peak allocated CUDA memory of one `step()` call above what was allocated before it, in bytes."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def peak_memory(setup: str, kwargs: dict, device: str = "cpu") -> int:
    """Peak memory growth in bytes of one call of the step that `setup(**kwargs)` builds.

    `setup` is "module:function" (importable from the repository root) returning a zero-argument step. On CUDA it
    runs here; on CPU in a fresh Python process, so that neither earlier variants nor the allocator's cache of
    freed blocks can hide or inflate the growth.
    """
    if torch.device(device).type == "cuda":
        step = _resolve(setup)(**kwargs)
        growth = measure_step_cuda(step)
        del step
        gc.collect()
        torch.cuda.empty_cache()
        return growth
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from bench.common import _memory_child; _memory_child(sys.argv[1])"
    payload = json.dumps({"setup": setup, "kwargs": kwargs, "threads": torch.get_num_threads()})
    done = subprocess.run([sys.executable, "-c", code, payload], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {setup}({kwargs}) failed:\n{done.stderr[-3000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["growth"])


def _resolve(target: str) -> Callable:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def _memory_child(payload: str) -> None:
    """Entry point of the fresh process that `peak_memory` starts: build, measure one step, print JSON."""
    spec = json.loads(payload)
    torch.set_num_threads(spec["threads"])
    # Start the thread pool and autograd once on something tiny, so their one-off buffers are not counted.
    warm = torch.randn(64, 64, requires_grad=True)
    torch.nn.functional.cross_entropy(warm @ warm, torch.zeros(64, dtype=torch.long)).backward()
    step = _resolve(spec["setup"])(**spec["kwargs"])
    print(json.dumps({"growth": measure_step_rss(step)}))


# ------------------------------------------------------------------------------------------------- reporting


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; numbers are expected to be formatted already (str() is applied to the rest)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(num_bytes: float) -> str:
    return f"{num_bytes / MiB:,.0f} MiB"


def gib(num_bytes: float | None) -> str:
    return f"{num_bytes / 2**30:,.1f} GiB" if num_bytes is not None else "-"


def ratio(a: float, b: float, digits: int = 1) -> str:
    """a / b as "12.3x" (or "inf" when b is 0)."""
    return f"{a / b:,.{digits}f}x" if b else "inf"


def environment() -> dict:
    """Where a result was measured: versions, device, threads."""
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def write_json(path: Path | None, name: str, results: dict, markdown: str) -> None:
    """Write {"benchmark", "environment", "results", "markdown"} to `path` (if given); run_all reads these back."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(), "results": results, "markdown": markdown}
    path.write_text(json.dumps(payload, indent=1) + "\n")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
