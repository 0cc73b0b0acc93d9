"""The README's main command at smoke size: local S3 + local Ray + train + nights of labeling + a review."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from jobs.support.sample_ledgers import BAD_TEXTS, ledger_partition

REPO = Path(__file__).resolve().parents[1]


def test_sample_ledgers_read_like_the_seed_and_repeat_across_nights():
    first = ledger_partition(date(2026, 11, 1))
    second = ledger_partition(date(2026, 11, 2))
    texts = first["texts"].dropna()
    assert texts.str.startswith("Less: ").any() and texts.str.startswith("Plus: ").any()
    assert texts.str.startswith("Total ").any() and texts.str.startswith("Header ").any()
    assert first["line_id"].is_unique
    # the same properties report the same accounts every night
    shared = set(first["texts"].dropna()) & set(second["texts"].dropna())
    assert len(shared) / first["texts"].nunique() > 0.9
    # bad rows are present
    assert first["texts"].isna().sum() >= 1 and (first["texts"] == "").sum() >= 1
    assert len(BAD_TEXTS) == sum(1 for t in first["texts"] if pd.isna(t) or t in BAD_TEXTS)


@pytest.mark.integration
def test_demo_smoke_runs_end_to_end_and_its_snippet_reads_every_row(tmp_path):
    workdir = tmp_path / "demo"
    (workdir / "outputs").mkdir(parents=True)
    (workdir / "outputs" / "stale-from-last-run.txt").write_text("old")  # as a previous run leaves it
    (workdir / "local-s3.pid").write_text("999999999")  # a previous demo's endpoint, long gone
    cmd = [sys.executable, "-m", "jobs.demo", "--smoke", "--workdir", str(workdir), "--nights", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "PYICEBERG_"))}
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    try:
        assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
        out = first.stdout
        outputs = workdir / "outputs"
        for name in ("report.md", "metrics.json", "confusion_matrix.png", "curves.png"):
            assert (outputs / "model" / name).stat().st_size > 0
        assert (outputs / "model" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        reviews = sorted(p.name for p in (outputs / "review").glob("*.csv"))
        assert reviews == ["dt=2026-11-01.csv", "dt=2026-11-02.csv", "dt=2026-11-03.csv", "dt=2026-11-04.csv"]
        for plot in ("calibration", "confusion_matrix.png", "curves.png", "reliability.png", "risk_coverage.png"):
            assert plot in out.split("plots:")[1].splitlines()[0] or plot == "calibration"
        # the review night: answers imported, earlier nights rewritten, rows carrying them
        corrected = re.search(r"reviewers corrected (\d+) text\(s\) of night 1; the next run rewrote (\d+) earlier "
                              r"night\(s\) without scoring, and (\d+) rows now carry the reviewers' labels", out)
        assert corrected and int(corrected.group(2)) >= 1, out[-3000:]   # answers reached the nights labeled before
        assert int(corrected.group(3)) >= int(corrected.group(1))
        assert re.search(r"imported .*reviewed.csv \(\d+ rows, UTF-8, comma-separated\): \d+ answers", out)
        assert "audit estimate for model v" in out
        # the rollout: a first promotion, then the gate between two models with its shadow, then a
        # backfill with the new champion and its diff report
        assert out.count("PROMOTED: income-expense@champion = v") == 2, out[-4000:]
        assert re.search(r"gate: income-expense candidate v\w+ vs champion v\w+", out)
        assert re.search(r"shadow, the last 2 labeled partition\(s\).*model-labeled rows would change", out)
        assert re.search(r"backfill report backfill-2026-11-01-2026-11-04-v\w+: [\d,]+ of [\d,]+ rows in 4 partition", out)
        labeled_rows = int(re.search(r"^  (\d+) rows labeled in", out, re.M).group(1))
        night2 = re.search(r"night 2 scored (\d+) new texts, (\d+) from the label cache", out)
        assert night2 and int(night2.group(2)) > 0, "the second night took nothing from the cache"
        # a run over a previous run's state replaces it
        assert not (outputs / "stale-from-last-run.txt").exists()

        # The snippet it prints, run as printed in a fresh shell, shows every labeled row.
        lines = out.split("=== read the labeled table with pyiceberg", 1)[1].splitlines()[1:]
        assert len([l for l in lines if l.strip()]) == 3, lines
        shell_env = {k: v for k, v in env.items() if k != "PYICEBERG_HOME"}
        read = subprocess.run(["bash", "-c", "\n".join(lines)], env=shell_env, capture_output=True, text=True,
                              timeout=120)
        assert read.returncode == 0, read.stdout[-2000:] + read.stderr[-2000:]
        assert re.search(rf"^{labeled_rows} rows$", read.stdout, re.M), read.stdout[-2000:]
    finally:
        stopped = subprocess.run([*cmd[:3], "--workdir", str(workdir), "--stop"], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0 and not (workdir / "local-s3.pid").exists()
