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


def build_report(test_metrics: dict, history: list[dict], summary: dict) -> dict[str, bytes]:
    """Files for the artifact: metrics.json, confusion_matrix.png, curves.png, report.md."""
    metrics = {"test": test_metrics, "history": history, **summary}
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
    return {
        "metrics.json": json.dumps(metrics, indent=2).encode(),
        "confusion_matrix.png": confusion_matrix_png(test_metrics, "held-out test split"),
        "curves.png": curves_png(history),
        "report.md": "\n".join(lines).encode(),
    }
