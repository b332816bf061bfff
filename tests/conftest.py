"""The test tiers, and the fixtures and helpers the test modules share (small, learnable synthetic datasets, so
tests do not depend on downloads).

Tiers (the markers in pyproject.toml): every test has exactly one of `unit`, `integration` and `e2e`; a test
marked with none is unit. A unit test may not start a process: every way this code base starts one fails the test
(_PROCESS_STARTS), so a new test that starts one fails until it is marked integration or e2e. `make test-unit` runs
`pytest -m unit`; `make test` runs all three.
"""

from __future__ import annotations

import io
import multiprocessing.process
import multiprocessing.util
import os
import signal
import subprocess
import zipfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from PIL import Image

from microfed.training.datasets import ImageData, LoadedDataset
from tests import gcs_emulator
from tests.gcs_emulator import GcsEmulator, gcs  # noqa: F401 - the fixture, for `base` and every module

if TYPE_CHECKING:
    from tests.local_operator import LocalOperator
    from tests.test_pytorchjob_backend import ApiServer

# ONNX Runtime's telemetry writes under $HOME and uploads events unless this is set before it starts (its
# Privacy.md); tests that import onnxruntime directly must not leave those files behind.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# --------------------------------------------------------------------------------------------------- the tiers

TIERS = ("unit", "integration", "e2e")

# A suite started in the background by a non-interactive shell (`(make test &)`) inherits SIGINT ignored (POSIX:
# asynchronous commands without job control), and so would every process it starts: the Ctrl-C tests need what a
# terminal gives, Python's own handler here and the default disposition in the processes started from here.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def tier_of(item: pytest.Item) -> str:
    """The item's tier, once pytest_collection_modifyitems has given every item exactly one."""
    return next(m.name for m in item.iter_markers() if m.name in TIERS)


@pytest.hookimpl(tryfirst=True)  # before the `-m` selection, which must see the tiers added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    problems = []
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if not tiers:
            item.add_marker("unit")
        elif len(tiers) > 1:
            problems.append(f"{item.nodeid} has the tiers {sorted(tiers)}: give it one")
        if tier_of(item) == "unit" and "gcs" in getattr(item, "fixturenames", ()):
            problems.append(f"{item.nodeid} uses the GCS emulator (a child process): mark it integration")
    if problems:
        raise pytest.UsageError("test tiers (tests/conftest.py):\n  " + "\n  ".join(problems))


class ProcessInUnitTest(RuntimeError):
    """A test of the unit tier tried to start a process."""


# What a unit test may not call: pytest_runtest_protocol replaces each for the test, its setup and teardown included.
# Between them they cover every way this code base and its tests start a process:
# - subprocess.Popen._execute_child: all of subprocess (run, check_output, Popen: the local launcher's workers,
#   kfp.local's SubprocessRunner steps, the local operator's pods, terraform, the GCS emulator, `microfed` as a
#   command), and what is built on it: os.popen, asyncio's subprocesses, jupyter_client's kernels (nbclient);
# - multiprocessing's BaseProcess.start: every start method (fork, spawn, forkserver) of multiprocessing and of
#   torch.multiprocessing (its spawn/start_processes, DataLoader workers), concurrent.futures' process pools;
#   multiprocessing.util.spawnv_passfds, which the forkserver and the resource tracker start their helpers with;
# - os.fork, os.forkpty (pty), os.posix_spawn(p), os.system (the spawn* functions fork through os.fork);
# - the GCS emulator's session server: a unit test must not reach the one an earlier test started, either.
# A process started from C or C++ (not through these) is not caught.
_PROCESS_STARTS: tuple[tuple[Any, str], ...] = (
    (subprocess.Popen, "_execute_child"),
    (multiprocessing.process.BaseProcess, "start"),
    (multiprocessing.util, "spawnv_passfds"),
    *((os, name) for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system") if hasattr(os, name)),
    (gcs_emulator, "_session_server"),
)
_ATTEMPTS = pytest.StashKey[list[str]]()


def _refusal(item: pytest.Item, what: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        message = (
            f"{item.nodeid} is a unit test and called {what}, which starts a process: mark the test "
            "@pytest.mark.integration (or e2e), or keep it in this process"
        )
        item.stash.setdefault(_ATTEMPTS, []).append(message)
        raise ProcessInUnitTest(message)

    return refuse


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    if tier_of(item) != "unit":
        return (yield)
    with pytest.MonkeyPatch.context() as patch:
        for owner, name in _PROCESS_STARTS:
            patch.setattr(owner, name, _refusal(item, f"{getattr(owner, '__name__', owner)}.{name}"))
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    attempts = item.stash.get(_ATTEMPTS, [])
    if attempts and report.passed:  # the code under test caught ProcessInUnitTest: the attempt still fails it
        report.outcome = "failed"
        report.longrepr = "\n".join(attempts)
    attempts.clear()
    return report


# ------------------------------------------------------------------------------------------------ shared data

CLASSES = ("circle", "square", "triangle")


def pattern_images(labels: np.ndarray, side: int = 16, seed: int = 0) -> np.ndarray:
    """Grayscale images where the class decides which horizontal band is bright: easy to learn, not trivial."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), side, side), dtype=np.uint8)
    band = side // 3
    for i, y in enumerate(labels):
        images[i, y * band : (y + 1) * band, :] += 150
    return images


def synthetic_dataset(n_train: int = 90, n_test: int = 30, side: int = 16) -> LoadedDataset:
    def part(n: int, seed: int) -> ImageData:
        labels = np.arange(n) % len(CLASSES)
        images = pattern_images(labels, side, seed)
        return ImageData(
            images=torch.from_numpy(images).unsqueeze(1),
            labels=torch.from_numpy(labels).long(),
            class_names=CLASSES,
        )

    return LoadedDataset(name="synthetic", train=part(n_train, 1), test=part(n_test, 2))


def write_zip(
    path: Path,
    per_class_train: int = 30,
    per_class_test: int = 10,
    side: int = 16,
    top: str = "shapes/",
    with_test: bool = True,
) -> Path:
    """A zip in the reference platform's upload layout: top folder, train/ and test/, one folder per class."""
    with zipfile.ZipFile(path, "w") as zf:
        splits = [("train", per_class_train, 1)] + ([("test", per_class_test, 2)] if with_test else [])
        for split, n, seed in splits:
            labels = np.repeat(np.arange(len(CLASSES)), n)
            for i, (img, y) in enumerate(zip(pattern_images(labels, side, seed), labels, strict=True)):
                buf = io.BytesIO()
                Image.fromarray(img, mode="L").save(buf, format="PNG")
                zf.writestr(f"{top}{split}/{CLASSES[y]}/{i:04d}.png", buf.getvalue())
        zf.writestr(f"__MACOSX/{top}train/._junk", b"\0\1")
    return path


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """Each `relative/path: bytes` of `files` as a file under root."""
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def sparse_file(path: Path, size: int) -> Path:
    """A file of `size` bytes that takes no disk space (a hole), like the issue's sparse 3 GB ".png"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        file.truncate(size)
    return path


@pytest.fixture
def shapes_zip(tmp_path: Path) -> Path:
    return write_zip(tmp_path / "shapes.zip")


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.integration)])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A folder to write into, once as a local path (unit) and once as a gs:// prefix on the emulator."""
    if request.param == "local":
        return str(tmp_path / "base")
    emulator: GcsEmulator = request.getfixturevalue("gcs")
    return emulator.uri("base")


@pytest.fixture
def api() -> Iterator[ApiServer]:
    """A loopback server that answers as the Kubernetes API server does (a thread of this process)."""
    from tests.test_pytorchjob_backend import ApiServer

    server = ApiServer()
    yield server
    server.httpd.shutdown()


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[LocalOperator]:
    """The local model of the Training Operator; its pods are processes, so only integration tests use it."""
    from tests.local_operator import LocalOperator

    with LocalOperator(tmp_path / "pods") as op:
        yield op
