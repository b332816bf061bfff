"""The import names map onto the top-level folders in a way tools can follow: `microfed.training.x` is
src/microfed/training/x.py, a committed link to training/x.py, so mypy (pyproject.toml's mypy_path), an editor and a
reader go from an import to its file without a build step; the installed package (setuptools' package-dir) is the
same file."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "components", "pipelines")


@pytest.mark.parametrize("folder", PACKAGES)
def test_src_microfed_links_each_folder(folder: str) -> None:
    link = ROOT / "src" / "microfed" / folder
    assert link.is_symlink(), f"src/microfed/{folder} must be a link to ../../{folder}"
    assert link.resolve() == ROOT / folder
    assert (link / "__init__.py").is_file()


@pytest.mark.parametrize("module", ["microfed.training.config", "microfed.components.steps", "microfed.pipelines.cli"])
def test_an_import_name_is_the_file_under_src(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    under_src = ROOT / "src" / Path(*module.split(".")).with_suffix(".py")
    assert Path(spec.origin).resolve() == under_src.resolve()


def test_mypy_reads_the_packages_through_src() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mypy, setuptools = config["tool"]["mypy"], config["tool"]["setuptools"]
    assert mypy["mypy_path"] == "src"
    assert sorted(mypy["packages"]) == sorted(f"microfed.{p}" for p in PACKAGES)
    assert setuptools["package-dir"] == {f"microfed.{p}": p for p in PACKAGES}
