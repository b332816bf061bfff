"""What `microfed run` shows while it works, fed the marker lines the steps and workers really print."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from microfed.pipelines.progress import LinesDisplay, RichDisplay, make_display

pytestmark = pytest.mark.unit

# As kfp.local and our steps print them (ANSI colours included), abridged from a real run's kfp.log.
STREAM = [
    "00:00:01.0 - INFO - Running pipeline: \x1b[95m'microfed'\x1b[0m",
    "00:00:01.1 - INFO - Executing task \x1b[96m'split-dataset'\x1b[0m",
    "    [KFP Executor 2026-11-21 INFO]: Got executor_input:",
    "    [microfed] split fashion-mnist: 60000 training examples into 3 stratified shards",
    "00:00:04.0 - INFO - Task \x1b[96m'split-dataset'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m",
    "00:00:04.1 - INFO - Executing task \x1b[96m'train'\x1b[0m",
    "    [microfed] train: 3 workers, 2 rounds x 2 local epochs of cnn-fmnist",
    "    [microfed worker] round 1/2 epoch 1/2: loss 0.6764 train acc 0.7567 (1990 img/s on rank 0)",
    "    [microfed worker] round 1/2 epoch 2/2: loss 0.3796 train acc 0.8624 (1997 img/s on rank 0)",
    "    [microfed worker] round 1/2: global model test accuracy 0.8912",
    "    [microfed worker] round 2/2 epoch 1/2: loss 0.2975 train acc 0.8905 (2131 img/s on rank 0)",
    "    [microfed worker] round 2/2 epoch 2/2: loss 0.2464 train acc 0.9079 (2149 img/s on rank 0)",
    "00:01:50.0 - INFO - Task \x1b[96m'train'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m",
    "00:01:50.1 - INFO - Executing task \x1b[96m'aggregate'\x1b[0m",
    "00:01:53.0 - INFO - Task \x1b[96m'aggregate'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m",
    "00:01:53.1 - INFO - Executing task \x1b[96m'evaluate'\x1b[0m",
    "    [microfed] evaluate: test accuracy 0.9201 on 10000 examples",
    "00:01:56.0 - INFO - Task \x1b[96m'evaluate'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m",
]


def test_progress_bars_follow_the_steps_and_the_epochs() -> None:
    out = io.StringIO()
    display = RichDisplay(out, steps=4)  # the stream below runs four steps
    for line in STREAM[:9]:
        display.line(line)
    steps, training = display.progress.tasks
    assert (steps.completed, steps.total) == (1, 4)
    assert (training.completed, training.total) == (2, 4)
    assert "round 1/2" in training.description and "0.8624" in training.description
    for line in STREAM[9:]:
        display.line(line)
    display.close()
    assert steps.completed == 4 and training.completed == 4
    text = out.getvalue()
    assert "global model test accuracy 0.8912" in text and "evaluate: test accuracy 0.9201" in text
    assert "executor_input" not in text


def test_plain_lines_show_the_marker_lines_only_unless_verbose() -> None:
    out = io.StringIO()
    display = LinesDisplay(out, verbose=False)
    for line in STREAM:
        display.line(line)
    shown = out.getvalue().splitlines()
    # 4 steps started + 4 finished + 8 marker lines; not the pipeline banner, not the executor's dumps
    assert len(shown) == 16 and not any("executor_input" in s or "Running pipeline" in s for s in shown)
    everything = io.StringIO()
    verbose = LinesDisplay(everything, verbose=True)
    for line in STREAM:
        verbose.line(line)
    assert len(everything.getvalue().splitlines()) == len(STREAM)


def test_the_step_bar_counts_every_step_of_the_pipeline(tmp_path: Path) -> None:
    import yaml

    from microfed.pipelines import progress
    from microfed.pipelines.pipeline import compile_pipeline

    tasks = yaml.safe_load(compile_pipeline(tmp_path / "p.yaml").read_text())["root"]["dag"]["tasks"]
    assert len(tasks) == progress._STEPS == 5  # split, train, aggregate, evaluate, export
    display = make_display(_Tty(), verbose=False, quiet=False, steps=len(tasks))
    assert isinstance(display, RichDisplay) and display.progress.tasks[0].total == len(tasks)
    display.close()


# Data a step can quote in its lines (a class folder's name): a window title (OSC ... BEL) and a colour.
TITLE = "\x1b]0;pwned\x07cat"
COLOUR = "\x1b[31mred"


def test_progress_lines_escape_data_and_drop_kfps_colours() -> None:
    line = f"    [microfed] split: class {TITLE} {COLOUR}"
    for verbose in (False, True):
        out = io.StringIO()
        LinesDisplay(out, verbose=verbose).line(line)
        # a colour code is dropped like kfp's own (the display cannot tell them apart); the rest is escaped
        assert out.getvalue() == "    [microfed] split: class \\x1b]0;pwned\\x07cat red\n"
    colours = io.StringIO()
    LinesDisplay(colours, verbose=True).line("Executing task \x1b[96m'train'\x1b[0m")
    assert colours.getvalue() == "Executing task 'train'\n"
    out = io.StringIO()
    display = RichDisplay(out, steps=1)
    display.line(line)
    display.close()
    assert "\x07" not in out.getvalue() and "\x1b" not in out.getvalue() and "\\x1b]0;pwned" in out.getvalue()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True
