"""Inference with an exported model: texts in, label names and confidences out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer

from distsent.checkpoint import EXPORT_CONFIG_NAME
from distsent.config import ConfigError, DataConfig, config_from_dict, first_line, read_yaml
from distsent.data import TABLE_SUFFIXES, clean_text, encode_texts
from distsent.modeling import label_names_of, load_classifier, probabilities, require_vocabulary


class Predictor:
    """Loads an export once (any head) and classifies batches of texts the way training saw them."""

    def __init__(self, model_dir: str | Path, device: str | None = None) -> None:
        model_dir = self.model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(
                f"--model {model_dir}: not an exported model (no config.json); give a run's best/ or final/"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = load_classifier(model_dir)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # missing or damaged files
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(
                f"--model {model_dir}: cannot load it ({type(error).__name__}: {first_line(error)})"
            ) from error
        require_vocabulary(self.tokenizer, f"--model {model_dir}")
        self.model = model.to(self.device).eval()
        self.label_names = label_names_of(self.model.config)
        if len(self.label_names) < 2:
            # One output and one name: a regression or one-label sigmoid model from elsewhere.
            raise ConfigError(
                f"--model {model_dir}: one output named {self.label_names} does not say which two classes it "
                "separates; predict takes classifiers with an output per class, or distsent's single-logit exports"
            )
        # Clean and truncate as in training (HTML, URLs, case; max_length, head or head+tail)
        # when the export says how; a model from elsewhere gets its texts as they are.
        saved = model_dir / EXPORT_CONFIG_NAME
        self.data = config_from_dict(read_yaml(saved.read_text())).data if saved.is_file() else DataConfig()
        longest = self.data.max_length if saved.is_file() else 512
        self.max_length = min(longest, self.tokenizer.model_max_length)

    @torch.no_grad()
    def predict_proba(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N, num_labels) class probabilities, in input order."""
        out = []
        texts = [clean_text(text, self.data) for text in texts]
        for start in range(0, len(texts), batch_size):
            ids = encode_texts(
                texts[start : start + batch_size],
                self.tokenizer,
                self.max_length,
                self.data.truncation,
                self.data.head_tokens,
            )
            batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out.append(probabilities(logits).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.label_names))

    def predict(self, texts: list[str], batch_size: int = 64, all_scores: bool = False) -> list[dict]:
        """One {"text", "label", "score"} per text: the most probable label and its probability;
        with `all_scores`, also "scores": every label's probability."""
        probs = self.predict_proba(texts, batch_size)
        rows = []
        for text, row in zip(texts, probs.tolist(), strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            result = {"text": text, "label": self.label_names[best], "score": round(row[best], 6)}
            if all_scores:
                result["scores"] = {name: round(p, 6) for name, p in zip(self.label_names, row, strict=True)}
            rows.append(result)
        return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_records(rows: list[dict], path: Path, columns: list[str]) -> None:
    """JSON lines, or a table of `columns` where the name asks for one (`.csv`, `.tsv`)."""
    delimiter = TABLE_SUFFIXES.get(path.suffix.lower())
    if delimiter is None:
        write_jsonl(rows, path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(columns)
        writer.writerows([row[column] for column in columns] for row in rows)


def write_predictions(rows: list[dict], path: Path, score_labels: list[str], with_ids: bool = False) -> None:
    """JSON lines, or a table where the name asks for one (`.csv`, `.tsv`): id (`with_ids`),
    text, label, score, and a `score_<label>` column for each of `score_labels` (--all-scores)."""
    score_columns = {f"score_{name}": name for name in score_labels}
    if path.suffix.lower() in TABLE_SUFFIXES:
        rows = [{**row, **{column: row["scores"][name] for column, name in score_columns.items()}} for row in rows]
    write_records(rows, path, [*(["id"] if with_ids else []), "text", "label", "score", *score_columns])
