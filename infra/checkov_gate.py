"""Run checkov on infra/ and fail on anything but a clean result.

checkov exits 0 when a file does not parse (it just checks fewer resources), so its exit status is not enough. This
gate reads checkov's JSON report and fails when

- any file could not be parsed, or nothing at all was checked;
- any check failed;
- a check was skipped without a reason, or its ID is not listed in infra/README.md (every skip is documented).

Usage (make infra-check runs it with checkov's own virtualenv):

    python3 infra/checkov_gate.py --checkov .venv-checkov/bin/checkov [--report FILE] [DIR]

Standard library only: it runs under any Python 3.11+.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Verdict", "evaluate", "main", "run_checkov"]

INFRA = Path(__file__).resolve().parent


@dataclass
class Verdict:
    """What the report says, and every reason to fail."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    parsing_errors: list[str] = field(default_factory=list)
    resources: int = 0
    skips: list[tuple[str, str, str]] = field(default_factory=list)
    """(check id, resource, reason) of every skipped check."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _reports(raw: Any) -> list[dict[str, Any]]:
    """checkov prints one report object per framework, a list of them for several, or a bare summary when it found
    nothing to scan."""
    if isinstance(raw, list):
        return [r for r in raw if isinstance(r, dict)]
    if isinstance(raw, dict):
        return [raw]
    raise ValueError(f"unexpected checkov JSON: {type(raw).__name__}")


def evaluate(raw: Any, readme: str) -> Verdict:
    """Judge a parsed checkov JSON report; `readme` is infra/README.md, which must name every skipped check."""
    verdict = Verdict()
    for report in _reports(raw):
        summary = report.get("summary", report)
        results = report.get("results", {})
        verdict.passed += int(summary.get("passed", 0))
        verdict.failed += int(summary.get("failed", 0))
        verdict.skipped += int(summary.get("skipped", 0))
        verdict.resources += int(summary.get("resource_count", 0))
        errors = results.get("parsing_errors") or []
        if not errors and int(summary.get("parsing_errors", 0)):
            errors = [f"{summary['parsing_errors']} file(s)"]
        verdict.parsing_errors += [str(e) for e in errors]
        for check in results.get("failed_checks", []):
            verdict.problems.append(
                f"FAILED {check.get('check_id')} {check.get('check_name', '')} "
                f"on {check.get('resource')} ({check.get('file_path')}:{check.get('file_line_range')})"
            )
        for check in results.get("skipped_checks", []):
            check_id = str(check.get("check_id"))
            reason = str((check.get("check_result") or {}).get("suppress_comment") or "").strip()
            verdict.skips.append((check_id, str(check.get("resource")), reason))
            if len(reason) < 20:
                verdict.problems.append(
                    f"{check_id} on {check.get('resource')} is skipped without a real reason: "
                    "write #checkov:skip=ID:<why this check does not apply>"
                )
            if not re.search(rf"\b{re.escape(check_id)}\b", readme):
                verdict.problems.append(
                    f"{check_id} is skipped but not listed in infra/README.md: add it with its reason"
                )
    for error in verdict.parsing_errors:
        verdict.problems.append(f"checkov could not parse {error}: fix the syntax (terraform fmt shows where)")
    if verdict.failed and not any(p.startswith("FAILED") for p in verdict.problems):
        verdict.problems.append(f"{verdict.failed} check(s) failed")
    if verdict.passed == 0:
        verdict.problems.append("checkov checked nothing: wrong directory, or every file failed to parse")
    return verdict


def run_checkov(checkov: str, directory: Path) -> Any:
    """Run checkov's Terraform checks on `directory` and return its parsed JSON report."""
    command = [checkov, "-d", str(directory), "--framework", "terraform", "--output", "json", "--skip-download"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"checkov printed no JSON report (exit status {proc.returncode}): {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", type=Path, default=INFRA, help="directory to scan (default: infra/)")
    parser.add_argument("--checkov", default="checkov", help="checkov executable (default: checkov on PATH)")
    parser.add_argument("--report", type=Path, help="also write checkov's JSON report to this file")
    args = parser.parse_args(argv)

    raw = run_checkov(args.checkov, args.directory)
    if args.report:
        args.report.write_text(json.dumps(raw, indent=1))
    verdict = evaluate(raw, (INFRA / "README.md").read_text())
    print(
        f"checkov on {args.directory}: {verdict.passed} passed, {verdict.failed} failed, {verdict.skipped} skipped, "
        f"{len(verdict.parsing_errors)} parsing errors ({verdict.resources} resources)"
    )
    for check_id, resource, reason in verdict.skips:
        print(f"  skipped {check_id} on {resource}: {reason}")
    for problem in verdict.problems:
        print(f"  {problem}", file=sys.stderr)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
