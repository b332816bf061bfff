"""What a run leaves behind outside its run folder: nothing in the temp folder, and nothing under the home folder
but the cache folder the README names (~/.cache/microfed).

Found by running `microfed run` with TMPDIR and HOME pointed at fresh folders (issue 14, item 13): before the
fix, every step left kfp.local's component file in the temp folder (`program_path=$(mktemp -d)` in kfp's command
for lightweight components, kfp/dsl/component_factory.py), a step left an empty `torchinductor_<user>`, ONNX
Runtime's telemetry wrote `.ses` there and ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,
onnxruntime.db} under HOME, and matplotlib created ~/.config/matplotlib and ~/.cache/matplotlib.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from microfed.pipelines.local_run import step_environment, tool_environment
from tests.conftest import write_zip

# Variables under which ONNX Runtime turns its telemetry off by itself (CI systems, its own test harness:
# onnxruntime/core/platform/telemetry_environment.h): removed, so that the run below shows what microfed does.
_ORT_SELF_DISABLING = (
    "CI",
    "TF_BUILD",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "CIRCLECI",
    "TRAVIS",
    "JENKINS_URL",
    "CODEBUILD_BUILD_ID",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "APPVEYOR",
    "BITBUCKET_BUILD_NUMBER",
    "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI",
    "ORT_RUNNING_UNIT_TESTS",
)


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.e2e
def test_a_run_leaves_nothing_in_tmpdir_and_only_the_named_cache_under_home(tmp_path: Path) -> None:
    home, temp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    temp.mkdir()
    dataset = write_zip(tmp_path / "shapes.zip", per_class_train=8, per_class_test=2)
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("XDG_", "MPL", "ORT_")) and name not in _ORT_SELF_DISABLING
    }
    env.update(HOME=str(home), TMPDIR=str(temp))
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "microfed.pipelines.cli", "run", "--runs-dir", str(runs), "--name", "r"]
    small = ["--model", "cnn-small", "--workers", "1", "--rounds", "1", "--local-epochs", "1", "--val-fraction", "0"]
    done = subprocess.run(
        [*command, "--dataset", str(dataset), *small, "--quiet"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # and `microfed predict`, the other user of ONNX Runtime
    image = tmp_path / "square.png"
    image.write_bytes(zipfile.ZipFile(dataset).read("shapes/test/square/0002.png"))
    predict = [sys.executable, "-m", "microfed.pipelines.cli", "predict", str(runs / "r" / "model.onnx"), str(image)]
    done = subprocess.run(predict, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    assert everything_under(temp) == []
    assert [p for p in everything_under(home) if p != ".cache" and not f"{p}/".startswith(".cache/microfed/")] == []
    assert (home / ".cache/microfed/matplotlib").is_dir()  # matplotlib's font list, kept for the next run
    assert (runs / "r" / "report.html").is_file()


def test_steps_get_a_temp_folder_of_the_run_and_the_tools_keep_to_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("MPLCONFIGDIR", "ORT_DISABLE_TELEMETRY"):
        monkeypatch.delenv(name, raising=False)
    env = step_environment(tmp_path / "run-tmp")
    assert env["TMPDIR"] == str(tmp_path / "run-tmp")
    assert env["MPLCONFIGDIR"] == str(tmp_path / ".cache" / "microfed" / "matplotlib")
    assert env["ORT_DISABLE_TELEMETRY"] == "1"
    # a value the user chose is theirs
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mine"))
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    assert tool_environment() == {"MPLCONFIGDIR": str(tmp_path / "mine"), "ORT_DISABLE_TELEMETRY": "0"}


def test_onnx_runtime_is_imported_with_its_telemetry_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from microfed.training.predict import disable_onnxruntime_telemetry

    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    disable_onnxruntime_telemetry()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    disable_onnxruntime_telemetry()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "0"
