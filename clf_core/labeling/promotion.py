"""Promoting a model (jobs.promote): the gate between "a model was trained" and "this model labels
our books", the shadow comparison on real traffic, and rollback.

    candidate (a published version) vs champion (what the alias points at), on the same rows:
      the evaluation file the team keeps (--eval-data)
      + the reviewed rows neither model was trained on (the corrections table)
    -> per-class precision / recall / F1 side by side, the rows where they disagree
    -> refused when the candidate's macro-F1 is more than --max-drop below the champion's on
       either set (--accept-worse --reason overrides, and the reason is recorded)
    -> shadow: the distinct texts of the last --shadow-nights labeled partitions, scored by the
       candidate; how many rows' labels would change, by class pair
    -> the alias moved, conditionally (clf_core.model.registry)

Both models are scored through the label job's own pass 1 (clf_core.labeling.pipeline: look the texts up
in the label cache, score the misses on TextScorer actors, which add them to the cache): the same
code, the same hardware (GPU actors on a cluster) and the same calibrated confidences as a night,
and the candidate's labels are in the cache when its backfill runs.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import date

import pyarrow as pa

from clf_core.model.config import SCORING_BATCH_SIZE
from clf_core.model import registry
from clf_core.model.registry import CHAMPION
from clf_core.errors import ClfError, ConfigError, DataError
from clf_core.settings import check, setting

log = logging.getLogger(__name__)


@dataclass
class PromoteSettings:
    registry: str = setting("The model registry (local folder or s3://) that jobs.train --registry published to.",
                            default="", required=True)
    name: str = setting("The model's name in the registry (jobs.train --name).", default="", required=True)
    candidate: str = setting("The version to promote (v...: jobs.train prints it), or `latest`: the one published last.",
                             default="")
    alias: str = setting("The alias to move.", default=CHAMPION)
    rollback: bool = setting("Point the alias back at the champion before the current one (no gate).", default=False)
    eval_data: str = setting("Labeled CSV/Parquet the team keeps for this check (local or s3://): both models are "
                             "scored on it. Required for a first promotion.", default="")
    text_column: str = setting("Text column of --eval-data (default: the column the candidate was trained on).",
                               default="")
    table_text_column: str = setting("Text column of --output-table (jobs.label's --text-column).", default="texts")
    label_column: str = setting("Label column of --eval-data.", default="label")
    max_drop: float = setting("Refuse when the candidate's macro-F1 is more than this below the champion's on "
                              "either set.", at_least=0, default=0.005)
    accept_worse: bool = setting("Promote even though the gate refuses (needs --reason).", default=False)
    reason: str = setting("Why (recorded in the alias's history; required with --accept-worse).", default="")
    catalog: str = setting("The pyiceberg catalog of --corrections and --output-table.", default="")
    corrections: str = setting("The corrections table: its reviewed rows neither model was trained on join the gate.",
                               default="")
    output_table: str = setting("The labeled table: the shadow comparison reads its last --shadow-nights partitions.",
                                default="")
    shadow_nights: int = setting("Labeled partitions (the latest) whose distinct texts the candidate scores in the "
                                 "shadow comparison. 0: none.", at_least=0, default=3)
    cache: str = setting("The label cache of the label jobs (local or s3://): both models are looked up there and "
                         "what is scored is added. Default: a temporary folder.", default="")
    samples: int = setting("How many disagreeing rows and changed texts to print.", at_least=0, default=10)
    actors: int = setting("Scoring actors (production: one per GPU).", at_least=1, default=1)
    gpus_per_actor: float = setting("GPUs per scoring actor: 1 on a T4 node, 0 on CPU.", at_least=0, default=0.0)
    cpus_per_actor: float = setting("CPUs reserved per scoring actor.", above=0, default=0.5)
    batch_size: int = setting("Texts per model forward pass.", at_least=1, default=SCORING_BATCH_SIZE)

    def validate(self) -> "PromoteSettings":
        extra = []
        if self.rollback and (self.candidate or self.accept_worse):
            extra.append("--rollback takes no --candidate or --accept-worse: it goes back to the previous champion")
        if not self.rollback and not self.candidate:
            extra.append("--candidate is required: the version to promote (or --rollback)")
        if self.accept_worse and not self.reason.strip():
            extra.append("--accept-worse needs --reason TEXT: it is recorded in the alias's history")
        if (self.corrections or self.output_table) and not self.catalog:
            extra.append("--corrections and --output-table need --catalog")
        return check(self, extra)

# ---- scoring a set of texts through the label job's pass 1 ---------------------------------------

def score_texts(texts: list[str], model_uri: str, settings: PromoteSettings, cache: str) -> dict[str, tuple[str, float]]:
    """text -> (label, calibrated confidence) by the model at `model_uri`: looked up in the label
    cache, the misses scored by TextScorer actors (which add them to the cache)."""
    import ray

    from clf_core.model.artifact import open_artifact
    from clf_core.labeling.settings import LabelSettings
    from clf_core.labeling.pipeline import configure_ray_data, look_up, score_misses
    from clf_core.runtime import ensure_ray
    from clf_core.labeling.scoring import ROWS, TEXT

    texts = sorted(set(texts))
    if not texts:
        return {}
    ensure_ray()
    artifact = open_artifact(model_uri)
    job = LabelSettings(model=model_uri, input="-", catalog="-", output_table="p.p", cache=cache,
                        actors=settings.actors, gpus_per_actor=settings.gpus_per_actor,
                        cpus_per_actor=settings.cpus_per_actor, batch_size=settings.batch_size, shuffle_partitions=2,
                        progress_every_s=30.0)
    configure_ray_data(job)
    dataset = ray.data.from_arrow(pa.table({TEXT: texts, ROWS: [1] * len(texts)})).materialize()
    scores = score_misses(look_up(dataset, job, artifact.model_version, artifact.labels), job,
                          f"promote-{uuid.uuid4().hex[:8]}")
    found: dict[str, tuple[str, float]] = {}
    for block in scores.run_labels:
        table = ray.get(block)
        table = table if isinstance(table, pa.Table) else pa.Table.from_pandas(table, preserve_index=False)
        for text, label, confidence in zip(table[TEXT].to_pylist(), table["label"].to_pylist(),
                                           table["confidence"].to_pylist()):
            if label is not None:
                found[text] = (label, confidence)
    return found


# ---- the gate -------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """One set of rows scored by both models."""
    name: str
    rows: int
    labels: list[str]
    champion: dict | None          # classification_metrics, None on a first promotion
    candidate: dict
    disagree: list[tuple[str, str, str, str]] = field(default_factory=list)   # (text, champion, candidate, true)

    def drop(self) -> float:
        return self.champion["macro_f1"] - self.candidate["macro_f1"] if self.champion else float("-inf")

    def lines(self, samples: int) -> list[str]:
        lines = [f"  {self.name} ({self.rows} rows)" + ("" if self.champion else ": no champion to compare with")]
        head = f"    {'':<26}" + ("  champion" if self.champion else "") + "  candidate"
        lines.append(head)

        def row(what: str, key) -> None:
            cand = key(self.candidate)
            if self.champion:
                champ = key(self.champion)
                lines.append(f"    {what:<26}  {champ:>8.4f}  {cand:>9.4f}  ({cand - champ:+.4f})")
            else:
                lines.append(f"    {what:<26}  {cand:>9.4f}")

        row("macro-F1", lambda m: m["macro_f1"])
        row("accuracy", lambda m: m["accuracy"])
        for label in self.labels:
            for metric in ("precision", "recall", "f1"):
                row(f"{label} {metric}", lambda m, l=label, k=metric: m["per_class"][l][k])
        if self.champion:
            lines.append(f"    they disagree on {len(self.disagree)} of {self.rows} rows"
                         + (", e.g.:" if self.disagree and samples else ""))
            for text, champ, cand, true in self.disagree[:samples]:
                lines.append(f"      {text[:70]!r}: champion {champ}, candidate {cand}, true {true}")
        return lines


def compare(name: str, texts: list[str], truth: list[str], labels: list[str], champion: dict | None,
            candidate: dict) -> Comparison:
    from clf_core.model.metrics import classification_metrics

    index = {label: i for i, label in enumerate(labels)}
    y = [index[t] for t in truth]
    cand = [candidate[t][0] for t in texts]
    result = Comparison(name, len(texts), labels, None, classification_metrics(y, [index[c] for c in cand], labels))
    if champion is not None:
        champ = [champion[t][0] for t in texts]
        result.champion = classification_metrics(y, [index[c] for c in champ], labels)
        result.disagree = [(t, a, b, true) for t, a, b, true in zip(texts, champ, cand, truth) if a != b]
    return result


def eval_rows(settings: PromoteSettings, labels: list[str], default_text_column: str) -> tuple[list[str], list[str]]:
    """(texts, true labels) of --eval-data; a label the model does not know fails, naming it."""
    from clf_core.model.labels import LabelMap, read_table

    text_column = settings.text_column or default_text_column
    table = read_table(settings.eval_data, [text_column, settings.label_column])
    table = table.dropna(subset=[text_column])
    LabelMap(labels).encode(table[settings.label_column].tolist(),
                            where=f"--eval-data {settings.eval_data} (column {settings.label_column!r})")
    return table[text_column].astype(str).tolist(), table[settings.label_column].astype(str).tolist()


def trained_on(manifest: dict, corrections) -> tuple[int, set[str]]:
    """(the corrections snapshot a model was trained with, the answered texts it held out): an
    answer imported after that snapshot, or held out, is one the model never learned from."""
    record = manifest.get("training", {}).get("corrections") or {}
    if record.get("table") != corrections.identifier:
        return -1, set()
    return corrections.sequence_number(record.get("snapshot_id")), set(record.get("held_out", []))


def reviewed_rows(settings: PromoteSettings, candidate: dict, champion: dict | None) -> tuple[list[str], list[str]]:
    """The reviewed texts (unscoped answers) neither model was trained on, with their answers."""
    from clf_core.review.corrections import CorrectionsTable, latest_per_key

    corrections = CorrectionsTable(settings.catalog, settings.corrections)
    rows = corrections.rows()
    if not rows.num_rows:
        return [], []
    models = [trained_on(m, corrections) for m in (candidate, champion) if m is not None]
    # each import is one commit whose summary names its file: the order an answer arrived in
    imported = {s.summary.additional_properties.get("clf.source-sha256"): s.sequence_number
                for s in corrections.table.snapshots() if s.summary}
    texts, truth = [], []
    for row in latest_per_key(rows).to_pylist():
        if row["scope_column"]:
            continue   # an answer for one scope is no fact about the text alone
        arrived = imported.get(row["source_sha256"], 0)
        if all(arrived > seq or row["text"] in held for seq, held in models):
            texts.append(row["text"])
            truth.append(row["corrected_label"])
    return texts, truth


@dataclass
class Verdict:
    passed: bool
    why: str


def verdict(comparisons: list[Comparison], max_drop: float) -> Verdict:
    worse = [c for c in comparisons if c.champion and c.rows and c.drop() > max_drop]
    if worse:
        return Verdict(False, "; ".join(
            f"on the {c.name} the candidate's macro-F1 is {c.candidate['macro_f1']:.4f}, {c.drop():.4f} below the "
            f"champion's {c.champion['macro_f1']:.4f} (more than --max-drop {max_drop})" for c in worse))
    return Verdict(True, "the candidate is no worse than the champion by more than --max-drop on any set"
                   if any(c.champion for c in comparisons) else "first promotion: no champion to compare with")


# ---- the shadow comparison ------------------------------------------------------------------------

@dataclass
class Shadow:
    partitions: list[str]
    rows: int = 0                   # model-labeled rows of those partitions
    reviewed_rows: int = 0          # rows with a reviewer's answer: a backfill never changes them
    changed_rows: int = 0
    pairs: Counter = field(default_factory=Counter)         # (champion label, candidate label) -> rows
    texts: Counter = field(default_factory=Counter)         # changed text -> rows
    labeled: Counter = field(default_factory=Counter)       # (text, label in the table) -> model-labeled rows

    @property
    def distinct_texts(self) -> list[str]:
        return sorted({text for text, _ in self.labeled})

    def compare(self, new: dict, old: dict | None) -> "Shadow":
        """The candidate's labels (`new`) against the champion's for the same texts (`old`, from the
        label cache: the nights it labeled put them there) or, on a first promotion, the table's."""
        for (text, label), n in self.labeled.items():
            before = old[text][0] if old and text in old else label
            after = new.get(text, (before,))[0]
            self.rows += n
            if after != before:
                self.changed_rows += n
                self.pairs[(before, after)] += n
                self.texts[text] += n
        return self

    def lines(self, samples: int) -> list[str]:
        if not self.partitions:
            return ["  shadow: the table has no labeled partition yet"]
        lines = [f"  shadow, the last {len(self.partitions)} labeled partition(s) ({self.partitions[0]} .. "
                 f"{self.partitions[-1]}): {self.changed_rows:,} of {self.rows:,} model-labeled rows would change "
                 f"({100 * self.changed_rows / max(self.rows, 1):.1f}%); {self.reviewed_rows:,} rows carry reviewers' "
                 f"answers and would not"]
        for (old, new), n in self.pairs.most_common():
            lines.append(f"    {old} -> {new}: {n:,} rows")
        for text, n in self.texts.most_common(samples):
            lines.append(f"    {n:>6,} x {text[:80]!r}")
        return lines


def shadow_rows(settings: PromoteSettings) -> Shadow:
    """The model-labeled rows of the last --shadow-nights labeled partitions, counted by (text,
    label in the table), for `Shadow.compare` once the candidate has scored their texts."""
    from pyiceberg.expressions import In

    from clf_core.labeling.table import LabeledTable

    labeled = LabeledTable(settings.catalog, settings.output_table)
    if labeled.table is None:
        raise ClfError(f"--output-table {settings.output_table}: no such table in catalog {settings.catalog!r}")
    partitions = sorted(labeled.commits())[-settings.shadow_nights:]
    result = Shadow(partitions)
    if not partitions:
        return result
    values = [p.split("=", 1)[1] for p in partitions]
    literals = {date.fromisoformat(v) for v in values} if labeled.key_is_date else set(values)
    text_column = settings.table_text_column
    scan = labeled.table.scan(row_filter=In(labeled.partition_key, literals),
                              selected_fields=(text_column, "label", "label_source"))
    for batch in scan.to_arrow_batch_reader():
        for text, label, source in zip(batch.column(text_column).to_pylist(), batch.column("label").to_pylist(),
                                       batch.column("label_source").to_pylist()):
            if source == "review":
                result.reviewed_rows += 1
            elif text is not None and label is not None:
                result.labeled[(text, label)] += 1
    return result


# ---- the command ---------------------------------------------------------------------------------

def promote(settings: PromoteSettings) -> tuple[int, str]:
    """(exit status, what happened): 0 promoted (or rolled back), 1 refused by the gate or by a
    concurrent promotion (the alias unchanged). Bad input raises ClfError before anything moves."""
    from clf_core.model.artifact import open_artifact

    settings.validate()
    alias = registry.Alias(settings.registry, settings.name, settings.alias)
    if settings.rollback:
        state, etag = alias.read()
        back = registry.previous(state)
        if back is None:
            raise ClfError(f"{settings.name}@{settings.alias} has no previous champion to roll back to "
                           f"({'it was never moved' if not state else 'it is the first one: ' + state['version']})")
        alias.move(back, settings.reason or "rollback", "rollback", etag, state)
        return 0, f"{settings.name}@{settings.alias}: rolled back from {state['version']} to {back}"
    candidate_uri = registry.check_version(settings.registry, settings.name, settings.candidate)
    candidate = open_artifact(candidate_uri)
    state, etag = alias.read()
    champion = None
    if state is not None:
        if state["version"] == candidate.model_version:
            return 0, f"{settings.name}@{settings.alias} is {candidate.model_version} already; nothing to do"
        champion = open_artifact(registry.version_uri(settings.registry, settings.name, state["version"]))
        if champion.labels != candidate.labels:
            raise ClfError(f"--candidate {candidate.model_version} was trained on the labels {candidate.labels}, the "
                           f"champion {champion.model_version} on {champion.labels}: they answer different questions. "
                           f"Publish it under another --name, or retrain it on the champion's labels.")
    elif not settings.eval_data:
        raise ConfigError(f"{settings.name} has no {settings.alias} yet: a first promotion needs --eval-data (a labeled "
                          f"file the team keeps) to show what the model does")
    labels = candidate.labels
    cache = settings.cache or tempfile.mkdtemp(prefix="promote-cache-")
    sets: list[tuple[str, list[str], list[str]]] = []
    if settings.eval_data:
        texts, truth = eval_rows(settings, labels, candidate.manifest.get("text_column", "text"))
        sets.append((f"evaluation file {settings.eval_data}", texts, truth))
    if settings.corrections:
        texts, truth = reviewed_rows(settings, candidate.manifest, champion.manifest if champion else None)
        unknown = sorted(set(truth) - set(labels))
        if unknown:
            raise DataError(f"--corrections {settings.corrections} holds answers {unknown} the models do not know "
                            f"(their labels: {labels})")
        if texts:
            sets.append(("reviewed rows neither model was trained on", texts, truth))
    if not any(texts for _, texts, _ in sets):
        raise DataError("nothing to compare the models on: --eval-data holds no row and no reviewed row is new to "
                        "both models")
    traffic = shadow_rows(settings) if settings.output_table and settings.shadow_nights else None
    # One scoring pass per model over every text the gate and the shadow need: each pass starts
    # scorer actors that load the model, minutes for a 4-bit 7B on a T4.
    everything = [t for _, texts, _ in sets for t in texts] + (traffic.distinct_texts if traffic else [])
    new = score_texts(everything, candidate_uri, settings, cache)
    old = score_texts(everything, registry.version_uri(settings.registry, settings.name, state["version"]),
                      settings, cache) if champion else None
    comparisons = [compare(name, texts, truth, labels, old, new) for name, texts, truth in sets if texts]
    lines = [f"gate: {settings.name} candidate {candidate.model_version} vs "
             f"{'champion ' + champion.model_version if champion else 'no champion'} (--max-drop {settings.max_drop} "
             f"macro-F1)"]
    for comparison in comparisons:
        lines += comparison.lines(settings.samples)
    if traffic:
        lines += traffic.compare(new, old).lines(settings.samples)
    result = verdict(comparisons, settings.max_drop)
    if not result.passed and not settings.accept_worse:
        lines.append(f"REFUSED: {result.why}. The alias still points at {champion.model_version}; --accept-worse "
                     f"--reason TEXT promotes anyway, and records why.")
        return 1, "\n".join(lines)
    action = "promote" if result.passed else "promote (accepted worse)"
    why = settings.reason or result.why
    try:
        alias.move(candidate.model_version, why, action, etag, state)
    except registry.AliasConflict as exc:
        lines.append(f"NOT PROMOTED: {exc}")
        return 1, "\n".join(lines)
    lines.append(f"PROMOTED: {settings.name}@{settings.alias} = {candidate.model_version}"
                 f"{' (accepted worse: ' + settings.reason + ')' if not result.passed else ''}; rollback: "
                 f"python -m jobs.promote --registry {settings.registry} --name {settings.name} --rollback")
    return 0, "\n".join(lines)
