"""The last encoder layer computed for the first token only, where nothing else is read.

transformers' sequence classifiers for BERT and its kin (RoBERTa, XLM-R, CamemBERT, ELECTRA)
classify from the last layer's first token ([CLS] or <s>). That token's output depends on
every token's keys and values, but no other position's output of the last layer is read.
So the last layer can project keys and values for all tokens and compute the query, the
attention output projection and the feed-forward block for the first position alone: the
logits are the same, and about 10/12 of that layer's matrix work is skipped, forward and
backward: 13% of MiniLM-L6's training FLOPs, 7% of bert-base's. The layer keeps its
modules and weights, so checkpoints and exports are unchanged.

It also takes packed batches (packing.py): there the first tokens are picked from where each
text starts, and its output has one row per text, as the classifier heads expect.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward

log = logging.getLogger("distsent")

# Classifiers whose head reads the last hidden state at position 0 only (their pooler or
# classification head takes `hidden_states[:, 0]`) and whose layers are BERT's: attention.self
# (query/key/value), attention.output, intermediate, output.
FIRST_TOKEN_CLASSIFIERS = (
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "CamembertForSequenceClassification",
    "ElectraForSequenceClassification",
)


def use_first_token_last_layer(model: nn.Module) -> bool:
    """Make `model`'s last encoder layer compute position 0 only; False where that is not safe.

    The last hidden state then has one position, which the classifier's `[:, 0]` reads as
    before; other heads (mean pooling, CNN) and other architectures are left alone."""
    if type(model).__name__ not in FIRST_TOKEN_CLASSIFIERS:
        return False
    layer = model.base_model.encoder.layer[-1]
    if layer.is_decoder or layer.chunk_size_feed_forward:
        return False
    # An instance attribute, so only this layer changes and its parameters keep their names.
    layer.forward = types.MethodType(_first_token_forward, layer)
    log.debug("last encoder layer computes the first token only (%s)", type(model).__name__)
    return True


def _first_token_forward(layer, hidden_states, attention_mask=None, *args, **kwargs) -> torch.Tensor:
    """BertLayer.forward for each text's first position: [batch, length, hidden] in, or a packed
    [1, tokens, hidden] (packing.py); [batch, 1, hidden] out, one row per text."""
    query_mask = _first_query_rows(attention_mask)
    cumulative = kwargs.get("cu_seq_lens_k")
    if query_mask is False:  # a mask this function cannot cut (e.g. flex attention's BlockMask)
        if cumulative is not None:  # [:, :1] would be the first text's token only
            raise ValueError("packed batches come without an attention mask; got a mask with cu_seq_lens_k")
        return type(layer).forward(layer, hidden_states, attention_mask, *args, **kwargs)[:, :1]
    attention = layer.attention.self
    head_size = attention.attention_head_size
    if cumulative is None:
        batch, positions = hidden_states.shape[:2]
        first = hidden_states[:, :1]
    else:
        # Packed: each text's first token sits where the text starts; one query per text.
        batch, positions = cumulative.numel() - 1, hidden_states.size(1)
        first = hidden_states[:, cumulative[:-1]].view(batch, 1, -1)
        one_each = torch.arange(batch + 1, dtype=cumulative.dtype, device=cumulative.device)
        kwargs = {**kwargs, "cu_seq_lens_q": one_each, "max_length_q": 1}
    query = attention.query(first).view(batch, 1, -1, head_size).transpose(1, 2)
    if cumulative is not None:  # to the packed layout, [1, heads, texts, head size]
        query = query.transpose(0, 2)
    rows = hidden_states.size(0)
    key = attention.key(hidden_states).view(rows, positions, -1, head_size).transpose(1, 2)
    value = attention.value(hidden_states).view(rows, positions, -1, head_size).transpose(1, 2)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    kwargs.pop("encoder_attention_mask", None)
    kwargs.pop("past_key_values", None)
    context, _ = attend(
        attention,
        query,
        key,
        value,
        query_mask,
        dropout=attention.dropout.p if attention.training else 0.0,
        scaling=attention.scaling,
        **kwargs,
    )
    attended = layer.attention.output(context.reshape(batch, 1, -1).contiguous(), first)
    return layer.feed_forward_chunk(attended)


def _first_query_rows(attention_mask):
    """The mask for a single query at position 0, or False if it cannot be cut.

    None (no padding) and 2-D padding masks (FlashAttention's) do not depend on the query
    length; 4-D masks ([batch, 1, queries, keys], boolean or additive) keep their first row."""
    if attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        return attention_mask
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        return attention_mask[:, :, :1]
    return False
