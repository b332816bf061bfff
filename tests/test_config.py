"""RunConfig (training/config.py) is the one home of every run parameter's default: the pipeline's signature, the
compiled pipeline (what the Kubeflow UI shows), the components' literal defaults (KFP ships their source alone, so
they cannot import it), the CLI's options and the worker's flags must all agree with it, and every field must reach
each place it is meant to go. A parameter that RunConfig lacks is refused unless the allow-lists below name it,
with the reason."""

from __future__ import annotations

import ast
import inspect
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from microfed.components import steps as component_steps
from microfed.pipelines import cli
from microfed.pipelines.pipeline import compile_pipeline, microfed_pipeline
from microfed.training import worker_config
from microfed.training.config import (
    ConfigField,
    OptimConfig,
    RunConfig,
    config_fields,
    defaults,
    to_argv,
)
from microfed.training.errors import MicrofedError
from microfed.training.shards import SplitConfig
from microfed.training.strategies import Strategy
from microfed.training.worker_config import WorkerConfig, config_to_argv, parse_config

pytestmark = pytest.mark.unit

FIELDS = config_fields()
BY_NAME = {f.name: f for f in FIELDS}

# Pipeline parameters that are not run settings.
PIPELINE_ONLY = {
    "worker_image": "the components' own image (MICROFED_IMAGE, or `compile --image`), not a setting of the run",
}
# Component parameters that are not run settings (artifacts are recognised by their Input/Output annotation).
COMPONENT_ONLY = {
    ("train", "worker_image"): "the pipeline passes its worker_image (see PIPELINE_ONLY)",
    ("train", "run_id"): "a KFP placeholder the pipeline passes: it names the PyTorchJob",
    ("train", "task_name"): "a KFP placeholder the pipeline passes: it names the PyTorchJob",
    ("export", "export_format"): "a setting of `microfed export`; the pipeline exports ONNX",
    ("export", "parity_images"): "a setting of `microfed export`; the pipeline keeps its default",
    ("export", "tolerance"): "a setting of `microfed export`; the pipeline keeps its default",
}
# RunConfig fields that are options of `submit` only.
SUBMIT_ONLY = {
    "launcher": "`microfed run` always runs its workers as local processes",
    "job_namespace": "a cluster setting (submit's --namespace is the profile's, where the run goes)",
    "accelerators": "a cluster setting",
    "timeout_minutes": "a cluster setting",
    "service_account": "a cluster setting",
    "pool_max_nodes": "a cluster setting",
}
# RunConfig fields the train step reads itself rather than passing to the workers.
TRAIN_STEP_ONLY = {
    "launcher": "how the step starts the workers",
    "job_namespace": "where the step creates the PyTorchJob",
    "accelerators": "the step's resource plan",
    "timeout_minutes": "the step's wait for the job",
    "service_account": "the job's pods",
    "pool_max_nodes": "the step's resource plan",
    "usage_cache": "the step's resource plan and its measured usage",
}
COMPONENTS = {"split_dataset": component_steps.split_dataset, "train": component_steps.train}


def _is_artifact(annotation: Any) -> bool:
    return typing.get_origin(annotation) is typing.Annotated


def _pipeline_parameters() -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(microfed_pipeline.pipeline_func).parameters)


def _component_parameters(name: str) -> dict[str, inspect.Parameter]:
    component = getattr(component_steps, name)
    return {
        n: p for n, p in inspect.signature(component.python_func).parameters.items() if not _is_artifact(p.annotation)
    }


def _component_literal_defaults(name: str) -> dict[str, Any]:
    """The component's defaults as written in its source: each must be a literal (KFP ships the source alone)."""
    tree = ast.parse(Path(inspect.getfile(component_steps)).read_text())
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    args = func.args.args
    out = {}
    for arg, default in zip(args[len(args) - len(func.args.defaults) :], func.args.defaults, strict=True):
        out[arg.arg] = ast.literal_eval(default)  # raises on anything but a literal
    return out


@pytest.fixture(scope="module")
def compiled() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = compile_pipeline(Path(tmp) / "pipeline.yaml")
        return yaml.safe_load(path.read_text())


def _subparser(name: str) -> Any:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]  # type: ignore[attr-defined]


def _options(parser: Any) -> dict[str, Any]:
    return {a.dest: a for a in parser._actions if a.option_strings}


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_the_pipeline_has_every_field_with_its_default(field: ConfigField, compiled: dict[str, Any]) -> None:
    params = _pipeline_parameters()
    assert field.name in params, f"the pipeline has no parameter {field.name}"
    assert params[field.name].default == field.default
    assert params[field.name].annotation is field.type
    # and the compiled pipeline, which the Kubeflow UI shows, has it too (KFP writes numbers as doubles)
    spec = compiled["root"]["inputDefinitions"]["parameters"][field.name]
    assert spec.get("defaultValue", "") == field.default, field.name


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_each_component_that_takes_a_field_has_its_literal_default(field: ConfigField) -> None:
    for step in field.steps:
        params = _component_parameters(step)
        assert field.name in params, f"component {step} has no parameter {field.name}"
        literal = _component_literal_defaults(step)
        assert field.name in literal, f"component {step}: {field.name} has no default"
        assert literal[field.name] == field.default, f"component {step}: {field.name}"
        assert type(literal[field.name]) is type(field.default), f"component {step}: {field.name}"


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_the_pipeline_passes_each_field_to_the_components_that_take_it(
    field: ConfigField, compiled: dict[str, Any]
) -> None:
    # a component parameter that is a RunConfig field but the pipeline does not pass would run with its literal
    tasks = compiled["root"]["dag"]["tasks"]
    for step in field.steps:
        task = tasks[step.replace("_", "-")]
        passed = task["inputs"]["parameters"]
        assert passed[field.name]["componentInputParameter"] == field.name, (step, field.name)


def test_no_pipeline_or_component_parameter_is_missing_from_runconfig() -> None:
    pipeline_extra = set(_pipeline_parameters()) - set(BY_NAME)
    assert pipeline_extra == set(PIPELINE_ONLY)
    for step in ("split_dataset", "train", "aggregate", "evaluate", "export"):
        for name in _component_parameters(step):
            if name in BY_NAME:
                assert step in BY_NAME[name].steps, f"{step} takes {name}: add it to the field's steps"
            else:
                assert (step, name) in COMPONENT_ONLY, f"component {step} takes {name}, which RunConfig lacks"


@pytest.mark.parametrize("command", ["run", "submit"])
def test_the_cli_has_every_option_with_runconfigs_default(command: str) -> None:
    options = _options(_subparser(command))
    for field in FIELDS:
        if command not in field.cli:
            assert command == "run" and field.name in SUBMIT_ONLY, f"`microfed {command}` lacks {field.flag}"
            assert field.name not in options
            continue
        assert command == "submit" or field.name not in SUBMIT_ONLY
        assert field.name in options, f"`microfed {command}` has no {field.flag}"
        assert options[field.name].default == field.default
        assert field.flag in options[field.name].option_strings


def test_every_field_the_train_step_takes_reaches_the_worker() -> None:
    options = _options(worker_config.build_parser())
    for field in FIELDS:
        if "train" not in field.steps:
            continue
        if field.name in TRAIN_STEP_ONLY:
            assert not field.worker
            continue
        assert field.worker, f"{field.name}: the train step takes it, so the workers must (or TRAIN_STEP_ONLY)"
        assert field.name in options, f"the worker has no {field.flag}"
        assert options[field.name].default == field.default


def test_the_lower_layers_take_runconfigs_defaults() -> None:
    d = defaults()
    cfg = WorkerConfig(shards="s", out="o")
    assert (cfg.model, cfg.rounds, cfg.local_epochs, cfg.seed, cfg.patience) == (
        d["model"],
        d["rounds"],
        d["local_epochs"],
        d["seed"],
        d["patience"],
    )
    assert cfg.collective_timeout_minutes == d["collective_timeout_minutes"]
    assert cfg.optim == OptimConfig() == RunConfig().optim
    strategy = Strategy()
    assert (strategy.name, strategy.mu, strategy.server_momentum, strategy.fedbn) == (
        d["strategy"],
        d["mu"],
        d["server_momentum"],
        d["fedbn"],
    )
    split = SplitConfig(workers=d["workers"])
    assert (split.split, split.alpha, split.seed, split.val_fraction) == (
        d["split"],
        d["alpha"],
        d["seed"],
        d["val_fraction"],
    )


def test_runconfig_round_trips_through_argv_and_flat_values() -> None:
    changed = RunConfig.from_flat({"rounds": 7, "momentum": 0.5, "warmup_fraction": 0.1, "fedbn": True, "lr": 0.1})
    assert RunConfig.from_argv(changed.to_argv()) == changed
    assert RunConfig.from_flat(changed.flat()) == changed
    assert RunConfig.from_argv([]) == RunConfig()
    with pytest.raises(MicrofedError, match="unknown parameters"):
        RunConfig.from_flat({"round": 2})


def test_momentum_and_warmup_reach_the_worker() -> None:
    cfg = WorkerConfig(shards="s", out="o", optim=OptimConfig(optimizer="sgd", momentum=0.5, warmup_fraction=0.25))
    argv = config_to_argv(cfg)
    assert argv[argv.index("--momentum") + 1] == "0.5" and argv[argv.index("--warmup-fraction") + 1] == "0.25"
    assert parse_config(argv) == cfg


def test_the_cli_passes_momentum_and_warmup_to_the_pipeline() -> None:
    args = cli.build_parser().parse_args(["run", "--momentum", "0.8", "--warmup-fraction", "0.1"])
    values = cli.pipeline_arguments(args)
    assert values["momentum"] == 0.8 and values["warmup_fraction"] == 0.1
    assert set(values) == {f.name for f in FIELDS if "run" in f.cli}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rounds": 0}, "rounds must be an integer from 1 to 99,999"),
        ({"workers": 100_000}, "workers must be an integer from 1 to 99,999"),
        ({"val_fraction": 0.5}, "val_fraction must be a finite number at least 0 and less than 0.5"),
        ({"warmup_fraction": float("nan")}, "warmup_fraction must be a finite number"),
        ({"optimizer": "sgd", "momentum": 0.0}, "momentum must be a finite number greater than 0"),
        ({"split": "random"}, "unknown split 'random'"),
        ({"split_ratios": "1,2"}, "split_ratios has 2 values but there are 3 workers"),
        ({"split_ratios": "1,x,1"}, "split_ratios '1,x,1' is not a comma-separated list of numbers"),
        ({"split": "dirichlet", "split_ratios": "1,1,1"}, "split_ratios apply to stratified and iid splits"),
        ({"image_size": 4}, "image_size must be 0 .keep the images' size. or from 8"),
        ({"bad_images": "ignore"}, "unknown bad_images 'ignore'"),
        ({"dataset": " "}, "dataset is empty"),
        ({"model": ""}, "model is empty"),
        ({"job_namespace": "a\0b"}, "job_namespace 'a.x00b' holds a NUL character"),
        ({"launcher": "k8s"}, "unknown launcher 'k8s'"),
        ({"timeout_minutes": 0}, "timeout_minutes must be an integer from 1"),
        ({"pool_max_nodes": -1}, "pool_max_nodes must be an integer from 0"),
        ({"server_momentum": 1.0}, "server_momentum must be a finite number at least 0 and less than 1"),
    ],
)
def test_runconfig_checks_its_fields(values: dict[str, Any], message: str) -> None:
    with pytest.raises(MicrofedError, match=message.replace("(", r"\(")):
        RunConfig.from_flat(values)


def test_to_argv_writes_floats_exactly_and_bools_as_flags() -> None:
    assert to_argv({"lr": 0.1 + 0.2, "fedbn": False, "rounds": 3}) == [
        "--lr",
        repr(0.1 + 0.2),
        "--no-fedbn",
        "--rounds",
        "3",
    ]


def test_the_train_component_reads_its_parameters_through_runconfig(tmp_path: Path) -> None:
    # the Kubeflow UI passes whatever was typed: the component's body checks every value with RunConfig's rules
    # before it reads anything, and refuses a parameter RunConfig lacks
    from microfed.components.train_adapter import train_component_step

    def call(**params: Any) -> None:
        train_component_step(
            shards=(str(tmp_path), str(tmp_path)),
            out=(str(tmp_path), str(tmp_path)),
            params=params,
            run_id="r",
            task_name="t",
        )

    with pytest.raises(MicrofedError, match="local_epochs must be an integer from 1"):
        call(local_epochs=0, worker_image="img")
    with pytest.raises(MicrofedError, match="unknown parameters"):
        call(local_epoch=2)


def test_the_components_train_passes_every_parameter_it_declares() -> None:
    # the component body forwards its parameters by name (locals()): each is a RunConfig field or COMPONENT_ONLY
    declared = set(_component_parameters("train"))
    assert declared - set(BY_NAME) == {name for step, name in COMPONENT_ONLY if step == "train"}


def test_the_export_settings_have_one_default() -> None:
    # the export component's literals, `microfed export`'s options and the step's defaults: EXPORT_DEFAULTS
    from microfed.training.step_export import EXPORT_DEFAULTS

    assert _component_literal_defaults("export") == EXPORT_DEFAULTS
    options = _options(_subparser("export"))
    assert (options["fmt"].default, options["parity_images"].default, options["tolerance"].default) == (
        EXPORT_DEFAULTS["export_format"],
        EXPORT_DEFAULTS["parity_images"],
        EXPORT_DEFAULTS["tolerance"],
    )
