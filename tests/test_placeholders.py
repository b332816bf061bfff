"""The compiled pipeline as the KFP 2.14 backend runs it (issue 12, defects 3, 11 and 12).

Placeholders: every `{{$...}}` in the YAML must be one the backend replaces, where it replaces it; the list and
its sources are pipelines/backend_placeholders.json (kubeflow/pipelines 2.14.3: backend/src/v2/driver/resolve.go,
`resolveInputParameter`; backend/src/v2/component/launcher_v2.go, `compileCmdAndArgs`, `getPlaceholders`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from microfed.pipelines.pipeline import compile_pipeline

pytestmark = pytest.mark.unit

ALLOWED = json.loads((Path(__file__).parents[1] / "pipelines" / "backend_placeholders.json").read_text())
PLACEHOLDER = re.compile(r"\{\{\$(?:\.[^{}]*)?\}\}")
EXECUTOR_INPUT = "{{$}}"
# the part of a component spec that declares NAME for each launcher placeholder
_SECTIONS = {
    ("inputs", "parameters"): ("inputDefinitions", "parameters"),
    ("inputs", "artifacts"): ("inputDefinitions", "artifacts"),
    ("outputs", "parameters"): ("outputDefinitions", "parameters"),
    ("outputs", "artifacts"): ("outputDefinitions", "artifacts"),
}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "pipeline.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1, "a platform spec appeared: extend unresolved_placeholders to it"
    compiled: dict[str, Any] = docs[0]
    return compiled


def _strings(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, (*path, i))
    elif isinstance(node, str):
        yield path, node


def _launcher_pattern(template: str) -> tuple[re.Pattern[str], tuple[str, str] | None]:
    """A regex for a launcher placeholder ("NAME" any name) and the component section NAME must be in."""
    if "NAME" not in template:
        return re.compile(re.escape(template)), None
    io, kind = template[len("{{$.") :].split("[")[0].split(".")
    return re.compile(re.escape(template).replace("NAME", "([^']+)")), _SECTIONS[(io, kind)]


def _launcher_problems(spec: dict[str, Any], executor: str, words: list[str]) -> list[str]:
    component = next(c for c in spec["components"].values() if c.get("executorLabel") == executor)
    patterns = [_launcher_pattern(t) for t in ALLOWED["launcher"]["placeholders"]]
    problems = []
    for i, word in enumerate(words):
        for found in PLACEHOLDER.findall(word):
            if i == 0 and found != EXECUTOR_INPUT:  # the launcher runs word 0 with only {{$}} replaced
                problems.append(f"{executor}: {found} in the first word of command + args")
            for pattern, section in patterns:
                match = pattern.fullmatch(found)
                if match and (section is None or match[1] in component.get(section[0], {}).get(section[1], {})):
                    break
            else:
                problems.append(f"{executor}: {found} is not a launcher placeholder of this component")
    return problems


def unresolved_placeholders(spec: dict[str, Any]) -> list[str]:
    """Each `{{$...}}` of the compiled spec that the KFP 2.14 backend would pass on as text, with its place."""
    driver = ALLOWED["driver"]["placeholders"]
    problems = []
    for path, text in _strings(spec):
        if not PLACEHOLDER.search(text) or _in_command_or_args(path):
            continue
        if "tasks" in path and path[-2:] == ("runtimeValue", "constant") and text in driver:
            continue
        problems.append(f"{'.'.join(map(str, path))}: {text!r}")
    for name, executor in spec["deploymentSpec"]["executors"].items():
        container = executor.get("container", {})
        problems += _launcher_problems(spec, name, [*container.get("command", []), *container.get("args", [])])
    return problems


def _in_command_or_args(path: tuple[Any, ...]) -> bool:
    """deploymentSpec.executors.<executor>.container.command|args.<i>: checked by `_launcher_problems`."""
    return path[:2] == ("deploymentSpec", "executors") and path[3:5] in (
        ("container", "command"),
        ("container", "args"),
    )


def test_every_placeholder_of_the_compiled_pipeline_is_resolved_by_the_kfp_2_14_backend(spec: dict[str, Any]) -> None:
    assert unresolved_placeholders(spec) == []


def test_the_pipeline_uses_the_run_id_and_task_name_placeholders_the_driver_resolves(spec: dict[str, Any]) -> None:
    train = spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]

    assert train["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert train["task_name"]["runtimeValue"]["constant"] == "{{$.pipeline_task_name}}"
    assert "pipeline_root" not in train


def test_the_check_reports_what_the_backend_leaves_as_text(spec: dict[str, Any]) -> None:
    """The check is not vacuous: the pipeline root placeholder (resolved only by kfp.local), a resolvable
    placeholder inside a longer constant, and a launcher placeholder naming no input are each reported."""
    doctored = json.loads(json.dumps(spec))
    train = doctored["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    train["pipeline_root"] = {"runtimeValue": {"constant": "{{$.pipeline_root}}"}}
    train["usage_cache"] = {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}/usage.json"}}
    executor = next(iter(doctored["deploymentSpec"]["executors"].values()))
    executor["container"]["args"].append("{{$.inputs.parameters['no_such_input']}}")

    problems = unresolved_placeholders(doctored)

    assert len(problems) == 3
    assert any("{{$.pipeline_root}}" in p for p in problems)
    assert any("/usage.json" in p for p in problems)
    assert any("no_such_input" in p for p in problems)


def test_no_task_is_cached_since_the_bucket_deletes_pipeline_root_objects(spec: dict[str, Any]) -> None:
    """KFP 2.14.3's v2 cache has no expiry (backend/src/v2/cacheutils/cache.go, `GetExecutionCache`) while
    infra/modules/microfed/ deletes pipeline-root objects after `artifact_retention_days`: a cached task would hand
    a later run artifact URIs that no longer exist."""
    tasks = spec["root"]["dag"]["tasks"]

    assert {name: task.get("cachingOptions", {}).get("enableCache", False) for name, task in tasks.items()} == {
        name: False for name in tasks
    }


def test_every_task_has_a_retry_policy(spec: dict[str, Any]) -> None:
    tasks = spec["root"]["dag"]["tasks"]

    assert set(tasks) == {"split-dataset", "train", "aggregate", "evaluate", "export"}
    for name, task in tasks.items():
        assert task.get("retryPolicy", {}).get("maxRetryCount") == 2, name
        assert task["retryPolicy"]["backoffDuration"] == "30s", name
