"""Gradient clipping inside the fused AdamW step: the same clipping as torch's clip_grad_norm_."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from distsent.clipping import (
    clip_and_step,
    clipping_divisor,
    gradient_norm,
    gradients_divided_in_step,
    takes_gradient_divisor,
)
from tests.conftest import TINY, run_cli

# Where the fused AdamW step's kernel exists here: CUDA too on a machine with a GPU (the GPU
# runs go with bench/gpu_suite.sh's; CI has none, and runs the CPU ones).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def model_with_gradients(scale: float = 1.0, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """A small model with gradients, one parameter without (it took no part in the loss).

    The gradients have their parameters' layout, as autograd gives them: torch 2.13's fused
    CPU AdamW misreads a gradient laid out otherwise (a transposed view stepped 0.02 off)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 8), torch.nn.Linear(8, 2))
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * scale
    model[2].bias.grad = None
    # Drawn on the CPU, then moved: the same numbers on every device.
    return model.to(device)


def fused_adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, fused=True)


def torch_clip_then_step(model: torch.nn.Module, max_norm: float) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    optimizer = fused_adamw(model)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    return norm, optimizer


def clip_in_step(model: torch.nn.Module, max_norm: float) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    optimizer = fused_adamw(model)
    norm = gradient_norm(model.parameters())
    with gradients_divided_in_step(optimizer, clipping_divisor(norm, max_norm)):
        optimizer.step()
    assert not hasattr(optimizer, "grad_scale")
    return norm, optimizer


def first_moments(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """AdamW's running mean of each gradient after one step: (1 - beta1) x the clipped
    gradient. The step itself is about lr x sign(gradient), nearly blind to the clipping."""
    return [optimizer.state[p]["exp_avg"] for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("device", DEVICES)
def test_the_norm_is_torchs_and_close_to_a_float64_sum(device):
    model = model_with_gradients(device=device)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    exact = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads))
    assert gradient_norm(model.parameters()).item() == pytest.approx(exact, rel=1e-6)
    assert torch.nn.utils.get_total_norm(grads, 2.0).item() == pytest.approx(exact, rel=1e-5)
    # A gradient that is not one block of float32 sends all to torch's norm: the same norm.
    model[1].weight.grad = model[1].weight.grad.t().contiguous().t()
    assert not model[1].weight.grad.is_contiguous()
    assert gradient_norm(model.parameters()).item() == pytest.approx(exact, rel=1e-5)
    assert gradient_norm([torch.nn.Parameter(torch.ones(3))]).item() == 0.0  # no gradients at all


@pytest.mark.parametrize("device", DEVICES)
def test_weights_within_the_limit_step_bit_for_bit_as_after_torchs_clipping(device):
    reference, ours = model_with_gradients(device=device), model_with_gradients(device=device)
    norm, _ = torch_clip_then_step(reference, max_norm=1e6)
    assert clip_in_step(ours, max_norm=1e6)[0].item() == pytest.approx(norm.item(), rel=1e-6)
    for expected, got in zip(reference.parameters(), ours.parameters(), strict=True):
        assert torch.equal(expected, got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_norm", [1.0, 0.01])
def test_clipped_gradients_step_as_after_torchs_clipping(max_norm, device):
    reference, ours = model_with_gradients(scale=10.0, device=device), model_with_gradients(scale=10.0, device=device)
    _, reference_optimizer = torch_clip_then_step(reference, max_norm)
    _, our_optimizer = clip_in_step(ours, max_norm)
    for expected, got in zip(reference.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    expected_moments = first_moments(reference, reference_optimizer)
    for expected, got in zip(expected_moments, first_moments(ours, our_optimizer), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    clipped_norm = math.sqrt(sum(m.double().pow(2).sum().item() for m in expected_moments)) / (1 - 0.9)
    assert clipped_norm == pytest.approx(max_norm, rel=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_a_non_finite_norm_spoils_the_step_as_torchs_clipping_does(device):
    reference, ours = model_with_gradients(device=device), model_with_gradients(device=device)
    for model in (reference, ours):
        model[0].weight.grad[3, 4] = math.nan
    torch_clip_then_step(reference, max_norm=1.0)
    clip_in_step(ours, max_norm=1.0)
    for expected, got in zip(reference.parameters(), ours.parameters(), strict=True):
        assert torch.equal(expected.isnan(), got.isnan())


def test_the_divisor_is_removed_even_when_the_step_fails_and_never_stacked():
    optimizer = fused_adamw(model_with_gradients())
    with pytest.raises(RuntimeError, match="step failed"):
        with gradients_divided_in_step(optimizer, torch.tensor(2.0)):
            raise RuntimeError("step failed")
    assert not hasattr(optimizer, "grad_scale")
    optimizer.grad_scale = torch.tensor(4.0)  # as GradScaler sets it
    with pytest.raises(RuntimeError, match="already has a grad_scale"):
        with gradients_divided_in_step(optimizer, torch.tensor(2.0)):
            pass


def test_accelerates_prepared_optimizer_clips_in_its_step_or_falls_back():
    accelerator = Accelerator(cpu=True)
    for fused in (True, False):
        reference, ours = model_with_gradients(scale=10.0), model_with_gradients(scale=10.0)
        prepared_model, optimizer = accelerator.prepare(
            ours, torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.01, fused=fused)
        )
        assert takes_gradient_divisor(optimizer.optimizer) is fused
        expected_norm, reference_optimizer = torch_clip_then_step(reference, max_norm=1.0)
        norm = clip_and_step(accelerator, prepared_model, optimizer, max_norm=1.0)
        assert norm.item() == pytest.approx(expected_norm.item(), rel=1e-6)
        assert not hasattr(optimizer.optimizer, "grad_scale")
        for expected, got in zip(
            first_moments(reference, reference_optimizer), first_moments(ours, optimizer.optimizer), strict=True
        ):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


class RecordingAccelerator(SimpleNamespace):
    """What clip_and_step asks of an Accelerator, recording whether torch's clipping ran."""

    def clip_grad_norm_(self, parameters, max_norm):
        self.clipped_by_torch = True
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


@pytest.mark.parametrize(
    ("distributed_type", "scaler", "clips_in_step"),
    [
        (DistributedType.NO, None, True),
        (DistributedType.MULTI_CPU, None, True),
        (DistributedType.MULTI_GPU, None, True),
        (DistributedType.MULTI_GPU, torch.amp.GradScaler("cpu"), False),  # fp16: GradScaler's own grad_scale
        (DistributedType.DEEPSPEED, None, False),  # the engine clips
        (DistributedType.FSDP, None, False),  # shards: each rank's norm is not the whole norm
    ],
)
def test_clipping_moves_into_the_step_only_where_every_rank_holds_whole_gradients(
    distributed_type, scaler, clips_in_step
):
    accelerator = RecordingAccelerator(distributed_type=distributed_type, scaler=scaler, clipped_by_torch=False)
    model = model_with_gradients(scale=10.0)
    optimizer = SimpleNamespace(optimizer=fused_adamw(model))
    optimizer.step = optimizer.optimizer.step
    clip_and_step(accelerator, model, optimizer, max_norm=1.0)
    assert accelerator.clipped_by_torch is not clips_in_step


def trained_weights(tmp_path: Path, max_grad_norm: str) -> dict[str, torch.Tensor]:
    out = tmp_path / f"clip_{max_grad_norm}"
    run_cli("train", *TINY, "train.max_steps=2", f"train.max_grad_norm={max_grad_norm}", f"output_dir={out}")
    return load_file(out / "final" / "model.safetensors")


def test_training_clips_and_leaves_gradients_within_the_limit_alone(tmp_path):
    unclipped = trained_weights(tmp_path, "0")  # 0: no clipping
    within = trained_weights(tmp_path, "1e6")
    clipped = trained_weights(tmp_path, "1e-6")
    assert all(torch.equal(unclipped[name], within[name]) for name in unclipped)
    assert any(not torch.equal(unclipped[name], clipped[name]) for name in unclipped)
