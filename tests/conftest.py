"""Shared fixtures: tiny offline backbones and data. Nothing here downloads anything."""

from __future__ import annotations

import os
import random

# Before transformers is imported anywhere: never reach for a hub in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist each worker gets its share of the cores for its own torch work (training in
# the test process, and the job processes it starts inherit it): torch's default of one thread
# per core in every worker oversubscribes the machine, and its waiting threads spin on the cores
# the other worker needs.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pandas as pd
import pytest

from clf_core.model.config import ClassifierConfig
from clf_core.logs import quiet_libraries

quiet_libraries()

INCOME_WORDS = ["Rent", "Deposit Fee", "Interest Earned", "Late Fee", "Laundry", "Parking Income",
                "Pet Fee", "Application Fee", "Utility Reimbursement", "Storage Income"]
EXPENSE_WORDS = ["Gas", "Water", "Repairs", "Insurance", "Payroll", "Landscaping", "Property Tax",
                 "Pest Control", "Advertising", "Legal Fees"]
PREFIXES = ["Less:", "Plus:", "Total", "Header", "Misc."]
SUFFIXES = ["", "- Vacancy", "Unit 4", "Bldg A", "- Appliance - Dishwasher", "Other"]


def ledger_rows(n: int, seed: int = 0, labels=("Expense", "Income")) -> pd.DataFrame:
    """Separable synthetic ledger lines: the account word decides the label; the prefix and
    suffix are drawn independently of it, so no position shortcut exists (lengths vary)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = INCOME_WORDS if label == "Income" else EXPENSE_WORDS
        text = " ".join(x for x in (rng.choice(PREFIXES), rng.choice(words), rng.choice(SUFFIXES)) if x)
        rows.append({"row_id": i, "texts": text, "label": label})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    from jobs.support.tiny import build_tiny_mistral

    return str(build_tiny_mistral(tmp_path_factory.mktemp("tiny") / "mistral"))


@pytest.fixture
def tiny_config(tiny_backbone) -> ClassifierConfig:
    """A tiny nf4 Mistral QLoRA config that learns the separable task in seconds on CPU."""
    from jobs.support.tiny import tiny_config

    return tiny_config(tiny_backbone)


def fake_aws_keys() -> tuple[str, str]:
    """Fake credentials shaped like real ones (moto accepts any): an AKIA key id marked FAKE and a
    random 40-character secret, made at run time so no key-looking string sits in a file.
    tests/test_faults.py proves the secret never reaches an output, a log or Ray's session files."""
    import secrets
    import string

    upper, alphabet = string.ascii_uppercase + string.digits, string.ascii_letters + string.digits + "/+"
    key_id = "AKIAFAKE" + "".join(secrets.choice(upper) for _ in range(12))
    return key_id, "".join(secrets.choice(alphabet) for _ in range(40))


@pytest.fixture(scope="session")
def local_s3(tmp_path_factory):
    """A real S3 endpoint (moto_server) on a free loopback port, for the whole session.

    The standard AWS variables point s3fs/pyarrow/boto3 at it; they are set before any Ray
    cluster starts so Ray workers inherit them, fake keys included (as a node's credentials).
    """
    from jobs.support.local_s3 import LocalS3, apply_env, restore_env

    key_id, secret = fake_aws_keys()
    s3 = LocalS3(log_path=tmp_path_factory.mktemp("moto") / "moto.log", access_key_id=key_id,
                 secret_access_key=secret).start()
    previous = apply_env(s3.env)
    yield s3
    restore_env(previous)
    s3.stop()


@pytest.fixture
def s3_bucket(local_s3, request) -> str:
    """A fresh bucket per test: s3://<test-name>-<n>."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    return local_s3.make_bucket(name)


CATALOG = "test"


@pytest.fixture(scope="session")
def iceberg_catalog(local_s3, tmp_path_factory) -> str:
    """A real Iceberg catalog for the session: pyiceberg's SQL catalog on a SQLite file, its
    warehouse on the local S3 endpoint. Configured the pyiceberg way (PYICEBERG_CATALOG__TEST__*),
    before any Ray cluster starts, so workers and job subprocesses see the same configuration.
    Iceberg I/O through s3fs (FsspecFileIO) honours the AWS_* endpoint variables, so readers that
    open the catalog themselves (pyiceberg, Ray Data) reach the same endpoint. Returns its name."""
    import os

    warehouse = local_s3.make_bucket("iceberg-warehouse") + "/warehouse"
    settings = {"TYPE": "sql", "URI": f"sqlite:///{tmp_path_factory.mktemp('catalog') / 'catalog.db'}",
                "WAREHOUSE": warehouse, "PY_IO_IMPL": "pyiceberg.io.fsspec.FsspecFileIO"}
    previous = {k: os.environ.get(k) for k in settings}
    os.environ.update({f"PYICEBERG_CATALOG__{CATALOG.upper()}__{k}": v for k, v in settings.items()})
    yield CATALOG
    for k, v in previous.items():
        os.environ.pop(f"PYICEBERG_CATALOG__{CATALOG.upper()}__{k}", None)


@pytest.fixture
def table_name(request) -> str:
    """A fresh NAMESPACE.TABLE per test (the table is created by the first commit)."""
    import re
    import uuid

    return "t." + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:6]


@pytest.fixture(scope="session")
def ray_cluster(local_s3, iceberg_catalog):
    """A real local Ray cluster for the session (after the S3 env is set, so workers inherit it).

    2 CPUs like this machine and CI; jobs give their actors fractional CPUs so Ray Data's read
    tasks are never starved.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def train_tiny_artifact(directory, backbone: str, steps: int = 6) -> str:
    from clf_core.training.data import stratified_split
    from clf_core.training.recipe import train_classifier

    from jobs.support.tiny import tiny_config

    cfg = tiny_config(backbone, {"train.epochs": 1, "train.max_steps": steps})
    split = stratified_split(ledger_rows(128, seed=11), "label", cfg.train.split, seed=200)
    train_classifier(cfg, split).save(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_backbone) -> str:
    """A tiny nf4 Mistral classifier saved as an artifact (local folder), for scoring tests.

    A few optimizer steps only: scoring tests check plumbing (every row once, the columns, the
    cache), not accuracy, which tests/test_train_predict.py covers."""
    return train_tiny_artifact(tmp_path_factory.mktemp("scoring-artifact") / "model", tiny_backbone)


@pytest.fixture(scope="session")
def second_artifact(tmp_path_factory, tiny_backbone) -> str:
    """Another model version (fewer steps, other weights): what a backfill relabels with."""
    return train_tiny_artifact(tmp_path_factory.mktemp("scoring-artifact-2") / "model", tiny_backbone, steps=4)


# The longest files, longest first (seconds of their tests with two workers, 2026-12-05): with
# --dist loadfile the two workers take whole files in this order, so the longest start first and
# both end together.
LONGEST_FILES = ("test_label.py", "test_demo.py", "test_faults.py", "test_train_job.py", "test_minilm.py",
                 "test_rollout.py", "test_review.py", "test_bench.py")   # 350, 219, 200, 174, 97, 91, 80, 78


def pytest_collection_modifyitems(config, items):
    """The files of LONGEST_FILES first, in its order, then the rest in file order (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
