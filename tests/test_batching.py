"""Sharding arithmetic: each example once per epoch globally, N ranks == 1 rank, exact eval shards."""

import numpy as np
import pytest

from distsent import distributed
from distsent.batching import TrainBatchPlan, eval_shard
from distsent.config import ConfigError
from distsent.distributed import LaunchInfo, resolve_mixed_precision


def plans(world_size: int, accum: int, grouping: bool, n: int = 1000, micro: int = 8):
    lengths = np.random.default_rng(0).integers(5, 120, size=n)
    return [
        TrainBatchPlan(lengths, micro, world_size, rank, accum, seed=3, length_grouping=grouping)
        for rank in range(world_size)
    ]


@pytest.mark.parametrize("grouping", [True, False])
def test_every_example_at_most_once_per_epoch_and_ranks_disjoint(grouping):
    ranks = plans(world_size=4, accum=2, grouping=grouping)
    seen = [i for plan in ranks for batch in plan.micro_batches(epoch=0) for i in batch]
    assert len(seen) == len(set(seen)) == ranks[0].steps_per_epoch * ranks[0].global_batch_size
    assert ranks[0].steps_per_epoch == 1000 // 64
    # The banner says how many examples the dropped incomplete global batch leaves out.
    assert ranks[0].describe() == (
        "64 = 8 per process x 4 processes x 2 accumulation; each epoch leaves out 40 of 1,000 examples"
        " (the incomplete last global batch), a different random set each epoch"
    )
    assert plans(world_size=1, accum=1, grouping=grouping, n=64)[0].describe() == (
        "8 = 8 per process x 1 process x 1 accumulation"
    )


@pytest.mark.parametrize("grouping", [True, False])
def test_n_ranks_see_what_one_rank_with_accumulation_sees(grouping):
    one = plans(world_size=1, accum=4, grouping=grouping)[0]
    four = plans(world_size=4, accum=1, grouping=grouping)
    one_steps = list(one.micro_batches(epoch=1))
    four_steps = [list(plan.micro_batches(epoch=1)) for plan in four]
    for step in range(one.steps_per_epoch):
        single = sorted(i for batch in one_steps[step * 4 : step * 4 + 4] for i in batch)
        multi = sorted(i for rank in four_steps for i in rank[step])
        assert single == multi


def test_epochs_differ_and_resume_skips_exactly():
    plan = plans(world_size=2, accum=1, grouping=True)[1]
    assert list(plan.micro_batches(0)) != list(plan.micro_batches(1))
    assert list(plan.micro_batches(1, start_step=5)) == list(plan.micro_batches(1))[5:]


def test_length_grouping_reduces_padding_and_balances_ranks():
    lengths = plans(world_size=2, accum=1, grouping=True)[0].lengths

    def padded_tokens(grouping):
        return sum(len(b) * max(lengths[b]) for plan in plans(2, 1, grouping) for b in plan.micro_batches(0))

    assert padded_tokens(True) < 0.75 * padded_tokens(False)
    grouped = plans(2, 1, True)
    rank0, rank1 = (list(p.micro_batches(0)) for p in grouped)
    # Ranks get neighbouring slices of a length-sorted global batch: similar work per step.
    ratio = np.mean([max(lengths[a]) / max(lengths[b]) for a, b in zip(rank0, rank1, strict=True)])
    assert 0.8 < ratio < 1.25


def test_left_out_examples_are_a_random_set_with_length_grouping():
    plan = plans(world_size=4, accum=2, grouping=True)[0]  # 1000 examples, 40 left out per epoch
    left_out = []
    for epoch in range(50):
        seen = {i for batch in plan.global_batches(epoch) for i in batch}
        left_out += [i for i in range(len(plan.lengths)) if i not in seen]
    assert len(left_out) == 50 * 40
    # Not the shortest texts each time: their lengths look like everyone's.
    assert np.mean(plan.lengths[left_out]) == pytest.approx(np.mean(plan.lengths), rel=0.1)


def test_too_small_dataset_is_explained():
    with pytest.raises(ValueError, match="smaller than one global batch"):
        TrainBatchPlan([10] * 10, 8, 2, 0, 1, seed=0, length_grouping=True)


@pytest.mark.parametrize("n, world", [(101, 2), (7, 4), (3, 8), (64, 2)])
def test_eval_shards_cover_each_example_once_with_equal_lengths(n, world):
    shards = [eval_shard(n, world, rank) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1
    real = sorted(i for s in shards for i in s if i >= 0)
    assert real == list(range(n))


def test_fp16_on_cpu_is_refused_with_a_message():
    cpu = LaunchInfo(world_size=1, rank=0, local_rank=0, use_deepspeed=False, has_cuda=False)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_mixed_precision("fp16", cpu)
    assert resolve_mixed_precision("no", cpu) == "no"


def test_auto_precision_on_cpu_follows_the_measured_bf16_speed(monkeypatch):
    cpu = LaunchInfo(world_size=1, rank=0, local_rank=0, use_deepspeed=False, has_cuda=False)
    monkeypatch.setattr(distributed, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(distributed, "cpu_bf16_speedup", lambda: 2.2)  # the AMD EPYC VM
    assert resolve_mixed_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(distributed, "cpu_bf16_speedup", lambda: 0.5)  # the Intel Xeon VM
    assert resolve_mixed_precision("auto", cpu) == "no"
    assert resolve_mixed_precision("bf16", cpu) == "bf16"  # an explicit choice stands
    monkeypatch.setattr(distributed, "cpu_supports_bf16", lambda: False)
    assert resolve_mixed_precision("auto", cpu) == "no"


def test_bf16_speedup_is_a_measured_ratio():
    speedup = distributed.cpu_bf16_speedup.__wrapped__(size=256, rounds=2)
    assert 0.01 < speedup < 100
