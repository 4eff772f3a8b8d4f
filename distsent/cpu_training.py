"""Costs of CPU training that are not the model's big matrix multiplies, and what removes them.

Profiling MiniLM-L6 fine-tuning with bf16 autocast on a 2-core CPU (bench/RESULTS.md) showed
GEMMs at ~85% of the machine's bf16 peak but only ~half of each step. Three other items:

- Page faults. glibc hands allocations over 32 MiB (the word-embedding gradient is 47 MB)
  back to the kernel on free, so every step faults them in again page by page; smaller
  blocks are often trimmed too. `keep_freed_memory` makes glibc keep freed memory for reuse.
- Dropout masks. CPU `bernoulli_` draws one 32-bit number per element from one
  single-threaded generator. `cpu_dropout` takes four 16-bit draws from each 64-bit word of
  numpy's PCG64DXSM, which fills words ~2.5x faster than torch's CPU generator (mt19937), and
  compares them in numpy, ~6x faster than torch's int16 comparison;
  `use_cpu_dropout` applies it to the model's dropout layers and, through a registered
  attention function, to attention-probability dropout (where torch's CPU SDPA, given a
  dropout, falls back to its math path and `bernoulli_` anyway).
- Attention with dropout. SDPA's math path computes it all in fp32, and small fp32 batched
  products are slow on CPU: at 256 tokens it took ~40% of an IMDB step. The registered
  attention function keeps fp32 only where FlashAttention does (`_AttentionWithDropout`)."""

from __future__ import annotations

import ctypes
import logging
import math
import platform

import numpy as np
import torch
from torch import nn

log = logging.getLogger("distsent")

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """For the rest of the process, serve allocations from the heap and keep what is freed.

    With mmap disabled, glibc retries a failed thread-arena allocation in the main arena, so
    no request fails for it; the cost is that RSS stays at its high-water mark, which a
    training step reaches again every step anyway. Returns False where glibc is absent."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    log.debug("glibc keeps freed memory for reuse: %s", applied)
    return applied


# A 16-bit draw resolves p in steps of 1/65536: dropout 0.1 becomes 0.100006.
_DRAW_LEVELS = 2**16


def dropout_keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A dropout mask: 0 where an element drops (probability p), 1 / (1 - p) where it stays.

    Seeded by one draw from torch's default generator, so seeding and checkpointed RNG state
    make it reproducible exactly as nn.Dropout's masks are."""
    count = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    # random_raw makes all 64 bits of a word uniform, so each int16 lane is.
    draws = np.random.PCG64DXSM(seed).random_raw((count + 3) // 4).view(np.int16)[:count]
    # A draw is uniform over the int16 range; it keeps the element if at or above this.
    keep_from = -(_DRAW_LEVELS // 2) + round(p * _DRAW_LEVELS)
    keep = torch.from_numpy((draws >= keep_from).view(np.uint8)).view(shape)
    # bool to a float type takes a scalar path; uint8, same bytes, is vectorised (~8x).
    return keep.to(device=device, dtype=dtype).mul_(1 / (1 - p))


def cpu_dropout(hidden: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout, 3-4x faster than torch's on CPU, same p, same scaling."""
    return hidden * dropout_keep_mask(hidden.shape, p, hidden.dtype, hidden.device)


class CpuDropout(nn.Module):
    """nn.Dropout drawing its masks with `cpu_dropout`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return hidden
        return cpu_dropout(hidden, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# Registered with transformers under this name; never saved (config.json omits it).
CPU_TRAINING_ATTENTION = "distsent_cpu_training"


class _AttentionWithDropout(torch.autograd.Function):
    """dropout(softmax(query key^T x scaling + mask)) value, with FlashAttention's precision.

    Of the six matrix products (two forward, four backward), the two whose results feed the
    softmax or its gradient, the scores and dP = d(output) value^T, are computed in fp32 from
    upcast inputs: rounding scores to bf16 costs accuracy. The other four take the probabilities
    or dS in the inputs' precision, with fp32 accumulation, and yield tensors that are in that
    precision anyway (output, and the gradients of query, key and value): on CPU a bf16 batched
    product is ~3x faster than an fp32 one at 256 tokens. With fp32 inputs, all six are fp32."""

    @staticmethod
    def forward(ctx, query, key, value, attention_mask, scaling, keep):
        high = keep.dtype  # the caller draws the mask in the computation's precision
        # Scaling the query, not the scores: d_head elements per position instead of seq_len.
        scores = torch.matmul(
            query.to(high, memory_format=torch.contiguous_format) * scaling,
            key.to(high, memory_format=torch.contiguous_format).transpose(2, 3),
        )
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:  # True = attend; made additive, as
                # broadcasting an add over the scores is ~2.5x faster than a masked fill.
                blocked = attention_mask.logical_not()
                attention_mask = scores.new_zeros(blocked.shape).masked_fill_(blocked, torch.finfo(high).min)
            scores += attention_mask.to(high)
        probabilities = torch.softmax(scores, dim=-1)
        # Multiplied and rounded to the inputs' precision in one pass.
        dropped = torch.mul(probabilities, keep, out=torch.empty_like(probabilities, dtype=value.dtype))
        ctx.save_for_backward(query, key, value, probabilities, keep, dropped)
        ctx.scaling = scaling
        return torch.matmul(dropped, value)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, probabilities, keep, dropped = ctx.saved_tensors
        high = probabilities.dtype
        grad_value = torch.matmul(dropped.transpose(2, 3), grad_output)
        # dP x scaling, by scaling the [batch, heads, seq, d_head] value rather than dP: the
        # softmax gradient is linear, so what comes out is dS x scaling, the gradient with
        # respect to the unscaled products, which is rounded once.
        scaled_value = value.to(high) * ctx.scaling
        grad_dropped = torch.matmul(grad_output.to(high), scaled_value.transpose(2, 3))
        grad_scores = torch._softmax_backward_data(grad_dropped.mul_(keep), probabilities, -1, high).to(query.dtype)
        grad_query = torch.matmul(grad_scores, key)
        grad_key = torch.matmul(grad_scores.transpose(2, 3), query)
        return grad_query, grad_key, grad_value, None, None, None


def cpu_training_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA, except with attention dropout (training): then `_AttentionWithDropout`, with the
    mask from `dropout_keep_mask` (SDPA's CPU kernels, given a dropout, fall back to their math
    path and `bernoulli_`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    batch, heads, length = query.shape[:3]
    high = torch.promote_types(query.dtype, torch.float32)
    keep = dropout_keep_mask((batch, heads, length, key.size(2)), dropout, high, query.device)
    # Autocast off: the function picks each product's precision itself.
    with torch.autocast(query.device.type, enabled=False):
        output = _AttentionWithDropout.apply(query, key, value, attention_mask, scaling, keep)
    # [batch, heads, seq, d_head] to the [batch, seq, heads, d_head] callers expect.
    return output.transpose(1, 2).contiguous(), None


def use_cpu_dropout(model: nn.Module) -> int:
    """Draw every dropout mask of `model` with `cpu_dropout`; returns the layers changed.

    nn.Dropout layers are swapped for CpuDropout, and models attending through SDPA get
    `cpu_training_attention`. Neither has weights or is saved: exports are unchanged."""
    from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
    from transformers.masking_utils import sdpa_mask

    changed = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                replacement = CpuDropout(child.p)
                replacement.train(child.training)  # a new module starts in training mode
                setattr(parent, name, replacement)
                changed += 1
    AttentionInterface.register(CPU_TRAINING_ATTENTION, cpu_training_attention)
    AttentionMaskInterface.register(CPU_TRAINING_ATTENTION, sdpa_mask)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation == "sdpa":
            module.config._attn_implementation = CPU_TRAINING_ATTENTION
    return changed
