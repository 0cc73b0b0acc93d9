"""Readable logs: our progress lines, without the known walls of library chatter.

Silenced deliberately, one by one (anything else still shows):
- transformers' per-load "LOAD REPORT" tables and weight-loading progress bars: a fresh
  classification head is *expected* to be missing from a backbone checkpoint;
- PEFT / bitsandbytes / torch.utils.checkpoint UserWarnings that fire on every QLoRA model build
  and say nothing the user can act on;
- the tokenizers fork warning (we tokenize in the main process only);
- Ray Data's per-pipeline INFO lines (execution plans), replaced by our own progress lines;
- pyiceberg's "Loaded FileIO" INFO line, once per table load (its warnings, e.g. a commit retried
  after a concurrent update, still show);
- Ray Train's two INFO lines per epoch in each worker ("Checkpoint successfully created at",
  "Reporting training result N: TrainingReport(...)"): our epoch line says the same in one line.
  Only those two loggers: restarts and failures (the controller's) still show.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

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


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for pattern in KNOWN_NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
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


def setup_logging(level: str = "INFO", verbose: bool | None = None, log_file=None) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
