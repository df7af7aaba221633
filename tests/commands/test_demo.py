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
    assert preset == SchedulePlan(9, 75, (7, 8), 100, 2)
    shorter = SchedulePlan(9, 50, (7, 8), 67, 2)
    overrides = demo.plan_overrides(shorter, full_pass=75)
    assert overrides == ["schedule.epochs=9", "schedule.milestones=[7, 8]", "schedule.warmup_iters=67",
                         "schedule.max_iters_per_epoch=50", "runtime.eval_every=2"]
    cfg = load_config("demo", overrides)
    assert demo.preset_plan(cfg, full_pass=75) == shorter
    assert "schedule.max_iters_per_epoch=null" in demo.plan_overrides(preset, full_pass=75)


def test_fit_to_budget_prints_and_applies_the_plan(monkeypatch, capsys):
    # measured: 0.6 s per iteration, 6 s per evaluation; budget 300 s, the probe itself taking ~0 s:
    # 95 % of 300 s = 285 s; evaluations 5 x 6 = 30 s; (285 - 30) / 0.6 = 425 iterations = 9 x 47 (+2);
    # warm-up 100 x 47 / 75 = 62.7 -> 63; the preset: 675 x 0.6 + 30 = 435 s = 7.25 min
    monkeypatch.setattr(demo, "measure_speed", lambda cfg, max_seconds: (0.6, 6.0, 75))
    cfg, plan = demo.fit_to_budget(load_config("demo"), 300.0)
    assert plan == SchedulePlan(9, 47, (7, 8), 63, 2)
    assert (cfg.schedule.epochs, cfg.schedule.max_iters_per_epoch, cfg.schedule.warmup_iters) == (9, 47, 63)
    assert cfg.schedule.milestones == [7, 8] and cfg.runtime.eval_every == 2
    out = capsys.readouterr().out
    assert "budget: 5.0 min of training; measured 0.60 s per iteration (batch 4), 6.0 s per evaluation" in out
    assert "preset schedule:  9 epochs x 75 iterations = 675 iterations" in out
    assert "chosen schedule:  9 epochs x 47 iterations = 423 iterations, lr x gamma at epochs 7, 8" in out
    assert ("note: the budget trains 63% of the preset's iterations on this machine, so expect a lower AP "
            "than the full schedule's") in out
    assert "--budget-minutes 0 runs it in full (about 7.2 min here)" in out


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
