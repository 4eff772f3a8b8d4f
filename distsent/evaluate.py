"""Exact evaluation across ranks: every example counted once, whatever the world size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from distsent.batching import PadCollator, eval_shard
from distsent.data import DataError
from distsent.metrics import classification_metrics
from distsent.modeling import classification_loss, probabilities
from distsent.packing import model_inputs
from distsent.preemption import Preempted


@dataclass
class Predictions:
    """Per-example results in dataset order (on every rank)."""

    probs: np.ndarray
    labels: np.ndarray
    losses: np.ndarray


def _length_sorted_batches(indices: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    # Longest first so each batch pads little; padding slots (-1) stay at the end.
    real = sorted((i for i in indices if i >= 0), key=lambda i: -lengths[i])
    ordered = real + [i for i in indices if i < 0]
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def predict_dataset(
    model, dataset, accelerator, batch_size: int, pad_token_id: int, should_stop: Callable[[], bool] | None = None
) -> Predictions:
    """Run every rank over its shard of `dataset`, gather, de-duplicate and check the count.

    All ranks run the same number of forward passes (shards are padded to equal size),
    which ZeRO-3 requires: each forward gathers parameters collectively. `should_stop` is
    asked (collectively) before each batch; when it says stop, Preempted is raised."""
    shard = eval_shard(len(dataset), accelerator.num_processes, accelerator.process_index)
    batches = _length_sorted_batches(shard, dataset["length"], batch_size)
    # Padding slots evaluate example 0 and are dropped after the gather by their -1 index.
    loader = DataLoader(
        dataset,
        batch_sampler=[[max(i, 0) for i in b] for b in batches],
        collate_fn=PadCollator(pad_token_id),
        # Its own generator: a loader otherwise draws from the global RNG, and evaluation
        # must not shift the dropout masks of the training that follows (exact resume).
        generator=torch.Generator(),
    )
    was_training = model.training
    model.eval()
    indices, probs, labels, losses = [], [], [], []
    for batch_indices, batch in zip(batches, loader, strict=True):
        if should_stop is not None and should_stop():
            raise Preempted("stopped during evaluation")
        batch = {key: value.to(accelerator.device) if torch.is_tensor(value) else value for key, value in batch.items()}
        logits = model(**model_inputs(batch)).logits
        indices.append(torch.as_tensor(batch_indices, device=accelerator.device))
        probs.append(probabilities(logits))
        labels.append(batch["labels"])
        losses.append(classification_loss(logits, batch["labels"], reduction="none"))
    model.train(was_training)

    gathered = [accelerator.gather(torch.cat(part)).cpu() for part in (indices, probs, labels, losses)]
    index, prob, label, loss = gathered
    keep = index >= 0
    index, prob, label, loss = index[keep], prob[keep], label[keep], loss[keep]
    order = torch.argsort(index)
    counted = torch.unique(index).numel()
    if counted != len(dataset) or index.numel() != len(dataset):
        raise RuntimeError(
            f"evaluation gathered {index.numel()} predictions ({counted} unique) for {len(dataset)} examples"
        )
    return Predictions(prob[order].numpy(), label[order].numpy(), loss[order].numpy())


def evaluate(
    model,
    dataset,
    accelerator,
    batch_size: int,
    pad_token_id: int,
    label_names: list[str],
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict, Predictions]:
    """Validation metrics (identical on every rank) and the per-example predictions."""
    predictions = predict_dataset(model, dataset, accelerator, batch_size, pad_token_id, should_stop)
    metrics = classification_metrics(
        predictions.labels, predictions.probs, label_names, loss=float(predictions.losses.mean())
    )
    return metrics, predictions


def evaluate_file(
    predictor, data_cfg, misclassified_path: Path, plots_dir: Path | None = None, batch_size: int = 64
) -> dict:
    """Metrics of an export (a `Predictor`) on a labelled file (every row, in order), and its
    misclassified rows. The file is read as the training data was: the same readers, bad-row
    policy and filters (multi-label rows, data.drop_labels), each counted in the notes."""
    from distsent.data import CLI_FLAGS, BadRows, clean_and_filter, label_key, read_file
    from distsent.predict import write_records

    bad = BadRows(data_cfg.bad_rows, CLI_FLAGS)
    rows = read_file(data_cfg.train_file, data_cfg, bad)
    # Scored and reported as written: the predictor cleans texts itself, as predict does.
    written = dict(zip(rows.origins, rows.texts, strict=True))
    notes: list[str] = []
    skipped_reading = sum(bad.skipped.values())
    kept = clean_and_filter(rows, data_cfg, bad, notes, deduplicate=False, dropped_labels=set())
    dropped = len(rows.texts) - len(kept.texts) - (sum(bad.skipped.values()) - skipped_reading)
    index = {name: i for i, name in enumerate(predictor.label_names)}
    texts, labels, origins = [], [], []
    read_by_position = False
    for label, origin in zip(kept.labels, kept.origins, strict=True):
        # Integers index the configured data.labels, as in training; without them, the model's
        # labels in order (a guess training does not make: the report's note says so).
        key = label_key(label, predictor.data.labels or predictor.label_names)
        if key not in index:
            bad.report(origin, f"unknown label: {key!r} is not one the model knows ({predictor.label_names})")
            continue
        read_by_position |= key != str(label).strip()
        texts.append(written[origin])
        labels.append(index[key])
        origins.append(origin)
    if not labels:
        raise DataError(f"{data_cfg.train_file}: no row has a label the model knows ({predictor.label_names})")
    probs = predictor.predict_proba(texts, batch_size).numpy()
    labels_array = np.asarray(labels)
    losses = -np.log(np.clip(probs[np.arange(len(labels)), labels_array], 1e-12, None))
    metrics = classification_metrics(labels_array, probs, predictor.label_names, loss=float(losses.mean()))
    predicted = probs.argmax(axis=1)
    wrong = [
        {
            "line": origin,
            "text": text,
            "gold": predictor.label_names[gold],
            "predicted": predictor.label_names[guess],
            "confidence": round(float(probs[i, guess]), 6),
        }
        for i, (text, gold, guess, origin) in enumerate(zip(texts, labels, predicted, origins, strict=True))
        if gold != guess
    ]
    write_records(wrong, misclassified_path, ["line", "text", "gold", "predicted", "confidence"])
    metrics["skipped_rows"] = sum(bad.skipped.values())
    metrics["dropped_rows"] = dropped
    metrics["notes"] = notes + bad.notes()
    metrics["misclassified_file"] = str(misclassified_path)
    if plots_dir is not None:
        from distsent.plots import evaluation_plots

        scored = f"{Path(data_cfg.train_file).name}, {predictor.model_dir.resolve().name}/"
        drawn = evaluation_plots(plots_dir, metrics["confusion_matrix"], labels, probs, predictor.label_names, scored)
        metrics["plots"] = [str(path) for path in drawn]
    if read_by_position and not predictor.data.labels:
        # The model learnt named labels, so which number means which name is a guess: say it.
        mapping = ", ".join(f"{i}={name}" for i, name in enumerate(predictor.label_names))
        metrics["note"] = f"integer labels were read as positions in the model's labels: {mapping}"
    return metrics
