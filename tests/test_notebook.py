"""notebooks/quickstart.ipynb runs top to bottom (small configuration); any failing cell fails the test."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.e2e

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (make data)")
def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "QUICKSTART_TRAIN_LIMIT": "1500",
        "QUICKSTART_TEST_LIMIT": "300",
        "QUICKSTART_ROUNDS": "2",
        "QUICKSTART_LOCAL_EPOCHS": "1",
        "QUICKSTART_RUNS_DIR": str(tmp_path / "runs"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KFP_HOST", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "\n".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    assert "test accuracy" in outputs and "after 2 rounds" in outputs
    assert "pipeline-for-kubeflow.yaml" in outputs
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    # beside the run folders: the workers' measured usage, which the next run's resource plan starts from
    assert (tmp_path / "runs" / "usage-cache.json").exists()
    assert (run_dir / "pipeline-for-kubeflow.yaml").exists() and (run_dir / "metrics.json").exists()
    assert "set KFP_HOST to submit" in outputs  # the submit cell ran its no-host branch
