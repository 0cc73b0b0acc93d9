"""clf_core: the QLoRA ledger line-item classifier as a library (no cluster needed).

Modules by role:
- settings and errors: config (typed settings), errors (messages that name the fix), logs, runtime
  (connecting to Ray), storage (fsspec URIs), progress (rate and ETA lines);
- the model: data (tables, labels, tokenization), model (backbone + 4-bit + LoRA + head), train
  (the loop), metrics, calibration (temperature, review threshold), report (report.md and plots),
  recipe (train -> calibrate -> evaluate -> save in one process), artifact (safetensors + manifest),
  prequantize (a 4-bit base saved once), predict (scoring);
- labeling ledgers: partitions (the input side, planned before any worker starts), label_cache,
  scoring (the Ray Data callables), table (the Iceberg output), table_maintenance, review (the
  review export), labeling (the two passes and the commits, shared by jobs.label and jobs.backfill).

What only the demo and the bench need (a local S3 endpoint, tiny backbones, sample ledgers) lives
in jobs/support; what only tests need, in tests/support.
"""

__version__ = "0.1.0"
