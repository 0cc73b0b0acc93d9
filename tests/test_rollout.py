"""Safe model rollout: a registry with an alias the scoring jobs resolve, the promotion gate, the
shadow comparison, the backfill's diff report, rollback, and bad input that leaves the alias alone.

Two tiny models are trained once for the module: a good one, and one trained on flipped labels
(deliberately worse: it gets most rows wrong). Both are published into a registry.
"""

from __future__ import annotations

import json
import threading

import pandas as pd
import pytest

from clf_core import storage
from clf_core.model import registry
from clf_core.model.artifact import open_artifact, publish
from conftest import ledger_rows
from jobs import promote as promote_job

NAME = "income-expense"


def flip(label: str) -> str:
    return {"Expense": "Income", "Income": "Expense"}[label]


def trained(directory, backbone: str, rows: pd.DataFrame, labels=("Expense", "Income")) -> str:
    from clf_core.training.data import stratified_split
    from clf_core.training.recipe import train_classifier
    from jobs.support.tiny import tiny_config

    cfg = tiny_config(backbone, {"data.labels": list(labels)})
    train_classifier(cfg, stratified_split(rows, "label", cfg.train.split, seed=200)).save(directory)
    return str(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_backbone) -> dict[str, str]:
    """good, worse (flipped labels), other (another label set): local artifacts."""
    work = tmp_path_factory.mktemp("rollout-models")
    rows = ledger_rows(256, seed=21)
    return {"good": trained(work / "good", tiny_backbone, rows),
            "worse": trained(work / "worse", tiny_backbone, rows.assign(label=rows["label"].map(flip))),
            "other": trained(work / "other", tiny_backbone, ledger_rows(256, seed=22, labels=("Asset", "Liability")),
                             labels=("Asset", "Liability"))}


def publish_into(registry_uri: str, artifact: str) -> str:
    version = open_artifact(artifact).model_version
    publish(artifact, registry.version_uri(registry_uri, NAME, version))
    return version


def eval_file(tmp_path, rows: pd.DataFrame | None = None) -> str:
    path = tmp_path / "eval.csv"
    (ledger_rows(120, seed=77) if rows is None else rows).to_csv(path, index=False)
    return str(path)


def alias_state(registry_uri: str) -> dict | None:
    return registry.Alias(registry_uri, NAME).read()[0]


# ---- the alias (no Ray) ---------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_promotions_at_once_exactly_one_wins_and_the_other_is_told(where, tmp_path, s3_bucket):
    """Both read the alias, both write: in every round exactly one write lands; the other gets
    AliasConflict naming the winner, and the alias holds the winner's version and history."""
    root = str(tmp_path / "registry") if where == "local" else f"{s3_bucket}/registry"
    alias = registry.Alias(root, NAME)
    alias.move("v000000000001", "first", "promote", None, None)
    for round_ in range(5):
        state, etag = alias.read()
        ready = threading.Barrier(2)
        outcome: dict[str, object] = {}

        def promote(version: str) -> None:
            mine = registry.Alias(root, NAME)
            ready.wait()
            try:
                mine.move(version, "race", "promote", etag, state)
                outcome[version] = "won"
            except registry.AliasConflict as exc:
                outcome[version] = str(exc)

        threads = [threading.Thread(target=promote, args=(f"v{round_:011d}{k}",)) for k in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [v for v, o in outcome.items() if o == "won"]
        assert len(winners) == 1, outcome
        loser = next(o for o in outcome.values() if o != "won")
        assert f"now {winners[0]}" in loser and "nothing was changed" in loser
        now = alias_state(root)
        assert now["version"] == winners[0] and now["history"][-1]["to"] == winners[0]
        assert len(now["history"]) == round_ + 2     # the loser left no trace


@pytest.mark.integration
def test_resolving_an_alias_and_bad_references(tmp_path, models):
    root = str(tmp_path / "registry")
    with pytest.raises(Exception, match="has no alias 'champion'"):
        registry.resolve_model(f"{root}/{NAME}@champion")
    version = publish_into(root, models["good"])
    registry.Alias(root, NAME).move(version, "test", "promote", None, None)
    ref = registry.resolve_model(f"{root}/{NAME}@champion")
    assert ref.uri == f"{root}/{NAME}/{version}" and open_artifact(ref.uri).model_version == version
    with pytest.raises(Exception, match=r"has no alias 'canary' \(its aliases: champion\)"):
        registry.resolve_model(f"{root}/{NAME}@canary")
    assert registry.resolve_model(models["good"]).uri == models["good"]      # a plain path stays a path
    with pytest.raises(Exception, match="not a published version of .* \\(versions: " + version):
        registry.check_version(root, NAME, "v999999999999")
    with pytest.raises(Exception, match=f"holds no model named 'nope' \\(names: {NAME}\\)"):
        registry.check_version(root, "nope", version)


# ---- the gate (Ray: both models score through the label job's actors) ------------------------------

def promote(*args) -> int:
    return promote_job.main(list(args))


@pytest.mark.integration
def test_the_gate_refuses_a_worse_model_records_an_override_and_rolls_back(ray_cluster, tmp_path, models, capsys):
    root = str(tmp_path / "registry")
    good, worse, other = (publish_into(root, models[k]) for k in ("good", "worse", "other"))
    base = ["--registry", root, "--name", NAME, "--cache", str(tmp_path / "cache"), "--shadow-nights", "0"]
    evaluation = eval_file(tmp_path)

    # a first promotion needs the evaluation file, and compares with nothing
    assert promote(*base, "--candidate", good) == 2
    assert "a first promotion needs --eval-data" in capsys.readouterr().err and alias_state(root) is None
    assert promote(*base, "--candidate", good, "--eval-data", evaluation, "--text-column", "texts") == 0
    out = capsys.readouterr().out
    assert "first promotion: no champion to compare with" not in out or "PROMOTED" in out
    assert f"PROMOTED: {NAME}@champion = {good}" in out and alias_state(root)["version"] == good

    # a deliberately worse candidate is refused, naming the figures; the alias stays
    assert promote(*base, "--candidate", worse, "--eval-data", evaluation, "--text-column", "texts") == 1
    out = capsys.readouterr().out
    assert "REFUSED: on the evaluation file" in out and "below the champion's" in out and "macro-F1" in out
    assert "they disagree on" in out and alias_state(root)["version"] == good
    # the side-by-side table holds both models' figures for each class
    assert "Income precision" in out and "Expense f1" in out

    # --accept-worse needs a reason, and records it
    assert promote(*base, "--candidate", worse, "--eval-data", evaluation, "--text-column", "texts",
                   "--accept-worse") == 2
    assert "--accept-worse needs --reason" in capsys.readouterr().err
    assert promote(*base, "--candidate", worse, "--eval-data", evaluation, "--text-column", "texts",
                   "--accept-worse", "--reason", "the eval file predates the new chart") == 0
    capsys.readouterr()
    state = alias_state(root)
    assert state["version"] == worse
    assert state["history"][-1] | {"at": None, "who": None} == {
        "at": None, "who": None, "action": "promote (accepted worse)", "from": good, "to": worse,
        "why": "the eval file predates the new chart"}

    # a better candidate than the (worse) champion passes the gate
    assert promote("--registry", root, "--name", NAME, "--rollback", "--reason", "bad labels") == 0
    assert f"rolled back from {worse} to {good}" in capsys.readouterr().out
    assert alias_state(root)["version"] == good and alias_state(root)["history"][-1]["action"] == "rollback"
    assert promote("--registry", root, "--name", NAME, "--rollback") == 2    # no champion before the first
    assert "has no previous champion" in capsys.readouterr().err

    # bad input: each named, the alias unchanged
    before = alias_state(root)
    bad = {
        ("--candidate", "v999999999999", "--eval-data", evaluation): "not a published version",
        ("--candidate", other, "--eval-data", evaluation): "trained on the labels ['Asset', 'Liability']",
        ("--candidate", worse, "--eval-data", eval_file(tmp_path, ledger_rows(20, labels=("Expense", "Revenue"))),
         "--text-column", "texts"): "not in the configured labels ['Expense', 'Income']: 'Revenue'",
    }
    for args, message in bad.items():
        assert promote(*base, *args) == 2, args
        assert message in capsys.readouterr().err, message
    assert promote("--registry", root, "--name", "nope", "--candidate", good, "--eval-data", evaluation) == 2
    assert "holds no model named 'nope'" in capsys.readouterr().err
    assert alias_state(root) == before


# ---- real traffic: label with @champion, shadow, backfill and its report ---------------------------

@pytest.mark.integration
def test_shadow_comparison_and_backfill_report_match_the_table(ray_cluster, s3_bucket, iceberg_catalog, table_name,
                                                               tmp_path, models, capsys):
    from test_label import DAYS, job_args, read_labeled, write_partition
    from test_train_job import answers_table

    from jobs import backfill, label
    from jobs import table as table_job

    root, src, cache = f"{s3_bucket}/registry", f"{s3_bucket}/ledgers", f"{s3_bucket}/label-cache"
    corrections = table_name + "_corrections"
    good, worse = publish_into(root, models["good"]), publish_into(root, models["worse"])
    registry.Alias(root, NAME).move(good, "first", "promote", None, None)
    texts = ledger_rows(40, seed=5)["texts"].unique().tolist()[:20]
    for i, day in enumerate(DAYS[:2]):
        write_partition(src, day, pd.DataFrame({"row_id": range(i * 100, i * 100 + 40), "texts": texts * 2}))
    champion = f"{root}/{NAME}@champion"
    # a reviewer's answer to one text, in the corrections table before the night is labeled (one
    # label run gives the table both kinds of rows): rows with a reviewer's answer never change in a
    # backfill. (jobs.review import, which needs a labeled table, is tested in test_review.)
    from clf_core.model.predict import Predictor

    answered = texts[0]
    given = Predictor.load(models["good"]).predict([answered]).labels[0]
    answers_table(iceberg_catalog, corrections, [(answered, given, flip(given), None, None)])
    assert label.main(job_args(champion, src, iceberg_catalog, table_name, cache, "--corrections", corrections)) == 0
    capsys.readouterr()
    current = read_labeled(iceberg_catalog, table_name)
    assert set(current.loc[current.label_source == "model", "model_version"]) == {good}  # @champion resolved
    assert set(current.loc[current.texts == answered, "label_source"]) == {"review"}
    assert set(current.loc[current.texts == answered, "label"]) == {flip(given)}

    # the shadow comparison: what the worse model would change on the last 2 nights, from the cache
    assert promote("--registry", root, "--name", NAME, "--candidate", worse, "--eval-data", eval_file(tmp_path),
                   "--text-column", "texts", "--catalog", iceberg_catalog, "--output-table", table_name,
                   "--cache", cache, "--shadow-nights", "2", "--accept-worse", "--reason", "test") == 0
    out = capsys.readouterr().out
    new = dict(zip(texts, Predictor.load(models["worse"]).predict(texts).labels))
    model_rows = current[current.label_source == "model"]
    changed = model_rows[model_rows.texts.map(new) != model_rows.label]
    assert (f"{len(changed):,} of {len(model_rows):,} model-labeled rows would change" in out and
            f"{(current.label_source == 'review').sum():,} rows carry reviewers' answers and would not" in out), out
    for (old, new_label), n in changed.groupby(["label", changed.texts.map(new)]).size().items():
        assert f"{old} -> {new_label}: {n:,} rows" in out

    # the backfill with the new champion: its report, checked against the two snapshots directly
    assert backfill.main(job_args(champion, src, iceberg_catalog, table_name, cache, "--start", DAYS[0],
                                  "--end", DAYS[1])) == 0
    out = capsys.readouterr().out
    after = read_labeled(iceberg_catalog, table_name)
    assert set(after.loc[after.label_source == "model", "model_version"]) == {worse}
    joined = current.merge(after, on="row_id", suffixes=("_before", "_after"))
    moved = joined[joined.label_before != joined.label_after]
    assert not (moved.label_source_before == "review").any()       # answers are applied again
    from clf_core.labeling.table import LabeledTable

    labeled = LabeledTable(iceberg_catalog, table_name)
    head = labeled.table.current_snapshot()
    figures = json.loads(head.summary.additional_properties["clf.backfill-report"])
    assert figures["changed"] == len(moved) and figures["rows"] == len(after) and figures["reviewed_changed"] == 0
    pairs = {f"{a} -> {b}": n for (a, b), n in moved.groupby(["label_before", "label_after"]).size().items()}
    assert figures["pairs"] == pairs
    assert figures["per_partition"] == {f"dt={d}": n for d, n in moved.groupby("dt_before").size().items()}
    assert dict(figures["top_texts"]) == dict(moved.groupby("texts_before").size().sort_values(ascending=False).head(20))
    tag = figures["tag"]
    assert f"backfill report {tag}: {len(moved):,} of {len(after):,} rows" in out
    report = storage.read_text(f"{labeled.table.location()}/reports/{tag}.md")
    assert f"rows whose label changed: **{len(moved):,}**" in report
    # a rollback to the tag undoes the backfill and its report snapshot
    assert table_job.main(["rollback", "--catalog", iceberg_catalog, "--output-table", table_name, "--to", tag]) == 0
    pd.testing.assert_frame_equal(read_labeled(iceberg_catalog, table_name).sort_values("row_id").reset_index(drop=True),
                                  current.sort_values("row_id").reset_index(drop=True), check_dtype=False)
