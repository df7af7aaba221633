"""End to end through the command line on a tiny synthetic data set (CPU, about a minute)."""

import json
import re
import shutil
import sys

import pytest
import torch
from tests.official import FIXTURES_DIR

from asag.cli import main
from asag.data.synthetic import generate_synthetic
from asag.viz.eval_plots import PLOT_FILES


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, 8, seed=3, val_images=4)
    return root


def common(data_root, out):
    return [f"data.root={data_root}", f"runtime.output_dir={out}", "schedule.max_iters_per_epoch=2",
            "runtime.log_every=1"]


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "tiny_cpu", *common(data_root, out), "schedule.epochs=1"]) == 0
    return out


def test_train_writes_checkpoints_logs_and_evaluation(trained):
    for name in ("last.pth", "best.pth", "metrics.jsonl", "val_results.json"):
        assert (trained / name).is_file(), name
    assert (trained / "curves.png").read_bytes().startswith(b"\x89PNG")  # drawn from metrics.jsonl
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert "train" in kinds and any("eval" in k for k in kinds)
    train = next(r for r in records if r["kind"] == "train")
    assert "terms/loss_ce_anchor" in train and "lr" in train


def test_resume_continues_from_the_checkpoint(trained, data_root, tmp_path):
    args = ["train", "tiny_cpu", *common(data_root, tmp_path), "schedule.epochs=2",
            "--resume", str(trained / "last.pth")]
    assert main(args) == 0
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 4


# Small images, one iteration per epoch, only last.pth: the bit-for-bit comparison below stays fast.
SMALL_RUN = ["schedule.max_iters_per_epoch=1", "data.train_scales=[64]", "data.train_max_size=96",
             "runtime.eval_every=0", "runtime.checkpoint_every=10"]


@pytest.mark.slow  # 10 to 20 s, three runs; tests/engine/test_trainer.py checks the same on a fake model
def test_resume_with_workers_equals_the_uninterrupted_run(data_root, tmp_path):
    """Interrupted after epoch 0 (trained without workers) and resumed with two DataLoader workers, the
    run ends with the weights of an uninterrupted run with two workers, bit for bit: a sample's
    augmentation depends on the seed, epoch and its position only, and no loader or evaluation draws from
    the RNGs that checkpoints restore. (Workers used to reseed at every start: resumed runs differed.)"""
    def train(out, *extra):
        return main(["train", "tiny_cpu", f"data.root={data_root}", f"runtime.output_dir={out}", *SMALL_RUN,
                     *extra])

    assert train(tmp_path / "full", "schedule.epochs=2", "data.num_workers=2") == 0
    assert train(tmp_path / "split", "schedule.epochs=1", "data.num_workers=0") == 0
    assert train(tmp_path / "split", "schedule.epochs=2", "data.num_workers=2",
                 "--resume", str(tmp_path / "split" / "last.pth")) == 0
    full, resumed = (torch.load(tmp_path / run / "last.pth", weights_only=True) for run in ("full", "split"))
    assert resumed["epoch"] == full["epoch"] == 1
    assert all(torch.equal(resumed["model"][key], value) for key, value in full["model"].items())


@pytest.mark.slow  # two runs; tests/engine/test_memory_format.py checks the decision with a mocked probe
def test_probed_layout_is_logged_recorded_and_kept_by_a_resume(data_root, tmp_path, capsys, monkeypatch):
    """runtime.memory_format=probe times both layouts once, says so in one line and records the choice in
    the checkpoint; the resumed run (auto) takes it from there without probing or applying its rule."""
    import asag.commands.train as train_command

    def train(*extra):
        return main(["train", "tiny_cpu", f"data.root={data_root}", f"runtime.output_dir={tmp_path}",
                     *SMALL_RUN, *extra])

    assert train("schedule.epochs=1", "runtime.memory_format=probe") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("runtime.memory_format"))
    assert re.fullmatch(r"runtime.memory_format: (channels_last|contiguous) \(probe: contiguous \d+ ms, "
                        r"channels_last \d+ ms \(median of 2 forward\+backward passes of backbone\+FPN\)\)",
                        line), line
    chosen = line.split()[1]
    assert torch.load(tmp_path / "last.pth", weights_only=True)["extra"]["memory_format"] == chosen
    monkeypatch.setattr(train_command, "probe_layouts", lambda *a, **k: pytest.fail("probed again"))
    monkeypatch.setattr("asag.engine.memory_format.cpu_layout_rule", lambda *a: pytest.fail("rule applied"))
    assert train("schedule.epochs=2", "--resume", str(tmp_path / "last.pth")) == 0
    assert f"runtime.memory_format: {chosen} (auto: the layout recorded in the resumed checkpoint)" in \
        capsys.readouterr().out
    assert torch.load(tmp_path / "last.pth", weights_only=True)["extra"]["memory_format"] == chosen


def test_eval_reports_coco_metrics(trained, data_root, tmp_path, capsys):
    code = main(["eval", str(trained / "last.pth"), f"data.root={data_root}", "--out", str(tmp_path),
                 "--batch-size", "2", "--inference-level", "P4P6"])
    assert code == 0
    text = capsys.readouterr().out
    assert "AP50" in text and "images/s" in text and "COCO evaluation backend: faster_coco_eval" in text
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["ap"] <= 1.0 and metrics["num_images"] == 4
    assert metrics["backend"] == "faster_coco_eval"  # evaluation.backend=auto: the core dependency
    reference = tmp_path / "pycocotools"
    assert main(["eval", str(trained / "last.pth"), f"data.root={data_root}", "--out", str(reference),
                 "--batch-size", "2", "--inference-level", "P4P6", "--no-plots",
                 "evaluation.backend=pycocotools"]) == 0
    assert "COCO evaluation backend: pycocotools" in capsys.readouterr().out
    expected = json.loads((reference / "metrics.json").read_text())
    assert expected["backend"] == "pycocotools"
    assert metrics["stats"] == pytest.approx(expected["stats"], rel=0, abs=2.0**-52)


def test_predict_writes_json_and_drawings(trained, data_root, tmp_path):
    images = data_root / "images" / "val"
    code = main(["predict", str(trained / "last.pth"), str(images), "--out", str(tmp_path), "--draw",
                 "--score-threshold", "0"])
    assert code == 0
    records = json.loads((tmp_path / "predictions.json").read_text())
    assert len(records) == 4
    det = records[0]["detections"][0]
    assert set(det) == {"box_xyxy", "score", "category_id", "category_name"}
    assert det["category_id"] in range(1, 6)
    assert len(list(tmp_path.glob("*_pred.png"))) == 4


def test_python_api_predicts_on_pil_and_tensor(trained, data_root):
    import PIL.Image
    from torchvision.transforms.functional import pil_to_tensor

    from asag.api import Detector

    detector = Detector.from_checkpoint(trained / "last.pth", device="cpu")
    path = next((data_root / "images" / "val").iterdir())
    image = PIL.Image.open(path)
    from_pil = detector.predict(image, topk=5)
    from_tensor = detector.predict(pil_to_tensor(image.convert("RGB")), topk=5)
    assert len(from_pil) == 5
    assert [d.box for d in from_pil] == [d.box for d in from_tensor]
    w, h = image.size
    assert all(-w <= d.box[0] <= 2 * w for d in from_pil)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "no_such_preset"], "unknown preset"),
        (["train", "tiny_cpu", "model.nope=1"], "unknown key model.nope"),
        (["eval", "missing.pth"], "missing.pth"),
        (["predict", "missing.pth", "x.png"], "x.png"),
        (["config", "show", "tiny_cpu", "schedule.epochs=many"], "expected an integer"),
        (["convert", "missing.pth", "--out", "x.pth"], "not found"),
    ],
)
def test_bad_input_gives_a_message_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=9", "data.batch_size=9 is larger than the 8 usable training images"),
    ("schedule.max_iters_per_epoch=0", "schedule.max_iters_per_epoch must be >= 1"),
])
def test_training_without_iterations_is_refused_up_front(data_root, tmp_path, capsys, override, message):
    args = ["train", "tiny_cpu", f"data.root={data_root}", f"runtime.output_dir={tmp_path}", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(tmp_path.glob("*.pth"))


def test_diverging_training_stops_with_the_non_finite_loss_line(data_root, tmp_path, capsys):
    """schedule.lr=1e9 makes the second step's predictions NaN; it raised an IndexError in the RoI
    pooling's level count (a device-side assert on CUDA) before the loss could be checked."""
    args = ["train", "tiny_cpu", *common(data_root, tmp_path), "schedule.lr=1e9", "runtime.eval_every=0",
            "data.train_scales=[64]", "data.train_max_size=96"]  # small images: a faster test
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]  # progress lines go to stderr too
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0]
    assert re.fullmatch(r"asag train: error: loss is not finite: .*non-finite.*; stopping", errors[0])
    assert not any(tmp_path.glob("*.pth"))  # the diverged epoch is not saved


@pytest.mark.parametrize("argv, message", [
    (["predict", "x.pth", "x.png", "--topk", "-1"], "argument --topk: must be >= 1, got -1"),
    (["predict", "x.pth", "x.png", "--topk", "2.5"], "argument --topk: expected an integer, got '2.5'"),
    (["predict", "c.pth", "i.png", "--score-threshold", "nan"], "--score-threshold: must be a finite"),
    (["predict", "c", "i", "--score-threshold", "1.5"], "--score-threshold: must be in [0, 1], got 1.5"),
    (["visualize", "x.pth", "x.png", "--score-threshold", "-0.1"], "--score-threshold: must be in [0, 1]"),
    (["eval", "x.pth", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["benchmark", "tiny_cpu", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["benchmark", "tiny_cpu", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["benchmark", "tiny_cpu", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["data", "synth", "--out", "x", "--images", "0"], "argument --images: must be >= 1, got 0"),
    (["data", "synth", "--out", "x", "--images", "2", "--seed", "-3"], "--seed: must be >= 0, got -3"),
])
def test_numeric_options_are_range_checked_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_python_api_checks_score_threshold_and_topk(trained):
    from asag.api import Detector
    from asag.errors import ConfigError

    detector = Detector.from_checkpoint(trained / "last.pth", device="cpu")
    image = torch.zeros(3, 32, 32)
    with pytest.raises(ConfigError, match="topk must be >= 1, got -1"):
        detector.predict(image, topk=-1)
    with pytest.raises(ConfigError, match="score_threshold must be a finite number, got nan"):
        detector.predict(image, score_threshold=float("nan"))


def test_bad_files(trained, tmp_path, capsys):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((trained / "last.pth").read_bytes()[:1000])
    assert main(["eval", str(truncated)]) == 2
    assert "truncated.pth" in capsys.readouterr().err
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"not a png")
    assert main(["predict", str(trained / "last.pth"), str(bad_image), "--out", str(tmp_path)]) == 1
    assert "bad.png" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(trained / "last.pth"), str(empty)]) == 2
    assert "no images" in capsys.readouterr().err


def test_bf16_training_falls_back_to_float32_without_native_support(monkeypatch, capsys):
    import torch

    import asag.commands.train as train_command
    from asag.config import load_config

    cfg = load_config("demo")
    monkeypatch.setattr(train_command, "cpu_supports_bf16", lambda: True)
    assert train_command.resolve_amp(cfg, torch.device("cpu")) == "bf16"
    monkeypatch.setattr(train_command, "cpu_supports_bf16", lambda: False)
    assert train_command.resolve_amp(cfg, torch.device("cpu")) is None
    assert "no native bf16" in capsys.readouterr().out
    cfg.runtime.amp = "auto"
    assert train_command.resolve_amp(cfg, torch.device("cpu")) is None


# ------------------------------------------------------------------- nothing lost, nothing silent


def run_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_train_refuses_a_folder_holding_a_run(trained, data_root, capsys):
    before = run_files(trained)
    assert main(["train", "tiny_cpu", *common(data_root, trained), "schedule.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"output folder {trained} already holds a run" in err
    assert "--resume" in err and "--overwrite" in err
    assert run_files(trained) == before


def test_train_overwrite_replaces_the_earlier_run_and_prints_progress(
        trained, data_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "checkpoint_0099.pth").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    (out / "resnet18-weights.pth").write_bytes(b"not written by asag train: kept")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # a CI log
    threads = torch.get_num_threads()
    try:
        code = main(["train", "tiny_cpu", *common(data_root, out), "schedule.epochs=1",
                     "runtime.eval_every=0", "--overwrite", "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint_0000.pth", "curves.png", "last.pth", "metrics.jsonl", "notes.txt",
                     "resnet18-weights.pth", "tensorboard"]
    assert (out / "curves.png").read_bytes() != (trained / "curves.png").read_bytes()  # this run's
    stored = torch.load(out / "last.pth", weights_only=True)["config"]["runtime"]
    assert (stored["device"], stored["num_threads"]) == ("cpu", 1)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "train", "epoch"]  # the earlier run's are gone
    assert all("time" in r and r["elapsed"] >= 0 for r in records)
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == f"done: no evaluation (runtime.eval_every=0); last checkpoint " \
                                            f"{out / 'last.pth'}"
    err = captured.err.splitlines()
    progress = [line.split(":")[0] for line in err if " iter " in line]
    assert progress == ["epoch 0 iter 1/2", "epoch 0 iter 2/2"]
    assert any(line.startswith("epoch 0 of 1 done: loss ") for line in err)


def test_eval_writes_a_new_folder_beside_the_checkpoint_and_never_replaces_results(
        trained, data_root, tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "ckpt" / "last.pth"
    checkpoint.parent.mkdir()
    shutil.copy(trained / "last.pth", checkpoint)
    monkeypatch.chdir(tmp_path)
    for plots in ([], ["--no-plots"]):
        assert main(["eval", str(checkpoint), f"data.root={data_root}", "--batch-size", "4", *plots]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing in the current folder
    first, second = checkpoint.parent / "eval_last", checkpoint.parent / "eval_last_2"
    assert sorted(p.name for p in first.iterdir()) == sorted(["metrics.json", "results.json", *PLOT_FILES])
    assert sorted(p.name for p in second.iterdir()) == ["metrics.json", "results.json"]
    before = run_files(first)
    capsys.readouterr()
    assert main(["eval", str(checkpoint), f"data.root={data_root}", "--out", str(first)]) == 2
    err = capsys.readouterr().err
    assert f"--out {first} already holds results.json, metrics.json, pr_curves.png, " in err
    assert "; pass --overwrite" in err
    assert run_files(first) == before
    assert main(["eval", str(checkpoint), f"data.root={data_root}", "--out", str(first), "--overwrite",
                 "--no-plots"]) == 0
    # the earlier plots showed the replaced results: they go too
    assert sorted(p.name for p in first.iterdir()) == ["metrics.json", "results.json"]
    removed = f"removed {len(PLOT_FILES)} plot files of an earlier evaluation from {first}"
    assert removed in capsys.readouterr().out


def test_predict_gives_every_input_its_own_output_and_skips_unreadable_images(
        trained, data_root, tmp_path, capsys):
    import PIL.Image

    source = sorted((data_root / "images" / "val").iterdir())
    for folder, name, index in (("a", "x.png", 0), ("b", "x.png", 1), ("a", "x.jpg", 2)):
        (tmp_path / folder).mkdir(exist_ok=True)
        PIL.Image.open(source[index]).convert("RGB").save(tmp_path / folder / name)
    (tmp_path / "y.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    pattern = str(tmp_path / "a" / "*.png")  # absolute, and a duplicate of a/x.png
    code = main(["predict", str(trained / "last.pth"), str(tmp_path / "a"), str(tmp_path / "b" / "x.png"),
                 str(tmp_path / "y.png"), pattern, "--out", str(out), "--draw", "--score-threshold", "0"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"asag predict: error: {tmp_path / 'y.png'}: cannot read image" in err
    assert "1 of 4 images could not be read" in err and "Traceback" not in err
    records = json.loads((out / "predictions.json").read_text())
    files = [str(tmp_path / "a" / "x.jpg"), str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")]
    assert [r["file"] for r in records] == files
    assert [r["drawing"] for r in records] == ["x_jpg_pred.png", "a_x_png_pred.png", "b_x_png_pred.png"]
    drawings = [PIL.Image.open(out / r["drawing"]) for r in records]
    assert [d.size for d in drawings] == [PIL.Image.open(f).size for f in files]



def test_predict_never_replaces_earlier_results(trained, data_root, tmp_path, monkeypatch, capsys):
    image = sorted((data_root / "images" / "val").iterdir())[0]
    checkpoint = str(trained / "last.pth")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "predictions").mkdir()  # an empty folder (left by a failed run) is used
    for _ in range(2):
        assert main(["predict", checkpoint, str(image)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions", "predictions_2"]
    first = tmp_path / "predictions"
    assert [p.name for p in first.iterdir()] == ["predictions.json"]
    before = (first / "predictions.json").read_bytes()
    capsys.readouterr()
    assert main(["predict", checkpoint, str(image), "--out", str(first)]) == 2
    err = capsys.readouterr().err
    assert f"--out {first} already holds predictions.json; pass --overwrite" in err and "Traceback" not in err
    assert (first / "predictions.json").read_bytes() == before
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    (drawn / f"{image.stem}_pred.png").write_bytes(b"an earlier drawing")
    assert main(["predict", checkpoint, str(image), "--out", str(drawn), "--draw"]) == 2
    assert f"already holds {image.stem}_pred.png" in capsys.readouterr().err
    assert main(["predict", checkpoint, str(image), "--out", str(drawn), "--draw", "--overwrite"]) == 0
    assert main(["predict", str(tmp_path / "missing.pth"), str(image)]) == 2  # a failed run leaves no folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drawn", "predictions", "predictions_2"]
    assert (drawn / f"{image.stem}_pred.png").read_bytes() != b"an earlier drawing"

def test_every_option_has_help_with_its_default_and_the_top_level_help_is_plain(capsys):
    import argparse

    from asag.cli import build_parser

    def actions(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from actions(sub, f"{name} {sub_name}")
            elif not isinstance(action, argparse._HelpAction):
                yield name, parser, action

    for name, parser, action in actions(build_parser(), "asag"):
        assert action.help, (name, action.dest)
        if (not action.option_strings or action.required or action.default is False
                or action.default == argparse.SUPPRESS):
            continue  # positionals, required options, on/off switches and actions (--list-classes) have no
            # default to show
        text = parser.formatter_class("x")._get_help_string(action) % {"default": action.default}
        assert "default" in text, (name, action.option_strings, text)
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "``" not in top and ":mod:" not in top and "train" in top


# -------------------------------------------------------------- every error is one line, early


def one_line_error(capsys, command):
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"asag {command}: error: ")
    return err


@pytest.mark.parametrize("command", ["train", "eval", "eval --plots", "plot", "predict", "visualize",
                                     "convert", "data synth", "data convert-crowdhuman", "data convert",
                                     "benchmark", "demo"])
def test_an_output_path_under_a_file_is_refused_before_the_work(command, tiny_checkpoint, tmp_path,
                                                                  monkeypatch, capsys):
    import asag.commands.benchmark
    import asag.commands.data
    import asag.data.formats
    import asag.engine.evaluator
    import asag.viz.curves

    for module, name in ((asag.engine.evaluator, "evaluate"), (asag.commands.data, "time"),
                         (asag.commands.benchmark, "benchmark"), (asag.viz.curves, "read_metrics"),
                         (asag.data.formats, "read_voc")):  # the work itself must not start
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the work started"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = str(blocker / "sub")
    ckpt = str(tiny_checkpoint / "ckpt.pth")
    image = str(next((tiny_checkpoint / "data" / "images" / "val").iterdir()))
    data = f"data.root={tiny_checkpoint / 'data'}"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"kind": "train", "step": 0, "loss": 1.0}\n')
    argv = {
        "train": ["train", "tiny_cpu", data, "--output-dir", out],
        "eval": ["eval", ckpt, data, "--out", out],
        "eval --plots": ["eval", ckpt, data, "--out", str(tmp_path / "results"), "--plots", out],
        "plot": ["plot", str(tmp_path / "run"), "--out", f"{out}/curves.png"],
        "predict": ["predict", ckpt, image, "--out", out],
        "visualize": ["visualize", ckpt, image, "--out", out],
        "convert": ["convert", ckpt, "--out", f"{out}/x.pth"],
        "data synth": ["data", "synth", "--out", out, "--images", "1"],
        "data convert-crowdhuman": ["data", "convert-crowdhuman", "--odgt", "x.odgt", "--images", ".",
                                    "--out", f"{out}/x.json"],
        "data convert": ["data", "convert", "--from", "voc", ".", "--out", out],
        "benchmark": ["benchmark", "tiny_cpu", "--json", f"{out}/x.json"],
        "demo": ["demo", "--output-dir", out],
    }[command]
    assert main(argv) == 2
    err = one_line_error(capsys, command.split()[0])
    assert f"{blocker} is a file, not a folder" in err
    assert not (blocker / "sub").exists()


def test_an_unwritable_folder_and_a_full_disk_are_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    import PIL.Image

    import asag.outputs

    ckpt = str(tiny_checkpoint / "ckpt.pth")
    image = str(next((tiny_checkpoint / "data" / "images" / "val").iterdir()))

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as patch:  # running as root: simulate a folder without write permission
        patch.setattr(asag.outputs.tempfile, "TemporaryFile", denied)
        assert main(["predict", ckpt, image, "--out", str(tmp_path / "ro")]) == 2
    err = one_line_error(capsys, "predict")
    assert f"--out {tmp_path / 'ro'}: cannot write there (Permission denied)" in err
    assert tempfile.TemporaryFile is not denied

    def disk_full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(PIL.Image.Image, "save", disk_full)
    assert main(["predict", ckpt, image, "--out", str(tmp_path / "full"), "--draw"]) == 1
    err = one_line_error(capsys, "predict")
    assert f"{tmp_path / 'full'}" in err and "_pred.png: No space left on device" in err


def test_a_full_disk_during_training_names_the_checkpoint(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import errno

    import asag.engine.checkpoint

    def disk_full(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(asag.engine.checkpoint.torch, "save", disk_full)
    out = tmp_path / "run"
    code = main(["train", "tiny_cpu", f"data.root={tiny_checkpoint / 'data'}", "schedule.epochs=1",
                 "schedule.max_iters_per_epoch=1", "runtime.eval_every=0", "data.batch_size=1",
                 "--output-dir", str(out)])
    assert code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"asag train: error: {out / 'last.pth'}: No space left on device"
    assert not out.exists()  # no temporary file, no log of a run without a checkpoint, no empty folder


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import asag.commands.config

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(asag.commands.config, "run_list", interrupted)
    assert main(["config", "list"]) == 130
    assert capsys.readouterr().err == "asag config: interrupted\n"


def official_shapes(variant: str) -> dict[str, torch.Tensor]:
    """An authors'-layout state dict with the right key names and shapes, every tensor a broadcast view
    of one zero (a few bytes on disk)."""
    manifest = FIXTURES_DIR / f"official-state-dict-{variant}.txt"
    state = {}
    for line in manifest.read_text().splitlines():
        key, shape, _ = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        state[key] = torch.zeros(()).expand(dims)
    return state


@pytest.mark.parametrize(
    "kind, extra, message",
    [
        ("empty", [], "the file is empty"),
        ("official", ["--keep-head", "foo"],
         "head 'foo': this model has 4 head(s); choose main, aux_0, aux_1, aux_2"),
        ("official", ["--keep-head", "aux_3"], "head 'aux_3': this model has 4 head(s)"),
        ("official", ["--keep-head", "aux_-1"], "head 'aux_-1'"),
    ],
    ids=["empty_file", "keep_head_foo", "head_out_of_range", "negative_head"],
)
def test_convert_bad_input_is_one_line(kind, extra, message, tmp_path, capsys):
    source = tmp_path / "official.pth"
    if kind == "empty":
        source.write_bytes(b"")
    else:
        torch.save({"model": official_shapes("asag-a")}, source)
    assert main(["convert", str(source), "--out", str(tmp_path / "out.pth"), *extra]) == 2
    err = one_line_error(capsys, "convert")
    assert message in err and (kind != "empty" or str(source) in err)
    assert not (tmp_path / "out.pth").exists()
