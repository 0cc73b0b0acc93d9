"""The pyiceberg catalogs the jobs use: opened by name, configured the pyiceberg way
(`.pyiceberg.yaml` or `PYICEBERG_CATALOG__<NAME>__*` variables), never by flags of ours.

Iceberg I/O goes through fsspec (s3fs) like every other read and write of this project, so the
standard AWS environment (AWS_ENDPOINT_URL, keys or instance profile) and botocore's and s3fs's
retries apply; pyiceberg's default pyarrow I/O ignores AWS_ENDPOINT_URL. A catalog's own
`py-io-impl` setting wins. Used by the labeled table and the corrections table alike.
"""

from __future__ import annotations

import re

from clf_core.errors import ConfigError


IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")


# Iceberg I/O goes through fsspec (s3fs) like every other read and write of this project, so the
# standard AWS environment (AWS_ENDPOINT_URL, keys or instance profile) and botocore's and s3fs's
# retries apply; pyiceberg's default pyarrow I/O ignores AWS_ENDPOINT_URL. A catalog's own
# `py-io-impl` setting wins.
IO_DEFAULTS = {"py-io-impl": "pyiceberg.io.fsspec.FsspecFileIO"}


def catalog_config(name: str) -> dict:
    from pyiceberg.utils.config import Config

    return Config().get_catalog_config(name) or {}


def open_catalog(name: str):
    """The pyiceberg catalog `name`, or a ConfigError that says how to configure it."""
    from pyiceberg.catalog import load_catalog

    config = catalog_config(name)
    if not config:
        raise ConfigError(
            f"--catalog {name!r} is not configured. Configure it the pyiceberg way: in .pyiceberg.yaml "
            f"(in $PYICEBERG_HOME, ~ or the current folder) under catalog: {name}: ..., or with environment "
            f"variables, e.g. PYICEBERG_CATALOG__{name.upper()}__TYPE=glue, or for a SQL catalog "
            f"PYICEBERG_CATALOG__{name.upper()}__URI=sqlite:////path/catalog.db and "
            f"PYICEBERG_CATALOG__{name.upper()}__WAREHOUSE=s3://bucket/warehouse.")
    try:
        # The configuration read now, not the copy pyiceberg took when it was first imported.
        return load_catalog(name, **{**IO_DEFAULTS, **config})
    except Exception as exc:  # pyiceberg raises ValueError / ImportError / driver errors, naming the setting
        raise ConfigError(f"--catalog {name!r} cannot be opened: {type(exc).__name__}: {exc}") from exc


def parse_identifier(value: str, flag: str = "--output-table") -> tuple[str, str]:
    if not IDENTIFIER.match(value or ""):
        example = "ledgers.corrections" if flag == "--corrections" else "ledgers.labeled_lines"
        raise ConfigError(f"{flag} {value!r}: expected NAMESPACE.TABLE with letters, digits and "
                          f"underscores, e.g. {example}")
    namespace, name = value.split(".")
    return namespace, name


def metadata_locations(catalog, identifier: str) -> tuple[str | None, str | None]:
    """(current, previous) metadata file of a table as the catalog records them, for messages;
    (None, None) where the catalog cannot say (only the SQL and Glue catalogs are asked)."""
    namespace, name = identifier.split(".", 1)
    try:
        if type(catalog).__name__ == "SqlCatalog":
            from pyiceberg.catalog.sql import IcebergTables
            from sqlalchemy import select
            from sqlalchemy.orm import Session

            with Session(catalog.engine) as session:
                row = session.scalar(select(IcebergTables).where(
                    IcebergTables.catalog_name == catalog.name, IcebergTables.table_namespace == namespace,
                    IcebergTables.table_name == name))
            return (row.metadata_location, row.previous_metadata_location) if row else (None, None)
        if type(catalog).__name__ == "GlueCatalog":
            params = catalog.glue.get_table(DatabaseName=namespace, Name=name)["Table"].get("Parameters", {})
            return params.get("metadata_location"), params.get("previous_metadata_location")
    except Exception:  # only for a message: never hide the original error behind a second one
        pass
    return None, None


SECRET_KEY = re.compile(r"secret|token|password|credential|access-key|key-id|session", re.IGNORECASE)


def public_io_properties(properties: dict) -> dict:
    """I/O settings safe to hand to workers: no keys, tokens or passwords (those come from each
    worker's own environment: instance profile, IRSA, AWS_* variables)."""
    return {k: str(v) for k, v in properties.items() if not SECRET_KEY.search(k)}
