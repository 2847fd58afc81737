import math

import pytest
import torch

from skresflow.core.train import Trainer


def _trainer(total_steps, **kwargs):
    return Trainer(torch.nn.Linear(2, 1), lr=1.0, total_steps=total_steps, **kwargs)


def _run(trainer, n):
    rates = []
    for _ in range(n):
        rates.append(trainer.learning_rate())
        trainer.n_steps += 1
    return rates


def test_cosine_schedule_reaches_the_final_fraction():
    rates = _run(_trainer(100), 101)
    assert rates[0] == pytest.approx(1.0)
    assert rates[50] == pytest.approx(0.05 + 0.95 * 0.5)
    assert rates[100] == pytest.approx(0.05)


def test_warm_up_is_linear_then_the_cosine_takes_over():
    def cosine(t):
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t / 100))

    rates = _run(_trainer(100, warmup_steps=10), 20)
    expected = [min(1, (t + 1) / 10) * cosine(t) for t in range(20)]
    assert rates == pytest.approx(expected)


def test_open_ended_training_keeps_the_peak_rate():
    assert _run(_trainer(None), 50) == pytest.approx([1.0] * 50)


def test_anneal_decays_from_the_current_rate_to_the_final_one():
    trainer = _trainer(1000)
    _run(trainer, 300)
    before = trainer.learning_rate()
    assert trainer.anneal(100)
    rates = _run(trainer, 150)
    assert rates[0] == pytest.approx(before)  # continuous where it starts
    assert all(a > b for a, b in zip(rates[:100], rates[1:101], strict=True))
    expected = 0.05 + (before - 0.05) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert rates[50] == pytest.approx(expected)
    assert rates[100:] == pytest.approx([0.05] * 50)
    assert not trainer.anneal(10)  # once per schedule


@pytest.mark.parametrize("total_steps, done, steps", [(None, 0, 10), (100, 95, 5)])
def test_anneal_refuses_where_it_would_not_shorten_the_schedule(
    total_steps, done, steps
):
    trainer = _trainer(total_steps)
    trainer.n_steps = done
    rates = [trainer.learning_rate()]
    assert not trainer.anneal(steps)
    assert trainer.learning_rate() == rates[0]


def test_anneal_during_the_warm_up_never_raises_the_rate():
    trainer = _trainer(600, warmup_steps=60)
    _run(trainer, 20)
    before = trainer.learning_rate()
    assert trainer.anneal(100)
    rates = _run(trainer, 120)
    assert rates[0] == pytest.approx(before)
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[-1] == pytest.approx(0.05)
    early = _trainer(600, warmup_steps=60)  # below the final rate: held there
    rate = early.learning_rate()
    assert early.anneal(100) and _run(early, 50) == pytest.approx([rate] * 50)
