"""Readable logs: our own lines on the console, the libraries' chatter in the log file.

At the default level the console (stderr) shows this project's loggers (`clf_core.*`, `jobs.*`,
a job run as `__main__`) from INFO and every other logger from WARNING, minus the known notices
below; `--verbose` (CLF_VERBOSE=1, which Ray workers inherit from the driver) shows every logger
from INFO. A log file, when asked for, receives every record from INFO, chatter included, with
no ANSI colour codes.

Silenced at the source, deliberately and one by one, because they are walls of text that say
nothing a user can act on (`--verbose` brings them back):
- transformers' per-load "LOAD REPORT" tables and weight-loading progress bars: a fresh
  classification head is *expected* to be missing from a backbone checkpoint;
- PEFT / bitsandbytes / torch.utils.checkpoint UserWarnings that fire on every QLoRA model build;
- the tokenizers fork warning (we tokenize in the main process only);
- Ray Data's per-pipeline INFO lines (execution plans), replaced by our own progress lines;
- pyiceberg's "Loaded FileIO" INFO line, once per table load (its warnings, e.g. a commit retried
  after a concurrent update, still show);
- Ray Train's two INFO lines per epoch in each worker ("Checkpoint successfully created at",
  "Reporting training result N: TrainingReport(...)"): our epoch line says the same in one line.
  Only those two loggers: restarts and failures (the controller's) still show.

Left out of the console only (KNOWN_NOTICES; they still reach the log file): warnings that
fire on every healthy run. Ray's own console lines (worker prefixes, the C++ core worker) are
clf_core.runtime.ensure_ray's business.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path

VERBOSE_ENV = "CLF_VERBOSE"   # "1": verbose; set by setup_logging, carried to Ray workers (runtime.WORKER_ENV)
OURS = ("clf_core", "jobs", "__main__")
FORMAT, DATEFMT = "%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

KNOWN_NOISY_WARNINGS = [
    r".*use_reentrant.*",
    r".*torch.utils.checkpoint.*",
    r".*MatMul8bitLt.*",
    r".*Input type into Linear4bit is torch.float16.*",
    r".*Already found a `peft_config` attribute.*",
    r".*The `use_fast` parameter.*",
    r".*requires_grad.*gradient checkpointing.*",
    r".*fan_in_fan_out.*",
    r".*is_gradient_checkpointing.*deprecated.*",
]

# (logger name or its parent, message pattern): WARNING-level notices of a healthy run.
KNOWN_NOTICES = [
    # kernels (bitsandbytes' 4-bit kernels): our runs are offline by design (HF_HUB_OFFLINE=1).
    ("kernels", re.compile(r"Skipping publisher trust check .* offline mode")),
    # Ray >= 2.59 turns token authentication on for local clusters and says so on every start.
    ("ray", re.compile(r"Token authentication is enabled for this Ray cluster")),
    # We turn Ray Data's progress bars off ourselves: our progress lines replace them.
    ("ray.data", re.compile(r"Progress bars disabled")),
    # Ray Train's controller (a worker process) renews its autoscaling request every few seconds;
    # on a busy machine one times out, and it logs a warning with the whole traceback that it says
    # is safe to ignore (seen twice in a `make demo` sharing 2 cores with a benchmark).
    (TRAIN_AUTOSCALING_LOGGER := "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
     re.compile(r"Failed to send resource request .*safe to ignore")),
]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_ROLE = "_clf_logs_role"   # marks the handlers and filters setup_logging installed


def is_verbose() -> bool:
    """What the driver chose: setup_logging exports it, ensure_ray hands it to the workers."""
    return os.environ.get(VERBOSE_ENV) == "1"


def _under(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


def is_ours(name: str) -> bool:
    return any(_under(name, parent) for parent in OURS)


def is_known_notice(record: logging.LogRecord) -> bool:
    return any(_under(record.name, parent) and pattern.search(record.getMessage())
               for parent, pattern in KNOWN_NOTICES)


class ConsoleFilter(logging.Filter):
    """What the console shows: ours from `level`, the rest from WARNING (minus KNOWN_NOTICES);
    verbose: everything from INFO."""

    def __init__(self, verbose: bool, level: int = logging.INFO):
        super().__init__()
        self.verbose, self.level = verbose, level
        setattr(self, _ROLE, "console")

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return record.levelno >= min(self.level, logging.INFO)
        if is_ours(record.name):
            return record.levelno >= self.level
        return record.levelno >= max(self.level, logging.WARNING) and not is_known_notice(record)


class PlainFormatter(logging.Formatter):
    """The file's format: logger names kept (the file is for finding where a line came from),
    ANSI colour codes removed (some libraries colour their own messages)."""

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", super().format(record))


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (pytest's capture, a redirection
    made after setup), as logging's own last-resort handler does."""

    def __init__(self):
        super().__init__()
        setattr(self, _ROLE, "console")

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; sys.stderr always wins
        pass


def _role(obj) -> str | None:
    return getattr(obj, _ROLE, None)


def _is_foreign_console(handler: logging.Handler) -> bool:
    """Someone else's handler printing to the terminal, e.g. the one Ray Train installs on the
    root logger of its worker processes."""
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and _role(handler) is None
            and getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__))


def quiet_libraries() -> None:
    """Silence the known walls of library output at their source (see the module docstring);
    in verbose mode, only the settings that keep runs correct (no tokenizer forks)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if is_verbose():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for pattern in KNOWN_NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    else:
        # Not imported here: a job's driver never needs transformers (importing it costs a second
        # of every job's start). Its default verbosity comes from this variable when it is imported;
        # its progress bars follow huggingface_hub's switch, set above or here.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if "huggingface_hub" in sys.modules:
            import huggingface_hub

            huggingface_hub.utils.disable_progress_bars()
    for name in ("peft", "bitsandbytes", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray Data prints its execution plan and "dataset finished" lines for every pipeline; our
    # jobs log their own progress (partitions done, rows/s) instead.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("pyiceberg").setLevel(logging.WARNING)
    for name in ("ray.train.v2._internal.execution.storage", "ray.train.v2._internal.execution.context"):
        logging.getLogger(name).setLevel(logging.WARNING)
        # Ray Train's context module names its logger by file path, not module name; its
        # per-report line repeats every metric of our own epoch line.
        module = sys.modules.get(name)
        if module is not None:
            logging.getLogger(module.__file__).setLevel(logging.WARNING)
    # Ray Data and Ray's driver logger print through handlers of their own (they do not
    # propagate to the root logger): their known notices are dropped at the logger that emits them.
    for parent, _ in KNOWN_NOTICES:
        _drop_notices_at(logging.getLogger(parent))


class _NoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_known_notice(record)


def quiet_ray_worker() -> None:
    """Ray's worker_process_setup_hook for our jobs (clf_core.runtime.ensure_ray): known notices
    that worker processes log themselves (Ray Train's controller) are dropped where they are made,
    unless verbose. Logging only: a Ray Data read task pays nothing for it."""
    if not is_verbose():
        logging.getLogger(TRAIN_AUTOSCALING_LOGGER).addFilter(_NoticeFilter())


def _drop_notices_at(logger: logging.Logger) -> None:
    """On the logger's console handlers only: Ray Data's own log file (ray-data.log) keeps them."""
    for handler in logger.handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _NoticeFilter) for f in handler.filters):
            handler.addFilter(_NoticeFilter())


def setup_logging(level: str = "INFO", verbose: bool | None = None, log_file: str | Path | None = None) -> None:
    """Console and log file for this process; call it again at will (it replaces what it set).

    `verbose`: True/False decides (and is exported as CLF_VERBOSE, so Ray workers started later
    decide the same); None reads CLF_VERBOSE: what the workers' own setup_logging() calls do.
    `log_file`: every record from INFO, without ANSI codes, appended; None keeps a file an
    earlier call set up. `level`: the lowest level of our own lines on the console.
    """
    if verbose is None:
        verbose = is_verbose()
    else:
        os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    threshold = logging.getLevelName(level.upper()) if isinstance(level, str) else int(level)
    root = logging.getLogger()
    root.setLevel(min(threshold, logging.INFO))   # the file wants INFO even when the console wants less
    console = ConsoleFilter(bool(verbose), threshold)
    for handler in list(root.handlers):
        if _role(handler) == "console":
            root.removeHandler(handler)
    foreign = [h for h in root.handlers if _is_foreign_console(h)]
    for handler in foreign:  # filter theirs rather than print every line twice
        for old in [f for f in handler.filters if _role(f) == "console"]:
            handler.removeFilter(old)
        handler.addFilter(console)
    if not foreign:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT, datefmt=DATEFMT))
        handler.addFilter(console)
        root.addHandler(handler)
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        for handler in [h for h in root.handlers if _role(h) == "file"]:
            root.removeHandler(handler)
            handler.close()
        handler = logging.FileHandler(path, encoding="utf-8")
        setattr(handler, _ROLE, "file")
        handler.setLevel(logging.INFO)
        handler.setFormatter(PlainFormatter(FILE_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        root.addHandler(handler)
    quiet_libraries()


def current_log_file() -> Path | None:
    """The log file setup_logging writes, if any."""
    for handler in logging.getLogger().handlers:
        if _role(handler) == "file":
            return Path(handler.baseFilename)
    return None
