"""Unpadded ("packed") training batches: a batch's texts concatenated, without padding.

Padded to its longest text, a batch makes every linear layer, norm and dropout of the encoder
also run on pad positions: about half of all positions in random batches of movie reviews,
a few percent once length grouping has made batches homogeneous. Packed, the token-wise work
runs on real tokens only (and, on CPU, a little filler; see below). A packed batch follows
transformers' padding-free convention: `input_ids` and `position_ids` are [1, total tokens],
positions restart at each text, and the cumulative text lengths `cu_seq_lens_q`/`cu_seq_lens_k`
(FlashAttention's varlen layout) tell attention where each text starts.

Attention is the one place where texts meet. FlashAttention's varlen kernel takes the packed
layout as it is; transformers passes the cumulative lengths through. Other kernels (SDPA,
eager, distsent's CPU training attention) are wrapped by `packed_attention`, which scatters
queries, keys and values into a [texts, heads, longest, head size] block with a padding mask
and gathers the output back: four index copies per layer for the token-wise work saved.

On CPU a packed row is filled up to a bucketed length (batching.bucketed_length) with filler
tokens after the last text, so that matrix products see few shapes. `cu_seq_lens` ends before
the filler; the wrapped kernels leave it out of every text's keys.

The classifier must read each text out of the packed row: the `cls` head's [CLS]-only last
layer (first_token.py) picks each text's first token, and the `mean` head averages each text's
tokens. Other classifiers (the CNN head; the `cls` head of a model without that last layer)
train on padded batches.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward

from distsent.batching import PackingCollator, PadCollator
from distsent.config import TrainConfig

# FlashAttention kernels read the packed layout natively and are not wrapped.
NATIVELY_PACKED = ("flash_attention_2", "flash_attention_3")
WRAPPER_PREFIX = "distsent_packed_"
# Up to this fraction of padding a batch stays padded for the wrapped kernels. On CPU, packing
# a MiniLM-L6 batch of 27-28-token texts (1.8% padding) made the step 1.0-1.3% slower, so
# packing pays from about 3% (bench/RESULTS.md, "Packed batches"); 2% errs towards packing.
WRAPPED_MIN_PADDING = 0.02


def use_packing(
    model: nn.Module, pad_token_id: int, min_padding: float | None, on_cpu: bool = False
) -> PackingCollator:
    """Let `model` (see `reads_packed_batches`) train on packed batches; returns their collator.

    `min_padding` (train.unpad_min_padding): the padding fraction above which a batch is
    packed; None: every batch with FlashAttention, which reads packed inputs natively and so
    never pays for a mask, else WRAPPED_MIN_PADDING. `on_cpu`: packed rows are filled up to
    bucketed lengths, for the wrapped kernels only: FlashAttention's varlen kernels leave the
    filler's outputs unwritten, and garbage there (NaN, say) would reach the weight gradients."""
    wrapped = model.config._attn_implementation not in NATIVELY_PACKED
    if min_padding is None and wrapped:
        min_padding = WRAPPED_MIN_PADDING
    use_packed_attention(model)
    return PackingCollator(pad_token_id, packed_position_offset(model), min_padding, bucket_lengths=on_cpu and wrapped)


# Encoders (under a distsent head) whose every layer attends through transformers' attention
# interface, which hands the cumulative lengths on to the kernel. Elsewhere (DeBERTa's relative
# attention, say) they could be dropped, and the texts of a packed row would see each other.
PACKED_ENCODERS = ("BertModel", "RobertaModel", "XLMRobertaModel", "CamembertModel", "ElectraModel")


def reads_packed_batches(model: nn.Module, first_token_only: bool) -> bool:
    """Whether `model` can train on packed batches: a classifier with its last layer for [CLS]
    only (`first_token_only`), or a head that pools each text itself (the `mean` head) on an
    encoder of PACKED_ENCODERS."""
    if first_token_only:
        return True
    encoder = getattr(model, "encoder", None)
    return getattr(model, "pools_packed_texts", False) and type(encoder).__name__ in PACKED_ENCODERS


def training_collator(
    model: nn.Module, pad_token_id: int, train_cfg: TrainConfig, first_token_only: bool, on_cpu: bool
) -> PackingCollator | PadCollator:
    """The collator of `model`'s training batches in `distsent train` (and bench/step_profile.py):
    packing where train.unpad is on and the model reads packed batches, else padding."""
    if train_cfg.unpad and reads_packed_batches(model, first_token_only):
        return use_packing(model, pad_token_id, train_cfg.unpad_min_padding, on_cpu)
    return PadCollator(pad_token_id)


def is_packed(batch: dict) -> bool:
    """Whether a collated batch is packed (PackingCollator) rather than padded."""
    return "cu_seq_lens" in batch


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of the model's forward for a padded or a packed batch."""
    if not is_packed(batch):
        # Texts of one length go without a mask. Given one, transformers asks at every forward
        # whether it is all ones (to drop it), and on a GPU that question waits for the GPU to
        # finish the previous step: the host can never queue a step ahead.
        attention_mask = batch["attention_mask"] if batch.get("padded", True) else None
        return {"input_ids": batch["input_ids"], "attention_mask": attention_mask}
    cumulative, longest = batch["cu_seq_lens"], batch["max_length"]
    return {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "cu_seq_lens_q": cumulative,
        "cu_seq_lens_k": cumulative,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def real_tokens(batch: dict) -> torch.Tensor:
    """The batch's tokens of texts: neither padding nor a packed row's filler."""
    return batch["cu_seq_lens"][-1] if is_packed(batch) else batch["attention_mask"].sum()


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The first transformers model inside: the classifier itself, or a distsent head's encoder."""
    return next(module for module in model.modules() if isinstance(module, PreTrainedModel))


def packed_position_offset(model: nn.Module) -> int:
    """Where `model`'s position ids start for a text's first token."""
    encoder = transformers_model(model).base_model
    # RoBERTa-style embeddings number positions from padding_idx + 1; BERT's from 0.
    padding_index = getattr(encoder.embeddings, "padding_idx", None)
    return 0 if padding_index is None else padding_index + 1


def position_limit(model: nn.Module) -> int | None:
    """The most tokens a text may have for `model`'s absolute position embeddings; None where
    positions are relative only (DeBERTa)."""
    config = transformers_model(model).config
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None or getattr(config, "position_biased_input", True) is False:
        return None
    return positions - packed_position_offset(model)


def use_packed_attention(model: nn.Module) -> None:
    """Let every attention layer of `model` take packed batches; padded batches work as before."""
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        kernel = module.config._attn_implementation
        if kernel in NATIVELY_PACKED or kernel.startswith(WRAPPER_PREFIX):
            continue
        wrapper = WRAPPER_PREFIX + kernel
        AttentionInterface.register(wrapper, functools.partial(packed_attention, kernel=kernel))
        # Padded batches (evaluation) still build the mask the wrapped kernel expects.
        AttentionMaskInterface.register(wrapper, ALL_MASK_ATTENTION_FUNCTIONS[kernel])
        module.config._attn_implementation = wrapper


def packed_attention(module, query, key, value, attention_mask, *, kernel: str, **kwargs):
    """Attention by `kernel` for packed inputs ([1, heads, tokens, head size]), through a padded block.

    Inputs without cumulative lengths (padded batches) go to `kernel` unchanged."""
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(kernel, eager_attention_forward)
    cu_queries, cu_keys = kwargs.pop("cu_seq_lens_q", None), kwargs.pop("cu_seq_lens_k", None)
    if cu_queries is None or cu_keys is None:
        return attend(module, query, key, value, attention_mask, **kwargs)
    longest_query, longest_key = kwargs.pop("max_length_q"), kwargs.pop("max_length_k")
    layout = _key_layout(cu_keys, longest_key, key.size(2), query.dtype)
    texts = cu_keys.numel() - 1
    if longest_query == 1:  # one query per text (the [CLS]-only last layer): already a block
        padded_query, query_slots = query.transpose(0, 2), None
    else:
        query_slots = (
            layout.slots if cu_queries is cu_keys else _padded_slots(cu_queries, longest_query, query.size(2))[0]
        )
        padded_query = _to_padded(query, query_slots, texts, longest_query)
    output, _ = attend(
        module,
        padded_query,
        _to_padded(key, layout.slots, texts, longest_key),
        _to_padded(value, layout.slots, texts, longest_key),
        layout.mask,
        **kwargs,
    )
    # [texts, longest, heads, head size] back to [1, tokens, heads, head size]. Filler tokens
    # take the block's last row: any finite output serves, as nothing reads theirs.
    rows = output.reshape(-1, *output.shape[2:])
    if query_slots is None:
        return rows.unsqueeze(0), None
    return rows.index_select(0, query_slots.clamp(max=rows.size(0) - 1)).unsqueeze(0), None


class _KeyLayout(NamedTuple):
    slots: torch.Tensor
    """Each packed token's row in the [texts x longest] padded block."""
    mask: torch.Tensor
    """Additive [texts, 1, 1, longest] mask of the padding: every kernel here (eager's too) adds it."""


# Every layer of one forward pass gets the same cumulative-lengths tensor, so its layout is
# computed once. Holding the tensor keeps its id from being reused by another.
_last_key_layout: tuple[torch.Tensor, int, torch.dtype, _KeyLayout] | None = None


def _key_layout(cumulative: torch.Tensor, longest: int, tokens: int, dtype: torch.dtype) -> _KeyLayout:
    global _last_key_layout
    # Compiled layers (train.compile) build it each time: a global cache would be a guard.
    compiling = torch.compiler.is_compiling()
    cached = _last_key_layout
    if not compiling and cached is not None and cached[0] is cumulative and cached[1:3] == (longest, dtype):
        return cached[3]
    slots, present = _padded_slots(cumulative, longest, tokens)
    mask = torch.zeros(present.shape, dtype=dtype, device=present.device)
    mask.masked_fill_(present.logical_not(), torch.finfo(dtype).min)
    layout = _KeyLayout(slots, mask[:, None, None, :])
    if not compiling:
        _last_key_layout = (cumulative, longest, dtype, layout)
    return layout


def _padded_slots(cumulative: torch.Tensor, longest: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each packed token's row in a [texts x longest] padded block, and where the block holds
    tokens. Filler tokens after the last text get row texts x longest, one past the block."""
    lengths = cumulative.diff()
    present = torch.arange(longest, device=cumulative.device) < lengths[:, None]
    # nonzero_static: the count is known here, so CUDA need not wait to learn it. Filler gets
    # -1, taken to the row past the block by arithmetic: as fill_value, the block's size would
    # be a constant that torch.compile (train.compile) recompiles for at every new length.
    slots = torch.nonzero_static(present.flatten(), size=tokens).squeeze(1)
    return slots.remainder(present.numel() + 1), present


def _to_padded(packed: torch.Tensor, slots: torch.Tensor, texts: int, longest: int) -> torch.Tensor:
    """[1, heads, tokens, head size] to [texts, heads, longest, head size], zeros at padding."""
    heads, head_size = packed.size(1), packed.size(3)
    rows = packed[0].transpose(0, 1)  # [tokens, heads, head size]
    # One row more, where filler tokens land and are dropped.
    padded = rows.new_zeros(texts * longest + 1, heads, head_size).index_copy(0, slots, rows)
    return padded[:-1].view(texts, longest, heads, head_size).transpose(1, 2)
