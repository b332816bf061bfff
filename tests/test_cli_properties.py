"""`microfed run` fed random option values (nan, inf, huge, negative, empty, control characters): every
command either reaches the pipeline start with a run folder inside --runs-dir, or ends with exit code 2 and
one error line (and at most a hint), escaped, without a traceback.

The commands go through `main()` exactly as a user's do, parsing and every pre-flight check included; only
the pipeline itself is replaced, at `local_run._execute`, by a stand-in that records where it would write.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from microfed.pipelines import local_run
from microfed.pipelines.cli import _fields, main
from microfed.training.text import is_printable

pytestmark = pytest.mark.unit

_RUN = _fields("run")
_INT_OPTIONS = [name for name, f in _RUN.items() if f.type is int]
_FLOAT_OPTIONS = [name for name, f in _RUN.items() if f.type is float]
_TEXT_OPTIONS = [name for name, f in _RUN.items() if f.type is str and name not in ("dataset", "model")]

# The values that broke things before, and their neighbours.
_SPECIAL = ["", " ", "nan", "NaN", "-nan", "inf", "-inf", "1e999", "-1e999", "0", "-0", "-1", "1e-320", "0x10"]
_HUGE = ["9" * 30, "-" + "9" * 30, str(2**53), str(2**63), str(2**64), "1e308", "3.5e38", "1e39"]
_CONTROL = ["\x1b[31m", "\x1b]0;t\x07", "a\nFAKE: test accuracy 1.0000", "\x00", "\udcff", "\u202e", "../x", "/"]


def _number_text(kind: type) -> st.SearchStrategy[str]:
    if kind is int:
        usual, anything = st.integers(0, 20), st.integers(min_value=-(2**70), max_value=2**70)
    else:
        usual, anything = st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True)
    return st.one_of(
        usual.map(str), anything.map(str), st.sampled_from(_SPECIAL + _HUGE + _CONTROL), st.text(max_size=8)
    )


def _options() -> st.SearchStrategy[dict[str, str]]:
    """A few pipeline options with random values; the others keep their defaults."""
    by_name: dict[str, st.SearchStrategy[str]] = {}
    for name in _INT_OPTIONS:
        by_name[name] = _number_text(int)
    for name in _FLOAT_OPTIONS:
        by_name[name] = _number_text(float)
    for name in _TEXT_OPTIONS:
        by_name[name] = st.one_of(st.sampled_from(_SPECIAL + _CONTROL), st.text(max_size=12))
    by_name["dataset"] = st.one_of(
        st.just("fashion-mnist"), st.just("MNIST"), st.sampled_from(_SPECIAL + _CONTROL), st.text(max_size=12)
    )
    by_name["model"] = st.one_of(st.just("cnn-small"), st.sampled_from(_SPECIAL + _CONTROL), st.text(max_size=12))
    return st.sets(st.sampled_from(sorted(by_name)), max_size=4).flatmap(
        lambda chosen: st.fixed_dictionaries({name: by_name[name] for name in chosen})
    )


_RUNS_DIRS = st.one_of(
    st.just("runs"), st.sampled_from(["runs", "nested/runs", "a-file", "a-file/under", "", "\x1b[2J", "runs\n"])
)
_NAMES = st.one_of(
    st.none(),
    st.just("r"),
    st.sampled_from(["exp 1", "..", ".", "", "../x", "a/b", "/abs", "x\x07"]),
    st.text(max_size=6),
)


class _Reached(BaseException):
    def __init__(self, arguments: dict[str, Any], run_dir: Path) -> None:
        self.arguments, self.run_dir = arguments, run_dir


def _reached(arguments: dict[str, Any], run_dir: Path, runs_dir: Path, **_: Any) -> Any:
    raise _Reached(arguments, run_dir)


def _run(argv: list[str]) -> tuple[int | _Reached, str]:
    err = io.StringIO()
    with mock.patch.object(local_run, "_execute", _reached), contextlib.redirect_stderr(err):
        try:
            result: int | _Reached = main(argv)
        except _Reached as reached:
            result = reached
        except SystemExit as e:  # argparse's own errors
            result = e.code if isinstance(e.code, int) else 2
    return result, err.getvalue()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=_options(), runs_dir=_RUNS_DIRS, name=_NAMES)
def test_any_option_values_reach_the_pipeline_or_fail_with_one_line(
    options: dict[str, str], runs_dir: str, name: str | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "a-file").write_text("not a folder")
        runs = str(root / runs_dir) if runs_dir else ""
        argv = ["run", f"--runs-dir={runs}", *([f"--name={name}"] if name is not None else [])]
        argv += [f"--{option.replace('_', '-')}={value}" for option, value in options.items()]
        result, err = _run(argv)
        event(
            "reached the pipeline"
            if isinstance(result, _Reached)
            else "refused by " + ("argparse" if "argument --" in err else "a check")
        )
        if isinstance(result, _Reached):  # at the pipeline start: the run folder inside --runs-dir, quiet
            assert result.run_dir.parent == Path(runs) and err == ""
            assert result.run_dir.resolve().is_relative_to(Path(runs).resolve())
            # and arguments KFP can pass on unchanged: finite numbers (JSON), integers a double holds exactly
            json.dumps(result.arguments, allow_nan=False)
            assert all(abs(v) < 2**53 for v in result.arguments.values() if type(v) is int)
            return
        assert result == 2, (argv, result, err)
        lines = err.splitlines()
        assert 1 <= len(lines) <= 2 and lines[0].startswith("microfed: error: "), (argv, err)
        assert all(line.startswith("microfed: hint: ") for line in lines[1:]), (argv, err)
        assert "Traceback" not in err and all(is_printable(line) for line in lines), (argv, err)
        assert sorted(p.name for p in root.iterdir()) == ["a-file"]  # nothing written
