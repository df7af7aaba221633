"""Fitting the demo's schedule into a wall-clock budget: hand-computed plans."""

import pytest

from asag.engine.budget import (
    BudgetPacer,
    SchedulePlan,
    num_evaluations,
    paced_iterations,
    plan_schedule,
)

# A demo-like preset: 9 epochs of 75 iterations (300 images, batch 4), lr drops at epochs 7 and 8, 100
# warm-up iterations, evaluation every 2 epochs (after epochs 2, 4, 6, 8 and 9: 5 evaluations).
DEMO = SchedulePlan(epochs=9, iters_per_epoch=75, milestones=(7, 8), warmup_iters=100, eval_every=2)


def test_evaluation_count():
    assert num_evaluations(9, 2) == 5 and num_evaluations(9, 9) == 1 and num_evaluations(9, 0) == 0
    assert num_evaluations(4, 1) == 4 and num_evaluations(3, 5) == 1
    assert DEMO.num_evals == 5 and DEMO.total_iters == 675


def test_a_preset_that_fits_is_unchanged():
    # 675 x 0.6 s + 5 x 6 s = 435 s <= 480 s
    assert DEMO.seconds(0.6, 6.0) == pytest.approx(435.0)
    assert plan_schedule(DEMO, budget_seconds=480, iter_seconds=0.6, eval_seconds=6.0) is DEMO
    # never lengthened, however large the budget
    assert plan_schedule(DEMO, budget_seconds=1e6, iter_seconds=0.01, eval_seconds=0.0) is DEMO


def test_shorter_epochs_keep_the_shape():
    # evaluations 5 x 6 = 30 s (<= 25 % of 300 s): kept; (300 - 30) / 0.6 = 450 iterations = 9 x 50;
    # warm-up 100 x 50 / 75 = 66.7 -> 67
    plan = plan_schedule(DEMO, budget_seconds=300, iter_seconds=0.6, eval_seconds=6.0)
    assert plan == SchedulePlan(9, 50, milestones=(7, 8), warmup_iters=67, eval_every=2)
    assert plan.seconds(0.6, 6.0) == pytest.approx(300.0)


def test_costly_evaluations_move_to_the_end():
    # 5 x 20 = 100 s > 25 % of 300 s: evaluate after epoch 9 only (20 s); (300 - 20) / 0.6 = 466.7 -> 466
    # iterations, 466 // 9 = 51 per epoch; warm-up 100 x 51 / 75 = 68
    plan = plan_schedule(DEMO, budget_seconds=300, iter_seconds=0.6, eval_seconds=20.0)
    assert plan == SchedulePlan(9, 51, milestones=(7, 8), warmup_iters=68, eval_every=9)
    assert plan.num_evals == 1 and plan.seconds(0.6, 20.0) <= 300


def test_tiny_budget_trains_fewer_epochs_with_scaled_milestones():
    # evaluations at the end only (4 s); (10 - 4) / 2 = 3 iterations < 9 epochs: 3 epochs of 1 iteration,
    # milestones 7 x 3 / 9 = 2.33 -> 2 and 8 x 3 / 9 = 2.67 -> 3 (= the end: dropped);
    # warm-up 100 x 3 / 675 = 0.44 -> 0
    plan = plan_schedule(DEMO, budget_seconds=10, iter_seconds=2.0, eval_seconds=4.0)
    assert plan == SchedulePlan(epochs=3, iters_per_epoch=1, milestones=(2,), warmup_iters=0, eval_every=3)


def test_budget_below_one_iteration_still_trains_one():
    plan = plan_schedule(DEMO, budget_seconds=2, iter_seconds=2.0, eval_seconds=4.0)
    assert plan == SchedulePlan(epochs=1, iters_per_epoch=1, milestones=(), warmup_iters=0, eval_every=1)
    assert plan.describe() == ("1 epoch x 1 iterations = 1 iterations, lr x gamma at epochs none, warm-up 0 "
                               "iterations, evaluation after the last epoch only")


def test_no_evaluation_stays_off():
    preset = SchedulePlan(epochs=4, iters_per_epoch=10, milestones=(3,), warmup_iters=8, eval_every=0)
    # 40 iterations x 1 s = 40 s > 20 s: 20 iterations = 4 x 5; warm-up 8 x 5 / 10 = 4
    assert plan_schedule(preset, budget_seconds=20, iter_seconds=1.0, eval_seconds=99.0) == SchedulePlan(
        epochs=4, iters_per_epoch=5, milestones=(3,), warmup_iters=4, eval_every=0)


def test_bad_measurements_are_refused():
    with pytest.raises(ValueError):
        plan_schedule(DEMO, budget_seconds=10, iter_seconds=0.0, eval_seconds=1.0)


def test_paced_iterations_fill_the_time_left():
    plan = SchedulePlan(9, 40, milestones=(7, 8), warmup_iters=53, eval_every=2)
    # from epoch 1: epochs 1..8 evaluate after 1, 3, 5, 7, 8 -> 5 x 6 s; (280 - 30) / (8 x 0.5) = 62.5
    assert paced_iterations(plan, epoch=1, seconds_left=280, iter_seconds=0.5, eval_seconds=6.0,
                            max_iters_per_epoch=75) == 62
    # never above the preset's epoch, never below one iteration
    assert paced_iterations(plan, epoch=1, seconds_left=1e4, iter_seconds=0.5, eval_seconds=6.0,
                            max_iters_per_epoch=75) == 75
    assert paced_iterations(plan, epoch=8, seconds_left=-5, iter_seconds=0.5, eval_seconds=6.0,
                            max_iters_per_epoch=75) == 1
    # the last epoch alone: one evaluation; (40 - 6) / 0.5 = 68
    assert paced_iterations(plan, epoch=8, seconds_left=40, iter_seconds=0.5, eval_seconds=6.0,
                            max_iters_per_epoch=75) == 68
    with pytest.raises(ValueError):
        paced_iterations(plan, epoch=9, seconds_left=40, iter_seconds=0.5, eval_seconds=6.0,
                         max_iters_per_epoch=75)


def test_pacer_replans_from_the_previous_epochs_speed():
    plan = SchedulePlan(3, 10, milestones=(2,), warmup_iters=5, eval_every=2)  # evaluates after 1 and 2
    now, lines = [100.0], []
    pacer = BudgetPacer(plan, deadline=160.0, eval_seconds=4.0, max_iters_per_epoch=30, log=lines.append,
                        clock=lambda: now[0])
    assert pacer(0) == 10 and lines == []  # the probe's plan for the first epoch
    now[0] += 10 * 1.0  # epoch 0 ran at 1 s per iteration (the probe guessed slower)
    # 50 s left for epochs 1-2 (two evaluations, 8 s): (50 - 8) / (2 x 1.0) = 21
    assert pacer(1) == 21
    assert lines == ["budget: 1.00 s per iteration in epoch 0; epochs 1-2 train 21 iterations each "
                     "(0.8 min left)"]
    now[0] += 21 * 1.5 + 4.0  # slower, then evaluated: 1.5 s per iteration
    # 160 - 145.5 = 14.5 s left, one evaluation: (14.5 - 4) / 1.5 = 7
    assert pacer(2) == 7
    assert lines[-1] == "budget: 1.50 s per iteration in epoch 1; epoch 2 trains 7 iterations (0.2 min left)"
    now[0] += 7 * 1.5
    assert pacer(2) == 10  # not after the epoch it planned (a restarted count): the plan's length
