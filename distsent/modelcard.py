"""Model card (README.md) for an export: what it is, what it was trained on, how well it does."""

from __future__ import annotations

from pathlib import Path

from distsent.config import Config

HEADLINE_METRICS = ("accuracy", "f1", "f1_macro", "f1_weighted", "roc_auc", "loss", "num_examples")


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"  # None: no examples of the class here


def _front_matter(cfg: Config) -> str:
    """The Hub's metadata. A `mean`/`cnn` head lives in distsent's own file, which transformers
    does not read: such an export must not offer a transformers widget with a random head."""
    if cfg.model.head == "cls":
        return "library_name: transformers\npipeline_tag: text-classification\ntags: [distsent, text-classification]"
    return f"library_name: distsent\ntags: [distsent, text-classification, {cfg.model.head}-head]"


def write_model_card(
    folder: Path, title: str, cfg: Config, label_names: list[str], metrics: dict, training: dict
) -> None:
    """README.md in `folder` (a staging folder, so the `title` names where it will live).
    `training`: how this export was trained, as run, not as configured (`epochs` done,
    `world_size`, `global_batch_size`, the resolved `mixed_precision`)."""
    rows = "\n".join(f"| {key} | {_fmt(metrics[key])} |" for key in HEADLINE_METRICS if key in metrics)
    per_class = metrics.get("per_class", {})
    class_rows = "\n".join(
        f"| {name} | {_score(s['precision'])} | {_score(s['recall'])} | {_score(s['f1'])} | {s['support']} |"
        for name, s in per_class.items()
    )
    text = f"""---
{_front_matter(cfg)}
---

# {title}

Fine-tuned with distsent from `{cfg.model.name}` (head `{cfg.model.head}`,
single logit: {cfg.model.single_logit}).

- Data: `{cfg.data.dataset}`{f" ({cfg.data.train_file})" if cfg.data.train_file else ""}, max length {cfg.data.max_length} tokens
- Labels: {", ".join(f"`{name}`" for name in label_names)}
- Training: {metrics.get("step", "?")} optimizer steps ({training["epochs"]} epochs), peak lr {cfg.train.lr},
  global batch {training["global_batch_size"]} ({cfg.train.batch_size} per process x {training["world_size"]}
  process(es) x {cfg.train.grad_accum_steps} accumulation), precision {training["mixed_precision"]},
  seed {cfg.train.seed}

## Validation metrics

| metric | value |
|---|---|
{rows}

| class | precision | recall | f1 | support |
|---|---|---|---|---|
{class_rows}

## Use

{_usage(cfg, label_names)}

The full resolved training config is in `distsent_config.yaml`, the metrics in `metrics.json`.
"""
    (folder / "README.md").write_text(text, encoding="utf-8")  # label names in any script, any locale


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _usage(cfg: Config, label_names: list[str]) -> str:
    """How to load this export: transformers for the `cls` head, distsent for its own heads."""
    command = '`distsent predict --model PATH/TO/THIS/FOLDER "what a great film"`'
    if cfg.model.head != "cls":
        return f"""Its `{cfg.model.head}` head is distsent's own (`distsent_head.safetensors`): transformers alone
would load the encoder with a random classifier. Use {command}, or in Python:

```python
from distsent.predict import Predictor
Predictor("PATH/TO/THIS/FOLDER").predict(["what a great film"])
```"""
    single = (
        f" One logit: transformers applies a sigmoid, so the score is the probability of `{label_names[-1]}`."
        if cfg.model.single_logit
        else ""
    )
    return f"""It loads with plain transformers.{single}

```python
from transformers import pipeline
classify = pipeline("text-classification", model="PATH/TO/THIS/FOLDER")
classify("what a great film", truncation=True, max_length={cfg.data.max_length})
```

(truncated at training's `data.max_length`; only distsent repeats training's text cleaning and
`{cfg.data.truncation}` truncation), or {command}."""
