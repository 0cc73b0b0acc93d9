"""Timing on a shared, noisy machine: interleaved rounds, medians, ratios; cores and peak memory."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

# ---- measuring ---------------------------------------------------------------------------------

def interleaved(variants: dict[str, Callable[[], int]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round, rotating the order; return each one's rows/s per round."""
    names = list(variants)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            rows = variants[name]()
            rates[name].append(rows / (time.perf_counter() - started))
    return rates


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def ratio_of(rates: dict[str, list[float]], name: str, baseline: str) -> float:
    return statistics.median(rates[name]) / statistics.median(rates[baseline])

def ray_cores() -> int:
    """CPUs to reserve for the scoring actor or training worker: every core, so its torch threads
    match the in-process variant's. A local cluster is started with logical CPUs doubled so Ray
    Data's read tasks still fit beside it; under an existing cluster (tests) at most half of its
    CPUs, or the actor would starve those tasks and the pipeline would never finish."""
    import ray

    from clf_core.runtime import ensure_ray

    cores = os.cpu_count() or 1
    ensure_ray(num_cpus=2 * cores)
    return max(1, min(cores, int(ray.cluster_resources().get("CPU", 2)) // 2))

class PeakRss:
    """The peak resident memory of each Ray Data actor kind (TextScorer, ApplyLabels) while a run
    goes on: every 0.25 s, each such process's VmHWM (the kernel's high-water mark)."""

    KINDS = {"TextScorer": "MapBatches(TextScorer)", "ApplyLabels": "MapBatches(ApplyLabels)"}

    def __init__(self):
        import threading

        self.peak_mib: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        while not self._stop.wait(0.25):
            for proc in psutil.process_iter(["pid", "cmdline"]):
                line = " ".join(proc.info["cmdline"] or [])
                kind = next((k for k, tag in self.KINDS.items() if tag in line), None)
                if kind is None:
                    continue
                try:
                    with open(f"/proc/{proc.info['pid']}/status") as f:
                        hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
                except (OSError, StopIteration):
                    continue
                self.peak_mib[kind] = max(self.peak_mib.get(kind, 0.0), hwm / 1024)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

def machine() -> dict:
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_at_start": load,
            "python": platform.python_version(), "torch": torch.__version__}
