"""PNG plots of a run, rebuilt from its files alone (metrics.jsonl, validation predictions)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import auc, roc_curve  # noqa: E402

from distsent.checkpoint import read_history  # noqa: E402
from distsent.files import write_whole  # noqa: E402
from distsent.tracking import METRICS_FILE  # noqa: E402

PREDICTIONS_FILE = "validation_predictions.json"
PLOTS_DIR = "plots"


def save_predictions(output_dir: Path, labels: np.ndarray, probs: np.ndarray, label_names: list[str]) -> None:
    """Keep the final validation predictions so the ROC curve can be redrawn without the model.
    Unrounded: rounding makes ties, and the redrawn curve's AUC would then differ from the logged one."""
    payload = {"label_names": label_names, "labels": labels.tolist(), "probs": np.asarray(probs).tolist()}
    write_whole(output_dir / PREDICTIONS_FILE, json.dumps(payload))


def read_events(output_dir: Path) -> list[dict]:
    """The run's metrics.jsonl events, in order."""
    path = output_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics to plot (is {output_dir} a distsent run folder?)")
    # Read as the resume reads it: a last line cut off by a kill is left out.
    events, _ = read_history(path)
    return [event for _, event in events]


def learning_curves(events: list[dict], target: Path, metric: str) -> Path:
    train = [(e["step"], e["loss"]) for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval" and e.get("split", "validation") == "validation"]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        # With markers: a run logged once would otherwise draw its single point invisibly.
        loss_axis.plot(*zip(*train, strict=True), ".-", label="train loss")
    if evals:
        loss_axis.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="validation loss")
        metric_axis.plot([e["step"] for e in evals], [e.get(metric) for e in evals], "o-", color="tab:green")
    loss_axis.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    loss_axis.legend()
    metric_axis.set(xlabel="optimizer step", ylabel=metric, title=f"Validation {metric}")
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


def confusion_matrix_plot(matrix: list[list[int]], label_names: list[str], target: Path, scored: str) -> Path:
    """`scored` says on what, and by which model (`validation, step 40`)."""
    counts = np.asarray(matrix)
    size = max(4, 0.8 * len(label_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(counts, cmap="Blues")
    ticks = range(len(label_names))
    axis.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title=f"Confusion matrix, {scored}")
    axis.set_xticklabels(label_names, rotation=45, ha="right")
    axis.set_yticklabels(label_names)
    # Dark cells get white counts: black on the darkest blue is unreadable.
    dark = counts.max() / 2 if counts.size else 0
    for row in ticks:
        for column in ticks:
            color = "white" if counts[row, column] > dark else "black"
            axis.text(column, row, int(counts[row, column]), ha="center", va="center", color=color)
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


def roc_plot(labels: list[int], probs: list[list[float]], label_names: list[str], target: Path, scored: str) -> Path:
    positive_scores = np.asarray(probs)[:, 1]
    fpr, tpr, _ = roc_curve(labels, positive_scores)
    area = float(auc(fpr, tpr))  # not np.trapezoid: NumPy 1.x lacks it
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot(fpr, tpr, label=f"AUC {area:.3f}")
    axis.plot([0, 1], [0, 1], "--", color="grey")
    axis.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"ROC ({label_names[1]} vs {label_names[0]}), {scored}",
    )
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


def evaluation_plots(
    folder: Path, matrix: list[list[int]], labels: list[int], probs, label_names: list[str], scored: str
) -> list[Path]:
    """The confusion matrix, and with two classes both present the ROC curve, into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [confusion_matrix_plot(matrix, label_names, folder / "confusion_matrix.png", scored)]
    if len(label_names) == 2 and len(set(labels)) == 2:
        written.append(roc_plot(labels, probs, label_names, folder / "roc.png", scored))
    else:
        # A ROC from an earlier call into this folder would pass for this data's.
        (folder / "roc.png").unlink(missing_ok=True)
    return written


def write_plots(output_dir: Path, metric: str = "accuracy") -> list[Path]:
    """Draw every plot the run's files support into <output_dir>/plots/; returns the files."""
    output_dir = Path(output_dir)
    events = read_events(output_dir)
    folder = output_dir / PLOTS_DIR
    folder.mkdir(exist_ok=True)
    written = [learning_curves(events, folder / "learning_curves.png", metric)]
    predictions_path = output_dir / PREDICTIONS_FILE
    predictions = json.loads(predictions_path.read_text()) if predictions_path.is_file() else None
    evals = [e for e in events if e["event"] == "eval" and e.get("split") == "validation" and "confusion_matrix" in e]
    # Both describe the last validation (the final model's), which may not be the best step's:
    # the titles say which step.
    if evals and predictions:
        written += evaluation_plots(
            folder,
            evals[-1]["confusion_matrix"],
            predictions["labels"],
            predictions["probs"],
            predictions["label_names"],
            f"validation, step {evals[-1]['step']}",
        )
    return written
