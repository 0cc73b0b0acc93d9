"""The scale item: `python -m jobs.label` as its own process at growing row counts and label
cache sizes; wall time, rows/s, peak RSS of the driver and of each actor kind."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from jobs.bench.measure import PeakRss, ray_cores
from jobs.bench.scoring import bench_catalog
from jobs.bench.settings import BenchSettings
from jobs.bench.training import labeled_rows, train_tiny_artifact

# ---- scale: time and memory against rows and the label cache's size --------------------------------

def scale_ledger(root: Path, rows: int, partitions: int, distinct_share: float, seed: int = 0) -> list[str]:
    """`rows` ledger lines over `partitions` daily Hive partitions, one Parquet file each; the texts
    are real account names made distinct per unit, each used about 1/distinct_share times.
    Returns the distinct texts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = labeled_rows(0)["full_path"].tolist()
    distinct = max(1, int(rows * distinct_share))
    pool = np.array([f"{names[i % len(names)]} - Unit {i // len(names):06d}" for i in range(distinct)], dtype=object)
    rng = np.random.default_rng(seed)
    per = -(-rows // partitions)
    for k in range(partitions):
        n = min(per, rows - k * per)
        if n <= 0:
            break
        folder = root / f"dt=2024-{1 + k // 28:02d}-{1 + k % 28:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pick = rng.integers(0, distinct, n)
        pq.write_table(pa.table({"line_id": pa.array(np.arange(k * per, k * per + n)), "texts": pa.array(pool[pick], pa.string()),
                                 "amount": pa.array(rng.normal(1000, 300, n).round(2))}), folder / "part-0.parquet")
    return pool.tolist()


def fill_cache(cache: str, model_version: str, entries: int, known: list[str], per_file: int = 250_000) -> None:
    """A label cache of `entries` valid entries for `model_version`: the texts `known` and filler."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clf_core.labeling.cache import ENTRY_SCHEMA, LabelCache

    texts = list(known[:entries]) + [f"Archived account {i:09d}" for i in range(max(0, entries - len(known)))]
    root = Path(LabelCache(cache, model_version).uri)
    root.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(texts), per_file):
        chunk = texts[start:start + per_file]
        pq.write_table(pa.table({"text": chunk, "label": ["Expense"] * len(chunk), "confidence": [0.9] * len(chunk)},
                                schema=ENTRY_SCHEMA), root / f"filler-{start // per_file:04d}.parquet")

def run_label_process(args: list[str], env: dict) -> dict:
    """`python -m jobs.label ARGS` as its own process on the bench's Ray cluster: its wall time,
    its own peak RSS (wait4), the actors' peak RSS and start times, the summary's figures."""
    import re
    import subprocess

    started = time.perf_counter()
    with PeakRss() as actors:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.label", *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"jobs.label exited {proc.returncode}:\n{output[-3000:]}")
    line = next(l for l in output.splitlines() if l.startswith("labeled "))
    figure = lambda pattern: int(re.search(pattern, line).group(1))  # noqa: E731
    starts = {kind: [float(x) for x in re.findall(rf"{word} ready in ([0-9.]+)s", output)]
              for kind, word in (("TextScorer", "scorer"), ("ApplyLabels", "labeler"))}
    return {"seconds": seconds, "rows": figure(r"out (\d+)"), "scored": figure(r"scored (\d+)"),
            "cache_hits": figure(r"cache hits (\d+)"), "driver_peak_rss_mib": usage.ru_maxrss / 1024,
            "actor_peak_rss_mib": actors.peak_mib,
            "actor_start_s": {k: max(v) for k, v in starts.items() if v}}


def bench_scale(settings: BenchSettings, work: Path) -> dict:
    """jobs.label at growing row counts (cold cache: every distinct text scored once), then on the
    smallest ledger with label caches of growing size holding half of its texts."""
    import ray

    from clf_core.model.artifact import open_artifact

    artifact = str(train_tiny_artifact(work / "scale-model", hidden=64, rows=200, max_steps=4))
    version = open_artifact(artifact).model_version
    catalog = bench_catalog(work / "scale")
    cores = ray_cores()  # the bench's local Ray cluster; each jobs.label process connects to it
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "HF_HUB_OFFLINE": "1"}
    # half the cores an actor: Ray Data's read, shuffle and join tasks run beside it
    flags = ["--catalog", catalog, "--cpus-per-actor", str(cores / 2), "--shuffle-partitions", "4",
             "--progress-every-s", "60"]
    sizes = [int(x) for x in settings.scale_rows.split(",")]
    ledgers, rows_runs, n = {}, {}, iter(range(1_000_000))
    for rows in sizes:
        ledgers[rows] = (work / "scale" / f"ledger-{rows}", scale_ledger(work / "scale" / f"ledger-{rows}", rows,
                                                                         settings.scale_partitions, settings.scale_distinct))
    # Smoke size (tests): only the cache runs, which start both actor kinds and the cache lookup.
    for round_ in range(0 if settings.smoke else settings.scale_rounds):
        for rows in (sizes if round_ % 2 == 0 else sizes[::-1]):  # alternate the order: drift hits every size
            k = next(n)
            result = run_label_process(["--model", artifact, "--input", str(ledgers[rows][0]),
                                        "--output-table", f"bench.scale_{k}", "--cache", str(work / "scale" / f"cache-{k}"),
                                        *flags], env)
            print(f"scale: {rows:,} rows in {result['seconds']:.1f}s ({rows / result['seconds']:.0f} rows/s), driver "
                  f"peak {result['driver_peak_rss_mib']:.0f} MiB, actors {result['actor_peak_rss_mib']}", flush=True)
            rows_runs.setdefault(rows, []).append(result)
    smallest, (ledger, distinct) = sizes[0], ledgers[sizes[0]]
    cache_runs = {}
    for round_ in range(settings.scale_rounds):
        for entries in [int(x) for x in settings.scale_cache.split(",")]:
            k = next(n)
            cache = str(work / "scale" / f"cache-{k}")
            fill_cache(cache, version, entries, distinct[: len(distinct) // 2])
            result = run_label_process(["--model", artifact, "--input", str(ledger), "--output-table",
                                        f"bench.scale_{k}", "--cache", cache, *flags], env)
            print(f"scale: cache of {entries:,} entries: {result['seconds']:.1f}s, actors {result['actor_peak_rss_mib']}, "
                  f"start {result['actor_start_s']}", flush=True)
            cache_runs.setdefault(entries, []).append(result)
            shutil.rmtree(cache, ignore_errors=True)

    def med(runs, get):
        values = [get(r) for r in runs if get(r) is not None]
        return statistics.median(values) if values else None

    def figures(runs, rows):
        return {"runs": len(runs), "seconds": med(runs, lambda r: r["seconds"]),
                "rows_per_s": med(runs, lambda r: rows / r["seconds"]),
                "driver_peak_rss_mib": med(runs, lambda r: r["driver_peak_rss_mib"]),
                **{f"{kind}_peak_rss_mib": med(runs, lambda r, kind=kind: r["actor_peak_rss_mib"].get(kind))
                   for kind in PeakRss.KINDS},
                **{f"{kind}_start_s": med(runs, lambda r, kind=kind: r["actor_start_s"].get(kind))
                   for kind in PeakRss.KINDS},
                "scored": runs[0]["scored"], "cache_hits": runs[0]["cache_hits"]}

    return {"partitions": settings.scale_partitions, "distinct_share": settings.scale_distinct,
            "rows": {str(rows): figures(runs, rows) for rows, runs in rows_runs.items()},
            "cache": {str(entries): figures(runs, smallest) for entries, runs in cache_runs.items()},
            "cache_ledger_rows": smallest}
