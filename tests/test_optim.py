"""Schedule arithmetic: step counts from fractions, without floating-point off-by-ones."""

import pytest

from distsent.config import TrainConfig
from distsent.optim import total_optimizer_steps, warmup_steps


@pytest.mark.parametrize("epochs, per_epoch, steps", [(0.55, 100, 55), (0.5, 3, 2), (3.0, 7, 21), (0.01, 50, 1)])
def test_fractional_epochs_give_the_steps_they_say(epochs: float, per_epoch: int, steps: int):
    # 0.55 x 100 is 55.00000000000001 in floating point: one step more, and a longer schedule.
    assert total_optimizer_steps(TrainConfig(epochs=epochs), per_epoch) == steps
    assert total_optimizer_steps(TrainConfig(epochs=epochs, max_steps=9), per_epoch) == 9


@pytest.mark.parametrize(
    "ratio, total, steps", [(0.29, 100, 29), (0.07, 100, 7), (0.1, 478, 47), (0.0, 10, 0), (1.0, 10, 10)]
)
def test_warmup_ratio_gives_the_steps_it_says(ratio: float, total: int, steps: int):
    # 0.29 x 100 is 28.999999999999996 in floating point: one warm-up step short.
    assert warmup_steps(TrainConfig(warmup_ratio=ratio), total) == steps
