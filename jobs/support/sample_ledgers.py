"""Synthetic nightly ledgers built from *real* account names (the packaged charts of accounts).

The layout imitates the seed's property-management P&L exports: per property and month, a
`Header <SECTION>` line, `Plus: <section> <account>` income lines, `Less: <section> <account>`
expense lines and `Total <section>` lines, each with an amount. The same properties report the
same accounts month after month, so most texts repeat across partitions (as real ledgers do),
and a few bad rows (null, empty, whitespace, numbers-as-text, an over-long line) are mixed in.
The layout is synthetic; the account names are real.
"""

from __future__ import annotations

import random
from datetime import date, timedelta

import pandas as pd

from clf_core.model.labels import read_table, sample_data_path

BAD_TEXTS = [None, "", "   ", "12345.67", "x" * 5000]


def account_book(seed: int = 0) -> pd.DataFrame:
    """Real account names with their section (the parent group in the chart) and label."""
    table = read_table(sample_data_path("coa_income_expense"))
    table = table.assign(section=[
        fp[: -len(t)].strip() if fp.endswith(t) and fp != t else ("Other Income" if lab == "Income" else "Operating Expenses")
        for fp, t, lab in zip(table["full_path"], table["text"], table["label"])
    ])
    return table.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def ledger_partition(day: date, properties: int = 6, accounts_per_property: int = 30, seed: int = 0,
                     new_accounts: int = 0, bad_rows: bool = True) -> pd.DataFrame:
    """One night's ledger rows for `properties` properties. `new_accounts` adds accounts never
    used on earlier nights (what a warm label cache has not seen)."""
    book = account_book(seed)
    rng = random.Random(f"{seed}-{day.isoformat()}")
    rows = []
    for p in range(properties):
        # A property keeps its chart: the same accounts every night (stable choice per property).
        prng = random.Random(f"{seed}-property-{p}")
        picks = book.iloc[prng.sample(range(len(book) - 200), accounts_per_property)]
        if new_accounts:
            offset = len(book) - 200 + (day.toordinal() * 7 + p) % 180
            picks = pd.concat([picks, book.iloc[offset: offset + new_accounts]])
        for section, group in picks.groupby("section", sort=False):
            is_income = (group["label"] == "Income").mean() >= 0.5
            rows.append((p, f"Header {section.upper()}", None, None))
            total = 0.0
            for text, label in zip(group["text"], group["label"]):
                amount = round(rng.uniform(20, 25_000), 2)
                total += amount
                prefix = "Plus:" if label == "Income" else "Less:"
                rows.append((p, f"{prefix} {section} {text}", amount if label == "Income" else -amount, label))
            rows.append((p, f"Total {section}", round(total if is_income else -total, 2), None))
    if bad_rows:
        for i, bad in enumerate(BAD_TEXTS):
            rows.insert(rng.randrange(len(rows)), (i % properties, bad, 0.0, None))
    frame = pd.DataFrame(rows, columns=["property_id", "texts", "amount", "source_label"])
    frame.insert(0, "line_id", [f"{day.isoformat()}-{i:05d}" for i in range(len(frame))])
    frame.insert(1, "posted_on", day.isoformat())
    frame["property_id"] = frame["property_id"].map(lambda p: f"PROP-{p + 1:03d}")
    return frame


def write_nights(prefix: str, first_day: date, nights: int, **kwargs) -> list[str]:
    """Write `nights` partitions under prefix/dt=YYYY-MM-DD/part-0.parquet; return their URIs."""
    from clf_core import storage

    uris = []
    for n in range(nights):
        day = first_day + timedelta(days=n)
        uri = storage.join(prefix, f"dt={day.isoformat()}", "part-0.parquet")
        table = ledger_partition(day, **kwargs)
        fs, path = storage.filesystem(uri)
        if not storage.is_remote(uri):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            table.to_parquet(f, index=False)
        uris.append(uri)
    return uris
