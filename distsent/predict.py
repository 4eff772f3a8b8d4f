"""Inference with an exported model: texts in, label names and confidences out."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer

from distsent.checkpoint import EXPORT_CONFIG_NAME
from distsent.config import ConfigError, DataConfig, first_line, saved_section
from distsent.data import TABLE_SUFFIXES, clean_text, encode_texts
from distsent.files import write_whole
from distsent.metrics import NonFiniteOutputs
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
        self.data = saved_section(saved, "data") if saved.is_file() else DataConfig()
        # Training truncated at data.max_length (checked then against the position
        # embeddings), whatever the base tokenizer's model_max_length said.
        self.max_length = self.data.max_length if saved.is_file() else min(512, self.tokenizer.model_max_length)
        if (
            getattr(self.model.config, "problem_type", None) == "multi_label_classification"
            and len(self.model.config.id2label) > 1
        ):
            # distsent's single-logit exports say multi-label too (their one logit trains with
            # BCE); a model with a sigmoid output per label scores labels independently, and a
            # softmax over them would be a confidence in nothing.
            raise ConfigError(
                f"--model {model_dir}: a multi-label classifier (problem_type multi_label_classification, "
                f"{len(self.model.config.id2label)} outputs); predict takes single-label classifiers"
            )

    @torch.no_grad()
    def predict_proba(self, texts: str | list[str], batch_size: int = 64) -> torch.Tensor:
        """(N, num_labels) class probabilities, in input order."""
        out = []
        texts = [clean_text(text, self.data) for text in _as_list(texts)]
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
        probs = torch.cat(out) if out else torch.empty(0, len(self.label_names))
        non_finite = int((~probs.isfinite()).any(dim=1).sum())
        if non_finite:
            raise NonFiniteOutputs(
                f"--model {self.model_dir} scored {non_finite} of {len(probs)} texts NaN or infinite: its weights "
                "are damaged, or its training diverged"
            )
        return probs

    def predict(self, texts: str | list[str], batch_size: int = 64, all_scores: bool = False) -> list[dict]:
        """One {"text", "label", "score"} per text: the most probable label and its probability;
        with `all_scores`, also "scores": every label's probability."""
        texts = _as_list(texts)
        probs = self.predict_proba(texts, batch_size)
        rows = []
        for text, row in zip(texts, probs.tolist(), strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            result = {"text": text, "label": self.label_names[best], "score": round(row[best], 6)}
            if all_scores:
                result["scores"] = {name: round(p, 6) for name, p in zip(self.label_names, row, strict=True)}
            rows.append(result)
        return rows


def _as_list(texts: str | list[str]) -> list[str]:
    # One string is one text, not a list of characters to classify each.
    return [texts] if isinstance(texts, str) else list(texts)


def write_records(rows: list[dict], path: Path, columns: list[str]) -> None:
    """JSON lines, or a table of `columns` where the name asks for one (`.csv`, `.tsv`); UTF-8
    whatever the locale, and written whole or not at all."""
    delimiter = TABLE_SUFFIXES.get(path.suffix.lower())
    if delimiter is None:
        write_whole(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return
    table = io.StringIO(newline="")
    writer = csv.writer(table, delimiter=delimiter)
    writer.writerow(columns)
    writer.writerows([row[column] for column in columns] for row in rows)
    write_whole(path, table.getvalue())


def write_predictions(rows: list[dict], path: Path, score_labels: list[str], with_ids: bool = False) -> None:
    """JSON lines, or a table where the name asks for one (`.csv`, `.tsv`): id (`with_ids`),
    text, label, score, and a `score_<label>` column for each of `score_labels` (--all-scores)."""
    score_columns = {f"score_{name}": name for name in score_labels}
    if path.suffix.lower() in TABLE_SUFFIXES:
        rows = [{**row, **{column: row["scores"][name] for column, name in score_columns.items()}} for row in rows]
    write_records(rows, path, [*(["id"] if with_ids else []), "text", "label", "score", *score_columns])
