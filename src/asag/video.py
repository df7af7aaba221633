"""Videos, streams and folders of frames in; annotated videos and per-frame detections out.

Reading (:func:`open_frames`): a video file or a stream URL (whatever FFmpeg opens: ``.mp4``, ``.avi``,
``.mkv``, ``.webm``, ``rtsp://...``) through PyAV, the ``video`` extra (``pip install "asag[video]"``),
or a folder of images as the frames of one video at a given frame rate. Frames come as :class:`Frame`
(index, timestamp in seconds since the stream's start, RGB PIL image), decoded one by one, so an
endless stream works too. A file that cannot be opened as a video is one :class:`DataError`; a decoding
error part way through is a :class:`VideoDecodeError` that says how many frames came before it.

Writing (:class:`VideoWriter`): an ``.mp4`` with H.264 (libx264, which PyAV's wheels include; even
sides: yuv420p, which every player takes; an odd side: yuv444p, which keeps the size exactly) or, in a
PyAV built without libx264, MPEG-4 part 2 (FFmpeg's own ``mpeg4`` encoder, yuv420p). The frame rate is
the source's; each frame is placed at its source timestamp (so a variable frame rate is kept); the size
is the first frame's (a later frame of another size, e.g. a stream changing resolution, is drawn scaled
to it).

:func:`write_video_predictions` drives both: ``NAME_pred.mp4`` plus ``NAME_frames.jsonl``, one JSON
object per frame (:meth:`FrameDetections.to_dict`). Every output is closed properly, also when decoding
fails or the run is interrupted, so what was written before stays a valid video.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import PIL.Image
from tqdm import tqdm

from asag.config import POSITIVE_REAL, check_number
from asag.data.formats import IMAGE_SUFFIXES, is_image_file
from asag.data.image import open_image
from asag.errors import ConfigError, DataError, OutputError
from asag.extras import require
from asag.viz.draw import draw_detections

if TYPE_CHECKING:
    from asag.api import Detection

VIDEO_EXTRA = "video"
# Inputs that `asag predict` reads as videos (any case); anything FFmpeg opens works through the API.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm")
URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # rtsp://, http://, file:// ...
DEFAULT_FPS = 30.0  # frame rate of a folder of frames, and of a stream that declares none
DEFAULT_BATCH_SIZE = 4
STREAM_TIMEOUT_S = 30.0  # a stream URL that sends nothing for this long is an error, not a hang
# Encoders of the annotated video, preferred first: H.264 (in PyAV's wheels), MPEG-4 part 2 (in every FFmpeg).
ENCODERS = ("libx264", "mpeg4")
H264 = "libx264"
OUTPUT_FORMAT = "mp4"
TIMESTAMP_DIGITS = 6  # microseconds in frames.jsonl


def require_av() -> ModuleType:
    """PyAV, or a one-line ConfigError naming the ``video`` extra."""
    return require("av", "video input", VIDEO_EXTRA)


def is_stream_url(spec: str) -> bool:
    """Whether ``spec`` is a URL (``scheme://...``) rather than a file name."""
    return bool(URL_PATTERN.match(spec))


def is_video_spec(spec: str) -> bool:
    """Whether ``asag predict`` reads input ``spec`` as a video: a URL, or a name (or glob pattern)
    ending in one of :data:`VIDEO_SUFFIXES`, any case."""
    return is_stream_url(spec) or Path(spec).suffix.lower() in VIDEO_SUFFIXES


def video_name(spec: str) -> Path:
    """A path whose stem names the outputs of video ``spec``: the file itself, or for a URL its last path
    part (``rtsp://cam/live/main`` -> ``main``; its host when the path is empty)."""
    if not is_stream_url(spec):
        return Path(spec)
    rest = URL_PATTERN.sub("", spec).split("?")[0].rstrip("/")
    return Path(rest.rsplit("/", 1)[-1] or "stream")


# ------------------------------------------------------------------------------------------ frames


@dataclass(frozen=True)
class Frame:
    """One decoded frame: ``index`` from 0 in decoding order, ``timestamp`` in seconds since the start of
    the stream, ``image`` 8-bit RGB."""

    index: int
    timestamp: float
    image: PIL.Image.Image


@dataclass
class FrameDetections:
    """The detections of one frame (boxes in its pixels) and the frame itself."""

    index: int
    timestamp: float
    detections: list[Detection]
    image: PIL.Image.Image = field(repr=False)

    def to_dict(self) -> dict:
        """One line of ``frames.jsonl``: ``{"frame": index, "timestamp": seconds, "detections": [records
        as in predictions.json: box_xyxy, score, category_id, category_name]}``."""
        return {"frame": self.index, "timestamp": round(self.timestamp, TIMESTAMP_DIGITS),
                "detections": [d.to_dict() for d in self.detections]}


class VideoDecodeError(DataError):
    """Decoding failed part way through: ``frames_read`` frames were decoded before the failure."""

    def __init__(self, message: str, frames_read: int) -> None:
        super().__init__(message)
        self.frames_read = frames_read


class FrameSource(Protocol):
    """What :func:`open_frames` returns: frames in order, the frame rate, the frame count if known."""

    name: str
    fps: Fraction
    frame_count: int | None

    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...


def _reason(err: BaseException) -> str:
    """FFmpeg's short reason (``Invalid data found when processing input``), without errno and file."""
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


class VideoReader:
    """The first video stream of a file or URL, decoded by PyAV (module docstring).

    ``fps``: the stream's average frame rate (else FFmpeg's guess, else :data:`DEFAULT_FPS`);
    ``frame_count``: as declared by the container, None when unknown (mkv, webm, streams).
    """

    def __init__(self, source: str | os.PathLike) -> None:
        av = require_av()
        self.name = str(source)
        url = is_stream_url(self.name)
        if not url and not Path(source).is_file():
            reason = "is a folder (a folder of frames goes with --frames)" if Path(source).is_dir() \
                else "no such file"
            raise DataError(f"{source}: {reason}")
        try:
            self._container = av.open(self.name, timeout=STREAM_TIMEOUT_S if url else None)
        except (av.error.FFmpegError, OSError) as err:
            raise DataError(f"{source}: cannot read it as a video ({_reason(err)})") from None
        if not self._container.streams.video:
            self._container.close()
            raise DataError(f"{source}: no video stream found (not a video, or truncated?)")
        # FFmpeg's default (slice) threading: frame threading would drop decoding errors silently.
        self._stream = self._container.streams.video[0]
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = Fraction(rate) if rate else Fraction(DEFAULT_FPS)
        self.frame_count = self._stream.frames or None
        self._origin = self._stream.start_time  # pts of the stream's start; None: the first frame's

    def __iter__(self) -> Iterator[Frame]:
        av = require_av()
        decoded = self._container.decode(self._stream)
        index = 0
        while True:
            try:
                frame = next(decoded)
            except StopIteration:
                return
            except (av.error.FFmpegError, OSError) as err:
                raise VideoDecodeError(f"{self.name}: decoding failed at frame {index} ({_reason(err)})",
                                       index) from None
            yield Frame(index, self._timestamp(frame.pts, index), frame.to_image())
            index += 1

    def _timestamp(self, pts: int | None, index: int) -> float:
        """Seconds since the stream's start from ``pts`` and the time base; ``index / fps`` without them."""
        time_base = self._stream.time_base
        if pts is None or time_base is None:
            return float(index / self.fps)
        if self._origin is None:
            self._origin = pts
        return float((pts - self._origin) * time_base)

    def close(self) -> None:
        self._container.close()


def natural_key(path: Path) -> list:
    """Sort key of a file name with its numbers compared as numbers (``frame_2`` before ``frame_10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


class FrameFolderReader:
    """The images of a folder (:data:`asag.data.formats.IMAGE_SUFFIXES`, in natural order of their names)
    as the frames of one video at ``fps`` frames per second (frame ``i`` at ``i / fps`` s)."""

    def __init__(self, folder: str | os.PathLike, fps: float = DEFAULT_FPS) -> None:
        check_number("fps", fps, POSITIVE_REAL)
        self.name = str(folder)
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder")
        self.paths = sorted((p for p in folder.iterdir() if is_image_file(p)), key=natural_key)
        if not self.paths:
            raise DataError(f"{folder}: folder contains no images ({', '.join(IMAGE_SUFFIXES)})")
        self.fps = Fraction(str(float(fps)))  # 29.97 -> 2997/100, as typed
        self.frame_count = len(self.paths)

    def __iter__(self) -> Iterator[Frame]:
        for index, path in enumerate(self.paths):
            try:
                image = open_image(path)[0]
            except DataError as err:
                raise VideoDecodeError(f"{err} (frame {index})", index) from None
            yield Frame(index, float(index / self.fps), image)

    def close(self) -> None:
        pass


def open_frames(source: str | os.PathLike, fps: float | None = None) -> FrameSource:
    """A :class:`FrameFolderReader` for a folder (at ``fps``, default :data:`DEFAULT_FPS`), else a
    :class:`VideoReader` for a file or URL (``fps`` must be None: a video has its own rate)."""
    if not is_stream_url(str(source)) and Path(source).is_dir():
        return FrameFolderReader(source, DEFAULT_FPS if fps is None else fps)
    if fps is not None:
        raise ConfigError(f"{source}: fps is only for a folder of frames; a video has its own frame rate")
    return VideoReader(source)


# --------------------------------------------------------------------------------------- detecting

ImagePredictor = Callable[[list[PIL.Image.Image]], list[list["Detection"]]]


def detect_frames(frames: Iterable[Frame], predict: ImagePredictor, batch_size: int
                  ) -> Iterator[FrameDetections]:
    """Detections of ``frames``, predicted ``batch_size`` at a time (``predict``: images -> detections
    of each). When decoding fails part way, the frames decoded before the failure are still predicted
    and yielded, then the :class:`VideoDecodeError` is raised."""
    pending: list[Frame] = []
    iterator = iter(frames)
    while True:
        try:
            frame = next(iterator)
        except StopIteration:
            break
        except VideoDecodeError:
            yield from _predicted(pending, predict)
            raise
        pending.append(frame)
        if len(pending) >= batch_size:
            yield from _predicted(pending, predict)
            pending = []
    yield from _predicted(pending, predict)


def _predicted(frames: Sequence[Frame], predict: ImagePredictor) -> list[FrameDetections]:
    if not frames:
        return []
    detections = predict([f.image for f in frames])
    return [FrameDetections(f.index, f.timestamp, d, f.image) for f, d in zip(frames, detections)]


class VideoDetections(Iterator[FrameDetections]):
    """An iterator of :class:`FrameDetections` over a :class:`FrameSource`, with its ``name``, ``fps``
    and ``frame_count``; closes the source when exhausted, on an error, or by :meth:`close` (``with``)."""

    def __init__(self, source: FrameSource, predict: ImagePredictor, batch_size: int) -> None:
        self.source = source
        self.name, self.fps, self.frame_count = source.name, source.fps, source.frame_count
        self._results = detect_frames(source, predict, batch_size)

    def __iter__(self) -> VideoDetections:
        return self

    def __next__(self) -> FrameDetections:
        try:
            return next(self._results)
        except BaseException:  # StopIteration included: the source is done
            self.close()
            raise

    def close(self) -> None:
        self._results.close()
        self.source.close()

    def __enter__(self) -> VideoDetections:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------- writing


def video_encoder() -> str:
    """The first of :data:`ENCODERS` that this PyAV can write with."""
    av = require_av()
    for name in ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except (ValueError, av.error.FFmpegError):  # UnknownCodecError is a ValueError
            continue
        return name
    raise ConfigError(f"this PyAV ({av.__version__}) has none of the video encoders {', '.join(ENCODERS)}")


def pixel_format(encoder: str, size: tuple[int, int]) -> str:
    """yuv420p (every player), except for H.264 with an odd side, which needs yuv444p to keep the size."""
    odd = any(side % 2 for side in size)
    return "yuv444p" if encoder == H264 and odd else "yuv420p"


class VideoWriter:
    """An ``.mp4`` of RGB frames at ``fps`` (module docstring). The file is created by the first
    :meth:`write` (its size is the first frame's) and finished by :meth:`close` (``with``)."""

    def __init__(self, path: str | os.PathLike, fps: Fraction) -> None:
        self.path = Path(path)
        self.fps = Fraction(fps)
        self.encoder = video_encoder()
        self.size: tuple[int, int] | None = None
        self.frames_written = 0
        self._container = self._stream = None
        self._last_pts = -1

    def _open(self, size: tuple[int, int]) -> None:
        av = require_av()
        self._container = av.open(str(self.path), "w", format=OUTPUT_FORMAT)
        self._stream = self._container.add_stream(self.encoder, rate=self.fps)
        self._stream.width, self._stream.height = size
        self._stream.pix_fmt = pixel_format(self.encoder, size)
        self.size = size

    def write(self, image: PIL.Image.Image, timestamp: float) -> None:
        """Append ``image`` at ``timestamp`` seconds (at the next frame slot when that is not later than
        the previous frame's)."""
        av = require_av()
        try:
            if self._container is None:
                self._open(image.size)
            if image.size != self.size:
                image = image.resize(self.size, PIL.Image.BILINEAR)
            frame = av.VideoFrame.from_image(image.convert("RGB"))
            frame.pts = self._last_pts = max(round(timestamp * self.fps), self._last_pts + 1)
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        except av.error.FFmpegError as err:
            raise OutputError(f"{self.path}: cannot encode the video ({_reason(err)})") from None
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file (idempotent; nothing to do when nothing was written)."""
        if self._container is None:
            return
        container, self._container = self._container, None
        try:
            for packet in self._stream.encode():
                container.mux(packet)
        finally:
            container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def video_outputs(name: str) -> tuple[str, str]:
    """File names of the annotated video and the per-frame detections of the video named ``name``."""
    return f"{name}_pred.{OUTPUT_FORMAT}", f"{name}_frames.jsonl"


@dataclass(frozen=True)
class VideoSummary:
    """What :func:`write_video_predictions` wrote: frames, detections, the wall time in seconds, and the
    frame count the source declared (None: unknown)."""

    frames: int
    detections: int
    seconds: float
    declared_frames: int | None = None

    @property
    def missing_frames(self) -> int:
        """Frames the source declared but that were not decoded (a truncated file ends early without a
        decoding error)."""
        return max(0, (self.declared_frames or 0) - self.frames)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")


def write_video_predictions(results: VideoDetections, video: Path, jsonl: Path, *, progress: bool = True
                            ) -> VideoSummary:
    """Write the annotated video (detections drawn as by ``asag predict --draw``) and one line of
    ``jsonl`` per frame, with a progress bar over the frames (total: the declared frame count).

    Both files are closed properly whatever happens. A decoding failure part way is re-raised as a
    :class:`VideoDecodeError` that also says how many frames were written and where; when no frame
    was written, no output file is left.
    """
    frames = detections = 0
    start = time.perf_counter()
    bar = tqdm(total=results.frame_count, desc=Path(results.name).name, unit="frame",
               disable=None if progress else True)
    try:
        with results, VideoWriter(video, results.fps) as writer, jsonl.open("w", encoding="utf-8") as lines:
            for result in results:
                writer.write(draw_detections(result.image, result.detections), result.timestamp)
                lines.write(json.dumps(result.to_dict()) + "\n")
                frames, detections = frames + 1, detections + len(result.detections)
                bar.update()
    except VideoDecodeError as err:
        written = f"the {frames} frames before it were written to {video} and {jsonl}" if frames \
            else "nothing was written"
        raise VideoDecodeError(f"{err}; {written}", frames) from None
    finally:
        bar.close()
        if frames == 0:
            jsonl.unlink(missing_ok=True)
    if frames == 0:
        raise DataError(f"{results.name}: no frame could be decoded; nothing was written")
    return VideoSummary(frames, detections, time.perf_counter() - start, results.frame_count)
