import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from asag.engine.schedule import (
    SCHEDULE_1X,
    SCHEDULE_3X,
    SCHEDULE_50_EPOCHS,
    WarmupMultiStepLR,
    decay_factor,
    warmup_factor,
)

LR, BACKBONE_LR = 2e-4, 2e-5


@pytest.fixture(autouse=True)
def _quiet():
    # The scheduler is stepped without optimizer steps here; torch warns about that order.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def make(milestones=(8, 11), warmup_iters=500):
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr": BACKBONE_LR}], lr=LR)
    return opt, WarmupMultiStepLR(opt, milestones=milestones, warmup_iters=warmup_iters)


def lrs(opt):
    return [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize(
    "iteration, factor",
    [(0, 1 / 3), (250, 1 / 3 * 0.5 + 0.5), (499, 1 / 3 * (1 / 500) + 499 / 500), (500, 1.0)],
)
def test_warmup_lrs_by_hand(iteration, factor):
    opt, sched = make()
    for _ in range(iteration):
        sched.step_iteration()
    assert lrs(opt) == pytest.approx([LR * factor, BACKBONE_LR * factor], rel=1e-12)


def test_warmup_values_exact_constants():
    assert warmup_factor(0, warmup_iters=500, start_factor=1 / 3) == pytest.approx(1 / 3)
    assert warmup_factor(250, warmup_iters=500, start_factor=1 / 3) == pytest.approx(2 / 3)
    assert warmup_factor(600, warmup_iters=500, start_factor=1 / 3) == 1.0
    assert decay_factor(7, milestones=[8, 11], gamma=0.1) == 1.0
    assert decay_factor(8, milestones=[8, 11], gamma=0.1) == pytest.approx(0.1)
    assert decay_factor(11, milestones=[11, 8], gamma=0.1) == pytest.approx(0.01)


def test_presets():
    assert (SCHEDULE_1X.epochs, SCHEDULE_1X.milestones) == (12, (8, 11))
    assert (SCHEDULE_3X.epochs, SCHEDULE_3X.milestones) == (36, (24, 33))
    assert (SCHEDULE_50_EPOCHS.epochs, SCHEDULE_50_EPOCHS.milestones) == (50, (40, 46))


def test_epoch_boundaries_1x():
    opt, sched = make()
    expected = [LR] * 8 + [LR * 0.1] * 3 + [LR * 0.01]
    seen = []
    for _epoch in range(12):
        seen.append(lrs(opt)[0])  # lr of the epoch's first iteration
        for _ in range(600):  # 600 iterations per epoch; warm-up ends in epoch 0
            sched.step_iteration()
        sched.step_epoch()
    assert seen[0] == pytest.approx(LR / 3)  # epoch 0 starts in warm-up
    assert seen[1:] == pytest.approx(expected[1:], rel=1e-12)
    assert sched.epoch == 12 and sched.warmup_done == 500


def release_lr(counter: int, base: float) -> float:
    """The release's single-counter scheduler (spec 9): warm-up below 500, milestones 508/511."""
    warm = 1 / 3 * (1 - counter / 500) + counter / 500 if counter < 500 else 1.0
    return base * warm * 0.1 ** sum(counter >= m for m in (508, 511))


def test_matches_release_counter_when_epoch0_is_long():
    opt, sched = make()
    counter = 0
    for epoch in range(12):
        for i in range(520):
            assert lrs(opt)[0] == pytest.approx(release_lr(counter, LR), rel=1e-12)
            if epoch == 0 and i < 500:
                counter += 1
            sched.step_iteration()
        sched.step_epoch()
        counter += 1


def test_warmup_longer_than_epoch0_continues_and_milestones_stay_on_time():
    opt, sched = make(milestones=(1,), warmup_iters=500)
    seen = {}
    for epoch in range(4):
        for i in range(200):
            seen[(epoch, i)] = lrs(opt)[0]
            sched.step_iteration()
        sched.step_epoch()
    f = lambda i: 1 / 3 * (1 - i / 500) + i / 500  # noqa: E731
    assert seen[(0, 199)] == pytest.approx(LR * f(199))
    assert seen[(1, 0)] == pytest.approx(LR * 0.1 * f(200))  # decay at epoch 1 on time, warm-up goes on
    assert seen[(2, 99)] == pytest.approx(LR * 0.1 * f(499))
    assert seen[(2, 100)] == pytest.approx(LR * 0.1)
    assert seen[(3, 0)] == pytest.approx(LR * 0.1)


def test_no_warmup():
    opt, sched = make(warmup_iters=0)
    assert lrs(opt) == pytest.approx([LR, BACKBONE_LR])
    sched.step_iteration()
    assert sched.warmup_done == 0


def test_state_dict_round_trip_weights_only():
    opt, sched = make(milestones=(1,))
    for _ in range(300):
        sched.step_iteration()
    sched.step_epoch()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    opt2, sched2 = make(milestones=(1,))
    sched2.load_state_dict(state)
    assert (sched2.warmup_done, sched2.epoch) == (300, 1)
    for _ in range(250):
        sched.step_iteration()
        sched2.step_iteration()
        assert lrs(opt2) == lrs(opt)
    sched.step_epoch()
    sched2.step_epoch()
    assert lrs(opt2) == lrs(opt) == pytest.approx([LR * 0.1, BACKBONE_LR * 0.1])


def test_negative_warmup_rejected():
    with pytest.raises(ValueError):
        make(warmup_iters=-1)


@settings(max_examples=100, deadline=None)
@given(
    warmup_iters=st.integers(1, 2000),
    start=st.floats(0.01, 1.0),
    i=st.integers(0, 3000),
    milestones=st.lists(st.integers(0, 50), max_size=4),
    epoch=st.integers(0, 60),
)
def test_factor_properties(warmup_iters, start, i, milestones, epoch):
    w = warmup_factor(i, warmup_iters=warmup_iters, start_factor=start)
    assert start - 1e-12 <= w <= 1.0 + 1e-12
    assert warmup_factor(i + 1, warmup_iters=warmup_iters, start_factor=start) >= w - 1e-12  # monotone
    d = decay_factor(epoch, milestones=milestones, gamma=0.1)
    assert d == pytest.approx(0.1 ** sum(m <= epoch for m in milestones))
    assert decay_factor(epoch + 1, milestones=milestones, gamma=0.1) <= d
