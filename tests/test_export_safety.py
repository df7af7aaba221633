"""Exported models are safe and never silent: a ``.pt2`` archive that could run code is refused before
anything is unpickled; a corrupted file or garbled metadata is one CheckpointError; ``asag export``
refuses to replace a file without ``--overwrite``, writes atomically and reports every failure in one
line; exported files given to ``load_checkpoint`` say so; ``asag predict`` skips an image that does not
fit an exported model like an unreadable one.

Most tests run a tiny stand-in graph (:class:`TinyDeployed`, same inputs and outputs as the detector)
through the real writer :func:`asag.export.write_exported`, so that they take a second or two; one test
(``-m slow``) exports the ``tiny_checkpoint`` detector to ``.pt2`` through ``asag export``."""

import errno
import io
import json
import os
import pickle
import re
import signal
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

import asag.export
import asag.outputs
from asag.cli import main
from asag.config import load_config
from asag.data import LabelMap
from asag.engine.checkpoint import load_checkpoint
from asag.errors import CheckpointError, ConfigError
from asag.export import (
    CHECKSUM_KEY,
    PT2_ENTRY,
    ExportedModel,
    ExportWarning,
    check_export_size,
    example_inputs,
    export_metadata,
    file_checksum,
    write_exported,
)

SIZE = (160, 160)  # fits a square image resized by tiny_cpu (short side 160), not a wide one
BATCH = 1
NUM_ANCHORS = 4


class TinyDeployed(nn.Module):
    """A stand-in for :class:`asag.export.DeployedDetector`: the same inputs and outputs, one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, NUM_ANCHORS * 128)

    def forward(self, images, image_sizes, orig_sizes):
        feat = images.mean(dim=(2, 3))  # [B, 3]
        scores = torch.sigmoid(self.fc(feat)).view(len(images), NUM_ANCHORS, -1).mean(-1)  # [B, K]
        boxes = (orig_sizes.float().repeat(1, 2) * 0.5)[:, None, :].expand(-1, NUM_ANCHORS, -1).contiguous()
        return boxes, scores, (scores * 10).long() % 5, scores > 0


@pytest.fixture(scope="module")
def metadata() -> dict:
    cfg = load_config("tiny_cpu")
    n = cfg.model.num_classes
    labels = LabelMap.from_dict({"category_ids": list(range(1, n + 1)), "names": [f"c{i}" for i in range(n)]})
    return export_metadata(cfg, labels, SIZE, BATCH)


@pytest.fixture(scope="module")
def made(tmp_path_factory, metadata) -> dict[str, bytes]:
    """``fmt -> bytes`` of the tiny graph written by :func:`write_exported` (once per module)."""
    folder = tmp_path_factory.mktemp("tiny_export")
    return {fmt: write_exported(TinyDeployed().eval(), example_inputs(BATCH, SIZE), folder / f"m.{fmt}",
                                metadata, fmt).read_bytes()
            for fmt in ("onnx", "pt2")}


@pytest.fixture
def exported(made, tmp_path):
    """``fmt -> path`` of a fresh copy of the tiny exported file in ``tmp_path``."""

    def get(fmt: str, name: str = "model") -> Path:
        path = tmp_path / f"{name}.{fmt}"
        path.write_bytes(made[fmt])
        return path

    return get


def one_line_error(call) -> str:
    with pytest.raises(CheckpointError) as err:
        call()
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ---------------------------------------------------------------------------------- .pt2 archives


def pt2_records(path: Path) -> tuple[str, dict[str, bytes]]:
    """The root folder and the records (names below it) of a ``.pt2`` archive."""
    with zipfile.ZipFile(path) as archive:
        root = archive.namelist()[0].split("/")[0]
        return root, {name[len(root) + 1:]: archive.read(name) for name in archive.namelist()}


def write_pt2(path: Path, root: str, records: dict[str, bytes], *, sign: bool = True) -> Path:
    """Write ``records`` as a ``.pt2`` archive; ``sign`` recomputes the checksum, as a forger would."""
    if sign and "extra/asag.json" in records:
        meta = json.loads(records["extra/asag.json"])
        unhashed = ("extra/asag.json", ".data/serialization_id")
        hashed = sorted((name, data) for name, data in records.items() if name not in unhashed)
        meta[CHECKSUM_KEY] = file_checksum(meta, hashed)
        records = {**records, "extra/asag.json": json.dumps(meta).encode()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records.items():
            archive.writestr(f"{root}/{name}", data)
    return path


class Marker:
    """A pickle that creates ``path`` when it is unpickled (what a malicious archive would run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def pickled_weight(records: dict[str, bytes], marker: Path) -> None:
    config = json.loads(records["data/weights/model_weights_config.json"])
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True
    records["data/weights/model_weights_config.json"] = json.dumps(config).encode()
    records[f"data/weights/{entry['path_name']}"] = pickle.dumps(Marker(marker))


def pickled_sample_inputs(records: dict[str, bytes], marker: Path) -> None:
    records["data/sample_inputs/model.pt"] = pickle.dumps(Marker(marker))


def pickled_constant(records: dict[str, bytes], marker: Path) -> None:
    records["data/constants/model_constants_config.json"] = json.dumps(
        {"config": {"obj": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False,
                            "tensor_meta": None}}}).encode()
    records["data/constants/opaque_obj_0"] = pickle.dumps(Marker(marker))


def legacy_weights_file(records: dict[str, bytes], marker: Path) -> None:
    records["data/weights/model.pt"] = pickle.dumps(Marker(marker))


def guard_code(records: dict[str, bytes], marker: Path) -> None:
    program = json.loads(records["models/model.json"])
    program["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).touch()"]
    records["models/model.json"] = json.dumps(program).encode()


def foreign_operator(records: dict[str, bytes], marker: Path) -> None:
    program = json.loads(records["models/model.json"])
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.load_library"
    records["models/model.json"] = json.dumps(program).encode()


def foreign_operator_in_a_loop(records: dict[str, bytes], marker: Path) -> None:
    """A while_loop (allowed: the graph loop of the patch NMS) whose body graph calls a foreign operator."""
    program = json.loads(records["models/model.json"])
    body = {"inputs": [], "outputs": [], "nodes": [{"target": "torch.ops.load_library", "inputs": [],
                                                     "outputs": [], "metadata": {}}]}
    program["graph_module"]["graph"]["nodes"][0] = {
        "target": "torch.ops.higher_order.while_loop", "outputs": [], "metadata": {},
        "inputs": [{"name": "body_fn", "arg": {"as_graph": {"name": "body_graph_0", "graph": body}}}]}
    records["models/model.json"] = json.dumps(program).encode()


def symbolic_expression(records: dict[str, bytes], marker: Path) -> None:
    program = json.loads(records["models/model.json"])
    program["range_constraints"] = {f"__import__('pathlib').Path({str(marker)!r}).touch()": {}}
    records["models/model.json"] = json.dumps(program).encode()


def compiled_library(records: dict[str, bytes], marker: Path) -> None:
    records["data/aotinductor/model/model.so"] = b"\x7fELF"


CRAFTED = {
    "pickled_weight": (pickled_weight, "a pickled payload"),
    "pickled_sample_inputs": (pickled_sample_inputs, "pickled sample inputs"),
    "pickled_constant": (pickled_constant, "an unexpected record"),
    "legacy_weights_file": (legacy_weights_file, "an unexpected record"),
    "guard_code": (guard_code, "guard code"),
    "foreign_operator": (foreign_operator, "a call of 'torch.ops.load_library'"),
    "foreign_operator_in_a_loop": (foreign_operator_in_a_loop, "a call of 'torch.ops.load_library'"),
    "symbolic_expression": (symbolic_expression, "symbolic shape constraints"),
    "compiled_library": (compiled_library, "an unexpected record"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_pt2_archive_that_could_run_code_is_refused_before_anything_is_unpickled(exported, tmp_path, case):
    craft, what = CRAFTED[case]
    marker = tmp_path / "marker"
    root, records = pt2_records(exported("pt2"))
    craft(records, marker)
    path = write_pt2(tmp_path / "crafted.pt2", root, records)
    text = one_line_error(lambda: ExportedModel(path))
    assert text.startswith(f"{path}: ") and ("refused" in text or "corrupted" in text), text
    assert re.search(what, text), text
    assert not marker.exists()


def test_the_legacy_zip_format_of_torch_export_load_is_never_reached(exported, tmp_path):
    """torch.export.load falls back to an older zip layout (``version``, ``serialized_*.pt`` pickles at
    the top level) when the archive reader finds no program; such a file is refused first."""
    marker = tmp_path / "marker"
    _, records = pt2_records(exported("pt2"))
    with zipfile.ZipFile(tmp_path / "old.pt2", "w") as archive:
        archive.writestr("version", "8.20")
        archive.writestr("serialized_exported_program.json", records["models/model.json"])
        archive.writestr("serialized_state_dict.pt", pickle.dumps(Marker(marker)))
        archive.writestr("serialized_constants.pt", pickle.dumps(Marker(marker)))
    text = one_line_error(lambda: ExportedModel(tmp_path / "old.pt2"))
    assert "an unexpected record 'version'" in text
    assert not marker.exists()


def test_predict_refuses_a_crafted_archive_in_one_line(exported, tmp_path, capsys):
    marker = tmp_path / "marker"
    root, records = pt2_records(exported("pt2"))
    pickled_weight(records, marker)
    path = write_pt2(tmp_path / "crafted.pt2", root, records)
    image = write_image(tmp_path / "img.png", 320, 320)
    assert main(["predict", str(path), str(image), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"asag predict: error: {path}: refused"), err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow  # about 40 s on the loaded 2-core machine; tests/test_export.py loads (and so checks)
# the archives of its default exports too
def test_asag_export_pt2_writes_no_pickle(tiny_checkpoint, tmp_path):
    """The detector's archive (buffers, constants, sample inputs) holds only raw tensors and JSON."""
    out = tmp_path / "detector.pt2"
    assert main(["export", str(tiny_checkpoint / "ckpt.pth"), "--size", "64x64", "--out", str(out)]) == 0
    _, records = pt2_records(out)
    assert all(PT2_ENTRY.fullmatch(name) for name in records), sorted(records)
    assert records["data/sample_inputs/model.pt"] == b""
    weights = json.loads(records["data/weights/model_weights_config.json"])["config"]
    constants = json.loads(records["data/constants/model_constants_config.json"])["config"]
    assert len(weights) > 100 and not any(entry["use_pickle"] for entry in [*weights.values(),
                                                                          *constants.values()])
    assert not any(name.endswith((".pt", ".pkl")) and data for name, data in records.items())
    model = ExportedModel(out)
    assert re.fullmatch("[0-9a-f]{64}", model.metadata[CHECKSUM_KEY]) and model.size == (64, 64)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------ checksum, metadata


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_bytes_flipped_in_the_middle_are_a_one_line_error(exported, fmt, tmp_path, capsys):
    path = exported(fmt)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    text = one_line_error(lambda: ExportedModel(path))
    assert text.startswith(f"{path}: corrupted (") and text.endswith(") — re-export it"), text
    image = write_image(tmp_path / "img.png", 320, 320)
    assert main(["predict", str(path), str(image), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: corrupted (" in err[0], err


def test_a_changed_weight_is_a_checksum_mismatch(exported, tmp_path):
    onnx = pytest.importorskip("onnx")
    path = exported("onnx")
    proto = onnx.load(str(path))
    weight = proto.graph.initializer[0]
    raw = bytearray(weight.raw_data)
    raw[len(raw) // 2] ^= 0xFF
    weight.raw_data = bytes(raw)
    onnx.save(proto, str(path))
    assert one_line_error(lambda: ExportedModel(path)) == mismatch(path)

    path = exported("pt2")
    root, records = pt2_records(path)
    raw = bytearray(records["data/weights/weight_0"])
    raw[0] ^= 0xFF
    records["data/weights/weight_0"] = bytes(raw)
    write_pt2(path, root, records, sign=False)  # valid zip CRCs, stale checksum
    assert one_line_error(lambda: ExportedModel(path)) == mismatch(path)


def mismatch(path: Path) -> str:
    return f"{path}: corrupted (checksum mismatch) — re-export it"


def set_metadata(path: Path, text: str) -> None:
    """Replace the asag metadata of an exported file by ``text`` (valid zip / protobuf around it)."""
    if path.suffix == ".pt2":
        root, records = pt2_records(path)
        write_pt2(path, root, {**records, "extra/asag.json": text.encode()}, sign=False)
        return
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"asag": text})
    onnx.save(proto, str(path))


def forged(meta: dict, **changes) -> str:
    out = {**meta, **changes}
    return json.dumps({k: v for k, v in out.items() if v is not ...})


GARBLED = {
    "not_json": (lambda meta: '{"size": [160, 1', "not valid JSON"),
    "not_an_object": (lambda meta: "[1, 2]", "is not a JSON object"),
    "no_size": (lambda meta: forged(meta, size=...), "has no 'size' entry"),
    "size_text": (lambda meta: forged(meta, size="160x160"), "entry 'size' is not a list"),
    "size_zero": (lambda meta: forged(meta, size=[0, 160]), "entry 'size' is not \\[height, width\\]"),
    "batch_text": (lambda meta: forged(meta, batch_size="1"), "entry 'batch_size' is not a int"),
    "batch_bool": (lambda meta: forged(meta, batch_size=True), "entry 'batch_size' is not a int"),
    "config_number": (lambda meta: forged(meta, config=5), "entry 'config' is not a dict"),
    "checksum_number": (lambda meta: forged(meta, sha256=12), "entry 'sha256' is not a SHA-256"),
}


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("case", list(GARBLED))
def test_garbled_metadata_is_one_checkpoint_error(exported, metadata, fmt, case):
    make, message = GARBLED[case]
    path = exported(fmt)
    set_metadata(path, make(metadata))
    text = one_line_error(lambda: ExportedModel(path))
    assert text.startswith(f"{path}: corrupted (its asag metadata ") and re.search(message, text), text


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_forged_metadata_that_passes_its_checksum_is_still_checked(exported, metadata, fmt):
    """A forger can recompute the checksum (it detects damage, it is no signature): the configuration,
    the label map and the size must still fit, before ONNX Runtime or torch would fail on them."""
    cases = [
        ({"config": {"model": {"num_classes": "five"}}}, "the stored configuration is invalid"),
        ({"label_map": {"names": ["a"]}}, "the stored label map has no 'category_ids' entry"),
        ({"label_map": {"category_ids": [1], "names": ["a"]}}, "its label map has 1 categories, fewer"),
        ({"size": [320, 320]}, r"does not match its asag metadata \(batch 1, size 320x320\)"),
    ]
    for changes, message in cases:
        path = exported(fmt)
        meta = {**metadata, **changes}
        if fmt == "pt2":
            root, records = pt2_records(path)
            write_pt2(path, root, {**records, "extra/asag.json": json.dumps(meta).encode()})
        else:
            onnx = pytest.importorskip("onnx")
            proto = onnx.load(str(path))
            del proto.metadata_props[:]
            meta[CHECKSUM_KEY] = file_checksum(meta, [("model.onnx", proto.SerializeToString())])
            set_metadata(path, json.dumps(meta))
        text = one_line_error(lambda path=path: ExportedModel(path))
        assert text.startswith(f"{path}: ") and re.search(message, text), (changes, text)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_file_without_checksum_loads_with_a_warning(exported, metadata, fmt, tmp_path, capsys):
    path = exported(fmt)
    set_metadata(path, json.dumps(metadata))  # what asag export wrote before the checksum
    with pytest.warns(ExportWarning, match=re.escape(f"{path}: no checksum")):
        model = ExportedModel(path)
    assert model.size == SIZE and CHECKSUM_KEY not in model.metadata
    image = write_image(tmp_path / "img.png", 320, 320)
    assert main(["predict", str(path), str(image), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"asag predict: warning: {path}: no checksum (exported before asag stored one), so damage cannot be "
        "detected; re-export it"]


def test_the_checksum_covers_the_metadata(exported, metadata):
    path = exported("onnx")
    onnx = pytest.importorskip("onnx")
    meta = json.loads(next(p.value for p in onnx.load(str(path)).metadata_props if p.key == "asag"))
    meta["label_map"]["names"][0] = "renamed"
    set_metadata(path, json.dumps(meta))
    assert one_line_error(lambda: ExportedModel(path)) == mismatch(path)


# ------------------------------------------------------------------------------------- asag export


@pytest.fixture
def tiny_graph(monkeypatch):
    """``asag export`` traces :class:`TinyDeployed` instead of the detector (seconds, not minutes)."""
    monkeypatch.setattr(asag.export, "DeployedDetector", lambda model: TinyDeployed())


def export_args(tiny_checkpoint, out, *extra) -> list[str]:
    return ["export", str(tiny_checkpoint / "ckpt.pth"), "--size", f"{SIZE[0]}x{SIZE[1]}", "--out", str(out),
            *extra]


def last_error(capsys, command: str = "export") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith(f"asag {command}: ") for line in err), err
    return err[-1]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_refuses_an_existing_file_unless_overwrite(tiny_checkpoint, tmp_path, tiny_graph, capsys, fmt):
    out = tmp_path / f"m.{fmt}"
    out.write_bytes(b"an earlier export")
    missing = tmp_path / "missing.pth"  # the refusal comes before the model loads
    assert main(["export", str(missing), "--size", "160x160", "--out", str(out)]) == 2
    assert last_error(capsys) == (f"asag export: error: --out {out} already exists; pass --overwrite to "
                                  f"replace it or choose another --out")
    assert out.read_bytes() == b"an earlier export"
    assert main(export_args(tiny_checkpoint, out, "--overwrite")) == 0
    assert ExportedModel(out).size == SIZE
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_export_errors_come_before_the_model_loads(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "missing.pth")
    (tmp_path / "folder.onnx").mkdir()
    cases = [
        (["--size", "160x160", "--out", str(tmp_path / "folder.onnx")], f"--out {tmp_path / 'folder.onnx'}: "
                                                                         "is a folder; give a file name"),
        (["--size", "32000x32000", "--out", str(tmp_path / "m.pt2")],
         "--size 32000x32000 --batch-size 1: the padded input [B, 3, H, W] would take 11.4 GiB; an export "
         "allows at most 1 GiB"),
        (["--size", "4096x4096", "--batch-size", "8", "--out", str(tmp_path / "m.pt2")],
         "would take 1.5 GiB"),
    ]
    for args, message in cases:
        assert main(["export", missing, *args]) == 2, args
        assert message in last_error(capsys), args

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(asag.outputs.tempfile, "TemporaryFile", denied)  # running as root: simulated
    assert main(["export", missing, "--size", "160x160", "--out", str(tmp_path / "ro" / "m.onnx")]) == 2
    assert last_error(capsys).endswith(f"--out {tmp_path / 'ro'}: cannot write there (Permission denied)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.onnx", "ro"] and not any(
        (tmp_path / "ro").iterdir())


def test_check_export_size_limits_the_input_tensor():
    check_export_size((1344, 1344), 8)
    check_export_size((9440, 9440), 1)
    with pytest.raises(ConfigError, match="an export allows at most 1 GiB"):
        check_export_size((9472, 9472), 1)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_full_disk_keeps_the_earlier_export(tiny_checkpoint, tmp_path, tiny_graph, monkeypatch, capsys,
                                              fmt):
    out = tmp_path / f"m.{fmt}"
    assert main(export_args(tiny_checkpoint, out)) == 0
    earlier = out.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assert main(export_args(tiny_checkpoint, out, "--overwrite")) == 1
    assert last_error(capsys) == f"asag export: error: {out}: No space left on device"
    assert out.read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left


def test_ctrl_c_during_the_write_leaves_a_whole_file(tiny_checkpoint, tmp_path, tiny_graph, monkeypatch,
                                                     capsys, sigint_handler):
    sigint_handler(signal.default_int_handler)  # also when pytest runs with SIGINT ignored
    out = tmp_path / "m.pt2"
    assert main(export_args(tiny_checkpoint, out)) == 0
    earlier = out.read_bytes()
    real_fsync = os.fsync

    def interrupted(fd):  # KeyboardInterrupt inside the write: the earlier file stays
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    assert main(export_args(tiny_checkpoint, out, "--overwrite")) == 130
    assert out.read_bytes() == earlier and sorted(p.name for p in tmp_path.iterdir()) == [out.name]

    def ctrl_c(fd):  # Ctrl-C while the file is written: held back until it is whole, then raised
        os.kill(os.getpid(), signal.SIGINT)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", ctrl_c)
    assert main(export_args(tiny_checkpoint, out, "--overwrite", "--batch-size", "2")) == 130
    assert "asag export: interrupted" in capsys.readouterr().err
    assert ExportedModel(out).batch_size == 2 and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_running_out_of_memory_while_tracing_is_one_line(tiny_checkpoint, tmp_path, tiny_graph, monkeypatch,
                                                         capsys):
    def no_memory(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 11796480000 bytes.\nError code 12")

    monkeypatch.setattr(asag.export, "_pt2_bytes", no_memory)
    out = tmp_path / "m.pt2"
    assert main(export_args(tiny_checkpoint, out)) == 2
    assert f"{out}: out of memory while exporting (" in last_error(capsys)
    assert not out.exists()


# ------------------------------------------------------------------- exported files elsewhere


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_load_checkpoint_names_an_exported_model(exported, tmp_path, fmt):
    path = exported(fmt)
    expected = f"{path} is an exported model (ONNX/.pt2): use asag predict"
    assert one_line_error(lambda: load_checkpoint(path)) == expected
    if fmt == "pt2":  # also under another name
        renamed = path.rename(tmp_path / "model.pth")
        assert "is an exported model" in one_line_error(lambda: load_checkpoint(renamed))


def test_eval_and_resume_name_an_exported_model(exported, tiny_checkpoint, tmp_path, capsys):
    onnx_file, pt2_file = exported("onnx"), exported("pt2")
    assert main(["eval", str(onnx_file), "--out", str(tmp_path / "ev")]) == 2
    assert last_error(capsys, "eval") == (f"asag eval: error: {onnx_file} is an exported model (ONNX/.pt2): "
                                          f"use asag predict")
    assert main(["train", "tiny_cpu", f"data.root={tiny_checkpoint / 'data'}", "--resume", str(pt2_file),
                 "--output-dir", str(tmp_path / "run")]) == 2
    expected = f"{pt2_file} is an exported model (ONNX/.pt2): use asag predict"
    assert last_error(capsys, "train").endswith(expected)


def write_image(path: Path, h: int, w: int) -> Path:
    rng = np.random.default_rng(h * w)
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_predict_skips_an_image_larger_than_the_export_like_an_unreadable_one(exported, tmp_path, capsys,
                                                                               fmt):
    path = exported(fmt)
    square = write_image(tmp_path / "square.png", 320, 320)  # resized to 160 x 160: fits
    wide = write_image(tmp_path / "wide.png", 320, 480)  # resized to 160 x 240: does not
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["predict", str(path), str(wide), str(square), str(broken), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"asag predict: error: {wide}: {path}: a resized image of 160x256 px does not "
                             f"fit the exported input size 160x160"), err  # 160 x 240, padded to 32
    assert str(broken) in err[1]
    assert err[-1] == ("asag predict: error: 2 of 3 images could not be read or processed (listed above); "
                       "the others were processed") and len(err) == 3
    records = json.loads((out / "predictions.json").read_text())
    assert [r["file"] for r in records] == [str(square)] and records[0]["detections"]


def test_a_loaded_file_is_read_once(exported, monkeypatch):
    """The bytes that were checked are the bytes that run: torch and ONNX Runtime get them from memory."""
    path = exported("pt2")
    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real(self))
    monkeypatch.setattr(torch.export, "load", _only_buffers(torch.export.load))
    ExportedModel(path)
    assert reads == [path]


def _only_buffers(load):
    def checked(f, **kwargs):
        assert isinstance(f, io.BytesIO)
        return load(f, **kwargs)

    return checked


# ------------------------------------------------------------------------- runtimes and precision


def test_runtime_and_precision_combinations_are_refused_in_one_line(exported, tiny_checkpoint, tmp_path,
                                                                      capsys):
    onnx_path, pt2_path = exported("onnx"), exported("pt2")
    cases = [
        (lambda: ExportedModel(onnx_path, precision="bf16"),
         f"{onnx_path}: precision bf16 needs runtime openvino (ONNX Runtime runs the exported float32 graph"),
        (lambda: ExportedModel(pt2_path, precision="bf16"),
         f"{pt2_path}: precision bf16 needs runtime openvino (torch runs"),
        (lambda: ExportedModel(pt2_path, runtime="openvino"),
         f"{pt2_path}: runtime openvino runs .onnx files; a .pt2 file runs with torch"),
        (lambda: ExportedModel(onnx_path, runtime="tensorrt"),
         "runtime 'tensorrt': choose onnxruntime or openvino"),
        (lambda: ExportedModel(onnx_path, runtime="openvino", precision="fp16"),
         "precision 'fp16': an exported model runs in fp32 or bf16 (bf16 with runtime openvino)"),
        (lambda: ExportedModel(onnx_path, "cuda", runtime="openvino"),
         f"{onnx_path}: runtime openvino runs on the CPU, not on device cuda"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as err:
            call()
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    image = write_image(tmp_path / "img.png", 320, 320)
    out = str(tmp_path / "out")
    assert main(["predict", str(onnx_path), str(image), "--out", out, "--precision", "bf16"]) == 2
    assert "precision bf16 needs runtime openvino" in capsys.readouterr().err
    ckpt = str(tiny_checkpoint / "ckpt.pth")
    assert main(["predict", ckpt, str(image), "--out", out, "--runtime", "openvino"]) == 2
    expected = f"asag predict: error: {ckpt}: --runtime chooses the runtime of an exported model (.onnx)"
    assert capsys.readouterr().err.strip() == f"{expected}; a checkpoint runs with torch"


def test_openvino_missing_is_one_line_naming_its_extra(exported, monkeypatch):
    import importlib

    path = exported("onnx")
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "openvino"
                        else real(name, *a))
    with pytest.raises(ConfigError) as err:
        ExportedModel(path, runtime="openvino")
    assert str(err.value) == ("running an ONNX model with OpenVINO needs the 'openvino' package: "
                              'pip install "asag[openvino]"')


def test_openvino_compiles_the_checked_bytes_with_the_configured_threads(exported, monkeypatch):
    """The safety checks run before OpenVINO sees the file, and OpenVINO compiles the bytes that were
    checked, with torch's thread count, the latency hint and float32."""
    ov = pytest.importorskip("openvino")
    path = exported("onnx")
    read = []

    class RecordingCore(ov.Core):
        def read_model(self, model, *args):
            read.append(model)
            return super().read_model(model, *args)

    monkeypatch.setattr(ov, "Core", RecordingCore)
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(path))
    raw = bytearray(proto.graph.initializer[0].raw_data)
    raw[len(raw) // 2] ^= 0xFF
    proto.graph.initializer[0].raw_data = bytes(raw)
    damaged = path.with_name("damaged.onnx")
    onnx.save(proto, str(damaged))
    assert one_line_error(lambda: ExportedModel(damaged, runtime="openvino")) == mismatch(damaged)
    assert read == []
    torch.set_num_threads(1)
    runner = ExportedModel(path, runtime="openvino")
    assert read == [path.read_bytes()]
    compiled = runner.request.get_compiled_model()
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    images, sizes, orig = example_inputs(BATCH, SIZE)
    expected = ExportedModel(path).run(images, sizes, orig)
    got = runner.run(images, sizes, orig)
    assert got.labels.dtype == torch.int64 and got.valid.dtype == torch.bool
    for name in ("boxes", "scores", "labels", "valid"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=0)


def test_bf16_is_refused_on_a_cpu_without_native_bf16(exported, monkeypatch):
    pytest.importorskip("openvino")
    path = exported("onnx")
    monkeypatch.setattr(asag.export, "openvino_native_bf16", lambda core: False)
    with pytest.raises(ConfigError) as err:
        ExportedModel(path, runtime="openvino", precision="bf16")
    assert str(err.value) == (f"{path}: precision bf16: this CPU has no native bfloat16 support "
                              "(AVX512-BF16/AMX), OpenVINO would emulate it; use fp32")
