"""CpuDropout behaves as nn.Dropout does (rate, scaling, gradient, eval, seeding); training attention
is the math it claims, in the precision it claims; glibc keeps freed memory."""

import platform

import numpy as np
import pytest
import torch
from torch import nn

from distsent.config import ModelConfig
from distsent.cpu_training import (
    CPU_TRAINING_ATTENTION,
    CpuDropout,
    _AttentionWithDropout,
    cpu_dropout,
    cpu_training_attention,
    dropout_keep_mask,
    keep_freed_memory,
    use_cpu_dropout,
)
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


def test_masks_depend_on_torchs_generator_state_alone():
    # What a resumed run restores is torch's RNG state; numpy's global generator plays no part.
    shape = (4, 12, 16, 16)
    state = torch.get_rng_state()
    np.random.seed(0)
    first = dropout_keep_mask(shape, 0.1, torch.float32, torch.device("cpu"))
    numpy_after = np.random.get_state()[1].copy()
    torch.set_rng_state(state)
    np.random.seed(1)
    again = dropout_keep_mask(shape, 0.1, torch.float32, torch.device("cpu"))
    assert torch.equal(first, again)
    np.random.seed(0)
    assert np.array_equal(np.random.get_state()[1], numpy_after), "drawing a mask moved numpy's global generator"


def test_swap_replaces_every_dropout_and_keeps_the_weights():
    model = build_model(ModelConfig(name="tiny-bert"), ["neg", "pos"], vocab_size=1000)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    expected = sum(type(module) is nn.Dropout for module in model.modules())
    assert expected > 0 and use_cpu_dropout(model) == expected
    assert not any(type(module) is nn.Dropout for module in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_swapped_dropout_keeps_the_mode_it_replaces():
    model = build_model(ModelConfig(name="tiny-bert"), ["neg", "pos"], vocab_size=1000).eval()
    use_cpu_dropout(model)
    assert not any(module.training for module in model.modules() if isinstance(module, CpuDropout))


def tiny_pair():
    """Two copies of one tiny-bert: one left as built (SDPA), one with distsent's CPU dropout."""
    torch.manual_seed(0)
    reference = build_model(ModelConfig(name="tiny-bert"), ["neg", "pos"], vocab_size=1000)
    fast = build_model(ModelConfig(name="tiny-bert"), ["neg", "pos"], vocab_size=1000)
    fast.load_state_dict(reference.state_dict())
    use_cpu_dropout(fast)
    return reference, fast


def test_attention_is_routed_and_eval_matches_sdpa_exactly():
    reference, fast = tiny_pair()
    assert reference.config._attn_implementation == "sdpa"
    assert fast.config._attn_implementation == CPU_TRAINING_ATTENTION
    ids = torch.randint(5, 1000, (4, 12))
    mask = torch.ones_like(ids)
    mask[:2, 7:] = 0
    with torch.no_grad():
        expected = reference.eval()(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(fast.eval()(input_ids=ids, attention_mask=mask).logits, expected)


def test_training_attention_ignores_padding_and_drops_probabilities():
    _, fast = tiny_pair()
    fast.train()
    ids = torch.randint(5, 1000, (4, 12))
    mask = torch.ones_like(ids)
    mask[:, 8:] = 0
    other_padding = ids.clone()
    other_padding[:, 8:] = 3
    runs = []
    for tokens in (ids, other_padding):
        torch.manual_seed(4)  # the same dropout masks for both
        runs.append(fast(input_ids=tokens, attention_mask=mask).logits)
    # What sits under the padding cannot reach the real tokens, dropout or not.
    assert torch.allclose(runs[0], runs[1], atol=1e-6)
    torch.manual_seed(5)
    assert not torch.allclose(fast(input_ids=ids, attention_mask=mask).logits, runs[0])


def padding_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool)  # True = attend
    mask[0, :, :, length // 2 :] = False
    return mask


def reference_attention(query, key, value, mask, scaling, keep):
    """The same attention by plain autograd, in the inputs' dtype."""
    scores = (query @ key.transpose(2, 3) * scaling).masked_fill(~mask, torch.finfo(query.dtype).min)
    return (scores.softmax(-1) * keep) @ value


@pytest.mark.parametrize("queries", [5, 1])  # 1: the first-token-only last layer (distsent.first_token)
@pytest.mark.parametrize("additive", [False, True])
def test_training_attention_gradients_are_exact_in_float64(additive, queries):
    torch.manual_seed(7)
    query = torch.randn(2, 3, queries, 4, dtype=torch.float64, requires_grad=True)
    key, value = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = padding_mask(2, 5)[:, :, :queries]
    if additive:  # transformers' other mask form: 0 to attend, a large negative number not to
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)
    keep = dropout_keep_mask((2, 3, queries, 5), 0.3, torch.float64, torch.device("cpu"))
    assert torch.autograd.gradcheck(
        lambda q, k, v: _AttentionWithDropout.apply(q, k, v, mask, 0.7, keep), (query, key, value)
    )


def test_training_attention_in_bf16_stays_close_to_fp32_where_bf16_scores_would_not():
    torch.manual_seed(7)
    # Large activations make scores large, where rounding them to bf16 visibly moves the softmax.
    leaves = [(4 * torch.randn(2, 3, 16, 8)).bfloat16().requires_grad_() for _ in range(3)]
    mask, grad_output = padding_mask(2, 16), torch.randn(2, 16, 3, 8)
    torch.manual_seed(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = cpu_training_attention(None, *leaves, mask, dropout=0.2, scaling=8**-0.5)
    output.backward(grad_output.bfloat16())
    assert output.dtype == torch.bfloat16 and output.shape == (2, 16, 3, 8)
    torch.manual_seed(8)  # the same draws, so the same dropout mask
    keep = dropout_keep_mask((2, 3, 16, 16), 0.2, torch.float32, torch.device("cpu"))
    upcast = [leaf.detach().float().requires_grad_() for leaf in leaves]
    expected = reference_attention(*upcast, mask, 8**-0.5, keep).transpose(1, 2)
    expected.backward(grad_output)
    bf16_scores = reference_attention(*(leaf.detach() for leaf in leaves), mask, 8**-0.5, keep.bfloat16()).transpose(
        1, 2
    )

    def error(tensor, reference):
        return ((tensor.float() - reference).norm() / reference.norm()).item()

    assert error(output, expected) < 4e-3  # about twice the bf16 rounding of the output itself (2^-9)
    assert error(output, expected) < error(bf16_scores, expected) / 2
    for leaf, reference in zip(leaves, upcast, strict=True):
        assert leaf.grad.dtype == torch.bfloat16 and error(leaf.grad, reference.grad) < 5e-3


def test_functional_dropout_keeps_the_expectation():
    torch.manual_seed(6)
    probabilities = torch.full((200, 64, 64), 1 / 64)
    dropped = cpu_dropout(probabilities, 0.1)
    assert abs(dropped.sum(-1).mean().item() - 1) < 2e-3


def test_glibc_keeps_freed_memory():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.fail("this test needs Linux with glibc, where keep_freed_memory applies")
    assert keep_freed_memory() is True
