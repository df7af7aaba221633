import json
import math

from asag.engine.logger import METRICS_FILE, RunLogger, flatten_scalars


def test_jsonl_one_object_per_call_and_nan_as_null(tmp_path):
    with RunLogger(tmp_path, tensorboard=False, enabled=True) as logger:
        logger.log("train", 0, {"loss": 1.5, "terms": {"l1": 0.25}, "note": "x"})
        logger.log("epoch", 10, {"loss": math.nan, "per_class": {"cat": 0.5}})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"kind": "train", "step": 0, "loss": 1.5, "terms": {"l1": 0.25}, "note": "x"},
        {"kind": "epoch", "step": 10, "loss": None, "per_class": {"cat": 0.5}},
    ]


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
