"""Run logging: a JSON-lines metrics file, TensorBoard scalars and tqdm progress bars.

Only the main process writes (files, TensorBoard, progress bars); on other ranks every method is a
no-op, so callers never branch on the rank.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from asag.engine.distributed import is_main_process
from asag.errors import DataError
from asag.outputs import naming

T = TypeVar("T")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _json_safe(value: Any) -> Any:
    """Floats that are not finite become None (JSON has no NaN/inf); containers are converted."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _now() -> str:
    """Wall-clock time as ISO 8601 UTC with milliseconds, e.g. ``2026-12-03T08:30:00.123+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def flatten_scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested mapping as ``{"a/b": value}`` (booleans and strings dropped)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_scalars(value, prefix=f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError inside the block (a full disk) is raised again naming ``path``."""
    try:
        yield
    except OSError as err:
        raise naming(err, path) from None


def _append_line(handle: BinaryIO, line: str) -> None:
    """Append ``line`` and a newline to the unbuffered ``handle``; a failed write is cut off again, so the
    file keeps whole lines only."""
    start = handle.seek(0, os.SEEK_END)
    data = memoryview((line + "\n").encode("utf-8"))
    try:
        while data:  # a raw write may take only part of the bytes
            written = handle.write(data)
            if not written:
                raise OSError(errno.EIO, "the write took no bytes")
            data = data[written:]
    except OSError:
        with contextlib.suppress(OSError):
            handle.truncate(start)
        raise


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file written by :class:`RunLogger`, in file order (blank lines
    skipped). A line that is not a JSON object with a string ``kind`` and an integer ``step`` raises
    :class:`DataError` naming the file and the line."""
    path = Path(path)
    records = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
                record = json.loads(line) if line.strip() else None
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
                raise DataError(f"{path}, line {number}: not a JSON record ({reason})") from None
            if record is None:
                continue
            if not _is_record(record):
                raise DataError(f'{path}, line {number}: not a metrics record (a JSON object with a "kind" '
                                f'and an integer "step")')
            records.append(record)
    return records


def _is_record(value: Any) -> bool:
    step = value.get("step") if isinstance(value, dict) else None
    return (isinstance(value, dict) and isinstance(value.get("kind"), str) and isinstance(step, int)
            and not isinstance(step, bool))


def current_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records of the run as it stands, when ``--resume`` appended a continuation to the log.

    A resumed run starts again at the step of its checkpoint, so its first record of a kind has a step
    that is not larger than the last one of that kind: the records it supersedes (of that kind at this
    step or later, of other kinds after this step) are dropped. In particular, of several records of a
    kind at one step the last one is kept. Order is otherwise kept.
    """
    kept: list[Mapping[str, Any]] = []
    last: dict[str, int] = {}
    for record in records:
        kind, step = record["kind"], record["step"]
        if kind in last and step <= last[kind]:
            kept = [r for r in kept if r["step"] < step or (r["step"] == step and r["kind"] != kind)]
            last = {}
            for r in kept:
                last[r["kind"]] = max(last.get(r["kind"], r["step"]), r["step"])
        kept.append(record)
        last[kind] = step
    return kept


class RunLogger:
    """Writes one JSON object per logged step or epoch to ``<output_dir>/metrics.jsonl`` and the same
    numbers as TensorBoard scalars (tag ``<kind>/<name>``) under ``<output_dir>/tensorboard``. Every
    JSON record carries ``kind``, ``step``, ``time`` (wall clock, ISO 8601 UTC) and ``elapsed`` (seconds
    since the logger was created, i.e. since this process started the run).

    Args:
        output_dir: run folder; None logs nothing to disk (progress bars still work).
        tensorboard: also write TensorBoard event files.
        progress: show tqdm bars (only on the main process and when stderr is a terminal).
        enabled: override the main-process check (None: ``is_main_process()``).
    """

    def __init__(
        self,
        output_dir: str | Path | None,
        *,
        tensorboard: bool = True,
        progress: bool = True,
        enabled: bool | None = None,
    ):
        self.enabled = is_main_process() if enabled is None else enabled
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.show_progress = progress and self.enabled and sys.stderr.isatty()
        # Without a terminal (a file, a CI log) the loop prints plain progress lines instead of bars.
        self.plain_progress = progress and self.enabled and not sys.stderr.isatty()
        self._start = time.monotonic()
        self._tensorboard = tensorboard
        self._jsonl = None
        self._tb = None

    def _open(self) -> None:
        """Create the log files on the first record: a run that stops before logging anything (a data
        error, say) leaves no log behind."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.output_dir / METRICS_FILE).open("ab", buffering=0)
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when used

            self._tb = SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIR))

    def log(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        """Record ``values`` (nested dicts allowed) of type ``kind`` (e.g. "train", "epoch", "eval") at
        global ``step``: one JSON line, plus one TensorBoard scalar per numeric leaf.

        A write that fails (a full disk) raises OSError naming the file; ``metrics.jsonl`` is cut back
        to its last complete line."""
        if not self.enabled or self.output_dir is None:
            return
        if self._jsonl is None:
            with _naming(self.output_dir / METRICS_FILE):
                self._open()
        record = {"kind": kind, "step": int(step), "time": _now(),
                  "elapsed": round(time.monotonic() - self._start, 3), **_json_safe(dict(values))}
        with _naming(self.output_dir / METRICS_FILE):
            _append_line(self._jsonl, json.dumps(record))
        if self._tb is not None:
            with _naming(self.output_dir / TENSORBOARD_DIR):
                for tag, value in flatten_scalars(values).items():
                    if math.isfinite(value):
                        self._tb.add_scalar(f"{kind}/{tag}", value, global_step=int(step))

    def info(self, message: str) -> None:
        """A human-readable line on stderr (main process only; does not break progress bars)."""
        if not self.enabled:
            return
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)

    def progress(self, iterable: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
        """``iterable`` wrapped in a tqdm bar with ETA when progress display is on, else unchanged."""
        if not self.show_progress:
            return iter(iterable)
        from tqdm import tqdm

        return iter(tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            tb, self._tb = self._tb, None
            with _naming(self.output_dir / TENSORBOARD_DIR):
                tb.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
