"""Ray jobs over clf_core: train, label, backfill, bench, demo. Run as `python -m jobs.<name>`."""
