# ruff: noqa: RUF001, RUF002, RUF003 - the READMEs print × and − (U+2212): the tests quote them as printed
"""Every number in the benchmark READMEs' tables comes from a results file the code wrote (issue 17, item 2).

The checked files are benchmarks/README.md and the project README.md (every markdown table in either, indented
ones included); the results files are the committed benchmarks/results*.json (results.json from the full
`bench.py` run, results-<rows>.json from `bench.py --only <rows>` runs). Every number anywhere in those JSON
files counts, found by walking them recursively (booleans are not numbers).

Matching rule. A table number x printed with d decimals ("3,711" d = 0, "90.11%" d = 2, "+2.16" d = 2, "1.42×"
d = 2) is backed when some JSON number v gives round(v, d) == x (the value as stored), or round(100 * v, d) == x
(a fraction shown as a percent: `ours_accuracy` 0.8915 printed as 89.15%). The sign counts: "−1.46" needs a
value of -1.46. Nothing else is accepted: a difference or a ratio the README computed by hand is unbacked, and
belongs in the JSON (the accuracy rows carry `gap_points`, the strategy rows `gain_points`).

What is not checked, and why:
- the first column of every table: the row's configuration ("3 workers", "5 × 1 epoch", "Dirichlet 0.5"), not a
  measurement;
- a column whose header contains the word "reference": numbers quoted from elsewhere (the GKE project), which
  the header must name as a reference with its source;
- header cells (column labels such as "fedprox μ=0.01"), and commit hashes in code spans (`3f682d7`);
- in a table outside a results section, every column but the goal. A results section is everything under a
  heading with the word "results" in it ("## Latest results"), up to the next heading of its level or higher; a
  table that quotes benchmark results goes there, in either README. The tables outside describe (benchmarks/
  README.md's method table: "the 2048² matmul peak", "1-64 workers") or configure (README.md's limits); they
  quote no run.
A goal cell ("≥ 1.5×", "≤ 0.5", "≥ 45%") is checked by the same rule, but only against the values of the JSON's
`goal*` keys (`goal`, `goal_points`), so a threshold must be the one the code tested.

When a number is unbacked the test prints it with its file, line, row and column, so a human can fix the table:
take the cell out, or put in the value a results file holds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
READMES = (BENCH / "README.md", REPO / "README.md")
RESULTS_WORD = "results"  # a heading with this word ("## Latest results") opens a section of results tables
SEPARATOR = re.compile(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?")

# A number: thousands separated by commas ("1,727,074"), an optional fraction; a sign only where it starts a word
# ("+2.16", "(−1.46)"), so the hyphen of "1-64" is not one. Digits glued to letters ("bf16", "fp32") are names.
NUMBER = re.compile(r"(?<![A-Za-z_0-9.,])(?P<int>[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.(?P<frac>[0-9]+))?")
SIGNS = {"+": 1, "-": -1, "−": -1}
COMMIT_SPAN = re.compile(r"`[0-9a-f]{7,40}`")


@dataclass(frozen=True)
class Pool:
    """The JSON numbers: all of them, and those of `goal*` keys."""

    values: tuple[float, ...]
    goals: tuple[float, ...]


@dataclass(frozen=True)
class Cell:
    table: int  # 1-based line of the table's header
    line: int  # 1-based line of the row in its file
    row: str  # the row's first cell, to name it
    column: str  # the column's header
    text: str
    checked: bool  # False: configuration, a reference column, or a method table's description
    goal: bool


def _walk(obj: Any, key: str, values: list[float], goals: list[float]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, str(k), values, goals)
    elif isinstance(obj, list):
        for v in obj:
            _walk(v, key, values, goals)
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        values.append(float(obj))
        if key.startswith("goal"):
            goals.append(float(obj))


def pool_of(documents: list[Any]) -> Pool:
    values: list[float] = []
    goals: list[float] = []
    for doc in documents:
        _walk(doc, "", values, goals)
    return Pool(tuple(values), tuple(goals))


def committed_pool() -> Pool:
    files = sorted(BENCH.glob("results*.json"))
    assert files, f"no results*.json in {BENCH}"
    return pool_of([json.loads(f.read_text()) for f in files])


def _cells(line: str) -> list[str]:
    inner = line.strip()
    inner = inner[1:-1] if inner.endswith("|") else inner[1:]
    return [c.strip() for c in inner.split("|")]


def table_cells(text: str) -> Iterator[Cell]:
    """Every body cell of every markdown table in `text` (outside code fences), with what decides whether it is
    checked."""
    lines = text.splitlines()
    results_level = 0  # the level of the heading that opened the results section; 0: outside one
    fenced = False
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"(#+)\s", stripped)
        if heading:
            level = len(heading.group(1))
            if RESULTS_WORD in stripped.lower():
                results_level = level
            elif level <= results_level:
                results_level = 0
        is_table = (
            not fenced
            and stripped.startswith("|")
            and i + 1 < len(lines)
            and SEPARATOR.fullmatch(lines[i + 1].strip()) is not None
        )
        if not is_table:
            i += 1
            continue
        header, table = _cells(lines[i]), i + 1
        i += 2
        while i < len(lines) and lines[i].strip().startswith("|"):
            cells = _cells(lines[i])
            for col, cell in enumerate(cells):
                name = header[col] if col < len(header) else f"column {col + 1}"
                goal = name.lower() == "goal"
                checked = col > 0 and "reference" not in name.lower() and (results_level > 0 or goal)
                yield Cell(table, i + 1, cells[0], name, cell, checked, goal)
            i += 1


def numbers(cell: str) -> Iterator[tuple[str, float, int]]:
    """(as printed, value, decimals) for every number in a cell."""
    cell = COMMIT_SPAN.sub("", cell).replace("*", "")
    for m in NUMBER.finditer(cell):
        before = cell[m.start() - 1] if m.start() > 0 else ""
        sign, start = 1, m.start()
        if before in SIGNS and (m.start() < 2 or not cell[m.start() - 2].isalnum()):
            sign, start = SIGNS[before], m.start() - 1
        frac = m.group("frac") or ""
        value = sign * float(m.group("int").replace(",", "") + ("." + frac if frac else ""))
        yield cell[start : m.end()], value, len(frac)


def backed(value: float, decimals: int, candidates: tuple[float, ...]) -> bool:
    tolerance = 10.0 ** -(decimals + 6)  # float noise only: round() already did the README's rounding
    return any(
        abs(round(v, decimals) - value) < tolerance or abs(round(100 * v, decimals) - value) < tolerance
        for v in candidates
    )


def unbacked(text: str, name: str, pool: Pool) -> tuple[list[str], int]:
    """The problems (one line per unbacked number) and how many numbers were checked."""
    problems, checked = [], 0
    for cell in table_cells(text):
        if not cell.checked:
            continue
        for shown, value, decimals in numbers(cell.text):
            checked += 1
            if not backed(value, decimals, pool.goals if cell.goal else pool.values):
                what = "no goal value in results*.json" if cell.goal else "in no results*.json"
                problems.append(
                    f"{name}:{cell.line}: {shown} ({what}) in row {cell.row!r}, column {cell.column!r}: {cell.text!r}"
                )
    return problems, checked


# ------------------------------------------------------------------------------------------------------- the READMEs


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_table_number_comes_from_a_results_file(readme: Path) -> None:
    problems, _ = unbacked(readme.read_text(), str(readme.relative_to(REPO)), committed_pool())
    for p in problems:
        print(p)
    assert not problems, "numbers no results file holds:\n" + "\n".join(problems)


def test_the_benchmark_readme_tables_are_read() -> None:
    """The checker finds benchmarks/README.md's results (a parser that found none would pass vacuously)."""
    text = (BENCH / "README.md").read_text()
    _, checked = unbacked(text, "benchmarks/README.md", committed_pool())
    assert checked >= 100
    shown = {s for c in table_cells(text) if c.checked for s, _, _ in numbers(c.text)}
    assert {"1.42", "90.11", "+2.16", "1,727,074"} <= shown


# ---------------------------------------------------------------------------------------------- the checker itself

POOL = pool_of(
    [
        {
            "rows": [
                {"ours": 3710.61, "ratio": 1.4228, "goal": 1.5, "ours_accuracy": 0.8915},
                {"ours": 90.11, "gap_points": 2.1599999999999966, "goal_points": 0.5, "gain_points": -1.46},
            ],
            "reference_epochs": 90,
            "met": True,  # a boolean is not the number 1
        }
    ]
)

TABLE = """\
## Latest results

| row | ours | ratio | gap (points) | goal |
|---|---|---|---|---|
| data path, 3 workers × 5 epochs at `3f682d7` | 3,711 img/s, 89.15% | 1.42× | +2.16, (−1.46) | ≥ 1.5× |
| accuracy | **90.11%** | — | | ≤ 0.5 |
"""


def test_a_table_of_backed_numbers_passes() -> None:
    problems, checked = unbacked(TABLE, "t.md", POOL)
    assert problems == []
    assert checked == 8  # 3,711 89.15 1.42 +2.16 −1.46 1.5 90.11 0.5: not the first column's 3 and 5


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        ("3,711 img/s", "3,712 img/s"),  # a measurement
        ("89.15%", "89.16%"),  # a fraction shown as a percent
        ("1.42×", "0.12×"),  # a ratio computed by hand
        ("+2.16", "+2.17"),  # a difference
        ("(−1.46)", "(+1.46)"),  # the sign counts
        ("≥ 1.5×", "≥ 1.4×"),  # a goal the code did not test
    ],
)
def test_a_changed_number_is_reported_with_its_row(good: str, bad: str) -> None:
    problems, _ = unbacked(TABLE.replace(good, bad), "t.md", POOL)
    assert len(problems) == 1, problems
    shown = bad.strip("()≥ ×%").split()[0]
    assert problems[0].startswith(f"t.md:5: {shown} "), problems[0]
    assert "row 'data path, 3 workers × 5 epochs at `3f682d7`'" in problems[0]


def test_fewer_decimals_are_backed_by_the_same_value() -> None:
    """round(2.16, 1) = 2.2: a number printed with fewer decimals is the same value, still backed."""
    assert unbacked(TABLE.replace("+2.16", "+2.2"), "t.md", POOL)[0] == []


def test_a_boolean_is_not_a_number() -> None:
    problems, _ = unbacked(TABLE.replace("1.42×", "1×"), "t.md", pool_of([{"ours": 3710.61, "met": True}]))
    assert any(p.startswith("t.md:5: 1 ") for p in problems), problems


def test_a_goal_must_be_a_goal_value() -> None:
    """90.11 is in the results, but not as a goal."""
    problems, _ = unbacked(TABLE.replace("≤ 0.5", "≤ 90.11"), "t.md", POOL)
    assert len(problems) == 1 and "no goal value" in problems[0] and "row 'accuracy'" in problems[0]


def test_a_reference_column_is_exempt() -> None:
    quoted = """\
## Latest results

| workers | projected epoch (s) | reference epoch (s), from the GKE project's README |
|---|---|---|
| 1 | 1.42 | 75.4 |
"""
    assert unbacked(quoted, "t.md", POOL)[0] == []
    unlabelled = quoted.replace("reference epoch (s), from the GKE project's README", "GKE epoch (s)")
    problems, _ = unbacked(unlabelled, "t.md", POOL)
    assert len(problems) == 1 and problems[0].startswith("t.md:5: 75.4 "), problems


def test_outside_a_results_section_only_goals_are_checked() -> None:
    method = """\
# benchmarks/

| row | ours | alternative | goal |
|---|---|---|---|
| compute | the loop on 1-64 workers | the 2048² matmul peak | ≥ 45% |

```
## Latest results (in a code block: not a heading)
```

| row | ours | goal |
|---|---|---|
| compute | 7 GFLOP/s | ≥ 50% |
"""
    problems, checked = unbacked(method, "t.md", POOL)
    assert checked == 2
    assert problems == ["t.md:5: 45 (no goal value in results*.json) in row 'compute', column 'goal': '≥ 45%'"]


def test_a_changed_number_in_the_real_readme_is_caught() -> None:
    """Every measured number of benchmarks/README.md's first results table, its last digit changed in a copy, fails
    the check on that line, unless the changed value happens to be another number of the results files (the rule
    matches against all of them: a two-digit ratio such as 0.87 often is)."""
    pool = committed_pool()
    text = (BENCH / "README.md").read_text()
    lines = text.splitlines()
    cells = [c for c in table_cells(text) if c.checked and not c.goal]
    caught = 0
    for cell in (c for c in cells if c.table == cells[0].table):
        for shown, _, decimals in numbers(cell.text):
            changed = shown[:-1] + str((int(shown[-1]) + 5) % 10)
            copy = lines.copy()
            copy[cell.line - 1] = copy[cell.line - 1].replace(shown, changed, 1)
            problems, _ = unbacked("\n".join(copy), "copy", pool)
            mine = [p for p in problems if p.startswith(f"copy:{cell.line}: {changed} ")]
            if mine:
                caught += 1
                assert repr(cell.row) in mine[0]
            else:
                assert backed(float(changed.replace(",", "")), decimals, pool.values), (cell, changed, problems)
    assert caught >= 20
