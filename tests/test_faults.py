"""Fault injection (issue 7): S3 that fails and stalls, fuzzed ledgers, secrets that never leak.

1. S3 faults come from support.fault_proxy, a reverse proxy in front of the session's real
   moto_server. The in-process storage tests point s3fs at it through fsspec's config, and the
   Iceberg table's I/O through a catalog of its own whose `s3.endpoint` is the proxy; the job
   runs are separate driver processes joined to the session's Ray cluster (as `ray job submit`
   entrypoints are), whose workers learn the proxy's URL from the job's runtime_env: the same
   route `ray job submit --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": ...}}'` takes.
   The session cluster's own environment (the moto endpoint) is left alone.
2. Ledgers fuzzed with Hypothesis go through the job's plan (footer checks), many of them fast,
   and a few through the job's whole run on the session's Ray cluster (the real pipeline).
3. The session's fake AWS secret (tests/conftest.py) is held by every process, the Ray workers
   included; no output, log or Ray session file may contain it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from datetime import date
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clf_core import storage
from support.fault_proxy import FaultProxy, Faults
from clf_core.labeling.plan import plan
from clf_core.labeling.scoring import OUTPUT_COLUMNS
from clf_core.labeling.settings import LabelSettings
from clf_core.labeling.scoring import check_text
from clf_core.labeling.records import PartitionCommit
from clf_core.labeling.table import CommitError, LabeledTable
from clf_core.labeling.write import WriteDataFiles
from conftest import ledger_rows
from jobs.support.tiny import TINY_CONFIG
from test_cluster import find_secrets
from test_label import (assert_exactly_once, commit_rows, commits, figures, job_args, labeled_rows, ledger_day,
                        read_labeled, write_partition)

REPO = Path(__file__).resolve().parents[1]
DAYS = ["2024-05-01", "2024-05-02"]


# ---- helpers --------------------------------------------------------------------------------------

@pytest.fixture
def proxy(local_s3):
    with FaultProxy(local_s3.endpoint, seed=7) as p:
        yield p


def use_proxy_here(monkeypatch, proxy: FaultProxy, **config) -> None:
    """clf_core.storage in this process reaches S3 through the proxy (fsspec's config feeds every
    new S3FileSystem; the config is part of fsspec's instance-cache key, so no cached instance
    bound to moto is reused). Timeouts are cut to 1s so stalls cost little."""
    config = {"read_timeout": 1, "connect_timeout": 1, **config}
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": proxy.url, "config_kwargs": config})


def direct_fs(local_s3):
    """s3fs straight to moto, bypassing the proxy: what is really stored."""
    return local_s3.filesystem()


def raw(proxy: FaultProxy, method: str, path: str, body: bytes | None = None, headers=None, timeout=10.0):
    parts = urlsplit(proxy.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def run_job(ray_cluster, module: str, args: list[str], endpoint: str | None = None,
            worker_env: dict[str, str] | None = None, timeout: int = 420) -> subprocess.CompletedProcess:
    """`python -m <module>` as a driver joined to the session's Ray cluster, like a `ray job
    submit` entrypoint. With `endpoint`, the driver and (through the job's runtime_env, as
    `ray job submit --runtime-env-json` passes it) every worker of the job use that S3 endpoint."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    worker_env = dict(worker_env or {})
    if endpoint:
        worker_env["AWS_ENDPOINT_URL"] = endpoint
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, **worker_env}
    if worker_env:
        env[RAY_JOB_CONFIG_JSON_ENV_VAR] = json.dumps({"runtime_env": {"env_vars": worker_env}})
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def labeled(catalog: str, table: str) -> pd.DataFrame:
    """The committed rows, in a canonical order, with the columns a run decides."""
    out = read_labeled(catalog, table)
    return out.sort_values("row_id").reset_index(drop=True)[
        ["row_id", "dt", "texts", "label", "confidence", "error", "needs_review"]]


def proxied_catalog(monkeypatch, proxy: FaultProxy, tmp_path, warehouse: str, name: str = "faults") -> str:
    """A catalog of its own (SQLite file, warehouse in `warehouse`) whose Iceberg I/O goes through
    the proxy, with 1 s timeouts so stalls cost little; configured the pyiceberg way."""
    settings = {"TYPE": "sql", "URI": f"sqlite:///{tmp_path / (name + '.db')}", "WAREHOUSE": warehouse,
                "PY_IO_IMPL": "pyiceberg.io.fsspec.FsspecFileIO", "S3__ENDPOINT": proxy.url,
                "S3__CONNECT_TIMEOUT": "1", "S3__REQUEST_TIMEOUT": "1"}
    for key, value in settings.items():
        monkeypatch.setenv(f"PYICEBERG_CATALOG__{name.upper()}__{key}", value)
    return name


def assert_same_labels(catalog: str, table: str, reference_table: str) -> None:
    got, want = labeled(catalog, table), labeled(catalog, reference_table)
    assert got["row_id"].is_unique, "a row was committed twice"
    pd.testing.assert_frame_equal(got.drop(columns="confidence"), want.drop(columns="confidence"))
    assert (got["confidence"] - want["confidence"]).abs().max() < 1e-4


# ---- 1. the proxy itself --------------------------------------------------------------------------

@pytest.mark.integration  # starts the local S3 endpoint
def test_proxy_forwards_s3_traffic_faithfully(local_s3, proxy, monkeypatch):
    """Multipart uploads, ranged reads, listings, deletes through s3fs, and raw chunked and
    aws-chunked (trailing checksum) uploads: what moto stores is byte for byte what was sent."""
    bucket = local_s3.make_bucket(f"proxy-{uuid.uuid4().hex[:8]}")[5:]
    use_proxy_here(monkeypatch, proxy)
    fs, _ = storage.filesystem(f"s3://{bucket}")
    big = os.urandom(11 * 2**20 + 12345)
    with fs.open(f"{bucket}/big.bin", "wb", block_size=5 * 2**20) as f:  # multipart: POST, PUT parts, POST
        for i in range(0, len(big), 4 * 2**20):
            f.write(big[i:i + 4 * 2**20])
    storage.write_bytes(f"s3://{bucket}/small.txt", b"hello")
    assert direct_fs(local_s3).cat(f"{bucket}/big.bin") == big
    with fs.open(f"{bucket}/big.bin", "rb", block_size=2**20) as f:  # ranged GETs
        f.seek(7 * 2**20 + 3)
        assert f.read(5000) == big[7 * 2**20 + 3:7 * 2**20 + 5003]
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(bucket)) == ["big.bin", "small.txt"]
    fs.rm(f"{bucket}/small.txt")
    assert not direct_fs(local_s3).exists(f"{bucket}/small.txt")
    assert proxy.forwarded["POST"] >= 3 and proxy.forwarded["PUT"] >= 2  # initiate, complete, DeleteObjects

    # Raw chunked bodies, relayed with their framing: plain, and aws-chunked with a trailer
    # checksum inside (what botocore sends over TLS; moto decodes it only if it arrives intact).
    payload = os.urandom(150_000)

    def chunked(data: bytes, size: int = 7001) -> bytes:
        return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                        for i in range(0, len(data), size)) + b"0\r\n\r\n"

    crc = base64.b64encode(zlib.crc32(payload).to_bytes(4, "big")).decode()
    aws_chunked = b"%x\r\n%s\r\n0\r\nx-amz-checksum-crc32:%s\r\n\r\n" % (len(payload), payload, crc.encode())
    cases = {"chunked.bin": (chunked(payload), {}),
             "aws-chunked.bin": (chunked(aws_chunked), {
                 "Content-Encoding": "aws-chunked", "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                 "x-amz-decoded-content-length": str(len(payload)), "x-amz-trailer": "x-amz-checksum-crc32"})}
    for name, (body, headers) in cases.items():
        parts = urlsplit(proxy.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.putrequest("PUT", f"/{bucket}/{name}")
        for key, value in {**headers, "Transfer-Encoding": "chunked"}.items():
            conn.putheader(key, value)
        conn.endheaders()
        for i in range(0, len(body), 50_000):
            conn.send(body[i:i + 50_000])
        response = conn.getresponse()
        assert response.status == 200, response.read()
        conn.close()
        assert direct_fs(local_s3).cat(f"{bucket}/{name}") == payload, name


@pytest.mark.integration  # starts the local S3 endpoint
def test_proxy_faults_are_s3_shaped_counted_and_seeded(local_s3, proxy):
    bucket = local_s3.make_bucket(f"faults-{uuid.uuid4().hex[:8]}")[5:]
    direct_fs(local_s3).pipe(f"{bucket}/there.txt", b"x")

    proxy.set_faults(write_error=1.0)
    status, headers, body = raw(proxy, "PUT", f"/{bucket}/new.txt", body=b"data")
    assert status == 503 and headers["Content-Type"] == "application/xml"
    assert re.search(rb"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>", body)
    assert not direct_fs(local_s3).exists(f"{bucket}/new.txt"), "a refused write must not happen"
    # reads untouched: forwarded, and answered by moto (403: this raw request is unsigned)
    assert raw(proxy, "GET", f"/{bucket}/there.txt")[0] == 403 and proxy.forwarded["GET"] == 1

    proxy.set_faults(write_error=0.0, read_error=1.0)
    status, headers, body = raw(proxy, "HEAD", f"/{bucket}/there.txt")
    assert status == 503 and body == b""  # HEAD answers carry no body, as from S3
    proxy.set_faults(read_error=0.0, read_stall=1.0, stall_s=3.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError):  # socket.timeout: unanswered until the client gives up
        raw(proxy, "GET", f"/{bucket}/there.txt", timeout=0.5)
    assert time.monotonic() - started < 2.5
    assert proxy.injected_total("503", "write") == 1 and proxy.injected_total("503", "read") == 1
    assert proxy.injected_total("stall", "read") == 1 and proxy.injected_total() == 3

    # The k-th request of a class meets the same fate under the same seed, whatever it is.
    def fates(seed: int) -> list[str]:
        with FaultProxy(local_s3.endpoint, seed=seed, faults=Faults(read_error=0.3)) as p:
            for i in range(40):
                raw(p, "GET", f"/{bucket}/there.txt" if i % 2 else f"/{bucket}?list-type=2")
            return [outcome for _, _, outcome in p.log]

    first = fates(11)
    assert first == fates(11) and first != fates(12)
    assert 3 <= first.count("503") <= 25 and set(first) == {"503", "forward"}
    with pytest.raises(ValueError):
        Faults(read_error=0.7, read_stall=0.5).check()


# ---- 1. storage and the commit protocol under faults (in-process, fast) ---------------------------

@pytest.mark.integration  # starts the local S3 endpoint
def test_storage_and_commit_survive_slowdowns_and_stalls_with_default_retries(local_s3, proxy, monkeypatch, tmp_path):
    """20% of reads and writes answered 503 SlowDown and 5% stalled past the read timeout: every
    storage call and a whole stage -> commit -> read cycle still give exactly the right bytes,
    with the retries s3fs/botocore do by default (no retry setting of ours)."""
    out = local_s3.make_bucket(f"storage-{uuid.uuid4().hex[:8]}")
    proxy.set_faults(read_error=0.2, write_error=0.2, read_stall=0.05, write_stall=0.05, stall_s=3.0)
    use_proxy_here(monkeypatch, proxy)

    blobs = {f"{out}/blobs/{i}.txt": f"ledger line {i} " * (i + 1) for i in range(8)}
    for uri, text in blobs.items():
        storage.write_bytes(uri, text.encode())
    assert {uri: storage.read_text(uri) for uri in blobs} == blobs
    folder = tmp_path / "artifact"
    (folder / "sub").mkdir(parents=True)
    files = {"manifest.json": b"{}", "adapter.safetensors": os.urandom(300_000), "sub/report.md": b"# r"}
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    storage.upload_dir(folder, f"{out}/model")
    back = storage.download_dir(f"{out}/model", tmp_path / "back")
    assert {rel: (back / rel).read_bytes() for rel in files} == files

    # The Iceberg side: data files written, a partition committed twice (the second replacing the
    # first), the table read back, every request through the faulty proxy.
    catalog = proxied_catalog(monkeypatch, proxy, tmp_path, f"{out}/warehouse")
    for k, day in enumerate(DAYS):  # two partitions, then the first one replaced
        commit_rows(catalog, "faults.labeled", day, labeled_rows([f"Rent {i}" for i in range(15)],
                                                                 [1000 * k + i for i in range(15)]))
    outcome, record = commit_rows(catalog, "faults.labeled", DAYS[0], labeled_rows(["Gas", "Water"], [100, 101]),
                                  planned_on=commits(catalog, "faults.labeled")[f"dt={DAYS[0]}"])
    assert outcome == "committed"
    got = read_labeled(catalog, "faults.labeled")
    assert sorted(got["row_id"]) == [100, 101] + [1000 + i for i in range(15)] and got["row_id"].is_unique
    assert set(got.loc[got.dt == DAYS[0], "texts"]) == {"Gas", "Water"}
    for kind in ("read", "write"):
        assert proxy.injected_total("503", kind) > 0, f"no {kind} was failed: the test proved nothing"
    assert proxy.injected_total("stall") > 0, "no request was stalled: the test proved nothing"


@pytest.mark.integration  # starts the local S3 endpoint
def test_a_refused_commit_leaves_nothing_visible_and_a_later_commit_completes(local_s3, proxy, monkeypatch, tmp_path):
    """Every write of table metadata refused past the retries: the data files are stored but no
    reader sees a row; once S3 is healthy, committing the same files makes the partition whole."""
    warehouse = local_s3.make_bucket(f"commit-{uuid.uuid4().hex[:8]}") + "/warehouse"
    catalog = proxied_catalog(monkeypatch, proxy, tmp_path, warehouse)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # only s3fs's own 5 tries per call: fails in seconds
    labeled = LabeledTable(catalog, "faults.refused")
    rows = labeled_rows(["Rent", "Gas", "Water"], [1, 2, 3])
    labeled.ensure(rows.drop_columns(list(OUTPUT_COLUMNS)).schema, key_is_date=True)
    written = WriteDataFiles(**labeled.writer_spec())(rows.append_column("dt", pa.array([DAYS[0]] * 3))).to_pylist()
    record = PartitionCommit(f"dt={DAYS[0]}", "run-1", "v1", (("in/a.parquet", 1, "e"),), 3, 0, 0)
    proxy.set_faults(write_error=1.0, path=r"/metadata/")
    with pytest.raises(CommitError, match="not committed after 2 attempts: .*reduce your request rate"):
        labeled.commit_partition(f"dt={DAYS[0]}", DAYS[0], [w["path"] for w in written], 3, record, None,
                                 lambda theirs: False, attempts=2)
    assert proxy.injected_total("503", "write") >= 2
    assert all(direct_fs(local_s3).exists(w["path"][5:]) for w in written), "the data files should be stored"
    assert read_labeled(catalog, "faults.refused").empty and LabeledTable(catalog, "faults.refused").commits() == {}

    proxy.heal()
    outcome, _ = LabeledTable(catalog, "faults.refused").commit_partition(
        f"dt={DAYS[0]}", DAYS[0], [w["path"] for w in written], 3, record, None, lambda theirs: False)
    assert outcome == "committed"
    assert sorted(read_labeled(catalog, "faults.refused")["texts"]) == ["Gas", "Rent", "Water"]


# ---- 1. jobs.label through the proxy (real Ray) ---------------------------------------------------

@pytest.fixture(scope="module")
def ledgers(local_s3) -> tuple[str, pd.DataFrame]:
    """Two nights of ledgers (2 files each) in a bucket of their own, shared by the job runs."""
    src = local_s3.make_bucket(f"fault-ledgers-{uuid.uuid4().hex[:8]}") + "/ledgers"
    days = {day: ledger_day(30, 40 + i) for i, day in enumerate(DAYS)}
    for day, df in days.items():
        write_partition(src, day, df)
    return src, pd.concat([df.assign(dt=day) for day, df in days.items()], ignore_index=True)


@pytest.fixture(scope="module")
def outage(ray_cluster, local_s3, iceberg_catalog, ledgers, tiny_artifact) -> dict:
    """S3 refuses every write (503 SlowDown) for longer than the retries last: a run; then S3 is
    healthy again (the proxy forwards everything): a re-run. The re-run is also the fault-free
    reference the other tests compare with, and its output is scanned for secrets."""
    src, _ = ledgers
    bucket = src.rsplit("/", 1)[0]
    table, cache = f"t.outage_{uuid.uuid4().hex[:6]}", f"{bucket}/outage-cache"
    with FaultProxy(local_s3.endpoint, seed=3, faults=Faults(write_error=1.0)) as proxy:
        # AWS_MAX_ATTEMPTS=1 leaves s3fs's own 5 tries per call, so the budget runs out in seconds
        # (by default: 5 botocore attempts within each of those 5 tries, about 40s per call).
        failed = run_job(ray_cluster, "jobs.label", job_args(tiny_artifact, src, iceberg_catalog, table, cache),
                         endpoint=proxy.url, worker_env={"AWS_MAX_ATTEMPTS": "1"})
        fs = direct_fs(local_s3)
        during = {"injected_writes": proxy.injected_total("503", "write"),
                  "writes_forwarded": sum(proxy.forwarded[m] for m in ("PUT", "POST", "DELETE")),
                  "stored": fs.exists(cache[5:]) or fs.exists(f"iceberg-warehouse/warehouse/t/{table[2:]}"),
                  "table_after_failure": LabeledTable(iceberg_catalog, table).table is not None}
        proxy.heal()
        healed = run_job(ray_cluster, "jobs.label", job_args(tiny_artifact, src, iceberg_catalog, table, cache,
                                                             "--review-export", f"{bucket}/outage-review"),
                         endpoint=proxy.url)
        during["injected_after_heal"] = proxy.injected_total() - during["injected_writes"]
    return {"table": table, "cache": cache, "review": f"{bucket}/outage-review", "failed": failed, "healed": healed,
            **during}


@pytest.mark.integration
def test_label_job_when_every_write_fails_commits_nothing_then_reruns_exactly_once(outage, ledgers, iceberg_catalog):
    failed, report = outage["failed"], outage["failed"].stdout + outage["failed"].stderr
    assert failed.returncode == 1, report[-4000:]
    assert re.search(r"labeled 0 partition\(s\), skipped 0, left to another run 0, failed 2 \| rows in 60, out 0",
                     failed.stdout), report[-4000:]
    for day in DAYS:  # the cause, named (the table could not even be created)
        assert re.search(rf"FAILED dt={day}: the labeling pipeline failed: OSError: .*Please reduce your request rate",
                         failed.stdout), failed.stdout[-3000:]
    assert outage["injected_writes"] > 0 and outage["writes_forwarded"] == 0
    assert not outage["stored"] and not outage["table_after_failure"], "nothing may be stored while every write fails"

    healed = outage["healed"]
    assert healed.returncode == 0, healed.stdout[-3000:] + healed.stderr[-3000:]
    assert outage["injected_after_heal"] == 0
    src, inputs = ledgers
    assert_exactly_once(iceberg_catalog, outage["table"], inputs)
    assert set(commits(iceberg_catalog, outage["table"])) == {f"dt={d}" for d in DAYS}
    assert figures(healed.stdout)["rows_out"] == len(inputs)


@pytest.mark.integration
def test_label_job_through_20pct_slowdowns_matches_a_fault_free_run(ray_cluster, ledgers, outage, tiny_artifact, proxy,
                                                                   iceberg_catalog):
    src, inputs = ledgers
    table, cache = f"t.through_faults_{uuid.uuid4().hex[:6]}", src.rsplit("/", 1)[0] + "/through-faults-cache"
    proxy.set_faults(read_error=0.2, write_error=0.2)
    done = run_job(ray_cluster, "jobs.label", job_args(tiny_artifact, src, iceberg_catalog, table, cache,
                                                      "--progress-every-s", "0"), endpoint=proxy.url)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # what `ray job logs` shows of a long night: progress lines with the rate and an ETA, both passes
    assert re.search(r"pass 1, scoring: \d+ / \d+ distinct texts \(\d+\.\d%\), [\d,]+/s, ETA ", done.stderr)
    assert re.search(r"pass 2, labeling: 60 / 60 rows \(100\.0%\), [\d,]+/s, done, .* \| 2/2 partitions committed",
                     done.stderr), done.stderr[-3000:]
    assert proxy.injected_total("503", "read") > 0 and proxy.injected_total("503", "write") > 0
    # The workers' traffic went through the proxy too: only Ray tasks write data files and fill the
    # cache; the driver writes the table's metadata.
    puts = [unquote(path) for method, path, _ in proxy.log if method == "PUT"]
    assert any("/data/dt=" in p for p in puts) and any("/through-faults-cache/" in p for p in puts)
    assert any(p.endswith(".metadata.json") for p in puts)
    assert_exactly_once(iceberg_catalog, table, inputs)
    assert_same_labels(iceberg_catalog, table, outage["table"])
    assert set(commits(iceberg_catalog, table)) == {f"dt={d}" for d in DAYS}


# ---- 2. fuzzed ledgers ----------------------------------------------------------------------------

@contextlib.contextmanager
def time_limit(seconds: int):
    """A hang fails the example instead of the whole session (SIGALRM: pytest runs tests on the main thread)."""
    def expired(signum, frame):
        raise TimeoutError(f"no answer within {seconds}s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


MAX_CHARS = 24
TEXTS = st.one_of(st.none(), st.sampled_from(["", "  \t", "Rent", "Less: Gas", "x" * (MAX_CHARS + 1), "Ünit 4 €"]),
                  st.text(max_size=MAX_CHARS + 4))
# Mutations of one file. MUST_FAIL ones make the partition unusable (a problem naming the file);
# BENIGN ones must be labeled, their bad rows getting an `error`; the others may go either way.
MUST_FAIL = {"truncated", "garbage", "no_text_column", "reserved_column", "text_int", "text_list", "amount_string"}
BENIGN = {"none", "missing_amount", "extra_column", "text_large_string", "text_all_null", "empty_table"}
MUTATIONS = sorted(MUST_FAIL | BENIGN | {"text_binary", "text_dictionary"})


def mutated_file(texts: list, first_id: int, mutation: str, cut: float, garbage: bytes) -> bytes:
    n = len(texts)
    columns = {"row_id": pa.array(range(first_id, first_id + n), pa.int64()), "texts": pa.array(texts, pa.string()),
               "amount": pa.array([i * 3 for i in range(n)], pa.int64())}
    if mutation == "empty_table":
        columns = {k: v.slice(0, 0) for k, v in columns.items()}
    elif mutation == "missing_amount":
        del columns["amount"]
    elif mutation == "extra_column":
        columns["memo"] = pa.array([f"m{i}" for i in range(n)])
    elif mutation == "no_text_column":
        columns["memo"] = columns.pop("texts")
    elif mutation == "reserved_column":
        columns["label"] = pa.array(["Income"] * n)
    elif mutation == "amount_string":
        columns["amount"] = pa.array([str(i) for i in range(n)])
    elif mutation == "text_int":
        columns["texts"] = pa.array(range(n), pa.int64())
    elif mutation == "text_list":
        columns["texts"] = pa.array([[t] if t is not None else None for t in texts], pa.list_(pa.string()))
    elif mutation == "text_binary":  # valid UTF-8, and some not
        columns["texts"] = pa.array([None if t is None else (t.encode() if i % 3 else b"\xff\xfe" + t.encode())
                                     for i, t in enumerate(texts)], pa.binary())
    elif mutation == "text_large_string":
        columns["texts"] = pa.array(texts, pa.large_string())
    elif mutation == "text_dictionary":
        columns["texts"] = pa.array(texts, pa.string()).dictionary_encode()
    elif mutation == "text_all_null":
        columns["texts"] = pa.nulls(n)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    data = sink.getvalue().to_pybytes()
    if mutation == "truncated":
        return data[:int(cut * len(data))]  # a valid file cut at a random byte (never whole)
    if mutation == "garbage":
        return garbage
    return data


@st.composite
def fuzzed_partition(draw):
    files = []
    for i in range(draw(st.integers(1, 3))):
        texts = draw(st.lists(TEXTS, min_size=1, max_size=6))
        mutation = draw(st.one_of(st.sampled_from(sorted(BENIGN)), st.sampled_from(MUTATIONS)))  # half benign
        cut = draw(st.floats(0.0, 0.999))
        garbage = draw(st.binary(max_size=64).map(lambda b: b"PAR1" + b))
        files.append((mutation, mutated_file(texts, 1000 * (i + 1), mutation, cut, garbage)))
    return files


def write_local(root: Path, day: str, files: list[bytes]) -> list[str]:
    folder = root / f"dt={day}"
    folder.mkdir(parents=True)
    paths = []
    for i, data in enumerate(files):
        (folder / f"part-{i}.parquet").write_bytes(data)
        paths.append(str(folder / f"part-{i}.parquet"))
    return paths


@pytest.mark.integration  # starts the local S3 endpoint
@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(fuzzed_partition())
def test_fuzzed_ledgers_are_planned_or_fail_their_partition_by_name(iceberg_catalog, files):
    """The plan (footers, schemas) on many fuzzed ledgers, fast: a bad partition is refused naming
    its file and never takes a good one down; what the labeling run then does with the planned
    ones is the next test's."""
    good = pa.table({"row_id": pa.array([1, 2, 3], pa.int64()), "texts": ["Rent", "Gas", None],
                     "amount": pa.array([1, 2, 3], pa.int64())})
    sink = pa.BufferOutputStream()
    pq.write_table(good, sink)
    with tempfile.TemporaryDirectory() as tmp, time_limit(30):
        root = Path(tmp) / "in"
        write_local(root, "2024-05-01", [sink.getvalue().to_pybytes()])
        paths = write_local(root, "2024-05-02", [data for _, data in files])
        write_local(root, "2024-05-03", [sink.getvalue().to_pybytes()])
        cfg = LabelSettings(model="m", input=str(root), catalog=iceberg_catalog, output_table="t.fuzz",
                            cache=str(Path(tmp) / "cache"), max_text_chars=MAX_CHARS).validate()
        pl = plan(cfg, "v-fuzz", LabeledTable(iceberg_catalog, "t.fuzz"))  # a table not made yet

        mutations = [m for m, _ in files]
        assert [p.name for p in pl.todo if p.name != "dt=2024-05-02"] == ["dt=2024-05-01", "dt=2024-05-03"], \
            f"a bad partition took a good one down: {pl.failed}"
        if "dt=2024-05-02" in pl.failed:
            why = pl.failed["dt=2024-05-02"]
            event("refused: " + ("cannot read" if "cannot read" in why else "type drift" if "does not match" in why
                                 else "columns"))
            named = [p for p, m in zip(paths, mutations) if p in why]
            assert named, f"the problem names no file of the partition: {why}"
            assert any(m not in BENIGN for m in mutations), f"a good partition was refused: {why} ({mutations})"
        else:
            event("planned")
            assert not set(mutations) & MUST_FAIL, f"{mutations} should have failed the partition"


def expected_outcomes(paths: list[str]) -> dict[int, bool]:
    """row_id -> whether the row must get a label (a valid text) or an error instead, from the
    file's own values: bytes that are not UTF-8 are an error, like any text check_text refuses."""
    out = {}
    for path in paths:
        t = pq.read_table(path, columns=["row_id", "texts"])
        for row_id, value in zip(t["row_id"].to_pylist(), t["texts"].to_pylist()):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    out[row_id] = False
                    continue
            out[row_id] = check_text(value, MAX_CHARS)[0] is not None
    return out


@pytest.mark.integration  # starts the local S3 endpoint and uses the session's Ray cluster
@settings(max_examples=2, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(fuzzed_partition(), min_size=5, max_size=5))
def test_fuzzed_ledgers_through_the_real_label_run(ray_cluster, iceberg_catalog, tiny_artifact, ledgers):
    """A good partition and five fuzzed ones through the job's own plan and run (Ray Data, the
    tiny 4-bit model, the Iceberg commit): every planned partition commits, each of its rows once,
    with a label or, for a text that cannot be scored, an error; every other partition fails
    naming one of its files. The good partition comes first, so the run's schema is its own: a
    fuzzed one that does not fit it waits for a run of its own (by design), it never takes the
    good one down."""
    from clf_core.model.artifact import open_artifact
    from clf_core.labeling.pipeline import run

    good = ledger_day(8, 0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        paths = {"dt=2024-04-30": [str(root / "dt=2024-04-30" / "part-0.parquet")]}
        (root / "dt=2024-04-30").mkdir(parents=True)
        good.to_parquet(paths["dt=2024-04-30"][0], index=False)
        for i, files in enumerate(ledgers):
            paths[f"dt=2024-05-0{i + 1}"] = write_local(root, f"2024-05-0{i + 1}", [data for _, data in files])
        artifact = open_artifact(tiny_artifact)
        table_id = f"t.fuzz_{uuid.uuid4().hex[:8]}"
        cfg = LabelSettings(model=tiny_artifact, input=str(root), catalog=iceberg_catalog, output_table=table_id,
                            cache=str(Path(tmp) / "cache"), max_text_chars=MAX_CHARS, batch_size=16,
                            shuffle_partitions=2, cpus_per_actor=0.5).validate()
        table = LabeledTable(iceberg_catalog, table_id)
        pl = plan(cfg, artifact.model_version, table)
        summary = run(cfg, pl, table, artifact.model_version)

        planned = sorted(p.name for p in pl.todo)
        assert "dt=2024-04-30" in planned, f"a bad partition took the good one down: {pl.failed}"
        assert sorted(summary.partitions_committed) == planned and summary.partitions_failed == pl.failed, \
            summary.report()
        for name, why in pl.failed.items():
            assert any(path in why for path in paths[name]), f"{name}: the problem names no file of it: {why}"
        labeled = read_labeled(iceberg_catalog, table_id)
        for p in pl.todo:
            rows = labeled[labeled["dt"] == p.value]
            assert len(rows) == p.rows and rows["row_id"].is_unique, f"{p.name}: {len(rows)} rows for {p.rows}"
            must_label = expected_outcomes(paths[p.name])
            for row in rows.itertuples():
                if must_label[row.row_id]:
                    assert row.label in artifact.labels and pd.isna(row.error), (p.name, row)
                else:  # e.g. a null, blank, over-long or non-UTF-8 text
                    assert pd.isna(row.label) and isinstance(row.error, str) and row.needs_review, (p.name, row)
        event(f"{len(pl.todo) - 1} fuzzed partitions labeled, {len(pl.failed)} refused")


@pytest.mark.integration  # starts the local S3 endpoint
def test_type_drift_fails_only_its_partition_by_name(s3_bucket, iceberg_catalog, table_name):
    """Ray Data reads a run's files as one dataset and fails the whole run, naming no file, on a
    column whose type differs between files ("Unable to merge: Field texts has incompatible
    types"). The plan refuses such a partition by name before Ray starts, as it does a corrupt
    file; test_label.py's real run shows the other partitions are then labeled and committed."""
    src = f"{s3_bucket}/ledgers"
    days = ["2024-06-01", "2024-06-02", "2024-06-03", "2024-06-04"]
    write_partition(src, days[0], ledger_day(20, 0))
    write_partition(src, days[1], ledger_day(20, 1))
    fs, _ = storage.filesystem(src)
    with fs.open(f"{src}/dt={days[1]}/part-1.parquet", "wb") as f:  # this file's texts are int64
        pq.write_table(pa.table({"row_id": pa.array([10_050], pa.int64()), "texts": pa.array([7], pa.int64())}), f)
    # columns may differ (missing ones read as null), compatible types too: this one is labeled
    write_partition(src, days[2], ledger_day(20, 2).drop(columns="amount").assign(memo="m"))
    write_partition(src, days[3], ledger_day(20, 3).astype({"amount": "string"}), files=1)  # fine alone, not with the run
    cfg = LabelSettings(model="m", input=src, catalog=iceberg_catalog, output_table=table_name,
                        cache=f"{s3_bucket}/cache").validate()
    table = LabeledTable(iceberg_catalog, table_name)

    pl = plan(cfg, "v1", table)
    assert [p.name for p in pl.todo] == [f"dt={days[0]}", f"dt={days[2]}"]
    assert re.fullmatch(rf"{re.escape(src)}/dt={days[1]}/part-1.parquet does not match the other files of "
                        rf"dt={days[1]} \(first: .*/part-0.parquet\): Unable to merge: Field texts has incompatible "
                        rf"types: (large_)?string vs int64\. .*", pl.failed[f"dt={days[1]}"])
    assert re.fullmatch(rf"{re.escape(src)}/dt={days[3]}/part-0.parquet does not match the partitions planned before "
                        rf"it in this run \(first: .*dt={days[0]}/part-0.parquet\): Unable to merge: Field amount has "
                        rf"incompatible types: .*re-run labels dt={days[3]} on its own\.", pl.failed[f"dt={days[3]}"])
    # As that message says: planned without the others (as once they are committed), it is labeled.
    again = plan(cfg, "v1", table, start=date.fromisoformat(days[3]), end=date.fromisoformat(days[3]))
    assert [p.name for p in again.todo] == [f"dt={days[3]}"] and not again.failed

    # Once the table exists, a file whose column cannot be stored in its column type is refused
    # by name too (the table says amount is a long; this file's amount is text).
    table.ensure(pl.schema, key_is_date=True)
    misfit = plan(cfg, "v1", table, start=date.fromisoformat(days[3]), end=date.fromisoformat(days[3]))
    assert not misfit.todo and re.fullmatch(
        rf"{re.escape(src)}/dt={days[3]}/part-0.parquet does not fit table {table_name}: .*amount.*\. Rewrite the "
        rf"file with the table's column types\.", misfit.failed[f"dt={days[3]}"])


# ---- 3. secrets -----------------------------------------------------------------------------------

def leaked(data: bytes, secret: str) -> bool:
    """The secret, or half of it, in any form a log or a JSON/URL encoder would write it."""
    needles = {secret, secret[:20], secret[20:], quote(secret, safe=""), secret.replace("/", "\\/")}
    return any(n.encode() in data for n in needles)


def test_the_leak_scan_can_fail():
    secret = "abcdEFGH/ijkl+MNOP0123qrstUVWX4567yzAB89"
    for form in (secret, json.dumps({"s": secret}), quote(secret, safe=""), f"...{secret[20:]} (truncated)",
                 f"key={secret[:20]}..."):
        assert leaked(form.encode(), secret), form
    assert not leaked(b"nothing to see", secret)


@pytest.mark.integration
def test_no_output_log_or_ray_file_holds_the_aws_secret(ray_cluster, local_s3, iceberg_catalog, outage, tiny_backbone):
    """Two jobs.label runs (one failing on S3 errors, one completing) and a jobs.train run, all
    holding the session's fake AWS keys like a node's credentials: the secret is in no captured
    output, no object they wrote, no file of the Ray session; the key id is in no output or object."""
    import ray

    secret, key_id = local_s3.env["AWS_SECRET_ACCESS_KEY"], local_s3.env["AWS_ACCESS_KEY_ID"]
    assert re.fullmatch(r"AKIAFAKE[0-9A-Z]{12}", key_id) and len(secret) == 40
    # The scan means something only if the secret was there to leak: every worker holds it.
    holds = ray.get(ray.remote(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY") == secret).remote())
    assert holds, "Ray workers do not hold the secret; this test would prove nothing"

    bucket = local_s3.make_bucket(f"secrets-{uuid.uuid4().hex[:8]}")
    data = f"{bucket}/train.parquet"
    fs, _ = storage.filesystem(data)
    with fs.open(data[5:], "wb") as f:
        ledger_rows(96, seed=5).to_parquet(f)
    train = run_job(ray_cluster, "jobs.train", [
        "--data", data, "--output", f"{bucket}/models/v1", "--base-model", tiny_backbone, "--num-workers", "1",
        "--cpus-per-worker", "0.5", "--config", str(TINY_CONFIG), "--epochs", "1", "--max-steps", "2"])
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]

    scanned: dict[str, int] = {}

    def scan(where: str, blob: bytes, key_id_too: bool = True) -> None:
        scanned[where] = len(blob)
        assert not leaked(blob, secret), f"the AWS secret leaked into {where}"
        if key_id_too:
            assert key_id.encode() not in blob, f"the AWS key id leaked into {where}"

    for name, run in (("failed jobs.label", outage["failed"]), ("jobs.label", outage["healed"]), ("jobs.train", train)):
        scan(f"{name} stdout", run.stdout.encode())
        scan(f"{name} stderr", run.stderr.encode())
    direct = direct_fs(local_s3)
    table_dir = LabeledTable(iceberg_catalog, outage["table"]).table.location().split("://", 1)[1]
    objects = (direct.find(table_dir) + direct.find(outage["cache"][5:]) + direct.find(outage["review"][5:])
               + direct.find(bucket[5:]))
    assert any(p.endswith(".metadata.json") for p in objects) and any("/data/dt=" in p for p in objects)
    assert any(p.endswith(".csv") for p in objects) and any(p.endswith(".avro") for p in objects)
    assert any(p.endswith("metrics.json") for p in objects) and any("checkpoint_" in p for p in objects)
    for path in objects:
        scan(f"s3://{path}", direct.cat(path))
    catalog_file = os.environ[f"PYICEBERG_CATALOG__{iceberg_catalog.upper()}__URI"].removeprefix("sqlite:///")
    scan("the SQLite catalog", Path(catalog_file).read_bytes())
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    files = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix in (".log", ".out", ".err") for p in files)
    for path in files:  # Ray's logs may name the key id (e.g. a signed request), never the secret
        scan(str(path), path.read_bytes(), key_id_too=False)
    assert len(scanned) > 20


def test_no_aws_key_in_configs():
    """configs/ holds no credentials (cluster/ is checked by test_cluster.py with the same scanner)."""
    files = [p for p in (REPO / "configs").rglob("*") if p.is_file()]
    assert files
    for path in files:
        text = path.read_text(errors="replace")
        assert not find_secrets(text), f"{path} looks like it holds credentials: {find_secrets(text)}"
        assert not re.search(r"AKIA[0-9A-Z]{16}|(?i:aws_secret_access_key)\s*[:=]\s*\S", text), path


@pytest.mark.integration
def test_a_local_ray_serves_its_dashboard_on_loopback_with_token_auth():
    """The cluster ensure_ray starts when no RAY_ADDRESS is set: the dashboard binds 127.0.0.1
    only and refuses requests without this machine's Ray token. The other ports it opens are
    listed (GCS, raylet, agents: Ray binds those to all interfaces, behind the token)."""
    script = r"""
import json, os, urllib.error, urllib.request
import psutil, ray
from clf_core.runtime import ensure_ray
ensure_ray(num_cpus=1)
node = ray._private.worker._global_node
url = "http://" + node.address_info["webui_url"]
def status(headers):
    try:
        return urllib.request.urlopen(urllib.request.Request(url + "/api/version", headers=headers), timeout=30).status
    except urllib.error.HTTPError as exc:
        return exc.code
token = open(os.path.expanduser("~/.ray/auth_token")).read().strip()
me = psutil.Process()
pids = {p.pid: p.name() for p in [me] + me.children(recursive=True)}
listening = sorted({(c.laddr.ip, c.laddr.port, pids[c.pid]) for c in psutil.net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN and c.pid in pids})
print("RESULT " + json.dumps({"url": url, "anonymous": status({}), "with_token": status({"Authorization": "Bearer " + token}),
                              "listening": listening}))
ray.shutdown()
"""
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short; its own, not /tmp/ray
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_TMPDIR"] = temp
    try:
        done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=240)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    port = int(result["url"].rsplit(":", 1)[1])
    assert result["url"].startswith("http://127.0.0.1:")
    dashboard = [ip for ip, p, _ in result["listening"] if p == port]
    assert dashboard and set(dashboard) == {"127.0.0.1"}, result["listening"]
    assert result["anonymous"] in (401, 403) and result["with_token"] == 200, result
    print("ports of a local Ray started by ensure_ray:", *result["listening"], sep="\n  ")
