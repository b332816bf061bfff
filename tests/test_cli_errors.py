"""Untrusted data and user mistakes at the command line (issue 14, items 5, 6, 8, 9, 10): each ends as one
error line and a hint, exit code 2, nothing printed raw from data, nothing written outside --runs-dir."""

from __future__ import annotations

import inspect
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from microfed.pipelines import local_run, step_processes
from microfed.pipelines.cli import _summary, main
from microfed.pipelines.local_run import RunResult, StepFailed, _step_error
from microfed.pipelines.step_processes import StepProcesses
from microfed.training.errors import ERROR_FILE_ENV, MicrofedError, read_error_records
from microfed.training.text import is_printable, printable
from tests.conftest import write_zip

# What the issue saw reach the terminal raw: a colour, a window title (OSC ... BEL), and a forged line.
COLOUR = "\x1b[31mred"
TITLE = "\x1b]0;pwned\x07cat"
FORGED = "dog\nFAKE: test accuracy 1.0000"
HOSTILE = (COLOUR, TITLE, FORGED)


class Reached(BaseException):
    """Raised where the pipeline would start: the command got through every check."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir


@pytest.fixture
def stop_at_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    def reached(arguments: dict[str, Any], run_dir: Path, runs_dir: Path, **_: Any) -> RunResult:
        raise Reached(run_dir)

    monkeypatch.setattr(local_run, "_execute", reached)


def run(tmp_path: Path, *flags: str) -> int:
    return main(["run", "--runs-dir", str(tmp_path / "runs"), "--name", "r", *flags])


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line, after checking stderr is that line and at most a hint: nothing else, nothing raw."""
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("microfed: error: "), lines
    assert all(line.startswith("microfed: hint: ") for line in lines[1:]), lines
    assert all(is_printable(line) for line in lines), lines
    return lines[0]


# ------------------------------------------------------------------------- 5: terminal injection


def test_printable_escapes_what_a_terminal_would_act_on() -> None:
    assert printable(COLOUR) == "\\x1b[31mred"
    assert printable(TITLE) == "\\x1b]0;pwned\\x07cat"
    assert printable(FORGED) == "dog\\nFAKE: test accuracy 1.0000"
    assert printable("a\rb\tc\x9bd\u202ee\u2028f\udcff") == "a\\rb\\tc\\x9bd\\u202ee\\u2028f\\udcff"
    assert printable("T-shirt/top é 猫 ✓") == "T-shirt/top é 猫 ✓"  # ordinary text of any script: unchanged
    long = printable("a" * 50 + "b" * 50, max_chars=21)
    assert len(long) == 21 and long.startswith("a" * 10) and long.endswith("b" * 10)


def test_the_run_summary_escapes_class_names() -> None:
    names = ["plain", *HOSTILE]
    metrics = {
        "accuracy": 0.5,
        "loss": 1.0,
        "num_test_examples": 8,
        "round_split": "validation",
        "round_numbers": [1],
        "round_accuracy": [0.5],
        "selected_round": 1,
        "shard_sizes": [4, 4],
        "class_names": names,
        "per_class_accuracy": dict.fromkeys(names, 0.25),
        "timings": {"split": 1.0},
    }
    text = _summary(RunResult(run_dir=Path("runs/r"), metrics=metrics))
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("FAKE") for line in text.splitlines())
    assert "dog\\nFAKE: test accuracy 1.0000  0.2500" in text
    assert len(text.splitlines()) == 12  # blank, accuracy, rounds, shards, 4 classes, seconds, 3 paths


def tiny_onnx(path: Path, class_names: list[str]) -> Path:
    """A 1x4x4 uint8 image classifier (cast, flatten, one matrix) carrying `class_names`, as export writes it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.arange(16 * len(class_names), dtype=np.float32).reshape(16, len(class_names)) / 100
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(class_names)])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    info = {"input": {"channels": 1, "height": 4, "width": 4}, "class_names": class_names}
    helper.set_model_props(model, {"microfed": json.dumps(info)})
    onnx.save(model, path)
    return path


def test_predict_escapes_class_names_and_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_onnx(tmp_path / "model.onnx", list(HOSTILE))
    image = tmp_path / "a\x1b[2Jb.png"
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint8), mode="L").save(image)
    assert main(["predict", str(model), str(image), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    (line,) = out.splitlines()  # one image, one line: no forged second one
    fields = line.split("\t")
    assert len(fields) == 7 and fields[0].endswith("a\\x1b[2Jb.png")
    assert set(fields[1::2]) == {printable(name) for name in HOSTILE}
    assert all(is_printable(field) for field in fields)  # tabs only between the columns


def test_an_error_quoting_data_is_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stop_at_pipeline: None
) -> None:
    assert run(tmp_path, "--dataset", str(tmp_path / FORGED)) == 2
    assert "FAKE: test accuracy" in one_error(capsys)  # on the error line, not a line of its own


# ---------------------------------------------------------------------------------- 6: --name ../x


@pytest.mark.parametrize("name", ["../x", "..", ".", "", "a/b", "/abs", "x\x1b[31m", "n\nFAKE", "x" * 256])
def test_a_name_that_is_not_one_folder_name_is_refused(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str], stop_at_pipeline: None
) -> None:
    code = main(["run", "--runs-dir", str(tmp_path / "runs"), "--name", name])
    assert code == 2
    assert "--name" in one_error(capsys)
    assert list(tmp_path.iterdir()) == []  # nothing written, inside --runs-dir or out of it


def test_a_plain_name_runs_inside_the_runs_dir(tmp_path: Path, stop_at_pipeline: None) -> None:
    with pytest.raises(Reached) as reached:
        main(["run", "--runs-dir", str(tmp_path / "runs"), "--name", "exp 1.é"])
    assert reached.value.run_dir == tmp_path / "runs" / "exp 1.é"


# ------------------------------------------------------- 8: a step's own error, checks before the pipeline


def fake_artifact(folder: Path) -> types.SimpleNamespace:
    folder.mkdir(parents=True, exist_ok=True)
    return types.SimpleNamespace(path=str(folder), uri=str(folder), metadata={})


def test_every_component_records_its_own_error_for_the_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each component, run as kfp.local runs it (its Python function), on inputs that are not there."""
    from microfed.components import steps

    errors = tmp_path / "errors.jsonl"
    monkeypatch.setenv(ERROR_FILE_ENV, str(errors))
    for i, name in enumerate(steps.__all__):
        func = getattr(steps, name).python_func
        kwargs: dict[str, Any] = {}
        for p in inspect.signature(func).parameters.values():
            # the dataset has a default (RunConfig's), which exists: name one that does not
            if p.default is not inspect.Parameter.empty and p.name != "dataset":
                continue
            if p.annotation is str:
                kwargs[p.name] = "no-such-dataset"
            elif p.annotation is int:
                kwargs[p.name] = 2
            else:
                kwargs[p.name] = fake_artifact(tmp_path / name / p.name)
        with pytest.raises(MicrofedError) as raised:
            func(**kwargs)
        records = read_error_records(errors)
        assert len(records) == i + 1, f"{name} recorded no error"
        assert records[-1] == {
            "type": type(raised.value).__name__,
            "message": raised.value.message,
            "hint": raised.value.hint,
            "user": True,
        }


def test_a_step_records_other_errors_as_not_the_users_and_nothing_without_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from microfed.training.errors import reported_errors

    errors = tmp_path / "errors.jsonl"
    monkeypatch.delenv(ERROR_FILE_ENV, raising=False)
    with pytest.raises(KeyError), reported_errors():
        raise KeyError("n_k")
    assert not errors.exists()  # on a cluster: the step fails as it always did, its traceback in the log
    monkeypatch.setenv(ERROR_FILE_ENV, str(errors))
    with pytest.raises(KeyError), reported_errors():
        raise KeyError("n_k")
    with pytest.raises(FileNotFoundError), reported_errors():
        (tmp_path / "missing").read_text()
    assert [(r["type"], r["user"]) for r in read_error_records(errors)] == [
        ("KeyError", False),
        ("FileNotFoundError", True),
    ]


def steps_with(tmp_path: Path, *records: dict[str, Any], returncode: int | None = 1) -> StepProcesses:
    steps = StepProcesses(tmp_path / "errors.jsonl")
    (tmp_path / "errors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    steps.process = types.SimpleNamespace(returncode=returncode)  # type: ignore[assignment]
    return steps


KFP_FAILED = (
    "Pipeline \x1b[95m'microfed'\x1b[0m finished with status FAILURE. Inner task failed: \x1b[96m'train'\x1b[0m."
)


def test_a_steps_own_error_becomes_the_runs_one_line(tmp_path: Path) -> None:
    log = tmp_path / "kfp.log"
    user = {"type": "MicrofedError", "message": "class 'x' has 0 examples", "hint": "use fewer workers", "user": True}
    e = _step_error(KFP_FAILED, steps_with(tmp_path, user), None, log)
    assert type(e) is MicrofedError and e.exit_code == 2
    assert e.message == "class 'x' has 0 examples" and e.hint == f"use fewer workers; the full log is {log}"
    # a failed worker: its own error line, from the log tail its WorkerFailed carries
    tail = "worker 1 exited with code 2; the last lines of w.log:\nloading\n[microfed worker] error: bad shard (fix it)"
    e = _step_error(KFP_FAILED, steps_with(tmp_path, {**user, "message": tail, "hint": ""}), None, log)
    assert e.message == "bad shard (fix it)"
    # a worker that crashed: the first line, and the exception its traceback ends with
    tail = "worker 0 exited with code 1; the last lines of w.log:\n[rank0]: Traceback (most recent call last):\n"
    tail += '[rank0]:   File "w.py"\n[rank0]: ValueError: Overflow when unpacking long long\n[rank0]: more text'
    e = _step_error(KFP_FAILED, steps_with(tmp_path, {**user, "message": tail, "hint": ""}), None, log)
    assert e.message.startswith("worker 0 exited with code 1") and e.message.endswith(
        "ValueError: Overflow when unpacking long long"
    )
    assert "\n" not in e.message


def test_a_step_that_fails_otherwise_is_named_with_exit_code_1(tmp_path: Path) -> None:
    log = tmp_path / "kfp.log"
    bug = {"type": "KeyError", "message": "'n_k'", "hint": "", "user": False}
    e = _step_error(KFP_FAILED, steps_with(tmp_path, bug), None, log)
    assert isinstance(e, StepFailed) and e.exit_code == 1
    assert e.message == "step 'train' failed with KeyError: 'n_k'"
    # nothing recorded: the exception line of its log, else how its process ended
    e = _step_error(KFP_FAILED, steps_with(tmp_path), "ModuleNotFoundError: No module named 'x'", log)
    assert e.message == "step 'train' failed with ModuleNotFoundError: No module named 'x'"
    e = _step_error(KFP_FAILED, steps_with(tmp_path, returncode=-9), None, log)
    assert e.message == "step 'train' failed with its process killed by SIGKILL"


@pytest.mark.e2e
def test_a_failing_train_step_reaches_the_cli_as_its_own_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = tmp_path / "refusing.py"
    factory.write_text(
        "from microfed.training.errors import MicrofedError\n\n\n"
        "def make(num_classes, in_channels, image_size):\n"
        "    raise MicrofedError(f'this factory takes 10 classes, not {num_classes}', hint='pass 10 classes')\n"
    )
    zip_path = write_zip(tmp_path / "shapes.zip", per_class_train=8, per_class_test=2)
    flags = ["--dataset", str(zip_path), "--model", f"{factory}:make", "--workers", "2", "--rounds", "1"]
    assert run(tmp_path, *flags, "--local-epochs", "1", "--quiet") == 2
    error = one_error(capsys)
    assert "this factory takes 10 classes, not 3" in error and "Inner task failed" not in error


# ------------------------------------------------------------------- 9: options that would fail later


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--weight-decay", "nan", "weight_decay must be a finite number at least 0"),
        ("--lr", "inf", "lr must be a finite number greater than 0"),
        ("--alpha", "1e999", "alpha must be a finite number"),
        ("--mu", "-0.5", "mu must be a finite number at least 0"),
        ("--server-lr", "1e39", "at most 3.40282e+38"),
        ("--server-momentum", "1", "less than 1"),
        ("--val-fraction", "-inf", "val_fraction must be a finite number"),
        ("--seed", "-1", "seed must be an integer from 0 to 9,007,199,254,740,991"),
        ("--seed", str(10**20), "seed must be an integer from 0"),
        ("--workers", "0", "workers must be an integer from 1 to 99,999"),
        ("--workers", "100000", "workers must be an integer from 1 to 99,999"),
        ("--rounds", "0", "rounds must be an integer from 1"),
        ("--local-epochs", "-3", "local_epochs must be an integer from 1"),
        ("--batch-size", "-1", "batch_size must be an integer from 0"),
        ("--global-batch-size", "-128", "global_batch_size must be an integer from 0"),
        ("--patience", "-1", "patience must be an integer from 0"),
        ("--train-limit", str(2**60), "train_limit must be an integer from 0"),
        ("--image-size", "3", "image_size must be 0 (keep the images' size) or from 8 to 9459"),
        ("--image-size", "100000", "image_size must be 0"),
        ("--workers", "nan", "argument --workers: invalid int value: 'nan'"),
        ("--lr", "", "argument --lr: invalid float value: ''"),
        ("--dataset", "", "dataset is empty"),
    ],
)
def test_a_value_outside_an_options_range_is_refused_before_the_pipeline(
    tmp_path: Path,
    flag: str,
    value: str,
    expected: str,
    capsys: pytest.CaptureFixture[str],
    stop_at_pipeline: None,
) -> None:
    try:
        code = run(tmp_path, f"{flag}={value}")
    except SystemExit as e:  # argparse's own errors
        code = int(str(e.code))
    assert code == 2
    assert expected in one_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_more_local_workers_than_memory_holds_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stop_at_pipeline: None
) -> None:
    most = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // local_run.WORKER_PROCESS_MEMORY
    assert run(tmp_path, "--workers", str(most + 1)) == 2
    assert f"holds at most {most} worker processes" in one_error(capsys)
    with pytest.raises(Reached):
        run(tmp_path, "--workers", str(min(most, 8)))


# ---------------------------------------------------------------------- 10: ordinary events, no traceback


def test_a_runs_dir_that_is_a_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stop_at_pipeline: None
) -> None:
    afile = tmp_path / "runs.txt"
    afile.write_text("not a folder")
    assert main(["run", "--runs-dir", str(afile)]) == 2
    assert one_error(capsys) == f"microfed: error: --runs-dir '{afile}' is a file, not a folder"
    assert main(["run", "--runs-dir", str(afile / "sub")]) == 2
    assert f"{afile} is a file, not a folder" in one_error(capsys)
    assert afile.read_text() == "not a folder"


def test_a_used_run_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stop_at_pipeline: None
) -> None:
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "metrics.json").write_text("{}")
    assert run(tmp_path) == 2
    assert "already exists and is not empty" in one_error(capsys)


def test_ctrl_c_in_the_cli_is_one_line_with_exit_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(arguments: dict[str, Any], run_dir: Path, runs_dir: Path, **_: Any) -> RunResult:
        raise KeyboardInterrupt

    monkeypatch.setattr(local_run, "_execute", interrupted)
    assert run(tmp_path) == 130
    err = capsys.readouterr().err
    assert err == f"microfed: interrupted; the run folder {tmp_path / 'runs' / 'r'} is left as it was\n"


def session_processes(sid: int) -> list[int]:
    """Live processes of session `sid` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_an_interrupt_sent_to_the_run_alone_reaches_its_step_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT to `microfed run` only (not from a terminal): passed on to kfp's `sh -c` and what runs below it."""
    monkeypatch.setattr(step_processes, "_terminal_interrupted_our_group", lambda: False)  # even under `pytest -s`
    steps = StepProcesses(tmp_path / "errors.jsonl")
    script = (
        "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('child stopped', flush=True)\n"
    )
    command = ["sh", "-ec", f'{sys.executable} -c "$0"', script]  # as kfp.local starts a step
    out = io.StringIO()
    returned: list[int] = []

    def run_step() -> None:
        from contextlib import redirect_stdout

        with redirect_stdout(out):
            returned.append(steps.run(command))

    thread = threading.Thread(target=run_step)
    thread.start()
    deadline = time.monotonic() + 20
    while not (steps.process and step_processes._descendants(steps.process.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert steps.process is not None
    time.sleep(0.5)  # let the Python child install its KeyboardInterrupt handling
    tree = [steps.process.pid, *step_processes._descendants(steps.process.pid)]
    started = time.monotonic()
    steps.stop()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 10
    assert "child stopped" in out.getvalue()
    assert not [pid for pid in tree if Path(f"/proc/{pid}").exists()]


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_ctrl_c_during_training_stops_every_process_and_prints_one_line(tmp_path: Path) -> None:
    """A terminal's Ctrl-C: SIGINT to the whole process group, while the workers train."""
    zip_path = write_zip(tmp_path / "shapes.zip", per_class_train=8, per_class_test=2)
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "microfed.pipelines.cli", "run", "--runs-dir", str(runs), "--name", "r"]
    command += ["--dataset", str(zip_path), "--model", "cnn-small", "--workers", "2", "--rounds", "5000"]
    process = subprocess.Popen(
        [*command, "--local-epochs", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a shell gives a foreground job
    )
    try:
        deadline = time.monotonic() + 120
        while not list(runs.glob("r/kfp/*/train/micro_models/logs/worker-00001.log")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        time.sleep(1)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    assert err == f"microfed: interrupted; the run folder {runs / 'r'} is left as it was\n"
    deadline = time.monotonic() + 5
    while session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_processes(process.pid) == []
    assert (runs / "r" / "kfp.log").is_file()
