"""jobs.train on a real local Ray cluster and a real local S3 endpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from clf_core import storage
from clf_core.model.predict import Predictor
from conftest import ledger_rows
from jobs import train as train_job
from jobs.support.tiny import TINY_CONFIG

REPO = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--config", str(TINY_CONFIG)]


def write_text(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def write_csv(tmp_path, table: pd.DataFrame, name="ledger.csv") -> str:
    path = tmp_path / name
    table.to_csv(path, index=False)
    return str(path)


# ---- bad input fails on the driver, before any worker starts -------------------------------------
@pytest.mark.parametrize("case,expected", [
    ("missing_column", "has no column 'texts'"),
    ("unknown_label", "not in the configured labels"),
    ("missing_label", "have no label"),
    ("empty_file", "is empty"),
    ("header_only", "no rows"),
    ("tiny_class", "class 'Income' has 1 row"),
    ("unreadable", "does not exist"),
    ("bad_config", "train.epochs = 0"),
    ("bad_review", "review.value = 1.5"),
])
def test_bad_input_fails_before_any_worker(tmp_path, caplog, capsys, case, expected):
    import ray

    rows = ledger_rows(40)
    data = {
        "missing_column": lambda: write_csv(tmp_path, rows.rename(columns={"texts": "text"})),
        "unknown_label": lambda: write_csv(tmp_path, rows.assign(label=["Revenue"] + rows.label.tolist()[1:])),
        "missing_label": lambda: write_csv(tmp_path, rows.assign(label=[None] + rows.label.tolist()[1:])),
        "empty_file": lambda: write_text(tmp_path / "e.csv", ""),
        "header_only": lambda: write_text(tmp_path / "h.csv", "texts,label\n"),
        "tiny_class": lambda: write_csv(tmp_path, pd.concat([rows[rows.label == "Expense"], rows[rows.label == "Income"].head(1)])),
        "unreadable": lambda: str(tmp_path / "nowhere.parquet"),
        "bad_config": lambda: write_csv(tmp_path, rows),
        "bad_review": lambda: write_csv(tmp_path, rows),
    }[case]()
    extra = {"bad_config": ["--epochs", "0"], "bad_review": ["--review-fraction", "1.5"]}.get(case, [])
    was_running = ray.is_initialized()
    with caplog.at_level(logging.ERROR):
        code = train_job.main(["--data", data, "--output", str(tmp_path / "out")] + extra)
    assert code == 2
    assert expected in caplog.text + capsys.readouterr().err   # a bad file is logged, bad flags are the job's error line
    assert ray.is_initialized() == was_running  # no cluster was started for bad input
    assert not (tmp_path / "out").exists()


def test_existing_artifact_is_not_overwritten(tmp_path, caplog):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{}")
    with caplog.at_level(logging.ERROR):
        code = train_job.main(["--data", write_csv(tmp_path, ledger_rows(40)), "--output", str(tmp_path / "out")])
    assert code == 2 and "already published" in caplog.text


def test_every_flag_reaches_the_config():
    args = train_job.build_parser().parse_args([
        "--data", "x.csv", "--output", "o", "--base-model", "mistralai/Mistral-7B-v0.1", "--labels", "A,B,C",
        "--text-column", "t", "--label-column", "l", "--epochs", "5", "--max-steps", "7", "--set", "lora.r=4"])
    cfg = train_job.config_from_args(args)
    assert cfg.model.backbone == "mistralai/Mistral-7B-v0.1" and cfg.data.labels == ["A", "B", "C"]
    assert (cfg.data.text_column, cfg.data.label_column) == ("t", "l")
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.lora.r) == (5, 7, 4)
    base = ["--data", "x.csv", "--output", "o"]
    review = train_job.config_from_args(train_job.build_parser().parse_args([*base, "--review-target-error", "0.01"]))
    assert (review.review.goal, review.review.value) == ("target_error", 0.01)
    review = train_job.config_from_args(train_job.build_parser().parse_args([*base, "--review-fraction", "0.05"]))
    assert (review.review.goal, review.review.value) == ("fraction", 0.05)
    from clf_core.errors import ConfigError
    from clf_core.settings import from_args
    from clf_core.training.job import TrainJobSettings

    both = train_job.build_parser().parse_args([*base, "--review-fraction", "0.05", "--review-target-error", "0.01"])
    with pytest.raises(ConfigError, match="either --review-fraction or --review-target-error"):  # one goal or the other
        from_args(TrainJobSettings, both).validate()


# ---- real runs ---------------------------------------------------------------------------------
def answers_table(catalog: str, identifier: str, rows: list[tuple]) -> int:
    """A corrections table holding these answers (text, label given, answer, scope column, scope value)."""
    from clf_core.review.corrections import SCHEMA, CorrectionsTable

    table = CorrectionsTable(catalog, identifier)
    now = pd.Timestamp.now(tz="UTC")
    return table.append(pd.DataFrame([
        {"text": t, "label": given, "corrected_label": answer, "review_reason": "budget", "reviewer": "r",
         "reviewed_at": now, "source_file": "f.csv", "source_sha256": "s" * 64, "source_line": i + 2,
         "model_version": "v000000000000", "scope_column": scope, "scope_value": value}
        for i, (t, given, answer, scope, value) in enumerate(rows)]).pipe(
        lambda df: __import__("pyarrow").Table.from_pandas(df, schema=SCHEMA, preserve_index=False)))


@pytest.mark.integration
def test_answers_join_the_training_data_one_split_per_text(iceberg_catalog, table_name):
    """Without Ray: an answer overrides the file's label for its text, a new answered text is
    added, a text whose scoped answers disagree is left out, and every text lands in one split."""
    from clf_core.model.config import ClassifierConfig
    from clf_core.training.data import ANSWERED, stratified_split
    from clf_core.training.job import TrainJobSettings, load_split

    rows = ledger_rows(200, seed=3)
    rows = pd.concat([rows, rows.head(20)], ignore_index=True)          # duplicated texts in the file
    texts = rows["texts"].unique().tolist()
    flipped = {texts[0]: "Income" if rows.set_index("texts").loc[texts[0], "label"].iloc[0] == "Expense" else "Expense"}
    snapshot = answers_table(iceberg_catalog, table_name, [
        (texts[0], "x", flipped[texts[0]], None, None),
        ("Plus: A brand new account", "Expense", "Income", None, None),
        ("Less: Depends on the property", "Income", "Expense", "property_id", "P1"),
        ("Less: Depends on the property", "Income", "Income", "property_id", "P2")])
    import tempfile as tf

    path = write_csv(Path(tf.mkdtemp()), rows)
    settings = TrainJobSettings(data=path, output="unused", catalog=iceberg_catalog, corrections=table_name)
    split, contribution = load_split(settings, ClassifierConfig.load(overrides={"data.text_column": "texts"}))
    parts = [split.train, split.validation, split.test]
    seen = [set(p["texts"]) for p in parts]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2]), "a text in two splits"
    everything = pd.concat(parts)
    assert everything["texts"].is_unique and len(everything) == len(texts) + 1
    assert everything.set_index("texts").loc[texts[0], "label"] == flipped[texts[0]]
    assert everything.set_index("texts").loc["Plus: A brand new account", "label"] == "Income"
    assert "Less: Depends on the property" not in set(everything["texts"])
    assert everything[ANSWERED].sum() == 2
    assert (contribution["snapshot_id"], contribution["overrides"], contribution["added"],
            contribution["skipped_scoped"]) == (snapshot, 1, 1, 1)
    assert contribution["held_out"] == sorted(set(split.test.loc[split.test[ANSWERED], "texts"]))
    # the file's texts are split as without answers: v1 and v2 differ by the answers, not the draw
    cfg = ClassifierConfig.load(overrides={"data.text_column": "texts"})
    plain = stratified_split(rows.drop_duplicates("texts"), "label", cfg.train.split, cfg.train.split_seed)
    assert [set(p["texts"]) for p in (plain.train, plain.validation, plain.test)] == [
        seen[0] - {"Plus: A brand new account"}, seen[1], seen[2]]
    assert "Plus: A brand new account" in seen[0]        # a new answered text is learned from


@pytest.mark.integration
def test_two_workers_train_from_s3_with_answers_and_publish_into_a_registry(ray_cluster, s3_bucket, tiny_backbone,
                                                                            iceberg_catalog, table_name):
    data_uri = f"{s3_bucket}/labeled/ledger.parquet"
    fs, path = storage.filesystem(data_uri)
    rows = ledger_rows(400, seed=1)
    with fs.open(path, "wb") as f:  # through s3fs, as the jobs write
        rows.to_parquet(f)
    # 8 new texts, and 30 of the file's texts confirmed: those that fall in the test split are the
    # reviewed rows held out, whose accuracy the report gives
    confirmed = rows.drop_duplicates("texts").head(30)
    snapshot = answers_table(iceberg_catalog, table_name, [(f"Plus: Reviewed Account {i}", "Expense", "Income", None, None)
                                                           for i in range(8)] +
                             [(t, label, label, None, None) for t, label in zip(confirmed["texts"], confirmed["label"])])
    registry = f"{s3_bucket}/models"
    args = ["--data", data_uri, "--registry", registry, "--name", "income-expense", "--base-model", tiny_backbone,
            "--num-workers", "2", "--cpus-per-worker", "0.5", "--epochs", "2", "--catalog", iceberg_catalog,
            "--corrections", table_name, *TINY_FLAGS]
    assert train_job.main(args) == 0
    from clf_core.model.registry import versions

    [version] = versions(registry, "income-expense")
    output = f"{registry}/income-expense/{version}"
    for name in ("manifest.json", "adapter.safetensors", "metrics.json", "report.md", "confusion_matrix.png", "curves.png",
                 "reliability.png", "risk_coverage.png"):
        assert storage.exists(f"{output}/{name}"), name
    manifest = json.loads(storage.read_text(f"{output}/manifest.json"))
    assert manifest["model_version"] == version
    assert [h["epoch"] for h in manifest["notes"]["history"]] == [0, 1]
    # 304 distinct texts, 37 in the test split: the two-class tiny task, learned in 2 epochs
    assert manifest["metrics"]["test"]["accuracy"] >= 0.85
    answers = manifest["training"]["corrections"]
    assert (answers["table"], answers["snapshot_id"], answers["added"], answers["confirmed"]) == (
        table_name, snapshot, 8, 30)
    assert answers["held_out"] and answers["held_out_accuracy"] is not None
    report = storage.read_text(f"{output}/report.md")
    assert "reviewers' answers from" in report
    assert f"accuracy on the reviewed rows held out for the test split: **{answers['held_out_accuracy']:.4f}**" in report
    # the published artifact loads and scores through clf_core
    predictor = Predictor.load(output)
    out = predictor.predict(["Less: Gas - Vacancy", "Plus: Late Fee Unit 4"])
    assert out.labels == ["Expense", "Income"]
    # checkpoints went to object storage too, in the registry beside the versions
    fs, path = storage.filesystem(f"{registry}/income-expense/checkpoints")
    assert any("checkpoint_" in p for p in fs.find(path))


def _ray_cli(*args, env, timeout=120):
    return subprocess.run([str(Path(sys.executable).with_name("ray")), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _registered_checkpoint(storage_dir: Path) -> bool:
    """Whether Ray Train's checkpoint manager has recorded a latest checkpoint for the run."""
    for snapshot in storage_dir.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (json.JSONDecodeError, OSError):  # being rewritten right now
            pass
    return False


def _session_pids(session: int, command_part: str = "") -> list[int]:
    """The processes of one session whose command line holds command_part. The head runs in a
    session of its own, so no process of another test's cluster on this machine is named."""
    out = subprocess.run(["ps", "-eo", "pid,sid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:]
            if command_part in line and int(line.split()[1]) == session]


def _train_worker_pids(session: int) -> list[int]:
    """The Ray Train workers of the cluster whose head started session `session`."""
    return _session_pids(session, "ray::RayTrainWorker")


@contextlib.contextmanager
def token_head_node():
    """`ray start --head` on loopback with token authentication (Ray's default), every port its own;
    yields (dashboard address, environment for the `ray` CLI, the head's process)."""
    from jobs.support.local_s3 import free_port

    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    # The entrypoint's `python` is found on PATH, as for a user with this venv activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    port, dash = free_port(), free_port()
    # Every port of its own: the session's cluster already holds Ray's fixed defaults (the
    # dashboard agent's 52365 above all), and a second head whose agent cannot bind answers
    # every submit with "No available agent to submit job".
    own_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port")]
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    # `--block` keeps the head in the foreground, in a process group of its own: stopping it kills
    # exactly this cluster (`ray stop` would kill every Ray cluster on the machine, the test
    # session's own included).
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--disable-usage-stats", *own_ports], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while _ray_cli("job", "list", "--address", address, env=env).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the head node did not answer within 3 minutes"
            time.sleep(2)
        yield address, env, head
    finally:
        # SIGKILL every process of the head's session: a throwaway cluster has nothing to save, and
        # `ray start --block` given SIGTERM waited out a 30 s grace period (measured) every time.
        for pid in _session_pids(head.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
def test_ray_job_submit_survives_a_killed_worker_and_resumes_from_the_last_checkpoint(ray_cluster, local_s3, tmp_path,
                                                                                      tiny_backbone):
    """`ray job submit` to a token-authenticated head on loopback, two workers. SIGKILL one after
    the first checkpoint: the run restarts the worker group, resumes after epoch 1 (not from
    scratch) and publishes a model trained for all epochs, whose held-out metrics are within 0.5
    points of the same run left alone. (One job for both claims: each costs a Ray cluster's start.)"""
    data = write_csv(tmp_path, ledger_rows(800, seed=6))
    job_flags = ["--base-model", tiny_backbone, "--num-workers", "2", "--cpus-per-worker", "0.5", "--epochs", "3",
                 "--set", "train.early_stopping_patience=0", *TINY_FLAGS]
    # The same run, uninterrupted, on the session's cluster.
    assert train_job.main(["--data", data, "--output", str(tmp_path / "clean"), *job_flags]) == 0
    clean = json.loads((tmp_path / "clean" / "manifest.json").read_text())["metrics"]["test"]
    output, checkpoints, log_path = tmp_path / "model", tmp_path / "ckpt", tmp_path / "submit.log"
    with token_head_node() as (address, env, head), open(log_path, "w") as log_file:
        deadline = time.monotonic() + 150
        while True:
            submit = subprocess.Popen(
                [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", address, "--working-dir",
                 str(REPO), "--", "python", "-m", "jobs.train", "--data", data, "--output", str(output),
                 "--checkpoints", str(checkpoints), "--max-failures", "2", *job_flags],
                env=env, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                # Kill once Ray Train has *registered* a checkpoint (its manager snapshot lists it),
                # not merely once the files exist: an unregistered checkpoint is not resumed from.
                while not _registered_checkpoint(checkpoints) and submit.poll() is None:
                    assert time.monotonic() < deadline + 420, "no registered checkpoint within 7 minutes"
                    time.sleep(0.2)
                if submit.poll() is None:
                    break
            except BaseException:
                submit.kill()
                raise
            # A head that answers `job list` may still be starting its job agent: Ray says so.
            assert "No available agent to submit job" in log_path.read_text() and time.monotonic() < deadline, \
                log_path.read_text()[-3000:]
            time.sleep(3)
        try:
            victims = _train_worker_pids(session=head.pid)
            assert victims, "no RayTrainWorker process of this head found"
            os.kill(victims[-1], signal.SIGKILL)
            assert submit.wait(timeout=600) == 0, log_path.read_text()[-4000:]
        finally:
            if submit.poll() is None:
                submit.kill()
    printed = log_path.read_text()
    assert "resumed from checkpoint after epoch" in printed, printed[-3000:]
    # the model the job says it published is the one at --output, and it loads and scores
    published = re.search(r"model (v[0-9a-f]{12}) published to", printed)
    assert published, printed[-2000:]
    predictor = Predictor.load(str(output))
    assert predictor.model_version == published.group(1) and len(predictor.predict(["Gas", "Rent"]).labels) == 2
    manifest = json.loads((output / "manifest.json").read_text())
    resumed = manifest["metrics"]["resumed_from_epoch"]
    assert resumed is not None and resumed >= 1, "the run started over instead of resuming"
    assert [h["epoch"] for h in manifest["notes"]["history"]] == [0, 1, 2]
    resumed_test = manifest["metrics"]["test"]
    for name in ("accuracy", "macro_f1"):
        assert abs(resumed_test[name] - clean[name]) <= 0.005, (name, resumed_test[name], clean[name])
