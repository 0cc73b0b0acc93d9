"""Labeling ledgers into the Iceberg table (jobs.label, jobs.backfill), looking after it, the
review loop's commands and the rollout of a new model.

    settings        the label jobs' flags (LabelSettings, BackfillSettings)
    partitions      the input: Hive-partitioned Parquet folders, checked from their footers
    plan            which partitions a run labels or brings up to date with new answers, and why
    pipeline        label_job and run: read -> distinct -> look up -> score -> label / correct -> write
    scoring         the Ray Data callables: TextScorer, ApplyLabels, ApplyCorrections
    cache           the label cache keyed by (model version, text), looked up by a hash join
    write           labeled rows -> Parquet data files in the table's location
    commit          each partition in its own Iceberg transaction, once its files add up
    summary         what a run reports
    records         what each commit records in its snapshot (run, model, input files, answers)
    table           LabeledTable: layout, properties, the commit protocol, reads from manifests
    maintenance     history, rollback, snapshot expiry, orphan files (jobs.table)
    backfill_report what a backfill changed, computed from the table
    review_commands jobs.review import and stats
    promotion       jobs.promote: the gate, the shadow comparison, the alias moved

May import the base, model/ and review/; never training/.
"""
