import json
import math
import sys
import time
from datetime import datetime

from asag.engine.logger import METRICS_FILE, RunLogger, flatten_scalars


def test_jsonl_one_object_per_call_and_nan_as_null(tmp_path):
    with RunLogger(tmp_path, tensorboard=False, enabled=True) as logger:
        logger.log("train", 0, {"loss": 1.5, "terms": {"l1": 0.25}, "note": "x"})
        logger.log("epoch", 10, {"loss": math.nan, "per_class": {"cat": 0.5}})
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    clock = [(r.pop("time"), r.pop("elapsed")) for r in records]
    assert records == [
        {"kind": "train", "step": 0, "loss": 1.5, "terms": {"l1": 0.25}, "note": "x"},
        {"kind": "epoch", "step": 10, "loss": None, "per_class": {"cat": 0.5}},
    ]
    assert all(isinstance(t, str) and isinstance(e, float) for t, e in clock)


def test_every_record_has_wall_clock_time_and_elapsed_seconds(tmp_path):
    before = time.time()
    with RunLogger(tmp_path, tensorboard=False, enabled=True) as logger:
        logger.log("train", 0, {"loss": 1.5})
        time.sleep(0.05)
        logger.log("epoch", 1, {"loss": 1.0})
    after = time.time()
    first, second = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    for record in (first, second):
        assert before - 0.01 <= datetime.fromisoformat(record["time"]).timestamp() <= after + 0.01
    assert first["elapsed"] >= 0.0 and second["elapsed"] - first["elapsed"] >= 0.05 - 1e-3


def test_plain_progress_lines_only_without_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert RunLogger(None, enabled=True).show_progress and not RunLogger(None, enabled=True).plain_progress
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    logger = RunLogger(None, enabled=True)
    assert logger.plain_progress and not logger.show_progress
    assert not RunLogger(None, enabled=True, progress=False).plain_progress


def test_appends_across_runs(tmp_path):
    for step in range(2):
        with RunLogger(tmp_path, tensorboard=False, enabled=True) as logger:
            logger.log("train", step, {"loss": 1.0})
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 2


def test_disabled_logger_writes_nothing(tmp_path):
    with RunLogger(tmp_path / "run", enabled=False) as logger:
        logger.log("train", 0, {"loss": 1.0})
        logger.info("hello")
    assert not (tmp_path / "run").exists()


def test_progress_is_plain_without_terminal(tmp_path):
    logger = RunLogger(None, enabled=True)
    assert not logger.show_progress  # pytest captures stderr: not a terminal
    assert list(logger.progress([1, 2, 3], total=3)) == [1, 2, 3]


def test_flatten_scalars():
    assert flatten_scalars({"a": 1, "b": {"c": 2.5, "d": "s", "e": True}}) == {"a": 1.0, "b/c": 2.5}


def test_tensorboard_scalars(tmp_path):
    with RunLogger(tmp_path, tensorboard=True, enabled=True) as logger:
        logger.log("train", 3, {"loss": 2.0, "terms": {"l1": 0.5}, "lr": 1e-4})
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr", "train/terms/l1"]
    (scalar,) = events.Scalars("train/terms/l1")
    assert (scalar.step, scalar.value) == (3, 0.5)
