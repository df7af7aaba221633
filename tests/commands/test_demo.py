"""``asag demo``: the budget turns a measured speed into the preset's schedule, shortened."""

import json

import pytest

import asag.commands.demo as demo
from asag.cli import main
from asag.config import load_config
from asag.engine.budget import SchedulePlan


def test_preset_plan_and_overrides_round_trip():
    cfg = load_config("demo")
    preset = demo.preset_plan(cfg, full_pass=75)  # 300 images / batch 4
    assert preset == SchedulePlan(9, 75, (8,), 100, 3)
    shorter = SchedulePlan(9, 50, (8,), 67, 3)
    overrides = demo.plan_overrides(shorter, full_pass=75)
    assert overrides == ["schedule.epochs=9", "schedule.milestones=[8]", "schedule.warmup_iters=67",
                         "schedule.max_iters_per_epoch=50", "runtime.eval_every=3"]
    cfg = load_config("demo", overrides)
    assert demo.preset_plan(cfg, full_pass=75) == shorter
    assert "schedule.max_iters_per_epoch=null" in demo.plan_overrides(preset, full_pass=75)


def test_fit_to_budget_prints_and_applies_the_plan(monkeypatch, capsys):
    # measured: 0.6 s per iteration, 6 s per evaluation; budget 300 s, the probe itself taking ~0 s:
    # 98 % of 300 s = 294 s; evaluations (after epochs 3, 6, 9) 3 x 6 = 18 s; (294 - 18) / 0.6 = 460
    # iterations = 9 x 51 (+1); warm-up 100 x 51 / 75 = 68; the preset: 675 x 0.6 + 18 = 423 s
    monkeypatch.setattr(demo, "measure_speed", lambda cfg, max_seconds: (0.6, 6.0, 75))
    cfg, pacer = demo.fit_to_budget(load_config("demo"), 300.0)
    assert pacer.plan == SchedulePlan(9, 51, (8,), 68, 3)
    assert pacer.max_iters_per_epoch == 75 and pacer.eval_seconds == 6.0
    assert (cfg.schedule.epochs, cfg.schedule.max_iters_per_epoch, cfg.schedule.warmup_iters) == (9, 51, 68)
    assert cfg.schedule.milestones == [8] and cfg.runtime.eval_every == 3
    out = capsys.readouterr().out
    assert "budget: 5.0 min of training; measured 0.60 s per iteration (batch 4), 6.0 s per evaluation" in out
    assert "preset schedule:  9 epochs x 75 iterations = 675 iterations" in out
    assert "chosen schedule:  9 epochs x 51 iterations = 459 iterations, lr x gamma at epochs 8," in out
    assert ("note: the budget trains 68% of the preset's iterations on this machine, so expect a lower AP "
            "than the full schedule's") in out
    assert "--budget-minutes 0 runs it in full (about 7.0 min here)" in out


@pytest.mark.slow
def test_demo_with_a_tiny_budget_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--preset", "tiny_cpu", "--output-dir", str(out), "--budget-minutes", "0.02",
            "data.synthetic_train_images=8", "data.synthetic_val_images=2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "budget: 0.0 min of training; measured" in text and "chosen schedule:" in text
    assert "training:" in text and "(budget 0.02 min)" in text and "AP50" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    iterations = sum(r["iterations"] for r in records if r["kind"] == "epoch")
    assert iterations < 8 // 2  # fewer than the preset's one epoch of 4 iterations (8 images, batch 2)
    drawings = sorted(p.name for p in (out / "predictions").glob("*_pred.png"))
    assert len(drawings) == 2 and (out / "predictions" / "predictions.json").is_file()
