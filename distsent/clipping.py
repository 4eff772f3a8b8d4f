"""Gradient clipping by total norm, with the clipping factor applied inside the optimizer step.

torch's `clip_grad_norm_` takes two passes over every gradient after backward: one for the
norm and one multiplying by the clipping factor. On a 2-core CPU, for MiniLM's 105 gradients
(22.7M values), they took 5.1 and ~4 ms of a ~130 ms bf16 step (bench/RESULTS.md). Here:

- The norm is a sum of dot products on CPU: 2.1 ms, and closer to a float64 reference (BLAS
  keeps many partial sums) than `linalg.vector_norm` was (3.6e-6 against 2.4e-4 relative).
- The factor goes to the optimizer's own kernel as its `grad_scale`, the gradient divisor
  GradScaler uses to unscale fp16 gradients, where the optimizer takes one (torch's fused
  Adam and AdamW). The fused step divides each gradient as it reads it: no pass of its own.

What is clipped is unchanged: the factor is torch's min(1, max_norm / (norm + 1e-6)), NaN and
inf included, though dividing by its reciprocal may round a gradient differently by an ulp.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# torch.nn.utils.clip_grad_norm_'s guard against dividing by a zero norm.
NORM_EPSILON = 1e-6


def gradient_norm(parameters) -> torch.Tensor:
    """The L2 norm of all the parameters' gradients together (0-dim tensor, float32)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    if all(g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous() for g in grads):
        flat = [g.view(-1) for g in grads]
        return torch.stack([torch.dot(g, g) for g in flat]).sum().sqrt()
    # On GPUs torch's foreach norm is one kernel for many tensors.
    return torch.nn.utils.get_total_norm(grads, 2.0)


def clipping_divisor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What to divide every gradient by to clip them to `max_norm` (1 where they are within it)."""
    factor = torch.clamp(max_norm / (norm + NORM_EPSILON), max=1.0)
    return torch.reciprocal(factor)


def takes_gradient_divisor(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step divides the gradients by its `grad_scale` attribute."""
    return getattr(optimizer, "_step_supports_amp_scaling", False)


@contextmanager
def gradients_divided_in_step(optimizer: torch.optim.Optimizer, divisor: torch.Tensor):
    """Within this, `optimizer.step()` divides the gradients by `divisor` (`takes_gradient_divisor`)."""
    optimizer.grad_scale = divisor
    try:
        yield
    finally:
        # Not left for a later step to divide by again.
        del optimizer.grad_scale


def clip_and_step(accelerator, model: torch.nn.Module, optimizer, max_norm: float) -> torch.Tensor:
    """The prepared optimizer's step on gradients clipped to `max_norm` (inf: measure only);
    returns their norm before clipping."""
    from accelerate.utils import DistributedType

    inner = optimizer.optimizer
    if (
        accelerator.distributed_type == DistributedType.DEEPSPEED  # the engine clips
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
