"""What `microfed run` shows while it works, fed the events the steps and workers emit (training/step_log.py),
and the event channel itself."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from microfed.pipelines.progress import LinesDisplay, RichDisplay, describe, follow_events, make_display
from microfed.training import step_log
from microfed.training.errors import MicrofedError, reported_errors
from microfed.training.step_log import EVENTS_ENV, event

pytestmark = pytest.mark.unit


def ev(kind: str, **fields: Any) -> dict[str, Any]:
    return {"event": kind, "time": 1.0, "pid": 7, **fields}


def epoch(rank: int, r: int, e: int, loss: float, acc: float) -> dict[str, Any]:
    fields = {"rank": rank, "round": r, "rounds": 2, "epoch": e, "epochs": 2, "loss": loss, "accuracy": acc}
    return ev("epoch", **fields, examples=950, seconds=0.5)


# A run of four steps, as the steps and two workers emit it.
EVENTS = [
    ev("step_start", step="split"),
    ev("step_end", step="split", status="ok", seconds=3.2),
    ev("step_start", step="train"),
    ev("train_plan", workers=2, rounds=2, local_epochs=2, model="cnn-fmnist"),
    epoch(1, 1, 1, 0.70, 0.75),
    epoch(0, 1, 1, 0.6764, 0.7567),
    epoch(0, 1, 2, 0.3796, 0.8624),
    epoch(1, 1, 2, 0.39, 0.86),
    ev("validation", round=1, rounds=2, accuracy=0.8912, loss=0.31),
    epoch(0, 2, 1, 0.2975, 0.8905),
    epoch(1, 2, 1, 0.30, 0.89),
    epoch(0, 2, 2, 0.2464, 0.9079),
    epoch(1, 2, 2, 0.25, 0.90),
    ev("step_end", step="train", status="ok", seconds=106.0),
    ev("step_start", step="aggregate"),
    ev("step_end", step="aggregate", status="ok", seconds=2.9),
    ev("step_start", step="evaluate"),
    ev("step_end", step="evaluate", status="ok", seconds=2.9),
]

# kfp.local's and the steps' log lines, as they reach the display (ANSI colours included).
LOG = [
    "00:00:01.1 - INFO - Executing task \x1b[96m'split-dataset'\x1b[0m",
    "    [KFP Executor 2026-11-21 INFO]: Got executor_input:",
    "    [microfed] train: 2 workers, 2 rounds x 2 local epochs of cnn-fmnist",
    "    [microfed worker] round 1/2 epoch 1/2: loss 0.6764 train acc 0.7567 (1990 img/s on rank 0)",
    "00:01:50.0 - INFO - Task \x1b[96m'train'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m",
]
REWORDED = [
    "kfp: now running split-dataset",
    "[microfed] training starts with two workers for two rounds",
    "[microfed worker] R1 E1 -- loss=0.6764, accuracy=0.7567",
    "Task 'train' finished with status SUCCESS",
]


def shown(display_of: Any, log: list[str], events: list[dict[str, Any]] = EVENTS) -> str:
    """What a display shows when the log lines and the events reach it interleaved."""
    out = io.StringIO()
    display = display_of(out)
    for i, record in enumerate(events):
        if i < len(log):
            display.line(log[i])
        display.event(record)
    display.close()
    return out.getvalue()


def test_progress_bars_follow_the_step_and_epoch_events() -> None:
    out = io.StringIO()
    display = RichDisplay(out, steps=4)
    for record in EVENTS[:8]:
        display.event(record)
    steps, training = display.progress.tasks
    assert (steps.completed, steps.total) == (1, 4) and steps.description == "step train"
    assert (training.completed, training.total) == (2, 4)  # rank 0's epochs: rounds x local epochs
    assert "training on 2 workers" not in training.description  # rank 0's numbers replaced it
    assert "round 1/2" in training.description and "0.8624" in training.description
    for record in EVENTS[8:]:
        display.event(record)
    display.close()
    assert steps.completed == 4 and training.completed == 4
    text = out.getvalue()
    assert "validation accuracy 0.8912" in text  # what the bars do not show, printed above them


def test_a_restarted_group_repeating_epochs_does_not_overfill_the_bar() -> None:
    display = RichDisplay(io.StringIO(), steps=5)
    for record in [
        *EVENTS[2:7],
        *EVENTS[4:7],
        ev("group_restart", rank=1, returncode=-9, restart=1, max_restarts=3, workers=2),
    ]:
        display.event(record)
    assert display.progress.tasks[1].completed == 2
    display.close()


def test_plain_lines_are_one_per_event_and_every_log_line_only_when_verbose() -> None:
    text = shown(lambda out: LinesDisplay(out, verbose=False), LOG)
    lines = text.splitlines()
    # 8 step starts and ends, the plan, rank 0's 4 epochs, 1 validation; not rank 1's epochs, not a log line
    assert len(lines) == 8 + 1 + 4 + 1
    assert lines[:3] == ["step split: started", "step split: done in 3.2 s", "step train: started"]
    assert "training cnn-fmnist on 2 workers: 2 rounds x 2 local epochs" in lines
    assert "round 1/2 epoch 2/2: rank 0 loss 0.3796, train acc 0.8624" in lines
    assert "round 1/2: validation accuracy 0.8912" in lines
    assert not any("executor_input" in s or "Executing" in s or "0.70" in s for s in lines)
    verbose = shown(lambda out: LinesDisplay(out, verbose=True), LOG)
    assert verbose.splitlines() == [
        s.replace("\x1b[96m", "").replace("\x1b[92m", "").replace("\x1b[0m", "") for s in LOG
    ]


@pytest.mark.parametrize("display_of", [lambda out: LinesDisplay(out, verbose=False), lambda out: RichDisplay(out)])
def test_rewording_a_log_line_changes_nothing_the_display_shows(display_of: Any) -> None:
    assert shown(display_of, LOG) == shown(display_of, REWORDED) == shown(display_of, [])


def test_trouble_is_shown_from_its_fields() -> None:
    message = "worker 1 exited with code 2; the last lines of w1.log:\n" + "".join(f"line {i}\n" for i in range(9))
    events = [
        ev(
            "worker_stalled",
            rank=1,
            doing="training round 3/5",
            idle_seconds=31.0,
            timeout_seconds=1800.0,
            log="w1.log",
        ),
        ev("worker_progressing", rank=1, doing="training round 3/5"),
        ev("group_restart", rank=0, returncode=-9, restart=1, max_restarts=3, workers=2),
        ev("stopped_early", round=3, rounds=9, best_round=1, patience=2),
        ev("error", type="WorkerFailed", message=message, hint="", user=False),
        ev("error", type="MicrofedError", message="class 'x' has 0 examples", hint="use fewer workers", user=True),
        ev("step_end", step="train", status="failed", seconds=200.0),
    ]
    assert [line for e in events for line in describe(e)] == [
        "warning: worker 1 has made no progress for 31.0 s while training round 3/5; the run fails after 30 min "
        "without any; its log is w1.log",
        "worker 1 is making progress again (training round 3/5)",
        "worker 0 was killed by SIGKILL: restarting all 2 workers (restart 1 of at most 3)",
        "stopped early after round 3/9: no better validation accuracy for 2 rounds (best: round 1)",
        # a failed worker's error: its first line, and the last lines of its log tail
        "error: WorkerFailed: worker 1 exited with code 2; the last lines of w1.log:",
        *(f"    line {i}" for i in range(4, 9)),
        "error: class 'x' has 0 examples",
        "step train: failed after 3.33 min",
    ]
    out = io.StringIO()
    display = RichDisplay(out, steps=5)
    for e in events:
        display.event(e)
    display.close()
    assert "error: class 'x' has 0 examples" in out.getvalue() and "failed after" in out.getvalue()
    assert "    line 8" in out.getvalue()


def test_malformed_or_unknown_events_show_nothing() -> None:
    for display in (LinesDisplay(io.StringIO(), verbose=False), RichDisplay(io.StringIO(), steps=5)):
        for e in (
            ev("epoch", rank=0),
            ev("train_plan", workers="two"),
            ev("step_end", step="x", status="odd"),
            ev("new"),
        ):
            display.event(e)
        display.close()
    assert describe(ev("epoch", rank=0)) == [] and describe(ev("something_new", a=1)) == []


def test_the_step_bar_counts_every_step_of_the_pipeline(tmp_path: Path) -> None:
    import yaml

    from microfed.pipelines import progress
    from microfed.pipelines.pipeline import compile_pipeline

    tasks = yaml.safe_load(compile_pipeline(tmp_path / "p.yaml").read_text())["root"]["dag"]["tasks"]
    assert len(tasks) == progress._STEPS == 5  # split, train, aggregate, evaluate, export
    display = make_display(_Tty(), verbose=False, quiet=False, steps=len(tasks))
    assert isinstance(display, RichDisplay) and display.progress.tasks[0].total == len(tasks)
    display.close()


# Data a field or a line can quote (a class folder's name, a model factory's path): a window title and a colour.
TITLE = "\x1b]0;pwned\x07cat"
COLOUR = "\x1b[31mred"


def test_displays_escape_data_in_events_and_drop_kfps_colours_in_lines() -> None:
    hostile = ev("error", type="MicrofedError", message=f"class {TITLE} {COLOUR}", hint="", user=True)
    out = io.StringIO()
    LinesDisplay(out, verbose=False).event(hostile)
    assert out.getvalue() == "error: class \\x1b]0;pwned\\x07cat \\x1b[31mred\n"
    out = io.StringIO()
    LinesDisplay(out, verbose=False).event(ev("worker_progressing", rank=1, doing="x\nFAKE: test accuracy 1.0"))
    assert out.getvalue() == "worker 1 is making progress again (x\\nFAKE: test accuracy 1.0)\n"  # no forged line
    out = io.StringIO()
    LinesDisplay(out, verbose=True).line(f"    [microfed] split: class {TITLE} {COLOUR}")
    # a colour code in a line is dropped like kfp's own (the display cannot tell them apart); the rest is escaped
    assert out.getvalue() == "    [microfed] split: class \\x1b]0;pwned\\x07cat red\n"
    out = io.StringIO()
    display = RichDisplay(out, steps=1)
    display.event(hostile)
    display.event(ev("step_start", step=TITLE))
    display.close()
    assert "\x07" not in out.getvalue() and "\x1b]" not in out.getvalue() and "\\x1b]0;pwned" in out.getvalue()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


# ------------------------------------------------------------------------------------------- the event channel


class _Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def line(self, text: str) -> None:
        pass

    def event(self, record: dict[str, Any]) -> None:
        self.events.append(record)

    def close(self) -> None:
        pass


def test_event_writes_nothing_without_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EVENTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    event("epoch", rank=0, loss=0.5)
    with step_log.step("split"):
        pass
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(EVENTS_ENV, "")
    event("epoch", rank=0, loss=0.5)
    assert list(tmp_path.iterdir()) == []


def test_event_appends_one_json_line_per_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(EVENTS_ENV, str(path))
    event("epoch", rank=0, loss=0.5, note="two\nlines", where=tmp_path)
    with pytest.raises(ValueError), reported_errors(), step_log.step("split"):
        raise MicrofedError("bad input", hint="fix it")
    with pytest.raises(ValueError, match="reserved"):
        event("x", time=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["epoch", "step_start", "step_end", "error"]
    first = records[0]
    assert first["rank"] == 0 and first["note"] == "two\nlines" and first["where"] == str(tmp_path)
    assert isinstance(first["time"], float) and isinstance(first["pid"], int)
    assert records[2]["status"] == "failed" and records[2]["step"] == "split"
    assert {k: records[3][k] for k in ("type", "message", "hint", "user")} == {
        "type": "MicrofedError",
        "message": "bad input",
        "hint": "fix it",
        "user": True,
    }


def test_the_steps_of_a_run_get_its_events_file(tmp_path: Path) -> None:
    from microfed.pipelines.local_run import step_environment

    assert step_environment(tmp_path, tmp_path / "events.jsonl")[EVENTS_ENV] == str(tmp_path / "events.jsonl")


def test_an_unwritable_events_file_does_not_fail_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENTS_ENV, str(tmp_path / "missing-folder" / "events.jsonl"))
    event("epoch", rank=0)  # no error: progress is not worth a failed step


def test_following_the_file_hands_on_whole_lines_once_and_the_last_ones_on_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    recorder = _Recorder()
    first, second = json.dumps(ev("step_start", step="split")), json.dumps(ev("step_end", step="split"))
    with follow_events(path, recorder, poll_seconds=0.01):
        time.sleep(0.05)  # no file yet: nothing, no error
        with open(path, "a") as f:
            f.write(first + "\n" + second[:10])  # a line still being written
            f.flush()
            deadline = time.monotonic() + 5
            while not recorder.events and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [e["event"] for e in recorder.events] == ["step_start"]
            f.write(second[10:] + "\nnot json\n[1, 2]\n")
            f.write(json.dumps(ev("train_plan", workers=1)) + "\n")
    assert [e["event"] for e in recorder.events] == ["step_start", "step_end", "train_plan"]
    assert not [t for t in threading.enumerate() if t.name == "microfed-events"]
