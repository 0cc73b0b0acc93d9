"""Labeled tables and the classifier's labels: reading a labeled CSV/Parquet file (training data,
an evaluation file) with errors a user can act on, class names <-> output indices, and the real
charts of accounts shipped with the package.
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

from clf_core.errors import DataError
from clf_core.storage import filesystem


SAMPLE_DATASETS = {
    "coa_income_expense": "coa_income_expense.csv",
    "coa_all_types": "coa_all_types.csv",
}


def sample_data_path(name: str = "coa_income_expense") -> str:
    """Path of a real chart-of-accounts table shipped with the package (see sample_data/README.md)."""
    if name not in SAMPLE_DATASETS:
        raise DataError(f"unknown sample dataset {name!r}; available: {', '.join(SAMPLE_DATASETS)}")
    return str(resources.files("clf_core") / "sample_data" / SAMPLE_DATASETS[name])


class LabelMap:
    """Class names <-> output indices, in the configured order."""

    def __init__(self, labels: list[str]):
        self.names = [str(x) for x in labels]
        self.index = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def encode(self, values: list, where: str = "labels") -> list[int]:
        """Map label names to indices; unknown or missing values fail listing what was seen."""
        values = list(values)
        missing = sum(1 for v in values if v is None or (isinstance(v, float) and v != v))
        if missing:
            raise DataError(
                f"{missing} row(s) of {where} have no label; every training row needs one of "
                f"{self.names}. Drop or fill those rows."
            )
        unknown = sorted({str(v) for v in values} - set(self.index))
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise DataError(
                f"{where} hold label value(s) not in the configured labels {self.names}: {shown}. "
                f"Fix the data, or pass the full ordered list with --labels."
            )
        return [self.index[str(v)] for v in values]


def read_table(uri: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a CSV or Parquet file (local or s3://) into a DataFrame, with errors a user can act on."""
    fs, path = filesystem(uri)
    try:
        if not fs.exists(path):
            raise DataError(f"input {uri} does not exist. Check the path, bucket and AWS credentials.")
        lower = path.lower()
        with fs.open(path, "rb") as f:
            if lower.endswith((".parquet", ".pq")):
                table = pd.read_parquet(f)
            elif lower.endswith((".csv", ".csv.gz", ".txt")):
                table = pd.read_csv(f, compression="gzip" if lower.endswith(".gz") else None, keep_default_na=False, na_values=[""])
            else:
                raise DataError(f"input {uri}: unknown file type; use .csv or .parquet")
    except DataError:
        raise
    except PermissionError as exc:
        raise DataError(f"input {uri} cannot be read: permission denied ({exc}). Check credentials.") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"input {uri} is empty: it holds no header and no rows") from exc
    except Exception as exc:  # pyarrow / parser / network errors: name the file and the cause
        raise DataError(f"input {uri} cannot be read: {type(exc).__name__}: {exc}") from exc
    if columns:
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise DataError(
                f"input {uri} has no column {missing[0]!r}; its columns are {list(table.columns)}. "
                f"Pass the right name with --text-column / --label-column."
            )
    if len(table) == 0:
        raise DataError(f"input {uri} has a header but no rows")
    return table
