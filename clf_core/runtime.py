"""Connecting a job to Ray: the cluster it was submitted to, or a local one started for it."""

from __future__ import annotations

import logging
import os

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
