"""Every job and subcommand, when its surroundings fail: no credentials, credentials the object
store refuses, an endpoint that does not answer, a reader that closed the pipe. Each exits 1 (a
run-time failure), says which of those it is, and prints no traceback.

The jobs are called as `main(argv)`, in this process, against real S3 endpoints: the session's
moto server for the objects (written with good credentials first), a second moto server that
enforces authentication (so any key is refused, as AWS refuses a wrong one), and a closed port.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clf_core import storage
from clf_core.model.artifact import publish

REPO = Path(__file__).resolve().parents[1]


def fresh_s3_clients():
    """s3fs keeps a filesystem per set of arguments, with the credentials it found first."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def objects(local_s3, iceberg_catalog, tiny_artifact, tmp_path_factory):
    """What the jobs read, in S3 (model, registry, ledgers, cache, training data, the table)."""
    import pandas as pd

    from conftest import ledger_rows
    from test_label import commit_rows, labeled_rows

    bucket = local_s3.make_bucket("cli-failures")
    publish(tiny_artifact, f"{bucket}/model")
    publish(tiny_artifact, f"{bucket}/registry/income-expense/v000000000001")
    storage.write_bytes(f"{bucket}/ledgers/dt=2024-03-01/part-0.parquet",
                        pd.DataFrame({"texts": ["Rent"]}).to_parquet(index=False))
    storage.write_bytes(f"{bucket}/labeled.csv", ledger_rows(40).to_csv(index=False).encode())
    storage.write_bytes(f"{bucket}/cache/v000000000001/part.parquet", b"x")
    commit_rows(iceberg_catalog, "cli.labeled", "2024-03-01", labeled_rows(["Rent"], [1]))
    review = tmp_path_factory.mktemp("review") / "answers.csv"
    review.write_text("texts,label,corrected_label,model_version\nRent,Income,,v1\n")
    return {"bucket": bucket, "catalog": iceberg_catalog, "review": str(review)}


def commands(o: dict) -> dict[str, tuple[str, list[str]]]:
    b, c = o["bucket"], o["catalog"]
    label = ["--model", f"{b}/model", "--input", f"{b}/ledgers", "--catalog", c, "--output-table", "cli.labeled",
             "--cache", f"{b}/cache"]
    table = ["--catalog", c, "--output-table", "cli.labeled"]
    tables = ["--catalog", c, "--output-table", "cli.labeled", "--corrections", "cli.corrections"]
    return {
        "label": ("jobs.label", label),
        "backfill": ("jobs.backfill", [*label, "--start", "2024-03-01", "--end", "2024-03-01"]),
        "table history": ("jobs.table", ["history", *table]),
        "table rollback": ("jobs.table", ["rollback", *table, "--to", "1"]),
        "table expire": ("jobs.table", ["expire", *table, "--older-than", "30d"]),
        "table remove-orphans": ("jobs.table", ["remove-orphans", *table, "--older-than", "3d"]),
        "table compact-cache": ("jobs.table", ["compact-cache", "--cache", f"{b}/cache", "--model-version",
                                               "v000000000001"]),
        "review import": ("jobs.review", ["import", *tables, "--file", o["review"]]),
        "review stats": ("jobs.review", ["stats", *tables]),
        "promote": ("jobs.promote", ["--registry", f"{b}/registry", "--name", "income-expense", "--candidate",
                                     "v000000000001", "--eval-data", f"{b}/labeled.csv"]),
        "promote rollback": ("jobs.promote", ["--registry", f"{b}/registry", "--name", "income-expense", "--rollback"]),
        "train": ("jobs.train", ["--data", f"{b}/labeled.csv", "--output", f"{b}/new-model"]),
        "prequantize": ("jobs.prequantize", ["--model", f"{b}/model", "--output", "/tmp/never-written"]),
    }


@pytest.fixture(scope="module")
def refusing_s3():
    """A second real S3 endpoint that checks signatures against its own (empty) IAM: every key is
    refused with InvalidAccessKeyId, as AWS refuses a wrong or deleted one."""
    from jobs.support.local_s3 import LocalS3

    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"   # moto's switch: authenticate from the first request
    try:
        s3 = LocalS3().start()
    finally:
        del os.environ["INITIAL_NO_AUTH_ACTION_COUNT"]
    yield s3
    s3.stop()


def closed_port() -> str:
    from jobs.support.local_s3 import free_port

    return f"http://127.0.0.1:{free_port()}"


SURROUNDINGS = {
    "no credentials": ("no credentials for the object store",
                       lambda mp, refusing: [mp.delenv(k, raising=False) for k in ("AWS_ACCESS_KEY_ID",
                                                                                   "AWS_SECRET_ACCESS_KEY")]),
    "refused credentials": ("refused the credentials",
                            lambda mp, refusing: mp.setenv("AWS_ENDPOINT_URL", refusing.endpoint)),
    "unreachable endpoint": ("cannot reach the object store at http://127.0.0.1:",
                             lambda mp, refusing: mp.setenv("AWS_ENDPOINT_URL", closed_port())),
}


@pytest.mark.integration
@pytest.mark.parametrize("surroundings", list(SURROUNDINGS))
def test_every_job_names_a_failing_object_store_without_a_traceback(surroundings, objects, refusing_s3, monkeypatch,
                                                                    capsys):
    import importlib

    expected, arrange = SURROUNDINGS[surroundings]
    # no other source of credentials on this machine, and no waiting on an instance-metadata service
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")             # botocore's retries: seconds, not minutes, here
    arrange(monkeypatch, refusing_s3)
    failures = []
    for name, (module, argv) in commands(objects).items():
        fresh_s3_clients()
        code = importlib.import_module(module).main(argv)
        err = capsys.readouterr().err
        if code != 1 or expected not in err or "Traceback" in err:
            failures.append(f"{name}: exit {code}, stderr: {err.strip()[-400:]}")
    fresh_s3_clients()
    assert not failures, "\n".join(failures)


@pytest.mark.integration
def test_a_closed_pipe_ends_a_job_quietly(objects, tmp_path):
    """`python -m jobs.table history ... | head -0`: the reader is gone before the job writes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = ["history", "--catalog", objects["catalog"], "--output-table", "cli.labeled"]
    shell = f"{sys.executable} -m jobs.table {' '.join(argv)} | head -0; echo exit ${{PIPESTATUS[0]}} >&2"
    done = subprocess.run(["bash", "-c", shell], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr[-2000:]
    assert "exit 0" in done.stderr
