"""The label jobs' settings (jobs.label, jobs.backfill): every flag declared once, with its help,
default and check. `python -m jobs.label --help` prints these.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from clf_core.model.config import SCORING_BATCH_SIZE
from clf_core.errors import ConfigError
from clf_core.labeling.scoring import OUTPUT_COLUMNS
from clf_core.settings import check, setting
from clf_core.labeling.partitions import DATE


TABLE_NAME = r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*"
COLUMN_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


@dataclass
class LabelSettings:
    model: str = setting("The model: REGISTRY/NAME@ALIAS (e.g. s3://models/income-expense@champion, the version "
                         "jobs.promote put there, resolved once at start), or an artifact's folder or s3:// URI.",
                         default="", required=True, hint="a local path or s3:// URI")
    input: str = setting("Prefix holding dt=YYYY-MM-DD/*.parquet ledger partitions (local or s3://).", default="",
                         required=True, hint="a local path or s3:// URI")
    catalog: str = setting("The pyiceberg catalog holding the output table, configured the pyiceberg way "
                           "(.pyiceberg.yaml or PYICEBERG_CATALOG__<NAME>__* variables).", default="",
                           required=True, hint="the name of a pyiceberg catalog, e.g. --catalog ledgers, configured "
                                               "in .pyiceberg.yaml or PYICEBERG_CATALOG__LEDGERS__* variables")
    output_table: str = setting("The labeled table, NAMESPACE.TABLE; created on first use, partitioned like the "
                                "input.", default="",
                                required=True, pattern=TABLE_NAME,
                                hint="expected NAMESPACE.TABLE, e.g. ledgers.labeled_lines")
    cache: str = setting("Label cache prefix (local or s3://), keyed by model version and text: the next run "
                         "scores only texts it has never seen. Keep it apart from the input.", default="",
                         required=True, hint="a local path or s3:// URI")
    text_column: str = setting("Column holding the line-item text.", default="texts",
                               required=True, hint="name the input column")
    partition_key: str = setting("Hive partition key of the input folders (key=value); also the table's partition "
                                 "column (an Iceberg date when every value is a date).", default="dt",
                                 pattern=COLUMN_NAME, hint="use a column-like name such as dt")
    actors: int = setting("Scoring actors (production: one per GPU).", at_least=1, default=1)
    backbone: str = setting("Where the scoring actors read the base weights: empty = the backbone the model was "
                            "trained on. A pre-quantized copy the model approves (python -m jobs.prequantize) "
                            "loads without quantizing on start (0.11x the cold start in jobs.bench). Checked "
                            "by content, like the original.", default="")
    cpus_per_actor: float = setting("CPUs reserved per actor. Keep the total below the cluster's CPUs so "
                                    "Ray Data's read tasks are never starved.",
                                    above=0, hint="e.g. 0.5 on a laptop, 4 on a GPU node", default=0.5)
    gpus_per_actor: float = setting("GPUs per scoring actor: 1 on a T4 node, 0 on CPU.",
                                    at_least=0, hint="1 = one T4 per actor", default=0.0)
    batch_size: int = setting("Texts per model forward pass (bounds the activations' GPU memory).",
                              at_least=1, default=SCORING_BATCH_SIZE)
    compile: str = setting("Compile the scoring actors' forward pass: auto (the model's model.compile: on CUDA "
                           "only), on, off. Compiled graphs are cached on the node, so a second actor starts fast.",
                           default="auto", choices=("auto", "on", "off"))
    rows_per_call: int = setting("Distinct texts handed to a scoring actor per call. The actor sorts them by "
                                 "token length before cutting forward batches, so a larger call pads less "
                                 "(64 per call ran at half the speed of 1024 on CPU); each call is also one "
                                 "durable write to the label cache, the most a killed actor can lose.",
                                 at_least=1, hint="e.g. 1024", default=1024)
    shuffle_partitions: int = setting("Partitions of the run-wide distinct-text shuffle: a few per node; more for "
                                      "tens of millions of distinct texts.", at_least=1, default=16)
    max_text_chars: int = setting("Texts longer than this are not scored; the row's error says why.",
                                  at_least=1, default=2000)
    cache_max_files: int = setting("After the run, rewrite the model version's label cache into few large files "
                                   "when it has more files than this (each run adds about one per "
                                   "--rows-per-call new texts). 0: never (python -m jobs.table compact-cache).",
                                   at_least=0, hint="0 = never compact in the job", default=64)
    cache_file_mb: int = setting("Target size of a compacted label cache file, in MB of memory (about 4 M "
                                 "entries per 256 MB).", at_least=1, default=256)
    actor_start_timeout_s: float = setting("Seconds to wait for the first actors to load the model "
                                           "(-1 = no limit: 7B weights can take minutes).", default=-1)
    shuffle: str = setting("Ray Data shuffle strategy of the distinct texts: sort (0.2 s per dedupe on a small "
                           "run; the cache join stays a hash join) or hash (Ray's default: ~5 s per shuffle to "
                           "start its actors; for shuffles of hundreds of GB).",
                           default="sort", choices=("sort", "hash"))
    review_threshold: float = setting("Rows scored below this confidence, and rows that could not be scored, "
                                      "get needs_review=true (the review queue: a query on the table), with "
                                      "review_reason low_confidence. -1: the threshold the model was published with "
                                      "(chosen on validation for a stated goal; 0.9 for models made before that). "
                                      "0: none.", default=-1.0)
    review_budget: float = setting("Also flag the least confident SHARE of each run's rows (review_reason budget), "
                                   "whatever their confidence: a review team's capacity is a share of rows, and a "
                                   "threshold chosen on validation flags another share on a new chart. Rows under "
                                   "the threshold count towards it. 0: no budget.",
                                   at_least=0.0, below=1.0, hint="a share of rows, e.g. 0.10 for 10%", default=0.0)
    audit_fraction: float = setting("Also flag a stable random sample of this share of texts (review_reason audit; "
                                    "chosen by a hash of the text and the model version, so a re-run flags the "
                                    "same rows). Reviewers' answers on it estimate the accuracy of the rows nobody "
                                    "else is shown (python -m jobs.review stats).", at_least=0.0, below=1.0,
                                    hint="a share of texts, e.g. 0.01", default=0.01)
    corrections: str = setting("The corrections table NAMESPACE.TABLE in --catalog (python -m jobs.review import "
                               "fills it): rows whose text reviewers answered get that answer (label_source "
                               "review) instead of being scored, and partitions labeled earlier that hold newly "
                               "answered texts are rewritten. Empty: the table the output table's runs used "
                               "before, if any.", default="",
                               pattern=TABLE_NAME, hint="expected NAMESPACE.TABLE, e.g. ledgers.corrections")
    review_export: str = setting("Also write each labeled partition's needs_review rows to "
                                 "<this prefix>/<key>=<value>.csv (local or s3://), for people to check in a "
                                 "spreadsheet. Empty: no files.", default="")
    progress_every_s: float = setting("Seconds between progress lines (rows done, rate, ETA) in a log; on a "
                                      "terminal a progress bar instead.",
                                      at_least=0, hint="0 = a line per update", default=30.0)
    force: bool = setting("Relabel partitions that already have committed labels.", default=False)
    dry_run: bool = setting("List what would be labeled and exit without running anything.", default=False)

    def validate(self) -> "LabelSettings":
        """Every bad value at once, each with its fix (ConfigError), before any worker starts."""
        extra = []
        if self.input and self.cache and self.input.rstrip("/") == self.cache.rstrip("/"):
            extra.append(f"--cache {self.cache!r} is the same as --input; keep the label cache apart")
        if self.text_column in OUTPUT_COLUMNS:
            extra.append(f"--text-column {self.text_column!r} is a column labeling adds; name the input column")
        if self.corrections and self.corrections == self.output_table:
            extra.append(f"--corrections {self.corrections!r} is the output table; name the corrections table "
                         f"jobs.review import writes, e.g. ledgers.corrections")
        if not (0.0 <= self.review_threshold <= 1.0 or self.review_threshold == -1.0):
            extra.append(f"--review-threshold {self.review_threshold}: must be within [0, 1] (0 flags only unscored "
                         f"rows), or -1 for the model's own")
        check(self, extra)
        return self


@dataclass
class BackfillSettings(LabelSettings):
    start: str = setting("First partition date to relabel, YYYY-MM-DD (inclusive).", required=True, default="")
    end: str = setting("Last partition date to relabel, YYYY-MM-DD (inclusive).", required=True, default="")

    def dates(self) -> tuple[date, date]:
        """--start and --end as dates, checked (ConfigError naming the flag and the fix)."""
        start, end = parse_date("--start", self.start), parse_date("--end", self.end)
        if start > end:
            raise ConfigError(f"--start {self.start} is after --end {self.end}; swap them")
        return start, end


def parse_date(flag: str, value: str) -> date:
    if not DATE.match(value or ""):
        raise ConfigError(f"{flag} {value!r}: expected a date as YYYY-MM-DD, e.g. 2024-01-31")
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"{flag} {value!r}: not a calendar date ({exc}); use YYYY-MM-DD") from exc


def review_threshold(settings: LabelSettings, artifact=None) -> float:
    """--review-threshold, or the threshold the model (`artifact`, opened from --model if not
    given) was published with (clf_core.model.artifact.LEGACY_REVIEW_THRESHOLD for older models)."""
    if settings.review_threshold >= 0:
        return settings.review_threshold
    from clf_core.model.artifact import open_artifact

    return (artifact or open_artifact(settings.model)).review_threshold
