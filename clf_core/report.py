"""The evaluation report published beside a model: metrics.json, two PNG plots and report.md.

Returned as {file name: bytes} so the artifact lists and hashes them like every other file.
"""

from __future__ import annotations

import io
import json

from clf_core.metrics import format_metrics


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def confusion_matrix_png(metrics: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(metrics["confusion_matrix"])
    labels = metrics["labels"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.0 * len(labels) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(title)
    data = _png(fig)
    plt.close(fig)
    return data


def curves_png(history: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    right.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="val accuracy")
    right.plot(epochs, [h["val_macro_f1"] for h in history], marker="o", label="val macro-F1")
    right.set_xlabel("epoch")
    right.set_ylim(0, 1.02)
    right.legend()
    fig.suptitle("training curves")
    data = _png(fig)
    plt.close(fig)
    return data


def reliability_png(calibration: dict) -> bytes:
    """Confidence against accuracy per bin, before and after calibration (the diagonal is perfect)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    # A bin of 2 rows says little: marker area follows the bin's rows, and the calibrated bins
    # are annotated with their row counts.
    most = max([b["rows"] for when in ("before", "after") for b in calibration["reliability"][when]] or [1])
    for when, marker, color in (("before", "o", "tab:blue"), ("after", "s", "tab:orange")):
        bins = calibration["reliability"][when]
        x, y = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
        ax.plot(x, y, "-", color=color, alpha=0.35)
        ax.scatter(x, y, s=[15 + 250 * b["rows"] / most for b in bins], marker=marker, color=color,
                   label=f"{when} calibration (ECE {calibration['ece'][when]:.3f})")
        if when == "after":
            for b in bins:
                ax.annotate(str(b["rows"]), (b["confidence"], b["accuracy"]), textcoords="offset points",
                            xytext=(6, -10), fontsize=7, color=color)
    ax.set_xlabel("confidence (mean of the bin)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0.45, 1.01)
    ax.set_ylim(0.0, 1.02)
    ax.legend(loc="lower right", markerscale=0.4)
    ax.set_title(f"reliability, held-out split (temperature {calibration['temperature']:.2f})\n"
                 f"marker area and numbers: rows in the bin", fontsize=10)
    data = _png(fig)
    plt.close(fig)
    return data


def risk_coverage_png(calibration: dict) -> bytes:
    """Error rate among the rows not flagged against the share flagged (least confident first),
    with the share of all errors the flagged rows catch, and the chosen threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rc, review = calibration["risk_coverage"], calibration["review"]
    fig, left = plt.subplots(figsize=(6, 4.2))
    left.plot(rc["flagged"], rc["error_unflagged"], color="tab:red", label="error rate among rows not flagged")
    left.set_xlabel("share of rows flagged for review (least confident first)")
    left.set_ylabel("error rate among rows not flagged", color="tab:red")
    right = left.twinx()
    right.plot(rc["flagged"], rc["errors_caught"], color="tab:blue", label="share of errors flagged")
    right.set_ylabel("share of errors flagged", color="tab:blue")
    right.set_ylim(0, 1.02)
    left.axvline(review["flagged"], color="black", linestyle=":",
                 label=f"threshold {review['threshold']:.3f}: {100 * review['flagged']:.1f}% flagged")
    left.legend(loc="upper right")
    left.set_title("risk-coverage, held-out split")
    data = _png(fig)
    plt.close(fig)
    return data


def calibration_lines(c: dict) -> list[str]:
    r = c["review"]
    goal = (f"flag the least confident {100 * r['value']:.0f}% of rows" if r["goal"] == "fraction"
            else f"keep the expected error rate among rows not flagged at most {100 * r['value']:.1f}%")
    return [
        "## Confidence and review",
        "",
        f"Temperature {c['temperature']:.3f}, fitted on the validation split: the logits are divided by it before "
        f"the softmax (the predicted class never changes).",
        "",
        "| held-out | before calibration | after |",
        "|---|---:|---:|",
        f"| expected calibration error (15 bins) | {c['ece']['before']:.4f} | {c['ece']['after']:.4f} |",
        f"| Brier score | {c['brier']['before']:.4f} | {c['brier']['after']:.4f} |",
        "",
        f"Review threshold **{r['threshold']:.3f}** (rows below it get `needs_review`), chosen on validation to "
        f"{goal}: there it flagged {100 * r['expected_flagged']:.1f}% of rows, with an expected error rate of "
        f"{100 * r['expected_error_unflagged']:.2f}% among the others.",
        f"On the held-out split it flags **{100 * r['flagged']:.1f}%** of the {c['rows']} rows and catches "
        f"**{r['errors_caught']} of {r['errors']}** errors; the error rate among the rows it does not flag is "
        f"{100 * r['error_unflagged']:.2f}%.",
        "",
        "![reliability](reliability.png)",
        "![risk-coverage](risk_coverage.png)",
        "",
    ]


def corrections_lines(c: dict | None) -> list[str]:
    """What reviewers' answers contributed to the training data, and the accuracy on the answered
    texts that were held out for the test split."""
    if not c:
        return []
    held = c.get("held_out_accuracy")
    return [f"- reviewers' answers from {c['table']} (snapshot {c['snapshot_id']}): {c['answers']} used, "
            f"{c['overrides']} overriding the file's label, {c['confirmed']} confirming it, {c['added']} new texts; "
            f"{c['skipped_scoped']} skipped (their scoped answers disagree)",
            "- accuracy on the reviewed rows held out for the test split: "
            + (f"**{held:.4f}**" if held is not None else "none fell in the test split")]


def build_report(test_metrics: dict, history: list[dict], summary: dict,
                 calibration: dict | None = None) -> dict[str, bytes]:
    """Files for the artifact: metrics.json, confusion_matrix.png, curves.png, report.md, and with
    `calibration` (clf_core.calibration.evaluate on the held-out split) reliability.png and
    risk_coverage.png."""
    metrics = {"test": test_metrics, "history": history, **summary}
    if calibration:
        metrics["calibration"] = calibration
    lines = [
        "# Evaluation report",
        "",
        f"- data: {summary.get('data')}",
        f"- backbone: {summary.get('backbone')}",
        f"- rows: train {summary.get('rows', {}).get('train')}, validation {summary.get('rows', {}).get('validation')}, "
        f"test {summary.get('rows', {}).get('test')}",
        f"- best epoch: {summary.get('best_epoch', 0) + 1} of {len(history)} run"
        + (" (stopped early)" if summary.get("stopped_early") else ""),
        f"- texts truncated at {summary.get('tokens', {}).get('max_tokens')} tokens: "
        f"{summary.get('tokens', {}).get('truncated')} of {summary.get('tokens', {}).get('rows')}",
        *corrections_lines(summary.get("corrections")),
        "",
        "## Held-out test split",
        "",
        "```",
        format_metrics(test_metrics),
        "```",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "![training curves](curves.png)",
        "",
    ]
    files = {"confusion_matrix.png": confusion_matrix_png(test_metrics, "held-out test split"),
             "curves.png": curves_png(history)}
    if calibration:
        lines += calibration_lines(calibration)
        files["reliability.png"] = reliability_png(calibration)
        files["risk_coverage.png"] = risk_coverage_png(calibration)
    return {"metrics.json": json.dumps(metrics, indent=2).encode(), **files, "report.md": "\n".join(lines).encode()}
