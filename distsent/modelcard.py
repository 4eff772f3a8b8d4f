"""Model card (README.md) for an export: what it is, what it was trained on, how well it does."""

from __future__ import annotations

from pathlib import Path

from distsent.config import Config

HEADLINE_METRICS = ("accuracy", "f1", "f1_macro", "f1_weighted", "roc_auc", "loss", "num_examples")


def write_model_card(target: Path, cfg: Config, label_names: list[str], metrics: dict) -> None:
    rows = "\n".join(f"| {key} | {_fmt(metrics[key])} |" for key in HEADLINE_METRICS if key in metrics)
    per_class = metrics.get("per_class", {})
    class_rows = "\n".join(
        f"| {name} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['support']} |"
        for name, s in per_class.items()
    )
    transformers_note = (
        "It loads with plain transformers:"
        if cfg.model.head == "cls" and not cfg.model.single_logit
        else "Its custom head loads through distsent (`distsent predict --model DIR`); plain transformers loads only the encoder."
    )
    text = f"""---
library_name: transformers
pipeline_tag: text-classification
tags: [distsent, text-classification]
---

# {target.parent.name}/{target.name}

Fine-tuned with [distsent](https://github.com/) from `{cfg.model.name}` (head `{cfg.model.head}`,
single logit: {cfg.model.single_logit}).

- Data: `{cfg.data.dataset}`{f" ({cfg.data.train_file})" if cfg.data.train_file else ""}, max length {cfg.data.max_length} tokens
- Labels: {", ".join(f"`{name}`" for name in label_names)}
- Training: {cfg.train.epochs} epochs (max_steps {cfg.train.max_steps}), peak lr {cfg.train.lr},
  batch {cfg.train.batch_size} per process x {cfg.train.grad_accum_steps} accumulation,
  precision {cfg.train.mixed_precision}, seed {cfg.train.seed}
- Step of this export: {metrics.get("step", "?")}

## Validation metrics

| metric | value |
|---|---|
{rows}

| class | precision | recall | f1 | support |
|---|---|---|---|---|
{class_rows}

## Use

{transformers_note}

```python
from transformers import pipeline
classify = pipeline("text-classification", model="PATH/TO/THIS/FOLDER")
classify("what a great film")
```

or `distsent predict --model PATH/TO/THIS/FOLDER "what a great film"`.

The full resolved training config is in `distsent_config.yaml`, the metrics in `metrics.json`.
"""
    (target / "README.md").write_text(text)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
