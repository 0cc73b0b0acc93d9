"""Living with Ray: connecting a job to the cluster it was submitted to (or a local one started
for it), sizing Ray Data's footer readers, and reading why a Ray task failed."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re

log = logging.getLogger(__name__)

# Workers must never reach for a model hub at run time, and must not fork tokenizers.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS (set by `ray job submit`), or start a local cluster bound to
    loopback. Under an existing `ray.init()` (tests, notebooks) this does nothing."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env}, logging_level="WARNING")
        log.info("connected to Ray cluster at %s", os.environ["RAY_ADDRESS"])
    else:
        # A local cluster for this run only, gone when the job ends. The dashboard stays on
        # (Ray Train's controller polls the state API it serves) but binds to loopback only.
        # Ray 2.60 turns token authentication on by default, so the cluster's ports refuse
        # clients that do not hold this machine's token (~/.ray/auth_token).
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", logging_level="WARNING",
                 runtime_env={"env_vars": env})
        log.info("started a local Ray cluster (%s CPUs)", ray.cluster_resources().get("CPU"))


# Ray Data's Parquet reader reads file footers on a pool of FooterReader actors, 32 per
# read_parquet call whatever the number of files: on a 2-core node starting them cost ~4 s of each
# pass. More actors than footer batches (10 files each) sit idle. read_parquet builds its file
# indexer, which reads the pool size from this variable, in the calling process.
FOOTER_ACTORS_ENV, FILES_PER_FOOTER_BATCH, MAX_FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", 10, 32


@contextlib.contextmanager
def footer_readers_for(files: int):
    """Size Ray Data's footer-reader pool to `files` for the read_parquet calls inside (unless the
    operator set RAY_DATA_PARQUET_FOOTER_NUM_ACTORS themselves)."""
    if FOOTER_ACTORS_ENV in os.environ:
        yield
        return
    os.environ[FOOTER_ACTORS_ENV] = str(min(MAX_FOOTER_ACTORS, max(1, math.ceil(files / FILES_PER_FOOTER_BATCH))))
    try:
        yield
    finally:
        del os.environ[FOOTER_ACTORS_ENV]


_CHAINED = re.compile(r"\n\s*(?:The above exception was the direct cause of the following exception:|"
                      r"During handling of the above exception, another exception occurred:)\s*\n")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failure_reason(exc: BaseException) -> str:
    """One line saying why: for an error raised in a Ray task, the task's own exception (e.g.
    `OSError: ... Please reduce your request rate.`), not the wrapper Ray adds last, whose last
    line is only a hint about Ray Data's retry settings. Ray passes that chain on as text."""
    text = _ANSI.sub("", str(exc)).strip()
    parts = _CHAINED.split(text)
    if len(parts) > 1:  # "<task's exception>  The above exception was the direct cause ...  <Ray's wrapper>"
        lines = [line for line in parts[-2].splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()[:500]
    last = text.splitlines()[-1] if text else ""
    return f"{type(exc).__name__}: {last.strip()[:500]}"
