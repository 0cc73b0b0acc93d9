"""Retraining with reviewers' answers, measured on charts the model never saw (--items corrections;
opt-in, ~10 min a seed: two trainings of the default model).

Per seed, the review loop first (jobs/bench/review.py: model v1 trained on the other charts, the
held-out charts labeled, the budget's rows and the audit sample answered from the true labels,
imported). Then model v2 is trained on the same charts and split plus those answers (clf_core.training.data's
answers_into_splits: the same merge as jobs.train --corrections), and both models label the held-out rows
nobody reviewed:

- family rows: unreviewed rows of the same family as a corrected text (the same parent section in
  the chart, or the same first word of the account name, "Repairs - ..."): the errors a
  correction should teach the model not to make again;
- other rows: the rest of the unreviewed rows: the errors a correction should not cause.

Beside them, how many family rows have the answer of their family as their true label: where few
do, the answer says little about its siblings.

Target: family errors fall by at least half; other errors rise by at most 1 per 1,000 rows. Both
with 95% intervals (Wilson, on the rates pooled over the seeds). Then v1 and v2 are published
into a registry and v2 goes through the promotion gate against v1 as champion, on the unreviewed
rows as the evaluation file: its verdict is printed.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from jobs.bench.review import Loop, catalog_for, labeled, model_of, review_loop, summarize, train_model
from jobs.bench.settings import BenchSettings


# Leading words that name no family: ledger modifiers and catch-alls ("Other income", "Less: ...").
# A name that starts with one is keyed on its first two words instead.
VAGUE_FIRST_WORDS = {"less", "plus", "other", "others", "total", "misc", "miscellaneous", "sundry", "general"}


def family_keys(full_path: str, name: str) -> set[str]:
    """A row's families: its parent section (the path above the account) and the first word of its
    account name ("Repairs - Plumbing" and "Repairs Roof" are one family; "Export Services" and
    "Export Sales" too)."""
    keys = set()
    if full_path.endswith(name) and full_path != name:
        keys.add("section:" + full_path[: -len(name)].strip().lower())
    words = [w.strip(".,:;()&/") for w in name.lower().replace("-", " ").split()]
    words = [w for w in words if w]
    if words:
        keys.add("words:" + " ".join(words[:2] if words[0] in VAGUE_FIRST_WORDS else words[:1]))
    return keys


def family_answer(corrected: dict[str, str], names: dict[str, str]):
    """text -> the reviewers' answer given most often in the text's families (None outside them):
    the label a sibling would get if a correction carried over to its whole family."""
    answers_by_family: dict[str, Counter] = {}
    for text in sorted(corrected):
        for key in family_keys(text, names.get(text, text)):
            answers_by_family.setdefault(key, Counter())[corrected[text]] += 1

    def answer(text: str) -> str | None:
        votes = sum((answers_by_family[k] for k in sorted(family_keys(text, names.get(text, text)))
                     if k in answers_by_family), Counter())
        return votes.most_common(1)[0][0] if votes else None

    return answer


def retrain_with_answers(loop: Loop) -> str:
    """Model v2: the training charts plus the reviewers' answers, merged as jobs.train --corrections does."""
    return train_model(loop.train, loop.seed, loop.work / "model-v2", answers=(catalog_for(loop.work), loop.corrections),
                         config=loop.config)


def gate_verdict(loop: Loop, v2: str, unreviewed) -> str:
    """v1 champion, v2 candidate, the unreviewed held-out rows as the evaluation file: the gate's last line."""
    from clf_core.model.artifact import open_artifact, publish
    from clf_core.labeling.promotion import PromoteSettings, promote
    from clf_core.model.registry import version_uri

    registry = str(loop.work / "registry")
    versions = []
    for artifact in (loop.artifact, v2):
        version = open_artifact(artifact).model_version
        publish(artifact, version_uri(registry, "bench", version))
        versions.append(version)
    evaluation = loop.work / "eval.csv"
    unreviewed.rename(columns={"texts": "full_path", "true_label": "label"})[["full_path", "label"]].to_csv(
        evaluation, index=False)
    common = dict(registry=registry, name="bench", eval_data=str(evaluation), text_column="full_path",
                  cache=str(loop.work / "gate-cache"), shadow_nights=0)
    promote(PromoteSettings(candidate=versions[0], **common))
    status, report = promote(PromoteSettings(candidate=versions[1], **common))
    lines = report.splitlines()
    figures = [l.strip() for l in lines if l.strip().startswith("macro-F1")]
    return f"{lines[-1].split(':')[0]} ({'; '.join(figures)})"


def corrections_seed(settings: BenchSettings, seed: int, work: Path) -> dict:
    import pandas as pd

    from clf_core.model.labels import sample_data_path
    from clf_core.model.predict import Predictor

    loop = review_loop(settings, seed, work)
    v2 = retrain_with_answers(loop)
    table = labeled(loop)                                    # v1's labels, the answers applied
    names = pd.read_csv(sample_data_path("coa_income_expense")).set_index("full_path")["text"].to_dict()
    corrected = answered_texts(loop)                         # text -> the reviewers' answer
    answer = family_answer(corrected, names)
    unreviewed = table[table["label_source"] != "review"].copy()   # no answer for their text
    unreviewed["family_answer"] = [answer(t) for t in unreviewed["texts"]]
    unreviewed["family"] = unreviewed["family_answer"].notna()
    predictor = Predictor.load(v2)
    v2_labels = predictor.predict(unreviewed["texts"].tolist()).labels
    unreviewed["v1_wrong"] = unreviewed["label"] != unreviewed["true_label"]
    unreviewed["v2_wrong"] = pd.Series(v2_labels, index=unreviewed.index) != unreviewed["true_label"]
    fam, other = unreviewed[unreviewed["family"]], unreviewed[~unreviewed["family"]]
    # whether v2 learned the answers themselves (they are in its training split), beside what it
    # does with their families: a model that has not learned them cannot carry them over
    learned = sum(label == corrected[text] for text, label in
                  zip(sorted(corrected), predictor.predict(sorted(corrected)).labels)) if corrected else 0
    return {"seed": seed, "review": loop.figures, "corrected_texts": len(corrected), "family_rows": len(fam),
            "other_rows": len(other), "corrections_learned": learned,
            # how often a family's answer is its siblings' true label: carrying a correction over
            # to its family can fix those rows only, and breaks the others
            "family_rows_with_the_answers_label": int((fam["family_answer"] == fam["true_label"]).sum()),
            "family_errors_v1": int(fam["v1_wrong"].sum()), "family_errors_v2": int(fam["v2_wrong"].sum()),
            "other_errors_v1": int(other["v1_wrong"].sum()), "other_errors_v2": int(other["v2_wrong"].sum()),
            "gate": gate_verdict(loop, v2, unreviewed[["texts", "true_label"]])}


def answered_texts(loop: Loop) -> dict[str, str]:
    """The texts reviewers corrected (answers that differ from the model's label), with the answer."""
    from clf_core.review.corrections import CorrectionsTable, latest_per_key

    rows = latest_per_key(CorrectionsTable(catalog_for(loop.work), loop.corrections).rows()).to_pylist()
    return {r["text"]: r["corrected_label"] for r in rows if r["corrected_label"] != r["label"]}


def bench_corrections(settings: BenchSettings, work: Path) -> dict:
    from clf_core.review.corrections import wilson_interval

    seeds = [int(s) for s in settings.review_seeds.split(",") if s.strip()]
    runs = [corrections_seed(settings, seed, work / f"corrections-seed-{seed}") for seed in seeds]

    def pooled(errors: str, rows: str) -> dict:
        e, n = sum(r[errors] for r in runs), sum(r[rows] for r in runs)
        low, high = wilson_interval(e, n)
        return {"errors": e, "rows": n, "rate": e / n if n else 0.0, "interval": [low, high]}

    family = {"v1": pooled("family_errors_v1", "family_rows"), "v2": pooled("family_errors_v2", "family_rows")}
    other = {"v1": pooled("other_errors_v1", "other_rows"), "v2": pooled("other_errors_v2", "other_rows")}
    family["with_the_answers_label"] = sum(r["family_rows_with_the_answers_label"] for r in runs)
    fall = 1 - family["v2"]["errors"] / family["v1"]["errors"] if family["v1"]["errors"] else 0.0
    rise_per_1000 = 1000 * (other["v2"]["rate"] - other["v1"]["rate"])
    return {"runs": runs, "review": summarize([r.pop("review") for r in runs], settings),
            "family": family, "other": other, "family_error_fall": fall,
            "other_error_rise_per_1000": rise_per_1000,
            "median": {k: statistics.median(r[k] for r in runs) for k in
                       ("family_errors_v1", "family_errors_v2", "other_errors_v1", "other_errors_v2")}}


def report(results: dict) -> list[str]:
    r = results
    lines = [f"-- retraining with the reviewers' answers: {model_of(r['review'])}, charts it never saw; {len(r['runs'])} seed(s)"]
    for run in r["runs"]:
        lines.append(f"   seed {run['seed']}: {run['corrected_texts']} texts corrected, {run['corrections_learned']} of them "
                     f"labeled as answered by v2 | family rows {run['family_rows']}: "
                     f"errors {run['family_errors_v1']} -> {run['family_errors_v2']}, "
                     f"{run['family_rows_with_the_answers_label']} with the answer's label | other rows {run['other_rows']}: "
                     f"errors {run['other_errors_v1']} -> {run['other_errors_v2']} | gate: {run['gate']}")
    for name, part in (("family", r["family"]), ("other", r["other"])):
        v1, v2 = part["v1"], part["v2"]
        lines.append(f"   {name} rows, pooled: error rate {v1['rate']:.3f} [{v1['interval'][0]:.3f}, {v1['interval'][1]:.3f}] "
                     f"-> {v2['rate']:.3f} [{v2['interval'][0]:.3f}, {v2['interval'][1]:.3f}] ({v1['rows']} rows)")
    lines.append(f"   family rows whose true label is their family's answer: {r['family']['with_the_answers_label']} "
                 f"of {r['family']['v1']['rows']} (a correction carried over to its whole family would be "
                 f"wrong on the rest)")
    lines.append(f"   family errors fall by {r['family_error_fall']:.0%} (target >= 50%); other errors change by "
                 f"{r['other_error_rise_per_1000']:+.1f} per 1,000 rows (target <= +1)")
    return lines
