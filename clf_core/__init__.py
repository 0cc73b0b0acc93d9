"""clf_core: the QLoRA ledger line-item classifier as a library (no cluster needed).

Four rooms on a small base; an import may go down or sideways to the base, never up:

    jobs/                 the command lines (jobs.train, .label, .backfill, .promote, .review, .table, ...)
    training/  labeling/  train a model  |  label ledgers into the Iceberg table, review, roll out
    model/     review/    the classifier |  reviewers' answers
    base                  errors, settings, storage, catalog, logs, progress, runtime, cli

- base (this folder): `errors` (messages that name the fix), `settings` (a setting declared once:
  flag, help, default, bounds), `cli` (every job's parser, exit statuses, failures named without a
  traceback), `storage` (fsspec URIs, the object store's failures named), `catalog` (pyiceberg
  catalogs, configured the pyiceberg way), `logs`, `progress` (rate and ETA lines), `runtime`
  (connecting to Ray, reading a Ray task's failure).
- `model/`: the classifier itself, from its config to its published, versioned artifact, a
  registry of versions and aliases, and the predictor that scores.
- `review/`: the review file people fill in, and the corrections table of their answers.
- `training/`: fine-tuning under Ray Train (or in one process), calibration, the evaluation report.
- `labeling/`: the label jobs (plan, the Ray Data pipeline, the commit into the Iceberg table),
  the table's maintenance, the review loop's commands, and promotion (the gate scores through the
  label pipeline).

What only the demo and the bench need (a local S3 endpoint, tiny backbones, sample ledgers) lives
in jobs/support; what only tests need, in tests/support. tests/test_layout.py holds the import rules.
"""

__version__ = "0.1.0"
