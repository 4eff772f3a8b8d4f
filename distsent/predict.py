"""Inference with an exported model: texts in, label names and confidences out."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distsent.modeling import label_names_of, probabilities


class Predictor:
    """Loads an export once and classifies batches of texts."""

    def __init__(self, model_dir: str | Path, device: str | None = None, max_length: int = 512) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not an exported model (no config.json)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(self.device).eval()
        self.label_names = label_names_of(self.model.config)
        self.max_length = min(max_length, self.tokenizer.model_max_length)

    @torch.no_grad()
    def predict_proba(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N, num_labels) class probabilities, in input order."""
        out = []
        for start in range(0, len(texts), batch_size):
            encoded = self.tokenizer(
                texts[start : start + batch_size],
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            out.append(probabilities(self.model(**encoded).logits).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.label_names))

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        """One {"text", "label", "score"} per text: the most probable label and its probability."""
        probs = self.predict_proba(texts, batch_size)
        scores, ids = probs.max(dim=-1)
        return [
            {"text": text, "label": self.label_names[i], "score": round(float(s), 6)}
            for text, i, s in zip(texts, ids.tolist(), scores.tolist(), strict=True)
        ]
