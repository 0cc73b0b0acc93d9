"""What the console shows (clf_core.logs, and clf_core.runtime's settings for Ray's console). Fast:
no Ray cluster; Ray's own line printer and deduplicator are driven directly with the settings
ensure_ray gives them, and ray.init is replaced by a recorder."""

from __future__ import annotations

import importlib
import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clf_core import logs, runtime
from clf_core.logs import setup_logging

ANSI = re.compile(r"\x1b\[")
NOTICE_LINE = ("[2026-12-04 20:38:00,590 E 6239 6270] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
               "and ID: '62bb' has constructor arguments in the object store and max_restarts > 0. If the arguments "
               "in the object store go out of scope or are lost, the actor restart will fail. See "
               "https://github.com/ray-project/ray/issues/53727 for more details.")


RAY_SETTINGS = ("RAY_COLOR_PREFIX", "RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_DEDUP_LOGS_ALLOW_REGEX", "RAY_ADDRESS",
                "RAY_BACKEND_LOG_LEVEL")


def unset(monkeypatch, *names: str) -> None:
    """Unset, and restored after the test even when the code under test sets them (a bare
    delenv of a missing variable records nothing to restore)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch):
    """Each test configures the root logger; put it back as it was (and the settings the code
    under test exports, with it)."""
    unset(monkeypatch, logs.VERBOSE_ENV, *RAY_SETTINGS)
    # Ray's loggers as ensure_ray leaves them (ray.init(configure_logging=False): propagating, no
    # handler of their own), whatever an earlier test's ray.init or `import ray.data` installed.
    for name in ("ray", "ray.data", "ray.train"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "propagate", True)
        monkeypatch.setattr(logger, "handlers", [])
        monkeypatch.setattr(logger, "level", logging.NOTSET)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def emit_the_usual_lines() -> None:
    """One line of each kind a demo run produces."""
    logging.getLogger("clf_core.labeling.pipeline").info("pass 1, scoring: 170 / 170 distinct texts")
    logging.getLogger("jobs.demo").info("our own line")
    logging.getLogger("clf_core.labeling.pipeline").error("FAILED dt=2026-11-01: OSError: the partition's file is gone")
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    logging.getLogger("botocore.configprovider").info("Found endpoint for s3 via: environment_global.")
    logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
    logging.getLogger("kernels._internals.hf_hub").warning(
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
        "Hub is in offline mode.")
    logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
        "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
    logging.getLogger("pyiceberg.table").warning("commit retried after a concurrent update")
    logging.getLogger("some.library").info("\x1b[36m(TrainController pid=6239)\x1b[0m Requesting resources")


def test_the_console_shows_our_lines_and_library_warnings_the_file_everything(capsys, tmp_path):
    log_file = tmp_path / "demo.log"
    setup_logging(verbose=False, log_file=log_file)
    emit_the_usual_lines()
    console = capsys.readouterr().err
    assert "pass 1, scoring" in console and "our own line" in console
    assert "FAILED dt=2026-11-01" in console                           # our errors always show
    assert "commit retried after a concurrent update" in console        # a library's real warning too
    for chatter in ("Found credentials", "Found endpoint", "generated new fontManager",
                    "Skipping publisher trust check", "Token authentication is enabled", "Requesting resources"):
        assert chatter not in console, chatter
    assert not ANSI.search(console)
    written = log_file.read_text()
    for line in ("pass 1, scoring", "FAILED dt=2026-11-01", "Found credentials", "Found endpoint",
                 "generated new fontManager", "Skipping publisher trust check", "Token authentication is enabled",
                 "(TrainController pid=6239) Requesting resources"):
        assert line in written, line
    assert "\x1b" not in written
    assert "botocore.credentials" in written   # the file names each line's logger


def test_verbose_shows_everything_and_workers_follow_the_driver(capsys, monkeypatch):
    setup_logging(verbose=True)
    assert os.environ[logs.VERBOSE_ENV] == "1"   # what runtime.WORKER_ENV hands to Ray workers
    emit_the_usual_lines()
    console = capsys.readouterr().err
    for line in ("our own line", "Found credentials", "generated new fontManager", "Skipping publisher trust check",
                 "Token authentication is enabled"):
        assert line in console, line
    # A Ray worker calls setup_logging() without arguments: it reads the driver's choice.
    setup_logging()
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    assert "Found credentials" in capsys.readouterr().err
    monkeypatch.setenv(logs.VERBOSE_ENV, "0")
    setup_logging()
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    assert capsys.readouterr().err == ""


def test_calling_it_again_neither_doubles_lines_nor_drops_the_file(capsys, tmp_path):
    setup_logging(verbose=False, log_file=tmp_path / "demo.log")
    setup_logging(verbose=False)   # e.g. the library code a job calls sets up logging again
    logging.getLogger("clf_core.x").info("once")
    assert capsys.readouterr().err.count("once") == 1
    assert "once" in (tmp_path / "demo.log").read_text()


def test_in_a_ray_train_worker_its_console_handler_is_filtered_not_doubled(capsys):
    """Ray Train installs a console handler on the root logger of its workers; ours would print
    every line twice. setup_logging filters theirs instead."""
    theirs = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(theirs)
    setup_logging()
    logging.getLogger("clf_core.training.job").info("epoch 1/3: train loss 0.6651")
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    console = capsys.readouterr().err
    assert console.count("epoch 1/3") == 1 and "Found credentials" not in console


def test_ray_datas_own_console_handler_drops_the_progress_bar_notice_only(capsys):
    """Ray Data prints through a console handler of its own (its logger does not propagate to
    ours); labeling calls quiet_libraries() again after importing ray.data."""
    importlib.import_module("ray.data")   # configures the "ray.data" logger and its handlers

    setup_logging(verbose=False)
    logging.getLogger("ray.data._internal.progress").warning(
        "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.")
    logging.getLogger("ray.data._internal.execution").warning("a real Ray Data warning")
    console = capsys.readouterr().err
    assert "Progress bars disabled" not in console and "a real Ray Data warning" in console


def test_quiet_ray_console_settings(monkeypatch):
    """ensure_ray's settings, checked with Ray's own line printer and deduplicator: no colour
    codes, the actor-restart notice skipped, every other line (a failure's included) printed."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    runtime.quiet_ray_console(verbose=False)

    from ray._private.ray_logging import LogDeduplicator
    from ray._private.worker import print_worker_logs

    # What `import ray` builds from the two settings (ray._private.ray_logging.stderr_deduplicator).
    dedup = LogDeduplicator(5, os.environ.get("RAY_DEDUP_LOGS_ALLOW_REGEX"),
                            os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX"))
    ours = "epoch 1/1: train loss 0.6651  val loss 0.7319  val acc 0.8378"
    failure = "ray.exceptions.RayTaskError(OSError): the partition's file is gone"
    batches = []
    for pid in (6239, 6240, 6241):   # the same lines from three workers: Ray's default: 1 + "[repeated 2x]"
        batch = {"ip": "192.0.2.2", "pid": pid, "actor_name": "TrainController", "is_err": True,
                 "lines": [NOTICE_LINE, ours, failure], "localhost": "192.0.2.2"}
        batches += dedup.deduplicate(batch)
    batches += dedup.flush()
    out = io.StringIO()
    for batch in batches:
        print_worker_logs(batch, out)
    printed = out.getvalue()
    assert "core_worker.cc" not in printed
    assert printed.count(ours) == 3 and printed.count(failure) == 3
    assert "(TrainController pid=6239) epoch 1/1" in printed and not ANSI.search(printed)


def test_verbose_leaves_rays_console_as_ray_prints_it(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    runtime.quiet_ray_console(verbose=True)
    assert not {"RAY_COLOR_PREFIX", "RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_DEDUP_LOGS_ALLOW_REGEX"} & set(os.environ)


def test_an_operators_own_ray_patterns_are_kept(monkeypatch):
    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "SplitCoordinator")
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    runtime.quiet_ray_console(verbose=False)
    skip = re.compile(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])
    assert skip.search("SplitCoordinator started") and skip.search(NOTICE_LINE)
    assert os.environ["RAY_COLOR_PREFIX"] == "1"


@pytest.mark.parametrize("verbose", [False, True])
def test_ensure_ray_hands_workers_the_verbosity_and_routes_rays_loggers_through_ours(monkeypatch, verbose):
    """ray.init is replaced by a recorder."""
    import ray

    setup_logging(verbose=verbose)
    seen, spent = {}, []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(runtime, "spend_actor_restart_notice", lambda: spent.append(True))
    runtime.ensure_ray(num_cpus=2)
    assert seen["runtime_env"]["env_vars"][logs.VERBOSE_ENV] == ("1" if verbose else "0")
    assert seen["configure_logging"] is False and logging.getLogger("ray").propagate
    assert spent == ([] if verbose else [True])


DRIVER = """
from clf_core.logs import setup_logging
from clf_core.runtime import ensure_ray
import ray

setup_logging(verbose=False)
ensure_ray(num_cpus=1)

@ray.remote(num_cpus=0, max_restarts=1)
class Restartable:
    def __init__(self, config):
        self.config = config
    def ping(self):
        return "pong"

@ray.remote(max_retries=0)
def fails():
    raise ValueError("a real task failure")

@ray.remote(num_cpus=0)
def renews_a_resource_request():
    # what Ray Train's controller logs when one renewal times out on a busy machine, and a
    # warning of the same logger that is not that notice
    import logging
    from clf_core.logs import TRAIN_AUTOSCALING_LOGGER
    logger = logging.getLogger(TRAIN_AUTOSCALING_LOGGER)
    try:
        raise TimeoutError("Get timed out: some object(s) not ready.")
    except TimeoutError:
        logger.warning("Failed to send resource request for train-1. If this only happens transiently during "
                       "network partition or CPU being overloaded, it's safe to ignore this error.", exc_info=True)
    logger.warning("another warning of that logger")

print(ray.get(Restartable.remote(ray.put({"big": "config"})).ping.remote()))
ray.get(renews_a_resource_request.remote())
try:
    ray.get(fails.remote())
except ray.exceptions.RayTaskError as exc:
    print("the task failed:", str(exc).strip().splitlines()[-1])
"""


@pytest.mark.integration
def test_a_quiet_driver_prints_no_actor_restart_notice_and_still_every_failure(tmp_path):
    """A real local Ray: the driver creates an actor of the kind that makes Ray's core worker
    print its restart notice (Ray Data's actor pools are such actors); the console holds our
    lines and the task's failure, not the notice."""
    done = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pong" in done.stdout and "ValueError: a real task failure" in done.stdout
    assert "started a local Ray cluster" in done.stderr
    assert "core_worker.cc" not in done.stderr and not ANSI.search(done.stderr), done.stderr
    # the controller's notice is dropped in the worker that makes it, traceback and all
    everything = done.stdout + done.stderr
    assert "Failed to send resource request" not in everything and "TimeoutError" not in everything, everything
    assert "another warning of that logger" in everything
