"""Classification metrics from per-example predictions (scikit-learn does the arithmetic)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

# Metrics where lower is better; everything else is maximised when picking the best model.
LOWER_IS_BETTER = ("loss",)


class NonFiniteOutputs(ValueError):
    """The model scored examples NaN or infinite: no metric describes it, and its argmax would
    put every such example in the first class."""


def is_improvement(metric: str, value: float, best: float | None) -> bool:
    if not np.isfinite(value):
        return False  # a NaN best would never be beaten
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, label_names: list[str], loss: float | None = None
) -> dict:
    """Accuracy, F1 (binary/macro/weighted), per-class scores, confusion matrix, ROC AUC (binary).

    `probs` is (N, num_labels); predictions are its argmax."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    non_finite = int((~np.isfinite(probs)).any(axis=1).sum())
    if non_finite:
        raise NonFiniteOutputs(f"the model scored {non_finite} of {len(probs)} examples NaN or infinite")
    preds = probs.argmax(axis=1)
    ids = list(range(len(label_names)))
    metrics: dict = {"num_examples": int(len(labels))}
    if loss is not None:
        metrics["loss"] = float(loss)
    metrics["accuracy"] = float(accuracy_score(labels, preds))
    # Averaged over the classes that occur (as gold or predicted labels): a class absent from
    # this data, e.g. a rare one in a slice, would count as F1 = 0 for a perfect classifier.
    present = sorted(set(labels.tolist()) | set(preds.tolist()))
    metrics["f1_macro"] = float(f1_score(labels, preds, labels=present, average="macro", zero_division=0))
    metrics["f1_weighted"] = float(f1_score(labels, preds, labels=present, average="weighted", zero_division=0))
    if len(label_names) == 2:
        metrics["f1"] = float(f1_score(labels, preds, pos_label=1, zero_division=0))
        if len(np.unique(labels)) == 2:
            metrics["roc_auc"] = float(roc_auc_score(labels, probs[:, 1]))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    matrix = confusion_matrix(labels, preds, labels=ids)
    # None where a score is undefined: recall and accuracy of a class with no examples here,
    # precision of a class never predicted, F1 where the class is neither.
    metrics["per_class"] = {
        name: {
            # 0/0 for a class never predicted: no precision, not a precision of 0.
            "precision": float(precision[i]) if matrix[:, i].sum() else None,
            "recall": float(recall[i]) if support[i] else None,
            "f1": float(f1[i]) if i in present else None,
            # Per-class accuracy is the share of this class's examples predicted correctly.
            "accuracy": float(matrix[i, i] / support[i]) if support[i] else None,
            "support": int(support[i]),
        }
        for i, name in enumerate(label_names)
    }
    metrics["confusion_matrix"] = matrix.tolist()
    return metrics


def selectable_metrics(labels, label_names: list[str]) -> list[str]:
    """The single-number metrics a validation on `labels` reports: train.best_metric's choices.
    Read off a real metrics dict, so this list cannot drift from `classification_metrics`."""
    uniform = np.full((len(labels), len(label_names)), 1 / len(label_names))
    metrics = classification_metrics(labels, uniform, label_names, loss=0.0)
    return [name for name, value in metrics.items() if isinstance(value, float)]
