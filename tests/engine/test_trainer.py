import json
import math
import re
import sys
from functools import partial

import pytest
import torch
from engine_fakes import (
    FakeCriterion,
    FakeLabelMap,
    SyntheticDataset,
    TinyDetector,
    coco_gt_dict,
    collate,
    make_coco,
)
from torch.utils.data import DataLoader

from asag.engine.checkpoint import load_checkpoint, seed_everything
from asag.engine.distributed import build_eval_sampler, build_train_loader
from asag.engine.ema import ModelEma
from asag.engine.evaluator import evaluate
from asag.engine.logger import RunLogger
from asag.engine.optim import build_optimizer
from asag.engine.schedule import WarmupMultiStepLR
from asag.engine.trainer import (
    EpochMetrics,
    NonFiniteLossError,
    _progress_line,
    check_amp,
    epoch_summary,
    fit,
    make_grad_scaler,
    to_float32,
    train_one_epoch,
)
from asag.errors import AsagError, ConfigError, DataError
from asag.training.matcher import NonFiniteCostError

GT = coco_gt_dict(10)


def train_loader(seed: int = 3, batch_size: int = 2, num_workers: int = 0) -> DataLoader:
    return build_train_loader(SyntheticDataset(GT, augment=True), batch_size=batch_size, seed=seed,
                              num_workers=num_workers, collate_fn=collate)


def val_loader() -> DataLoader:
    dataset = SyntheticDataset(GT)
    return DataLoader(dataset, batch_size=4, sampler=build_eval_sampler(dataset), collate_fn=collate)


def setup(seed=0, lr=1e-2, warmup_iters=7, milestones=(2,)):
    torch.manual_seed(seed)
    model = TinyDetector()
    opt = build_optimizer(model, lr=lr, backbone_lr=lr / 10)
    sched = WarmupMultiStepLR(opt, milestones=milestones, warmup_iters=warmup_iters)
    return model, opt, sched


def test_one_epoch_metrics_and_epoch_passed():
    model, opt, sched = setup()
    criterion = FakeCriterion()
    loader = train_loader()
    metrics = train_one_epoch(model, criterion, loader, opt, sched, epoch=3, device="cpu", max_iters=4)
    assert metrics.iterations == 4 and metrics.images == 8 and metrics.epoch == 3
    assert model.seen_epochs == [3, 3, 3, 3]
    assert sched.warmup_done == 4  # one warm-up step per iteration
    assert metrics.lr == pytest.approx(1e-2 * (1 / 3 * (1 - 4 / 7) + 4 / 7))
    assert set(metrics.terms) == {"l1", "cls"} and metrics.stats == {"num_targets": 6.0}
    assert metrics.loss == pytest.approx(5 * metrics.terms["l1"] + 2 * metrics.terms["cls"], rel=1e-5)
    assert math.isfinite(metrics.grad_norm) and metrics.grad_norm > 0
    assert criterion.seen_dtypes == [torch.float32] * 4


def test_gradient_clipping_limits_the_update():
    torch.manual_seed(0)
    model = TinyDetector(dropout=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = WarmupMultiStepLR(opt, milestones=[], warmup_iters=0)
    metrics = train_one_epoch(model, FakeCriterion(), train_loader(), opt, sched, epoch=0, device="cpu",
                              max_iters=1, clip_max_norm=0.1)
    assert metrics.grad_norm > 0.1  # the unclipped norm is reported
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert step.norm().item() == pytest.approx(0.1, rel=1e-4)  # SGD lr 1: update = clipped gradient


def test_bf16_autocast_on_cpu_feeds_fp32_to_criterion():
    model, opt, sched = setup()
    criterion = FakeCriterion()
    metrics = train_one_epoch(model, criterion, train_loader(), opt, sched, epoch=0, device="cpu", amp="bf16",
                              max_iters=2)
    assert criterion.seen_dtypes == [torch.float32, torch.float32]
    assert math.isfinite(metrics.loss)


def test_amp_validation():
    check_amp(None, torch.device("cpu"))
    check_amp("bf16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="CUDA"):
        check_amp("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="amp must be"):
        check_amp("fp8", torch.device("cpu"))
    assert make_grad_scaler(None, "cpu") is None and make_grad_scaler("bf16", "cpu") is None


def test_durations_and_the_eta_in_the_epoch_summary():
    metrics = EpochMetrics(epoch=2, iterations=500, images=1000, loss=1.23456, terms={}, stats={},
                           grad_norm=1.0, lr=1e-4, seconds=482.4)
    assert epoch_summary(metrics, None, 12, eta_seconds=4000.0) == (
        "epoch 2 of 12 done: loss 1.2346, 500 iterations in 8m02s; run ETA 1h06m")
    last = epoch_summary(metrics, None, 3, eta_seconds=0.0)
    assert last == "epoch 2 of 3 done: loss 1.2346, 500 iterations in 8m02s"
    # 41 iterations (82 images) in 10 s; 459 left: 10 / 41 * 459 = 112 s
    assert _progress_line(2, 40, 500, 2.5, 2e-4, 82, 10.0) == (
        "epoch 2 iter 41/500: loss 2.5000, lr 0.0002, 8.20 images/s, epoch ETA 1m51s")


def test_to_float32_keeps_integer_tensors():
    out = to_float32({"a": [torch.ones(2, dtype=torch.bfloat16)], "b": (torch.ones(1, dtype=torch.int64),)})
    assert out["a"][0].dtype == torch.float32 and out["b"][0].dtype == torch.int64


class NanCriterion(FakeCriterion):
    def forward(self, output, targets, image_sizes):
        loss = super().forward(output, targets, image_sizes)
        loss.total = loss.total * float("nan")
        return loss


def test_non_finite_loss_stops():
    model, opt, sched = setup()
    with pytest.raises(NonFiniteLossError, match="nan"):
        train_one_epoch(model, NanCriterion(), train_loader(), opt, sched, epoch=0, device="cpu", max_iters=1)


class DivergedCriterion(FakeCriterion):
    """Meets NaN predictions before summing the loss, like the matcher of a diverged run."""

    def forward(self, output, targets, image_sizes):
        raise NonFiniteCostError("matching cost of stage 'main' has 4 non-finite entries (NaN or inf)")


def test_non_finite_predictions_stop_with_the_loss_message():
    model, opt, sched = setup()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"^loss is not finite: matching cost of stage 'main' has 4 "
                                                 r"non-finite entries \(NaN or inf\); stopping$"):
        train_one_epoch(model, DivergedCriterion(), train_loader(), opt, sched, epoch=0, device="cpu",
                        max_iters=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no update
    assert issubclass(NonFiniteLossError, AsagError)  # the CLI prints one line and exits 2


def run_fit(output_dir, *, epochs, seed=0, resume=None, log=False, num_workers=0, ema_decay=0.0):
    model, opt, sched = setup(seed=seed)
    ema = ModelEma(model, ema_decay) if ema_decay else None
    evaluate_fn = partial(evaluate, loader=val_loader(), coco_gt=make_coco(GT), label_map=FakeLabelMap(),
                          device="cpu")
    logger = RunLogger(output_dir, tensorboard=False, enabled=True) if log else None
    result = fit(
        model, FakeCriterion(), train_loader(num_workers=num_workers), opt, sched,
        epochs=epochs, device="cpu", output_dir=output_dir, config={"schedule": {"epochs": epochs}},
        label_map={"category_ids": [1, 3, 7]}, evaluate_fn=evaluate_fn, checkpoint_every=2, resume=resume,
        logger=logger, log_every=2, ema=ema,
    )
    if logger is not None:
        logger.close()
    if ema is not None:
        result.ema = ema
    return model, opt, sched, result


@pytest.mark.parametrize("num_workers, ema_decay", [(0, 0.0), (2, 0.0), (0, 0.9)])
def test_resume_equals_uninterrupted_run(tmp_path, num_workers, ema_decay):
    """Bit for bit, also with DataLoader workers (their augmentations drew from worker RNGs seeded when
    the first epoch started, which a resumed run could not reproduce) and with an EMA of the weights
    (its weights and update count are restored)."""
    kw = dict(num_workers=num_workers, ema_decay=ema_decay)
    seed_everything(0)
    full_model, full_opt, full_sched, full = run_fit(tmp_path / "full", epochs=4, **kw)

    seed_everything(0)
    run_fit(tmp_path / "split", epochs=2, **kw)  # "interrupted" after epoch 1
    seed_everything(1234)  # a new process would start from another RNG state
    model, opt, sched, resumed = run_fit(tmp_path / "split", epochs=4, seed=99,
                                         resume=tmp_path / "split" / "last.pth", **kw)
    if ema_decay:
        assert resumed.ema.updates == full.ema.updates == 20
        for (name, a), b in zip(full.ema.state_dict().items(), resumed.ema.state_dict().values()):
            assert torch.equal(a, b), name
        assert not torch.equal(resumed.ema.state_dict()["head.weight"], model.state_dict()["head.weight"])

    assert resumed.start_epoch == 2 and [m.epoch for m in resumed.epochs] == [2, 3]
    for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert opt.param_groups[0]["lr"] == full_opt.param_groups[0]["lr"]
    assert (sched.epoch, sched.warmup_done) == (full_sched.epoch, full_sched.warmup_done) == (4, 7)
    assert resumed.iteration == full.iteration == 20
    assert resumed.best_ap == full.best_ap and resumed.best_epoch == full.best_epoch
    assert [m.loss for m in resumed.epochs] == [m.loss for m in full.epochs[2:]]


def test_training_does_not_depend_on_the_number_of_workers(tmp_path):
    """Each sample's augmentation is seeded by (seed, epoch, position): 0 and 2 workers train alike."""
    models = []
    for num_workers in (0, 2):
        seed_everything(0)
        models.append(run_fit(tmp_path / str(num_workers), epochs=2, num_workers=num_workers)[0])
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name


def test_fit_writes_checkpoints_and_metrics(tmp_path):
    seed_everything(0)
    _, _, _, result = run_fit(tmp_path, epochs=2, log=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pth", "checkpoint_0001.pth", "last.pth", "metrics.jsonl"]
    last = load_checkpoint(tmp_path / "last.pth")
    assert last["epoch"] == 1 and last["iteration"] == 10
    assert last["config"] == {"schedule": {"epochs": 2}} and last["label_map"] == {"category_ids": [1, 3, 7]}
    assert last["extra"]["best_ap"] == result.best_ap and "eval" in last["extra"]
    assert last["extra"]["memory_format"] == "contiguous"  # the layout trained in, for a resume
    assert load_checkpoint(tmp_path / "best.pth")["epoch"] == result.best_epoch
    assert set(result.evaluations) == {0, 1}

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("train") == 6 and kinds.count("epoch") == 2 and kinds.count("eval") == 2
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [0, 2, 4, 5, 7, 9]
    assert {"lr", "loss", "terms/l1", "terms/cls", "stats/num_targets", "grad_norm"} <= set(train[0])
    assert records[-1]["kind"] == "eval" and "ap" in records[-1]


def test_eval_every_zero_disables_evaluation(tmp_path):
    model, opt, sched = setup()
    calls = []
    result = fit(model, FakeCriterion(), train_loader(), opt, sched, epochs=1, device="cpu",
                 output_dir=tmp_path, config={}, label_map={}, evaluate_fn=calls.append, eval_every=0,
                 max_iters=1)
    assert calls == [] and result.best_epoch == -1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


@pytest.mark.parametrize("loader, max_iters",
                         [(partial(train_loader, batch_size=11), None), (train_loader, 0)],
                         ids=["batch_larger_than_data", "max_iters_0"])
def test_epoch_without_iterations_fails_before_saving(tmp_path, loader, max_iters):
    model, opt, sched = setup()
    calls = []
    with pytest.raises(ConfigError, match="epoch 0 ran no training iteration"):
        fit(model, FakeCriterion(), loader(), opt, sched, epochs=1, device="cpu", output_dir=tmp_path,
            config={}, label_map={}, evaluate_fn=calls.append, max_iters=max_iters)
    assert calls == [] and list(tmp_path.iterdir()) == []  # no evaluation, no untrained best.pth


def test_epoch_iters_sets_each_epochs_length(tmp_path):
    model, opt, sched = setup()
    asked = []

    def epoch_iters(epoch):
        asked.append(epoch)
        return [3, 1, 2][epoch]

    result = fit(model, FakeCriterion(), train_loader(), opt, sched, epochs=3, device="cpu",
                 output_dir=tmp_path, config={}, label_map={}, eval_every=0, max_iters=5,
                 epoch_iters=epoch_iters)
    assert asked == [0, 1, 2]
    assert [m.iterations for m in result.epochs] == [3, 1, 2] and result.iteration == 6


def test_epoch_checkpoint_is_saved_before_evaluation(tmp_path):
    model, opt, sched = setup()

    def failing_evaluation(model):
        assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 0  # already on disk
        raise DataError("val/1.jpg: cannot read image")

    with pytest.raises(DataError, match="1.jpg"):
        fit(model, FakeCriterion(), train_loader(), opt, sched, epochs=1, device="cpu", output_dir=tmp_path,
            config={}, label_map={}, evaluate_fn=failing_evaluation, max_iters=2)
    last = load_checkpoint(tmp_path / "last.pth")
    assert last["epoch"] == 0 and last["iteration"] == 2 and "eval" not in last["extra"]
    assert not (tmp_path / "best.pth").exists()


def test_plain_progress_lines_and_epoch_summaries(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # output piped to a file or a CI log
    seed_everything(0)
    run_fit(tmp_path, epochs=2, log=True)  # 5 iterations per epoch, log_every=2
    lines = capsys.readouterr().err.splitlines()
    progress = [line for line in lines if " iter " in line]
    assert [line.split(":")[0] for line in progress] == [
        "epoch 0 iter 1/5", "epoch 0 iter 3/5", "epoch 0 iter 5/5",
        "epoch 1 iter 1/5", "epoch 1 iter 3/5", "epoch 1 iter 5/5"]
    assert all(re.search(r"loss \d+\.\d{4}, lr [\d.e-]+, [\d.]+ images/s, epoch ETA [\d.]+s$", line)
               for line in progress), progress
    summaries = [line for line in lines if " done: " in line]
    assert len(summaries) == 2
    assert re.fullmatch(r"epoch 0 of 2 done: loss \d+\.\d{4}, AP -?\d\.\d{4}, 5 iterations in [\d.]+s; "
                        r"run ETA [\d.]+s", summaries[0])
    assert re.fullmatch(r"epoch 1 of 2 done: loss \d+\.\d{4}, AP -?\d\.\d{4}, 5 iterations in [\d.]+s",
                        summaries[1])  # the last epoch: no ETA


def test_epoch_summary_without_a_terminal_or_evaluation(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a progress bar instead of lines
    model, opt, sched = setup()
    fit(model, FakeCriterion(), train_loader(), opt, sched, epochs=1, device="cpu", output_dir=tmp_path,
        config={}, label_map={}, eval_every=0, max_iters=1,
        logger=RunLogger(None, tensorboard=False, progress=False, enabled=True))
    (summary,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"epoch 0 of 1 done: loss \d+\.\d{4}, 1 iterations in [\d.]+s", summary)
