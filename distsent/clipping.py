"""Gradient clipping by total norm, with the clipping applied inside the optimizer step.

torch's `clip_grad_norm_` takes two passes over every gradient after backward: one for the
norm and one multiplying by the clipping factor. For MiniLM's 105 gradients (22.7M values)
on a 2-core CPU that was 12 ms of a ~125 ms bf16 step (bench/RESULTS.md, twentieth session):

- On CPU the norm is a sum of dot products: 2.1 ms against torch's 5.1 ms, and closer to a
  float64 reference (BLAS keeps many partial sums): 3.6e-6 relative against 2.4e-4.
- The clipping goes to the optimizer's own kernel as its `grad_scale`, the divisor GradScaler
  uses to unscale fp16 gradients, where the optimizer takes one (torch's fused Adam and
  AdamW). The fused step divides each gradient in the pass it makes anyway.

What is clipped is unchanged: the gradients are divided by max(1, (norm + 1e-6) / max_norm),
torch's factor inverted, NaN and inf alike, though a gradient may round differently by an ulp.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# torch.nn.utils.clip_grad_norm_'s guard against dividing by a zero norm.
NORM_EPSILON = 1e-6


def gradient_norm(parameters) -> torch.Tensor:
    """The L2 norm of all the parameters' gradients together: a 0-dim tensor, float32 on the
    CPU path, the gradients' own dtype from torch's (`clipping_divisor` takes either)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    if all(g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous() for g in grads):
        flat = [g.view(-1) for g in grads]
        return torch.stack([torch.dot(g, g) for g in flat]).sum().sqrt()
    # On GPUs torch's foreach norm is one kernel for many tensors.
    return torch.nn.utils.get_total_norm(grads, 2.0)


def clipping_divisor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What to divide every gradient by to clip them to `max_norm` (exactly 1 where they are
    within it), in float32, the only `grad_scale` the fused kernels take."""
    return torch.clamp((norm.float() + NORM_EPSILON) / max_norm, min=1.0)


def takes_gradient_divisor(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step divides the gradients by its `grad_scale` attribute."""
    return getattr(optimizer, "_step_supports_amp_scaling", False)


@contextmanager
def gradients_divided_in_step(optimizer: torch.optim.Optimizer, divisor: torch.Tensor):
    """Within this, `optimizer.step()` divides the gradients by `divisor` (`takes_gradient_divisor`)."""
    if hasattr(optimizer, "grad_scale"):
        raise RuntimeError("the optimizer already has a grad_scale (GradScaler's?): clip with torch's clip_grad_norm_")
    optimizer.grad_scale = divisor
    try:
        yield
    finally:
        # Not left for a later step to divide by again.
        del optimizer.grad_scale


def clip_and_step(accelerator, model: torch.nn.Module, optimizer, max_norm: float):
    """The prepared optimizer's step on gradients clipped to `max_norm` (inf: measure only);
    returns their norm before clipping (DeepSpeed's engine: what it reports)."""
    from accelerate.utils import DistributedType

    inner = optimizer.optimizer
    if (
        # Whole gradients on every rank; DeepSpeed's engine clips itself, FSDP holds shards.
        accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        or accelerator.scaler is not None  # GradScaler sets grad_scale itself, to unscale
        or not takes_gradient_divisor(inner)
    ):
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        return norm
    norm = gradient_norm(model.parameters())
    with gradients_divided_in_step(inner, clipping_divisor(norm, max_norm)):
        optimizer.step()
    return norm
