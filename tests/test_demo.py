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


CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "PYICEBERG_"))}


@pytest.fixture(scope="module")
def smoke_demo(tmp_path_factory):
    """`python -m jobs.demo --smoke` once, over a previous run's leftovers, for the tests below; its
    local S3 endpoint is stopped (with --stop, as a user does) when they are done."""
    workdir = tmp_path_factory.mktemp("smoke") / "demo"
    (workdir / "outputs").mkdir(parents=True)
    (workdir / "outputs" / "stale-from-last-run.txt").write_text("old")  # as a previous run leaves it
    (workdir / "local-s3.pid").write_text("999999999")  # a previous demo's endpoint, long gone
    cmd = [sys.executable, "-m", "jobs.demo", "--smoke", "--workdir", str(workdir), "--nights", "2"]
    run = subprocess.run(cmd, cwd=REPO, env=CLEAN_ENV, capture_output=True, text=True, timeout=900)
    yield workdir, run
    stopped = subprocess.run([*cmd[:3], "--workdir", str(workdir), "--stop"], cwd=REPO, env=CLEAN_ENV,
                             capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0 and not (workdir / "local-s3.pid").exists()


def new_shell_env() -> dict:
    """A new shell's environment: nothing of this test process's venv, endpoint or catalog."""
    env = {k: v for k, v in CLEAN_ENV.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    return env


@pytest.mark.integration
def test_demo_smoke_runs_end_to_end_and_its_snippet_reads_every_row(smoke_demo):
    workdir, first = smoke_demo
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    out = first.stdout
    outputs = workdir / "outputs"
    for name in ("report.md", "metrics.json", "confusion_matrix.png", "curves.png"):
        assert (outputs / "model" / name).stat().st_size > 0
    assert (outputs / "model" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reviews = sorted(p.name for p in (outputs / "review").glob("*.csv"))
    assert reviews == ["dt=2026-11-01.csv", "dt=2026-11-02.csv", "dt=2026-11-03.csv", "dt=2026-11-04.csv"]
    for plot in ("confusion_matrix.png", "curves.png", "reliability.png", "risk_coverage.png"):
        assert plot in out.split("plots:")[1].splitlines()[0]     # the summary names every plot
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
    lines = out.split("=== from a new shell, `source", 1)[1].splitlines()[1:]
    assert len([l for l in lines if l.strip()]) == 2, lines
    read = subprocess.run(["bash", "-c", "\n".join(lines)], env=new_shell_env(), capture_output=True, text=True,
                          timeout=120)
    assert read.returncode == 0, read.stdout[-2000:] + read.stderr[-2000:]
    assert re.search(rf"^{labeled_rows} rows$", read.stdout, re.M), read.stdout[-2000:]


RUN_MARKER = "<!-- run -->"


def runnable_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block the README marks runnable, in order."""
    return [(lang, code) for lang, code in re.findall(re.escape(RUN_MARKER) + r"\s*\n```(bash|python)\n(.*?)```",
                                                     readme, flags=re.S)]


@pytest.mark.integration
def test_the_readme_examples_run_as_written_against_the_demo(smoke_demo):
    """Every block the README marks `<!-- run -->`, in order, in a new shell that has only sourced
    the line the demo prints (its folder in place of runs/demo): each command exits 0."""
    workdir, demo = smoke_demo
    assert demo.returncode == 0, demo.stderr[-3000:]
    readme = (REPO / "README.md").read_text()
    blocks = runnable_blocks(readme)
    assert len(blocks) >= 6 and {lang for lang, _ in blocks} == {"bash", "python"}
    assert readme.count(RUN_MARKER) == len(blocks), "a marker that is not right above a bash or python block"
    for number, (lang, code) in enumerate(blocks, 1):
        code = code.replace("runs/demo", str(workdir))
        body = code if lang == "bash" else f"python - <<'PYTHON'\n{code}\nPYTHON"
        script = f"set -euo pipefail\nsource {workdir}/env.sh\n{body}"
        done = subprocess.run(["bash", "-c", script], cwd=REPO, env=new_shell_env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (f"README block {number} ({lang}) failed:\n{code}\n--- stdout\n{done.stdout[-2000:]}"
                                      f"\n--- stderr\n{done.stderr[-3000:]}")
        assert "Traceback" not in done.stderr, f"README block {number}: a traceback\n{done.stderr[-3000:]}"
