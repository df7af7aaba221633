"""Videos, streams and folders of frames (asag.video, ``asag predict VIDEO``): frames and timestamps, the
annotated video's frame count, rate and size, frames.jsonl, batching, unreadable and damaged files, a
missing PyAV."""

import importlib
import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from asag.api import Detection, Detector
from asag.cli import main
from asag.errors import ConfigError, DataError
from asag.video import (
    H264,
    FrameFolderReader,
    VideoDecodeError,
    VideoDetections,
    VideoWriter,
    is_video_spec,
    natural_key,
    pixel_format,
    video_encoder,
    video_name,
    write_video_predictions,
)
from asag.viz.draw import draw_detections

av = pytest.importorskip("av")

WIDTH, HEIGHT, FPS, FRAMES = 96, 64, 10, 12


def frame_pixels(index: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """``[H, W, 3]`` uint8: a red rectangle moving right by 6 px per frame on grey."""
    pixels = np.full((height, width, 3), 90, dtype=np.uint8)
    pixels[10:30, 5 + 6 * index:25 + 6 * index] = (255, 0, 0)
    return pixels


def write_video(path: Path, frames: int = FRAMES, fps: int = FPS, codec: str = "mpeg4",
                options: dict | None = None) -> Path:
    """A tiny test video written with PyAV (``options``: the muxer's)."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_pixels(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_video(path: Path) -> tuple[dict, list]:
    """(stream facts, decoded frames) of a written video."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        return {"codec": stream.codec_context.name, "rate": stream.average_rate, "frames": stream.frames,
                "size": (stream.width, stream.height)}, frames


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint evaluating at the test videos' own size (64 px short side; fast)."""
    ckpt = torch.load(tiny_checkpoint / "ckpt.pth", weights_only=True)
    ckpt["config"]["data"].update(val_size=HEIGHT, val_max_size=WIDTH)
    path = tmp_path_factory.mktemp("video_ckpt") / "small.pth"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def detector(checkpoint) -> Detector:
    return Detector.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


# ------------------------------------------------------------------------------------------- API


def test_api_iterates_every_frame_in_batches_with_stream_timestamps(detector, video, monkeypatch):
    batches = []
    predict_raw = detector.predict_raw
    monkeypatch.setattr(detector, "predict_raw",
                        lambda images: batches.append(len(images)) or predict_raw(images))
    with detector.predict_video(video, batch_size=5, topk=3) as frames:
        assert (frames.fps, frames.frame_count) == (FPS, FRAMES)
        results = list(frames)
    assert batches == [5, 5, 2]
    assert [r.index for r in results] == list(range(FRAMES))
    assert [r.timestamp for r in results] == pytest.approx([i / FPS for i in range(FRAMES)], abs=1e-6)
    assert all(r.image.size == (WIDTH, HEIGHT) and r.image.mode == "RGB" for r in results)
    assert all(len(r.detections) == 3 for r in results)
    # the frames are the video's: the red rectangle moves 6 px to the right per frame
    red = [np.nonzero((np.asarray(r.image)[20, :, 0] > 200) & (np.asarray(r.image)[20, :, 1] < 60))[0]
           for r in (results[0], results[5])]
    assert abs((red[1].min() - red[0].min()) - 30) <= 2
    record = results[1].to_dict()
    assert record["frame"] == 1 and record["timestamp"] == 0.1
    assert set(record["detections"][0]) == {"box_xyxy", "score", "category_id", "category_name"}


def test_api_frames_folder_in_natural_order_at_the_given_rate(detector, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for number, index in (("10", 2), ("2", 1), ("1", 0)):  # frame_10 comes last, not between 1 and 2
        PIL.Image.fromarray(frame_pixels(3 * index)).save(folder / f"frame_{number}.png")
    (folder / "notes.txt").write_text("not a frame")
    with detector.predict_video(folder, fps=4, topk=1) as frames:
        assert (frames.fps, frames.frame_count) == (4, 3)
        results = list(frames)
    assert [r.timestamp for r in results] == [0.0, 0.25, 0.5]
    assert all(np.array_equal(np.asarray(r.image), frame_pixels(3 * i)) for i, r in enumerate(results))
    assert sorted(["f10", "f2", "f1"], key=lambda n: natural_key(Path(n))) == ["f1", "f2", "f10"]


def test_api_bad_sources_are_one_data_error(detector, tmp_path, video):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 100)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(video.read_bytes()[: video.stat().st_size // 2])  # mp4 index (moov) at the end lost
    cases = [(garbage, "cannot read it as a video (Invalid data found when processing input)"),
             (truncated, "no video stream found (not a video, or truncated?)"),
             (tmp_path / "missing.mp4", "no such file"), (tmp_path, "folder contains no images")]
    for path, message in cases:
        with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
            detector.predict_video(path)
    with pytest.raises(ConfigError, match="fps is only for a folder of frames"):
        detector.predict_video(video, fps=5)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        detector.predict_video(video, batch_size=0)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_writes_annotated_video_and_frames_jsonl(checkpoint, video, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", str(checkpoint), str(video), "--out", str(out), "--batch-size", "4",
            "--score-threshold", "0", "--topk", "2"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"{video}: {FRAMES} frames, {2 * FRAMES} detections" in stdout and "frames/s" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["clip_frames.jsonl", "clip_pred.mp4"]
    facts, frames = read_video(out / "clip_pred.mp4")
    assert facts == {"codec": "h264" if video_encoder() == H264 else "mpeg4", "rate": FPS, "frames": FRAMES,
                     "size": (WIDTH, HEIGHT)}
    assert [float(f.time) for f in frames] == pytest.approx([i / FPS for i in range(FRAMES)])
    lines = [json.loads(line) for line in (out / "clip_frames.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(FRAMES))
    assert [line["timestamp"] for line in lines] == pytest.approx([i / FPS for i in range(FRAMES)])
    assert all(len(line["detections"]) == 2 for line in lines)
    # the video shows predict --draw's drawing of each frame's detections (up to compression)
    source = read_video(video)[1][0].to_image()
    detections = [Detection(d["box_xyxy"], d["score"], d["category_id"], d["category_name"])
                  for d in lines[0]["detections"]]
    drawn = np.asarray(draw_detections(source, detections), dtype=np.float32)
    shown = frames[0].to_ndarray(format="rgb24").astype(np.float32)
    undrawn = np.asarray(source, dtype=np.float32)
    assert np.abs(shown - drawn).mean() < 0.5 * np.abs(shown - undrawn).mean()
    # earlier results are never replaced without --overwrite
    assert main(argv) == 2
    assert "already holds clip_pred.mp4, clip_frames.jsonl; pass --overwrite" in capsys.readouterr().err


def test_cli_frames_folder_and_stream_url(checkpoint, tmp_path, capsys):
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        PIL.Image.fromarray(frame_pixels(i, width=95, height=63)).save(folder / f"{i}.png")  # odd sides
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(folder), "--frames", "--fps", "5", "--out", str(out)]) == 0
    facts, frames = read_video(out / "shots_pred.mp4")
    assert (facts["rate"], facts["frames"], facts["size"]) == (5, 3, (95, 63))
    assert [float(f.time) for f in frames] == pytest.approx([0.0, 0.2, 0.4])
    clip = write_video(tmp_path / "cam.mkv", frames=2)
    assert main(["predict", str(checkpoint), f"file://{clip}", "--out", str(out)]) == 0  # a URL
    assert len((out / "cam_frames.jsonl").read_text().splitlines()) == 2
    assert read_video(out / "cam_pred.mp4")[0]["frames"] == 2


def test_cli_unreadable_video_is_one_line_exit_2_and_writes_nothing(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.webm"
    bad.write_bytes(b"garbage" * 50)
    good = write_video(tmp_path / "good.avi", frames=2)
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"asag predict: error: {bad}: cannot read it as a video (Invalid data found when " \
                          "processing input)"
    assert not out.exists()  # all videos are opened before any work


def test_cli_decoding_error_part_way_keeps_valid_partial_outputs(checkpoint, video, tmp_path, capsys,
                                                                  monkeypatch):
    real_open = av.open

    class FailingContainer:
        """A real container whose decoding fails after 6 frames, as a damaged file does."""

        def __init__(self, container):
            self._container = container

        def __getattr__(self, name):
            return getattr(self._container, name)

        def decode(self, *args):
            for i, frame in enumerate(self._container.decode(*args)):
                if i == 6:
                    raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
                yield frame

    def failing_open(file, mode="r", **kwargs):
        container = real_open(file, mode, **kwargs)
        return FailingContainer(container) if mode == "r" else container

    monkeypatch.setattr(av, "open", failing_open)
    out = tmp_path / "out"
    argv = ["predict", str(checkpoint), str(video), "--out", str(out), "--batch-size", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"asag predict: error: {video}: decoding failed at frame 6 (Invalid data found when "
                   f"processing input); the 6 frames before it were written to {out / 'clip_pred.mp4'} and "
                   f"{out / 'clip_frames.jsonl'}")
    monkeypatch.undo()
    facts, frames = read_video(out / "clip_pred.mp4")  # a valid file: the frames of the pending batch too
    assert (facts["frames"], len(frames)) == (6, 6)
    assert len((out / "clip_frames.jsonl").read_text().splitlines()) == 6


def test_cli_video_that_ends_early_is_written_with_a_warning(checkpoint, tmp_path, capsys):
    clip = write_video(tmp_path / "early.mp4", options={"movflags": "faststart"})  # index first
    data = clip.read_bytes()
    clip.write_bytes(data[: len(data) * 2 // 3])  # the index still declares 12 frames
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(clip), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip()
    decoded = len((out / "early_frames.jsonl").read_text().splitlines())
    assert 0 < decoded < FRAMES and read_video(out / "early_pred.mp4")[0]["frames"] == decoded
    assert err == (f"asag predict: warning: {clip}: declares {FRAMES} frames, only {decoded} could be "
                   "decoded (truncated or damaged?)")


def test_interrupted_run_leaves_valid_outputs(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):
        PIL.Image.fromarray(frame_pixels(i)).save(folder / f"{i}.png")
    calls = []

    def predict(images):  # no model needed: Ctrl-C during the second batch
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [[] for _ in images]

    results = VideoDetections(FrameFolderReader(folder, fps=10), predict, batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        write_video_predictions(results, tmp_path / "v.mp4", tmp_path / "v.jsonl", progress=False)
    facts, frames = read_video(tmp_path / "v.mp4")
    assert (facts["frames"], len(frames)) == (4, 4)
    assert len((tmp_path / "v.jsonl").read_text().splitlines()) == 4


def test_missing_pyav_is_one_line_naming_the_extra(checkpoint, detector, video, tmp_path, capsys,
                                                    monkeypatch):
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "av"
                        else real(name, *a))
    message = "video input needs the 'av' package: pip install \"asag[video]\""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        detector.predict_video(video)
    assert main(["predict", str(checkpoint), str(video), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"asag predict: error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["a.png", "b.mp4"], "give either images or videos, not both in one run (a.png is an image input, "
                         "b.mp4 a video)"),
    (["--fps", "5", "b.mp4"], "--fps is the frame rate of --frames (a video has its own)"),
    (["missing.mkv"], "missing.mkv: no such file"),
    (["clips/*.MP4"], "clips/*.MP4: pattern matches no videos"),
    (["shots", "--frames"], "shots: no such folder or file"),
    (["notes.txt", "--frames"], "notes.txt: with --frames, give folders of frames (or videos)"),
])
def test_cli_input_rules_are_one_line(checkpoint, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a video")
    assert main(["predict", str(checkpoint), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"asag predict: error: {message}"


# -------------------------------------------------------------------------------- small helpers


def test_what_is_a_video_and_how_its_outputs_are_named():
    assert [is_video_spec(s) for s in ["a.MP4", "b.mkv", "c.webm", "d.avi", "x/*.mov", "rtsp://cam/live",
                                        "a.png", "folder", "*.jpg"]] == [True] * 6 + [False] * 3
    assert video_name("rtsp://user@cam:554/live/main?tcp") == Path("main")
    assert video_name("http://cam.local/") == Path("cam.local")
    assert video_name("clips/a.mp4") == Path("clips/a.mp4")


def test_writer_keeps_odd_sizes_and_places_frames_at_their_timestamps(tmp_path):
    assert pixel_format(H264, (96, 64)) == "yuv420p" and pixel_format(H264, (95, 64)) == "yuv444p"
    assert pixel_format("mpeg4", (95, 63)) == "yuv420p"
    with VideoWriter(tmp_path / "v.mp4", Fraction(25)) as writer:
        for t in (0.0, 0.04, 0.2, 0.2):  # a gap, then a repeated timestamp: the next slot
            writer.write(PIL.Image.fromarray(frame_pixels(1, width=95, height=63)), t)
        writer.write(PIL.Image.new("RGB", (40, 30)), 0.4)  # another size: scaled to the video's
    facts, frames = read_video(tmp_path / "v.mp4")
    assert facts["size"] == (95, 63) and len(frames) == 5
    assert [round(float(f.time), 2) for f in frames] == [0.0, 0.04, 0.2, 0.24, 0.4]


def test_decode_error_carries_the_frames_read():
    err = VideoDecodeError("x.mp4: decoding failed at frame 3 (bad)", 3)
    assert isinstance(err, DataError) and err.frames_read == 3
