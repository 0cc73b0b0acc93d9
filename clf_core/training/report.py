"""The evaluation report published beside a model: metrics.json, two PNG plots and report.md.

Returned as {file name: bytes} so the artifact lists and hashes them like every other file.
"""

from __future__ import annotations

import io
import json

from clf_core.model.metrics import format_metrics


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


# Legends sit outside the axes (below them, "outside lower center" of a constrained layout), so
# they never cover a line, wherever the data of a given run happens to fall.
LEGEND = {"loc": "outside lower center", "frameon": False}


def confusion_matrix_png(metrics: dict, title: str) -> bytes:
    import numpy as np

    plt = _pyplot()
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
    return _png(fig)


def curves_figure(history: list[dict], best_epoch: int | None = None):
    """Losses (left) and validation metrics (right) per epoch, one legend for both panels, and
    the epoch whose weights were kept (`best_epoch`, 0-based as in the history) marked on both."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    epochs = [h["epoch"] + 1 for h in history]
    last = max(epochs, default=1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    # Four colours, not two per panel: the shared legend must tell all four lines apart.
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", color="tab:blue", label="train loss")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", color="tab:orange", label="validation loss")
    left.set_ylabel("loss")
    right.plot(epochs, [h["val_accuracy"] for h in history], marker="o", color="tab:green", label="validation accuracy")
    right.plot(epochs, [h["val_macro_f1"] for h in history], marker="o", color="tab:red", label="validation macro-F1")
    right.set_ylabel("validation metric")
    right.set_ylim(0, 1.02)
    if best_epoch is not None and best_epoch >= 0:
        for ax in (left, right):
            ax.axvline(best_epoch + 1, color="black", linestyle="--", linewidth=1,
                       label=f"kept: epoch {best_epoch + 1} of {len(history)}")
    for ax, title in ((left, "loss"), (right, "validation accuracy and macro-F1")):
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0.5, last + 0.5)
        if last <= 20:   # whole epochs, also for a one-epoch run (a locator would put 0.9, 1.0, 1.1)
            ax.set_xticks(range(1, last + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = left.get_legend_handles_labels()
    more = [(h, l) for h, l in zip(*right.get_legend_handles_labels()) if l not in labels]  # "kept" once
    fig.legend(handles + [h for h, _ in more], labels + [l for _, l in more], ncol=3, **LEGEND)
    fig.suptitle("training curves")
    return fig


def curves_png(history: list[dict], best_epoch: int | None = None) -> bytes:
    return _png(curves_figure(history, best_epoch))


def reliability_figure(calibration: dict):
    """Confidence against accuracy per bin, before and after calibration (the diagonal is perfect)."""
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.lines import Line2D

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5.4), layout="constrained")
    diagonal, = ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    handles, labels = [diagonal], [diagonal.get_label()]
    # A bin of 2 rows says little: marker area follows the bin's rows, and the calibrated bins
    # are annotated with their row counts.
    most = max([b["rows"] for when in ("before", "after") for b in calibration["reliability"][when]] or [1])
    for when, marker, color in (("before", "o", "tab:blue"), ("after", "s", "tab:orange")):
        bins = calibration["reliability"][when]
        x, y = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
        line, = ax.plot(x, y, "-", color=color, alpha=0.35,
                        label=f"{when} calibration (ECE {calibration['ece'][when]:.3f})")
        ax.scatter(x, y, s=[15 + 250 * b["rows"] / most for b in bins], marker=marker, color=color)
        if when == "after":
            for b in bins:
                # Above left of the square: below right, the largest "before" circle hid it.
                ax.annotate(str(b["rows"]), (b["confidence"], b["accuracy"]), textcoords="offset points",
                            xytext=(-6, 6), ha="right", va="bottom", fontsize=7, color=color,
                            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none",
                                  "alpha": 0.8})
        # One entry per series naming its line and its markers together.
        handles.append((line, Line2D([], [], marker=marker, color=color, linestyle="none")))
        labels.append(line.get_label())
    ax.set_xlabel("confidence (mean of the bin)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0.45, 1.02)   # margins: a bin at accuracy 0 or 1 keeps its whole marker
    ax.set_ylim(-0.05, 1.07)
    fig.legend(handles, labels, handler_map={tuple: HandlerTuple(ndivide=None)}, ncol=1, **LEGEND)
    ax.set_title(f"reliability, held-out split (temperature {calibration['temperature']:.2f})\n"
                 f"marker area and numbers: rows in the bin", fontsize=10)
    return fig


def reliability_png(calibration: dict) -> bytes:
    return _png(reliability_figure(calibration))


def risk_coverage_figure(calibration: dict):
    """Error rate among the rows not flagged against the share flagged (least confident first),
    with the share of all errors the flagged rows catch, and the chosen threshold marked."""
    plt = _pyplot()
    rc, review = calibration["risk_coverage"], calibration["review"]
    fig, left = plt.subplots(figsize=(6, 5), layout="constrained")
    unflagged, = left.plot(rc["flagged"], rc["error_unflagged"], color="tab:red",
                           label="error rate among rows not flagged (left axis)")
    left.set_xlabel("share of rows flagged for review (least confident first)")
    left.set_ylabel("error rate among rows not flagged", color="tab:red")
    right = left.twinx()
    caught, = right.plot(rc["flagged"], rc["errors_caught"], color="tab:blue",
                         label="share of errors flagged (right axis)")
    right.set_ylabel("share of errors flagged", color="tab:blue")
    right.set_ylim(0, 1.02)
    threshold = left.axvline(review["flagged"], color="black", linestyle=":",
                             label=f"threshold {review['threshold']:.3f}: {100 * review['flagged']:.1f}% flagged")
    # Both axes' lines in one legend: a legend of one axis leaves the other's line unnamed.
    lines = [unflagged, caught, threshold]
    fig.legend(lines, [line.get_label() for line in lines], ncol=1, **LEGEND)
    left.set_title("risk-coverage, held-out split")
    return fig


def risk_coverage_png(calibration: dict) -> bytes:
    return _png(risk_coverage_figure(calibration))


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
    `calibration` (clf_core.model.calibration.evaluate on the held-out split) reliability.png and
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
             "curves.png": curves_png(history, summary.get("best_epoch"))}
    if calibration:
        lines += calibration_lines(calibration)
        files["reliability.png"] = reliability_png(calibration)
        files["risk_coverage.png"] = risk_coverage_png(calibration)
    return {"metrics.json": json.dumps(metrics, indent=2).encode(), **files, "report.md": "\n".join(lines).encode()}
