"""Classification metrics. The classes are imbalanced (about 4 Expense : 1 Income in the real
charts), so per-class recall and macro-F1 are reported beside accuracy."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true, y_pred, labels: list[str]) -> dict:
    """accuracy, macro_f1, per-class precision/recall/f1/support and the confusion matrix
    (rows = true class, columns = predicted class, in `labels` order)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=0
    )
    return {
        "rows": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(np.mean(f1)) if len(ids) else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "labels": list(labels),
    }


def format_metrics(m: dict) -> str:
    """A small fixed-width table for logs and the human-readable report."""
    lines = [f"rows {m['rows']}  accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}"]
    width = max(len(n) for n in m["labels"])
    lines.append(f"{'class':<{width}}  precision  recall   f1      support")
    for name, c in m["per_class"].items():
        lines.append(f"{name:<{width}}  {c['precision']:.4f}     {c['recall']:.4f}   {c['f1']:.4f}  {c['support']}")
    lines.append("confusion matrix (rows = true, columns = predicted):")
    for name, row in zip(m["labels"], m["confusion_matrix"]):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:>6d}" for v in row))
    return "\n".join(lines)
