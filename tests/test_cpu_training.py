"""CpuDropout behaves as nn.Dropout does (rate, scaling, gradient, eval, seeding); glibc keeps freed memory."""

import platform

import pytest
import torch
from torch import nn

from distsent.config import ModelConfig
from distsent.cpu_training import CpuDropout, keep_freed_memory, use_cpu_dropout
from distsent.modeling import build_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_and_scaling_match_nn_dropout(p, dtype):
    torch.manual_seed(0)
    hidden = torch.ones(64, 128, 384, dtype=dtype)  # 3.1M elements: the rate's std error is < 3e-4
    dropped = CpuDropout(p).train()(hidden)
    kept = dropped != 0
    assert abs(1 - kept.float().mean().item() - p) < 2e-3
    # Kept elements are scaled by 1/(1-p) exactly as nn.Dropout scales them in this dtype.
    expected = torch.nn.functional.dropout(hidden, p, training=True)
    assert torch.equal(dropped[kept].unique(), expected[expected != 0].unique())


def test_lanes_of_a_random_word_drop_independently():
    # Four draws come from one 64-bit word: each lane position must drop at the same rate.
    torch.manual_seed(1)
    dropped = CpuDropout(0.25).train()(torch.ones(4 * 200_000))
    rates = (dropped.view(-1, 4) == 0).float().mean(dim=0)
    assert torch.all((rates - 0.25).abs() < 5e-3), rates


def test_gradient_is_the_mask_and_eval_is_identity():
    torch.manual_seed(2)
    dropout = CpuDropout(0.3)
    hidden = torch.randn(8, 16, 32, requires_grad=True)
    out = dropout.train()(hidden)
    out.sum().backward()
    assert torch.equal(hidden.grad, (out != 0).float() / 0.7)
    assert dropout.eval()(hidden) is hidden


def test_masks_follow_the_global_seed():
    hidden = torch.ones(1000)
    torch.manual_seed(3)
    first = CpuDropout(0.1).train()(hidden)
    torch.manual_seed(3)
    again = CpuDropout(0.1).train()(hidden)
    assert torch.equal(first, again) and not torch.equal(first, CpuDropout(0.1).train()(hidden))


def test_swap_replaces_every_dropout_and_keeps_the_weights():
    model = build_model(ModelConfig(name="tiny-bert"), ["neg", "pos"], vocab_size=1000)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    expected = sum(type(module) is nn.Dropout for module in model.modules())
    assert expected > 0 and use_cpu_dropout(model) == expected
    assert not any(type(module) is nn.Dropout for module in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_glibc_keeps_freed_memory():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.fail("this test needs Linux with glibc, where keep_freed_memory applies")
    assert keep_freed_memory() is True
