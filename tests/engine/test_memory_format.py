"""runtime.memory_format: the auto decision (probe, resume, CUDA) and the probe itself."""

import itertools
from functools import partial

import pytest
import torch
from torch import nn

import asag.commands.train as train_command
from asag.config import load_config
from asag.engine.checkpoint import save_checkpoint
from asag.engine.memory_format import (
    CHANNELS_LAST,
    CONTIGUOUS,
    choose_memory_format,
    faster_layout,
    probe_images,
    probe_layouts,
    recorded_layout,
)


def never_called():
    raise AssertionError("the probe must not run")


def test_faster_layout_compares_medians_and_keeps_contiguous_on_a_tie():
    assert faster_layout({CONTIGUOUS: [1.0, 5.0, 1.0], CHANNELS_LAST: [0.9, 0.95, 4.0]}) == CHANNELS_LAST
    assert faster_layout({CONTIGUOUS: [1.0, 1.0], CHANNELS_LAST: [1.0, 1.0]}) == CONTIGUOUS
    assert faster_layout({CONTIGUOUS: [0.5], CHANNELS_LAST: [0.6]}) == CONTIGUOUS


@pytest.mark.parametrize("times, expected", [((2.0, 1.0), True), ((1.0, 2.0), False), ((1.0, 1.0), False)])
def test_probe_on_the_cpu_follows_the_measurement(times, expected):
    calls = []

    def probe():
        calls.append(1)
        return {CONTIGUOUS: [times[0]] * 2, CHANNELS_LAST: [times[1]] * 2}

    choice = choose_memory_format("probe", "cpu", probe=probe)
    assert choice.channels_last is expected and calls == [1]
    layout = CHANNELS_LAST if expected else CONTIGUOUS
    assert choice.line() == (f"runtime.memory_format: {layout} (probe: contiguous {times[0] * 1e3:.0f} ms, "
                             f"channels_last {times[1] * 1e3:.0f} ms (median of 2 forward+backward passes "
                             f"of backbone+FPN))")


@pytest.mark.parametrize("amp, amx, expected", [
    (None, False, False), (None, True, True), ("bf16", False, True), ("bf16", True, True),
])
def test_auto_on_the_cpu_is_a_fixed_rule_of_precision_and_processor(amp, amx, expected):
    choice = choose_memory_format("auto", "cpu", amp=amp, amx=amx, probe=never_called)
    assert choice.channels_last is expected
    assert choice == choose_memory_format("auto", "cpu", amp=amp, amx=amx)  # no timing: always the same
    assert choose_memory_format("probe", "cpu", amp=amp, amx=amx) == choice  # nothing to probe with


def test_explicit_recorded_and_cuda_need_no_probe():
    for mode in ("auto", "probe"):
        assert choose_memory_format(mode, "cuda", probe=never_called).channels_last
        resumed = choose_memory_format(mode, "cpu", recorded=CHANNELS_LAST, probe=never_called)
        assert resumed.channels_last and "recorded in the resumed checkpoint" in resumed.reason
        assert not choose_memory_format(mode, "cuda", recorded=CONTIGUOUS, probe=never_called).channels_last
    assert choose_memory_format("channels_last", "cpu", probe=never_called).channels_last
    assert not choose_memory_format("contiguous", "cuda", amp="bf16", probe=never_called).channels_last
    changed = choose_memory_format("contiguous", "cpu", recorded=CHANNELS_LAST)
    assert not changed.channels_last and "only up to float rounding" in changed.reason
    assert "rounding" not in choose_memory_format("contiguous", "cpu", recorded=CONTIGUOUS).reason


class Backbone(nn.Module):
    formats: list[bool] = []  # per call: did the input arrive channels-last

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        Backbone.formats.append(x.is_contiguous(memory_format=torch.channels_last)
                                and not x.is_contiguous())
        return {"C5": self.norm(self.conv(x))}


class Neck(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 2, 1)

    def forward(self, levels):
        return [self.conv(levels["C5"])]


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.neck = Backbone(), Neck()


def test_probe_times_both_layouts_alternating_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = Detector().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ticks = itertools.count()
    pass_seconds = {CONTIGUOUS: 3.0, CHANNELS_LAST: 2.0}
    clock = []

    def timer():  # start / end of each pass: contiguous passes last 3 s, channels-last ones 2 s
        i = next(ticks)
        layout = CONTIGUOUS if (i // 2) % 2 == 0 else CHANNELS_LAST
        clock.append(clock[-1] + (pass_seconds[layout] if i % 2 else 0.0) if clock else 0.0)
        return clock[-1]

    Backbone.formats = []
    entered = []
    seconds = probe_layouts(model, probe_images(2, 20, 100, "cpu"), passes=3, timer=timer,
                            autocast=lambda: entered.append(1) or torch.autocast("cpu", enabled=False))
    assert seconds == {CONTIGUOUS: [3.0] * 3, CHANNELS_LAST: [2.0] * 3}  # the untimed first passes dropped
    assert Backbone.formats == [False, True] * 4 and len(entered) == 8
    assert choose_memory_format("probe", "cpu", probe=lambda: seconds).channels_last
    for k, v in model.state_dict().items():  # batch-norm statistics included
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_probe_images_have_the_largest_training_size_padded():
    images = probe_images(3, 500, 600, "cpu")
    assert images.shape == (3, 3, 512, 608)  # 500 x min(600, 667), padded to multiples of 32
    assert torch.equal(images, probe_images(3, 500, 600, "cpu"))  # fixed seed
    state = torch.get_rng_state()
    probe_images(1, 32, 32, "cpu")
    assert torch.equal(torch.get_rng_state(), state)


def test_a_resumed_run_keeps_the_recorded_layout(tmp_path, monkeypatch):
    cfg = load_config("tiny_cpu", ["runtime.memory_format=probe"])
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "last.pth"
    save = partial(save_checkpoint, path, model=model, optimizer=opt, scheduler=None, scaler=None, epoch=0,
                   iteration=1, config={}, label_map={})
    save(extra={"memory_format": CHANNELS_LAST})
    monkeypatch.setattr(train_command, "probe_layouts", lambda *a, **k: never_called())
    choice = train_command.training_layout(cfg, model, torch.device("cpu"), None, resume=path)
    assert choice.channels_last and recorded_layout(torch.load(path, weights_only=False)) == CHANNELS_LAST
    save(extra={})  # a checkpoint of an earlier version
    assert recorded_layout(torch.load(path, weights_only=False)) is None
    monkeypatch.setattr(train_command, "probe_layouts",
                        lambda *a, **k: {CONTIGUOUS: [1.0], CHANNELS_LAST: [2.0]})
    assert not train_command.training_layout(cfg, model, torch.device("cpu"), None, resume=path).channels_last
    monkeypatch.setattr(train_command, "probe_layouts",
                        lambda *a, **k: {CONTIGUOUS: [2.0], CHANNELS_LAST: [1.0]})
    assert train_command.training_layout(cfg, model, torch.device("cpu"), None).channels_last
