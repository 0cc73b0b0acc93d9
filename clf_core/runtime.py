"""Living with Ray: connecting a job to the cluster it was submitted to (or a local one started
for it) with a quiet console, sizing Ray Data's footer readers, and reading why a Ray task failed."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys

from clf_core.logs import VERBOSE_ENV, is_verbose

log = logging.getLogger(__name__)

# Workers must never reach for a model hub at run time, and must not fork tokenizers; they log as
# verbosely as the driver chose (clf_core.logs.setup_logging exports CLF_VERBOSE).
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", VERBOSE_ENV: "0"}

# Ray's C++ core worker prints this at ERROR level, once in every process that creates an actor
# with max_restarts > 0 and a constructor argument in the object store (ray-project/ray#53727).
# Ray Data's actor pools (from the driver) and Ray Train's PreemptionWatcher (from its controller)
# do so on every healthy run: it is about a restart that has not happened, not a failure.
ACTOR_RESTART_NOTICE = r"has constructor arguments in the object store and max_restarts > 0"


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS (set by `ray job submit`), or start a local cluster bound to
    loopback. Under an existing `ray.init()` (tests, notebooks) this does nothing.

    The console then shows our lines only (quiet_ray_console, spend_actor_restart_notice),
    unless the driver chose verbose logging (clf_core.logs.setup_logging)."""
    verbose = is_verbose()
    quiet_ray_console(verbose)   # before `import ray`: Ray reads these settings when imported
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    # Ray's Python loggers go through ours (the console's filter, the log file) instead of a
    # handler of their own: configure_logging=False removes Ray's, propagate sends them to ours.
    logging.getLogger("ray").propagate = True
    options = dict(runtime_env={"env_vars": env, "worker_process_setup_hook": "clf_core.logs.quiet_ray_worker"},
                   configure_logging=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**options)
        log.info("connected to Ray cluster at %s", os.environ["RAY_ADDRESS"])
    else:
        # A local cluster for this run only, gone when the job ends. The dashboard stays on
        # (Ray Train's controller polls the state API it serves) but binds to loopback only.
        # Ray 2.60 turns token authentication on by default, so the cluster's ports refuse
        # clients that do not hold this machine's token (~/.ray/auth_token).
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", **options)
        log.info("started a local Ray cluster (%s CPUs)", ray.cluster_resources().get("CPU"))
    if not verbose:
        spend_actor_restart_notice()


def quiet_ray_console(verbose: bool) -> None:
    """Ray's settings for the lines its driver prints from workers (Ray docs, "Configuring
    Logging"), set in this process's environment unless the operator set them: no ANSI colour
    around the "(Actor pid=...)" prefixes (RAY_COLOR_PREFIX=0), and the actor-restart notice
    skipped (RAY_DEDUP_LOGS_SKIP_REGEX) unless verbose. Where the output is not a terminal (a
    file, `ray job logs`) Ray's log deduplication is turned off for every other line
    (RAY_DEDUP_LOGS_ALLOW_REGEX): its "[repeated Nx across cluster]" suffix is always coloured.
    Ray reads the two regexes when it is imported: call this before `import ray`. The driver's
    own copy of the notice: spend_actor_restart_notice."""
    terminal = sys.stdout.isatty() and sys.stderr.isatty()
    if not verbose or not terminal:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not verbose:
        _add_pattern("RAY_DEDUP_LOGS_SKIP_REGEX", ACTOR_RESTART_NOTICE)
    if not terminal:
        _add_pattern("RAY_DEDUP_LOGS_ALLOW_REGEX", "^" if verbose else f"^(?!.*{ACTOR_RESTART_NOTICE})")
    if "ray._private.ray_constants" in sys.modules:
        log.debug("Ray was imported before quiet_ray_console: its skip and allow patterns stay as they were")


def _add_pattern(name: str, pattern: str) -> None:
    current = os.environ.get(name)
    if current is None:
        os.environ[name] = pattern
    elif pattern not in current:
        os.environ[name] = f"(?:{current})|(?:{pattern})"


def spend_actor_restart_notice() -> None:
    """Let this process's C++ core worker print ACTOR_RESTART_NOTICE now, with its stderr on the
    null device, so that it does not print it on the console later.

    The core worker prints that notice straight to file descriptor 2, where no Python setting
    reaches it, and once per process (RAY_LOG_ONCE_PER_PROCESS in core_worker.cc). Ray's only
    switch for it, RAY_BACKEND_LOG_LEVEL=fatal, would also empty this process's core-worker log
    file and prints a line of its own. The notice still lands in Ray's log file
    (python-core-driver-*.log): only the console copy goes. The throwaway actor needs no CPU
    and is killed at once; creating it is what prints the notice (synchronously, in .remote())."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class RestartNoticeProbe:
        def __init__(self, argument):
            pass

    try:
        argument = ray.put(None)   # passed by reference: an argument "in the object store"
        with _stderr_to_null():
            probe = RestartNoticeProbe.remote(argument)
        ray.kill(probe, no_restart=True)
    except Exception as exc:   # a quieter console is never worth a failed job
        log.debug("could not spend Ray's actor-restart notice: %s", exc)


@contextlib.contextmanager
def _stderr_to_null():
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def train_logging_config():
    """Ray Train's own console lines ("Requesting resources", "Started training worker group",
    "Setting up process group", ...) at INFO in verbose mode only; restarts and failures, which
    Ray Train logs as warnings and errors, always show. For RunConfig(logging_config=...)."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")


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
