"""Training curves from a hand-written ``metrics.jsonl``: the series drawn, resumed runs, runs without
evaluation, malformed lines, and ``asag plot``."""

from __future__ import annotations

import json
import math

import pytest

from asag.cli import main
from asag.engine.logger import current_records, read_metrics
from asag.errors import DataError
from asag.viz.curves import CURVES_FILE, curves_after_training, training_curves, write_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train(step: int, loss: float, lr: float = 1e-4, **terms: float) -> dict:
    """A "train" record as RunLogger writes it (loss terms as flat "terms/NAME" keys)."""
    return {"kind": "train", "step": step, "time": "2026-01-01T00:00:00.000+00:00", "elapsed": 1.0,
            "epoch": 0, "lr": lr, "loss": loss, "grad_norm": 1.0,
            **{f"terms/{k}": v for k, v in terms.items()}}


def epoch(step: int, number: int) -> dict:
    return {"kind": "epoch", "step": step, "epoch": number, "loss": 1.0, "terms": {"ce": 1.0}}


def evaluation(step: int, ap: float, ap50: float) -> dict:
    return {"kind": "eval", "step": step, "epoch": 0, "ap": ap, "ap50": ap50, "ap75": None, "stats": [ap],
            "per_class_ap": None, "summary": "text"}


def write(path, records: list[dict | str]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


TWO_EPOCHS = [train(0, 9.0, 1e-5, ce=3.0, giou=1.0), train(5, 7.0, 5e-5, ce=2.0, giou=0.75), epoch(10, 0),
              evaluation(10, 0.1, 0.3), train(10, 5.0, 1e-4, ce=1.5, giou=0.5),
              train(15, 4.0, 1e-4, ce=1.0, giou=0.25), epoch(20, 1), evaluation(20, 0.2, 0.45)]


def test_series_of_a_hand_written_log(tmp_path):
    write(tmp_path / "metrics.jsonl", TWO_EPOCHS)
    curves = training_curves(read_metrics(tmp_path / "metrics.jsonl"))
    assert curves.steps == [0, 5, 10, 15]
    assert curves.loss == [9.0, 7.0, 5.0, 4.0]
    assert curves.lr == [1e-5, 5e-5, 1e-4, 1e-4]
    assert curves.terms == {"ce": [3.0, 2.0, 1.5, 1.0], "giou": [1.0, 0.75, 0.5, 0.25]}
    assert curves.eval_steps == [10, 20]
    assert list(curves.evals) == ["ap", "ap50"]  # ap75 is null in every record: not drawn
    assert curves.evals == {"ap": [0.1, 0.2], "ap50": [0.3, 0.45]}
    assert curves.epoch_ends == [10, 20]


def test_a_resumed_run_keeps_the_last_record_of_each_step_and_drops_what_it_superseded(tmp_path):
    # the first run logged up to step 15 and evaluated at 20 (then crashed); the resumed run continues
    # from the checkpoint at step 10, so its records from step 10 on replace the first run's
    first = TWO_EPOCHS
    resumed = [train(10, 5.5, 1e-4, ce=1.6, giou=0.6), train(15, 4.5, 1e-4, ce=1.1, giou=0.3), epoch(20, 1),
               evaluation(20, 0.25, 0.5), train(20, 3.0, 1e-5, ce=0.5, giou=0.2), epoch(30, 2),
               evaluation(30, 0.3, 0.55)]
    write(tmp_path / "metrics.jsonl", [*first, *resumed])
    curves = training_curves(read_metrics(tmp_path / "metrics.jsonl"))
    assert curves.steps == [0, 5, 10, 15, 20]
    assert curves.loss == [9.0, 7.0, 5.5, 4.5, 3.0]
    assert curves.eval_steps == [10, 20, 30] and curves.evals["ap"] == [0.1, 0.25, 0.3]
    assert curves.epoch_ends == [10, 20, 30]


def test_records_after_a_restart_point_of_another_kind_are_dropped():
    # a run resumed from an earlier checkpoint (step 10) after having evaluated at 20 and 30
    records = [train(0, 1.0), train(10, 1.0), evaluation(20, 0.1, 0.2), train(25, 1.0),
               evaluation(30, 0.2, 0.3), train(10, 2.0), evaluation(20, 0.15, 0.25)]
    kept = current_records(records)
    assert [(r["kind"], r["step"]) for r in kept] == [("train", 0), ("train", 10), ("eval", 20)]
    assert kept[1]["loss"] == 2.0 and kept[2]["ap"] == 0.15


def test_a_run_without_evaluation_is_drawn(tmp_path):
    write(tmp_path / "metrics.jsonl", [r for r in TWO_EPOCHS if r["kind"] != "eval"])
    curves = training_curves(read_metrics(tmp_path / "metrics.jsonl"))
    assert curves.evals == {} and curves.eval_steps == []
    path = write_curves(tmp_path)
    assert path == tmp_path / CURVES_FILE and path.read_bytes().startswith(PNG_SIGNATURE)


def test_missing_values_become_nan(tmp_path):
    write(tmp_path / "metrics.jsonl", [train(0, 1.0, ce=1.0), {**train(5, 1.0), "loss": None, "lr": "x"}])
    curves = training_curves(read_metrics(tmp_path / "metrics.jsonl"))
    assert curves.loss[0] == 1.0 and math.isnan(curves.loss[1]) and math.isnan(curves.lr[1])
    assert curves.terms["ce"][0] == 1.0 and math.isnan(curves.terms["ce"][1])


@pytest.mark.parametrize(("line", "message"), [
    ('{"kind": "train", "step": 5, "loss": 1.0', "line 3: not a JSON record (Expecting ',' delimiter)"),
    ("[1, 2]", 'line 3: not a metrics record (a JSON object with a "kind" and an integer "step")'),
    ('{"kind": "train", "step": "5"}', 'line 3: not a metrics record'),
    ('{"step": 5}', 'line 3: not a metrics record'),
])
def test_a_malformed_line_is_named(tmp_path, line, message):
    path = tmp_path / "metrics.jsonl"
    write(path, [train(0, 1.0), "", line, train(10, 1.0)])
    with pytest.raises(DataError) as err:
        read_metrics(path)
    assert str(err.value).startswith(f"{path}, {message}")


def test_plot_command_writes_refuses_and_overwrites(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write(run / "metrics.jsonl", TWO_EPOCHS)
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"training curves: {run / CURVES_FILE}"
    first = (run / CURVES_FILE).read_bytes()
    assert first.startswith(PNG_SIGNATURE)
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == (f"asag plot: error: {run / CURVES_FILE} already exists; pass --overwrite to replace it or "
                   f"--out FILE to write another file\n")
    assert (run / CURVES_FILE).read_bytes() == first
    assert main(["plot", str(run), "--overwrite"]) == 0
    other = tmp_path / "figures" / "a.png"
    assert main(["plot", str(run / "metrics.jsonl"), "--out", str(other)]) == 0  # the file itself, too
    assert other.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_command_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"asag plot: error: {tmp_path}: no metrics.jsonl there (not a run "
                                       f"folder of asag train)\n")
    write(tmp_path / "metrics.jsonl", [train(0, 1.0), "{oops"])
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"asag plot: error: {tmp_path / 'metrics.jsonl'}, line 2: not a JSON record")
    assert err.count("\n") == 1 and not (tmp_path / CURVES_FILE).exists()
    write(tmp_path / "metrics.jsonl", [epoch(10, 0)])
    assert main(["plot", str(tmp_path)]) == 2
    assert 'no training record (kind "train") to draw' in capsys.readouterr().err


def test_end_of_training_reports_a_log_it_cannot_draw(tmp_path):
    lines: list[str] = []
    write(tmp_path / "metrics.jsonl", TWO_EPOCHS)
    assert curves_after_training(tmp_path, lines.append) == tmp_path / CURVES_FILE
    write(tmp_path / "metrics.jsonl", [train(0, 1.0), "not json"])
    assert curves_after_training(tmp_path, lines.append) is None
    assert lines == [f"training curves: {tmp_path / CURVES_FILE}",
                     f"training curves not drawn: {tmp_path / 'metrics.jsonl'}, line 2: not a JSON record "
                     f"(Expecting value)"]
