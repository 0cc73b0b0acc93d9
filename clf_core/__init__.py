"""clf_core: the QLoRA ledger line-item classifier as a library (no cluster needed).

Modules by role:
- settings and errors: settings (a setting declared once: flag, help, default), config (the model
  and its training recipe, from YAML and flags), errors (messages that name the fix), logs,
  runtime (connecting to Ray, reading a Ray task's failure), storage (fsspec URIs), progress (rate
  and ETA lines);
- the model: data (tables, labels, tokenization), model (backbone + 4-bit + LoRA + head), train
  (the loop), metrics, calibration (temperature, review threshold), report (report.md and plots),
  recipe (train -> calibrate -> evaluate -> save in one process), train_job (the same under Ray
  Train: the job jobs.train runs), artifact (safetensors + manifest), prequantize (a 4-bit base
  saved once), predict (scoring);
- labeling ledgers (jobs.label, jobs.backfill): label_settings (their flags), partitions (the input
  folders and files), label_plan (which partitions a run takes on, before any worker starts),
  labeling (read -> distinct -> look up -> score -> label -> commit), label_cache, scoring (the
  Ray Data callables), table (the Iceberg output), table_maintenance, review (the review export).

What only the demo and the bench need (a local S3 endpoint, tiny backbones, sample ledgers) lives
in jobs/support; what only tests need, in tests/support.
"""

__version__ = "0.1.0"
