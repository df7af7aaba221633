"""Wrong input never gives a wrong number or a traceback: data-file overrides a data format does not read,
unreadable or endless preset chains, and ``key=value`` overrides placed after options."""

import json

import pytest
import yaml

import asag.commands.benchmark
import asag.commands.convert
import asag.commands.demo
import asag.commands.eval
import asag.commands.train
from asag.cli import main
from asag.config import load_config
from asag.data.synthetic import generate_synthetic
from asag.errors import ConfigError

# ------------------------------------------------------------ data fields the data format does not read

UNREAD = "data.val_annotations: not read when data.format=synthetic"


@pytest.fixture(scope="module")
def eight_train_images(tmp_path_factory):
    """A synthetic data set with 8 train and 2 validation images."""
    root = tmp_path_factory.mktemp("eight")
    generate_synthetic(root, 8, seed=3, val_images=2)
    return root


def eval_train_split(tiny_checkpoint, data, out, *extra):
    """``asag eval`` of the tiny checkpoint (format synthetic) asked to evaluate the 8 train images."""
    return main(["eval", str(tiny_checkpoint / "ckpt.pth"), f"data.root={data}", *extra,
                 "data.val_annotations=train.json", "data.val_images=images/train", "--out", str(out)])


def test_eval_refuses_file_overrides_the_synthetic_format_does_not_read(tiny_checkpoint, eight_train_images,
                                                                         tmp_path, capsys):
    assert eval_train_split(tiny_checkpoint, eight_train_images, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert UNREAD in err and "set data.format=coco to use it" in err
    assert not (tmp_path / "metrics.json").exists()  # not the 2 images of val.json


def test_eval_honours_file_overrides_of_the_coco_format(tiny_checkpoint, eight_train_images, tmp_path):
    assert eval_train_split(tiny_checkpoint, eight_train_images, tmp_path, "data.format=coco") == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == 8


def test_a_synthetic_root_without_its_files_says_how_to_name_other_files(tiny_checkpoint, tmp_path, capsys):
    assert main(["eval", str(tiny_checkpoint / "ckpt.pth"), "--data", str(tmp_path), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'val.json'}: annotation file not found" in err
    assert "data.format=coco with data.val_annotations and data.val_images" in err


@pytest.mark.parametrize("command", ["train", "benchmark", "benchmark-checkpoint", "config", "demo"])
def test_every_command_refuses_a_data_field_its_format_does_not_read(command, tiny_checkpoint, tmp_path,
                                                                     capsys):
    ckpt = str(tiny_checkpoint / "ckpt.pth")
    override = "data.val_annotations=train.json"
    argv = {
        "train": ["train", "tiny_cpu", override, f"runtime.output_dir={tmp_path}"],
        "benchmark": ["benchmark", "tiny_cpu", override, "--data", str(tiny_checkpoint / "data")],
        "benchmark-checkpoint": ["benchmark", ckpt, override, "--data", str(tiny_checkpoint / "data")],
        "config": ["config", "show", "tiny_cpu", override],
        "demo": ["demo", override, "--output-dir", str(tmp_path / "demo")],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert UNREAD in err and err.count("\n") == 1
    assert not list(tmp_path.glob("**/*.pth"))


def test_synthetic_fields_are_refused_with_the_coco_format():
    with pytest.raises(ConfigError, match="data.synthetic_seed: not read when data.format=coco .* set "
                                          "data.format=synthetic to use it"):
        load_config("asag_a_r50_1x_100q", ["data.synthetic_seed=3"])


def test_a_preset_file_setting_an_unread_field_is_named(tmp_path):
    (tmp_path / "mine.yaml").write_text("_base_: tiny_cpu\ndata:\n  val_annotations: train.json\n")
    with pytest.raises(ConfigError, match=f"mine.yaml: {UNREAD}"):
        load_config(str(tmp_path / "mine.yaml"))
    (tmp_path / "coco.yaml").write_text("_base_: tiny_cpu\ndata: {format: coco, val_annotations: t.json}\n")
    assert load_config(str(tmp_path / "coco.yaml")).data.val_annotations == "t.json"


def test_choosing_another_format_supersedes_the_fields_set_before():
    # tiny_cpu sets synthetic_* fields; the override that picks coco makes them irrelevant, not an error
    cfg = load_config("tiny_cpu", ["data.format=coco", "data.val_annotations=v.json"])
    assert (cfg.data.format, cfg.data.val_annotations) == ("coco", "v.json")
    # the CrowdHuman preset names its files; switching to the synthetic format drops them knowingly
    assert load_config("asag_s_r50_crowdhuman", ["data.format=synthetic"]).data.format == "synthetic"
    # ... but not when the same layer also sets an unread field
    with pytest.raises(ConfigError, match=UNREAD):
        load_config("asag_s_r50_crowdhuman", ["data.val_annotations=v.json", "data.format=synthetic"])


def test_a_mapping_override_sets_only_its_keys():
    cfg = load_config("tiny_cpu", ["data={root: elsewhere, val_batch_size: 1}"])
    assert (cfg.data.root, cfg.data.val_batch_size, cfg.data.format) == ("elsewhere", 1, "synthetic")
    assert cfg.data.synthetic_train_images == 16  # the preset's value, not the default
    with pytest.raises(ConfigError, match=UNREAD):
        load_config("tiny_cpu", ["data={val_annotations: x.json}"])


def test_a_bad_override_of_a_checkpoint_is_not_blamed_on_the_checkpoint(tiny_checkpoint, tmp_path, capsys):
    assert main(["eval", str(tiny_checkpoint / "ckpt.pth"), "data.val_batch_size=0",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "data.val_batch_size must be >= 1, got 0" in err and "stored configuration" not in err


# ------------------------------------------------------------------------------- unreadable presets


def config_show_error(path, capsys) -> str:
    """The one line ``asag config show PATH`` prints (exit 2)."""
    assert main(["config", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_binary_preset_or_base_is_one_line(tmp_path, capsys):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    err = config_show_error(tmp_path / "binary.yaml", capsys)
    assert f"{tmp_path / 'binary.yaml'}: not a YAML text file (not UTF-8)" in err
    (tmp_path / "model.pth").write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")
    (tmp_path / "top.yaml").write_text("_base_: model.pth\n")
    assert "model.pth: not a YAML text file (not UTF-8)" in config_show_error(tmp_path / "top.yaml", capsys)


def test_a_deep_base_chain_resolves(tmp_path):
    depth = 2000
    for i in range(depth):
        body = f"_base_: p{i + 1}.yaml\n" if i < depth - 1 else "_base_: tiny_cpu\nschedule: {epochs: 7}\n"
        (tmp_path / f"p{i}.yaml").write_text(body + f"description: p{i}\n")
    cfg = load_config(str(tmp_path / "p0.yaml"))
    assert (cfg.schedule.epochs, cfg.description, cfg.data.format) == (7, "p0", "synthetic")


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "a preset must be a mapping of config sections, got a list"),
    ("just text\n", "a preset must be a mapping of config sections, got a str"),
    ("_base_: [tiny_cpu]\n", "_base_ must name a preset or a YAML file, got ['tiny_cpu']"),
    ("_base_: 3\n", "_base_ must name a preset or a YAML file, got 3"),
    ("_base_: ''\n", "_base_ must name a preset or a YAML file, got ''"),
    ("_base_: no_such_preset\n", "unknown preset 'no_such_preset'"),
    ("1: 2\nfoo: 3\n", "unknown key 1; valid keys here"),
    ("data:\n  roots: x\n", "unknown key data.roots"),
    ("data: 5\n", "data: expected a mapping, got 5"),
    ("schedule: {epochs: many}\n", "schedule.epochs: expected an integer, got 'many'"),
    ("schedule: {epochs: [1\n", "not valid YAML (line 2, column 1: expected ',' or ']'"),
    ("a: 1\n\tb: 2\n", "not valid YAML (line 2, column 1: found character '\\t'"),
])
def test_malformed_presets_are_one_line_naming_the_file(tmp_path, capsys, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    err = config_show_error(tmp_path / "bad.yaml", capsys)
    assert f"bad.yaml: {message}" in err or (message.startswith("unknown preset") and message in err)


def test_a_missing_preset_file_or_base_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert f"{missing}: preset file not found" in config_show_error(missing, capsys)
    (tmp_path / "folder.yaml").mkdir()
    assert f"{tmp_path / 'folder.yaml'}: not a file" in config_show_error(tmp_path / "folder.yaml", capsys)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "top.yaml").write_text("_base_: base.yml\n")
    err = config_show_error(tmp_path / "sub" / "top.yaml", capsys)
    assert f"top.yaml: _base_ file {tmp_path / 'sub' / 'base.yml'} not found" in err


def test_a_base_file_with_a_bad_key_is_named(tmp_path):
    (tmp_path / "base.yaml").write_text("schedule: {epoks: 3}\n")
    (tmp_path / "top.yaml").write_text("_base_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base.yaml: unknown key schedule.epoks"):
        load_config(str(tmp_path / "top.yaml"))


# ------------------------------------------------------------------------ overrides after options


def capture(monkeypatch, module) -> list:
    """Replace ``module.run`` by a recorder of the parsed arguments."""
    seen = []
    monkeypatch.setattr(module, "run", lambda args: seen.append(args) or 0)
    return seen


@pytest.mark.parametrize("module, argv", [
    (asag.commands.train, ["train", "tiny_cpu", "a=1", "--output-dir", "X", "b=2", "c.d=[3]"]),
    (asag.commands.eval, ["eval", "ckpt.pth", "a=1", "--out", "O", "b=2", "--per-class", "c.d=[3]"]),
    (asag.commands.benchmark, ["benchmark", "tiny_cpu", "a=1", "--data", "D", "b=2", "c.d=[3]"]),
    (asag.commands.convert, ["convert", "ckpt.pth", "a=1", "--out", "O", "b=2", "c.d=[3]"]),
    (asag.commands.demo, ["demo", "a=1", "--output-dir", "X", "b=2", "c.d=[3]"]),
])
def test_overrides_may_follow_options_in_order(monkeypatch, module, argv):
    seen = capture(monkeypatch, module)
    assert main(argv) == 0
    assert seen[0].overrides == ["a=1", "b=2", "c.d=[3]"]


def test_config_show_reads_overrides_after_its_options(capsys):
    assert main(["config", "show", "tiny_cpu", "--format", "json", "data.root=elsewhere",
                 "schedule.epochs=3"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["data"]["root"], shown["schedule"]["epochs"]) == ("elsewhere", 3)
    assert main(["config", "show", "tiny_cpu", "--format", "yaml", "data.root=x"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["root"] == "x"


@pytest.mark.parametrize("argv, unknown", [
    (["train", "tiny_cpu", "--output-dir", "X", "stray"], "stray"),
    (["train", "tiny_cpu", "--output-dir", "X", "a=1", "--bogus", "b=2"], "--bogus"),
    (["predict", "ckpt.pth", "image.jpg", "--out", "O", "data.root=D"], "data.root=D"),
    (["config", "list", "data.root=D"], "data.root=D"),
])
def test_other_leftover_tokens_are_still_refused(capsys, argv, unknown):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: unrecognized arguments: {unknown}\n" in err and "a=1" not in err.splitlines()[-1]
