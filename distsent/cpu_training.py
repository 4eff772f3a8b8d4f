"""Two costs of CPU training that are not matrix multiplies, and what removes them.

Profiling MiniLM-L6 fine-tuning with bf16 autocast on a 2-core CPU (bench/RESULTS.md) showed
GEMMs at ~85% of the machine's bf16 peak but only ~half of each step. Two other items were
over a fifth of the step between them:

- Page faults. glibc hands allocations over 32 MiB (the word-embedding gradient is 47 MB)
  back to the kernel on free, so every step faults them in again page by page; smaller
  blocks are often trimmed too. `keep_freed_memory` makes glibc keep freed memory for reuse.
- Dropout masks. CPU `bernoulli_` draws one 32-bit number per element from one
  single-threaded generator. `cpu_dropout` takes four 16-bit draws from each 64-bit word;
  `use_cpu_dropout` applies it to the model's dropout layers and, through a registered
  attention function, to attention-probability dropout (where torch's CPU SDPA, given a
  dropout, falls back to its math path and `bernoulli_` anyway).
"""

from __future__ import annotations

import ctypes
import logging
import platform

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


def cpu_dropout(hidden: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout, 3-4x faster than torch's on CPU, same p, same scaling.

    Masks come from torch's default generator, so seeding and checkpointed RNG state make
    them reproducible exactly as nn.Dropout's are."""
    count = hidden.numel()
    # random_ over the full int64 range makes all 64 bits uniform, so each int16 lane is.
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=hidden.device).random_(-(2**63), 2**63 - 1)
    # A draw is uniform over the int16 range; it keeps the element if at or above this.
    keep_from = -(_DRAW_LEVELS // 2) + round(p * _DRAW_LEVELS)
    keep = words.view(torch.int16)[:count].view(hidden.shape) >= keep_from
    # Converting bool to a float type takes a scalar path; uint8, same bytes, is vectorised (~8x).
    return hidden * keep.view(torch.uint8).to(hidden.dtype).mul_(1 / (1 - p))


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


def cpu_training_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA, except with attention dropout (training): then the same math SDPA's CPU fallback
    runs, with the mask from `cpu_dropout`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    output_dtype = query.dtype
    # In fp32 like SDPA's CPU math path (bf16 softmax costs accuracy); these matmuls are
    # ~1% of the model's FLOPs at review lengths, so what costs here is copying. Each input
    # is cast and made contiguous in one copy, which matmul then uses without another.
    with torch.autocast(query.device.type, enabled=False):
        query, key, value = (t.to(torch.float32, memory_format=torch.contiguous_format) for t in (query, key, value))
        # Scaling the query, not the scores: d_head elements per position instead of seq_len.
        scores = torch.matmul(query * scaling, key.transpose(2, 3))
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:  # True = attend
                # In place: matmul's backward needs its inputs, not its output.
                scores.masked_fill_(attention_mask.logical_not(), torch.finfo(scores.dtype).min)
            else:  # additive
                scores = scores + attention_mask.float()
        probabilities = cpu_dropout(torch.softmax(scores, dim=-1), dropout)
        output = torch.matmul(probabilities, value)
    # [batch, heads, seq, d_head] to the [batch, seq, heads, d_head] callers expect, cast in the same copy.
    return output.transpose(1, 2).to(output_dtype, memory_format=torch.contiguous_format), None


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
                setattr(parent, name, CpuDropout(child.p))
                changed += 1
    AttentionInterface.register(CPU_TRAINING_ATTENTION, cpu_training_attention)
    AttentionMaskInterface.register(CPU_TRAINING_ATTENTION, sdpa_mask)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation == "sdpa":
            module.config._attn_implementation = CPU_TRAINING_ATTENTION
    return changed
