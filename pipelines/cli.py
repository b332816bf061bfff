"""The `microfed` command: run the pipeline locally, compile it for Kubeflow Pipelines, or submit a run there.

microfed run [--dataset fashion-mnist] [--model cnn-fmnist] [--workers 3] ...
microfed compile -o pipeline.yaml
microfed submit --host http://localhost:8080 [--namespace NS] [--experiment NAME] [--workers 3] ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from microfed.training.errors import MicrofedError

__all__ = ["build_parser", "main", "pipeline_arguments"]

# Pipeline parameter → (flag type, help). Defaults come from the pipeline function itself, so the CLI,
# the compiled YAML and the Kubeflow UI all show the same ones.
_PARAMS: dict[str, tuple[type, str]] = {
    "dataset": (
        str,
        "fashion-mnist, mnist, cifar10, a .zip / folder with train/ and test/ class folders, "
        "or a .csv listing image,label[,split]",
    ),
    "model": (
        str,
        "cnn-small, cnn-fmnist, resnet18, vgg16, squeezenet, efficientnet_v2_s, "
        "mobilenet_v3_small, or a factory package.module:function, path/file.py:function, gs://.../file.py:function",
    ),
    "workers": (int, "shards = workers (PyTorchJob replicas; local processes here)"),
    "rounds": (int, "rounds of local training followed by a weighted average"),
    "local_epochs": (int, "epochs over each worker's shard per round"),
    "batch_size": (int, "examples per step on each worker"),
    "lr": (float, "peak learning rate"),
    "optimizer": (str, "adam, adamw or sgd"),
    "weight_decay": (float, "weight decay"),
    "schedule": (str, "cosine (warm-up, then decay over all rounds) or constant"),
    "augment": (str, "none, flip, crop or crop-flip"),
    "precision": (str, "auto (bf16 where the hardware has it), fp32 or bf16"),
    "split": (str, "stratified, iid or dirichlet"),
    "split_ratios": (str, "relative shard sizes for stratified/iid, comma-separated, e.g. 1,2,1 (empty = equal)"),
    "alpha": (float, "Dirichlet concentration (with --split dirichlet)"),
    "seed": (int, "seed of the split, the initial weights and the data order"),
    "image_size": (int, "resize images to this square side (0 keeps their size)"),
    "train_limit": (int, "use at most this many training examples (0 = all)"),
    "test_limit": (int, "use at most this many test examples (0 = all)"),
    "bad_images": (str, "fail on an image that cannot be decoded, or skip it (counted in the manifest)"),
    "val_fraction": (float, "share of the training set held out to validate each round and keep the best (0 = none)"),
    "strategy": (str, "fedavg, fedprox, fedavgm or ddp (DistributedDataParallel across the shards)"),
    "mu": (float, "fedprox: weight of the proximal term"),
    "server_momentum": (float, "fedavgm: server momentum"),
    "server_lr": (float, "fedavgm: server learning rate"),
    "fedbn": (bool, "keep BatchNorm layers out of the in-job averages (FedBN)"),
    "patience": (int, "stop after this many rounds without a better validation accuracy (0 = run every round)"),
    "usage_cache": (
        str,
        "measured-usage cache (folder or .json, local or gs://) that later resource plans start from; "
        "empty: next to the pipeline root (runs/ for `run`), off: none",
    ),
}


def _pipeline_defaults() -> dict[str, Any]:
    import inspect

    from microfed.pipelines.pipeline import microfed_pipeline

    sig = inspect.signature(microfed_pipeline.pipeline_func)
    return {name: p.default for name, p in sig.parameters.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microfed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline on this machine with kfp.local")
    defaults = _pipeline_defaults()
    _add_pipeline_params(run, defaults)
    run.add_argument("--runs-dir", default="runs", help="parent folder of run folders (default: runs)")
    run.add_argument("--name", default=None, help="run folder name (default: a timestamp)")
    run.add_argument("--json", action="store_true", help="print only metrics.json (no progress, no summary)")
    run.add_argument("--quiet", action="store_true", help="print only the run folder (no progress, no summary)")
    run.add_argument("--verbose", action="store_true", help="show every step's full KFP log (always in kfp.log)")
    comp = sub.add_parser("compile", help="write the pipeline YAML to upload to Kubeflow Pipelines")
    comp.add_argument("-o", "--output", default="pipeline.yaml", help="output file (default: pipeline.yaml)")
    comp.add_argument(
        "--image",
        default=None,
        help="container image for every step and worker (default: MICROFED_IMAGE or microfed:0.1.0)",
    )
    _add_submit_parser(sub, defaults)
    exp = sub.add_parser("export", help="write a run's global model as ONNX or TorchScript, checked against PyTorch")
    exp.add_argument("run_dir", type=Path, help="a run folder written by `microfed run`")
    exp.add_argument("--format", dest="fmt", choices=["onnx", "torchscript"], default="onnx")
    exp.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/export)")
    exp.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed logit difference (default: 1e-4)")
    # handled in main() before this parser is built (no torch needed); listed here for --help
    sub.add_parser("predict", help="classify images with an exported ONNX model: predict MODEL IMAGE... (no torch)")
    return parser


def _add_pipeline_params(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """One flag per pipeline parameter, so `run` and `submit` accept the same ones."""
    for name, (kind, help_text) in _PARAMS.items():
        if kind is bool:
            parser.add_argument(
                f"--{name.replace('_', '-')}",
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=defaults[name],
                help=f"{help_text} (default: {defaults[name]})",
            )
            continue
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            default=defaults[name],
            help=f"{help_text} (default: {defaults[name]})",
        )


def _add_submit_parser(sub: Any, defaults: dict[str, Any]) -> None:
    from microfed.pipelines.pipeline import PIPELINE_NAME
    from microfed.pipelines.submit import DEFAULT_EXPERIMENT

    submit = sub.add_parser("submit", help="upload the pipeline to Kubeflow Pipelines and start a run")
    endpoint = os.environ.get("KF_PIPELINES_ENDPOINT")
    submit.add_argument(
        "--host",
        default=endpoint,
        required=endpoint is None,
        help="Kubeflow Pipelines URL, e.g. http://localhost:8080 after "
        "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` (default: KF_PIPELINES_ENDPOINT)",
    )
    submit.add_argument("--namespace", default=None, help="profile namespace on a multi-user installation")
    submit.add_argument(
        "--experiment", default=DEFAULT_EXPERIMENT, help=f"experiment to run in (default: {DEFAULT_EXPERIMENT})"
    )
    submit.add_argument(
        "--pipeline-name",
        default=PIPELINE_NAME,
        help=f"pipeline to upload as, a new version when it exists (default: {PIPELINE_NAME})",
    )
    submit.add_argument(
        "--image",
        default=None,
        help="container image for every step and worker (default: MICROFED_IMAGE or microfed:0.1.0)",
    )
    submit.add_argument(
        "--token",
        default=os.environ.get("KF_PIPELINES_TOKEN"),
        help="bearer token for the API; prefer the KF_PIPELINES_TOKEN variable, which stays out of shell history",
    )
    _add_pipeline_params(submit, defaults)


def pipeline_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline arguments from parsed flags, checked here so bad input fails before any step runs."""
    from microfed.training.aggregation import Strategy
    from microfed.training.datasets import check_source
    from microfed.training.models import absolute_factory_path
    from microfed.training.shards import SplitConfig, parse_ratios
    from microfed.training.train import OptimConfig

    values = {name: getattr(args, name) for name in _PARAMS}
    if check_source(values["dataset"]) != "name" and not values["dataset"].startswith("gs://"):
        # the steps run elsewhere (another process, or a pod): give them an absolute path
        values["dataset"] = str(Path(values["dataset"]).expanduser().resolve())
    # likewise a factory file (path/file.py:function) for the workers; checked to exist here
    values["model"] = absolute_factory_path(values["model"])
    SplitConfig(
        num_shards=values["workers"],
        strategy=values["split"],
        ratios=parse_ratios(values["split_ratios"]),
        alpha=values["alpha"],
        seed=values["seed"],
        val_fraction=values["val_fraction"],
    )
    Strategy(
        name=values["strategy"],
        mu=values["mu"],
        server_momentum=values["server_momentum"],
        server_lr=values["server_lr"],
        fedbn=values["fedbn"],
    )
    OptimConfig(
        optimizer=values["optimizer"],
        lr=values["lr"],
        weight_decay=values["weight_decay"],
        schedule=values["schedule"],
        augment=values["augment"],
        batch_size=values["batch_size"],
        precision=values["precision"],
    )
    if values["bad_images"] not in ("fail", "skip"):
        raise MicrofedError(f"--bad-images must be fail or skip, got {values['bad_images']!r}")
    for name in ("rounds", "local_epochs"):
        if values[name] < 1:
            raise MicrofedError(f"--{name.replace('_', '-')} must be at least 1, got {values[name]}")
    for name in ("image_size", "train_limit", "test_limit", "patience"):
        if values[name] < 0:
            raise MicrofedError(f"--{name.replace('_', '-')} must be 0 or more, got {values[name]}")
    return values


def _summary(result: Any) -> str:
    m = result.metrics
    t = m["timings"]
    names = m["class_names"]
    width = max(len(n) for n in names)
    lines = [
        "",
        f"test accuracy   {m['accuracy']:.4f}  (loss {m['loss']:.4f}, {m['num_test_examples']} test images)",
        f"per round       {m['round_split']}: "
        + "  ".join(
            f"{a:.4f}" + ("*" if r == m.get("selected_round") else "")
            for r, a in zip(m["round_numbers"], m["round_accuracy"], strict=True)
        )
        + ("  (* kept)" if m.get("selected_round") else ""),
        "shard sizes     " + ", ".join(str(n) for n in m["shard_sizes"]),
        "per class       "
        + "\n                ".join(f"{n:<{width}}  {m['per_class_accuracy'][n]:.4f}" for n in names),
        "seconds         " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()),
        f"model           {result.run_dir / 'model.safetensors'} (+ model_config.json)",
        f"metrics         {result.run_dir / 'metrics.json'}",
        f"report          {result.run_dir / 'report.html'}",
    ]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from microfed.pipelines.local_run import run_local

    arguments = pipeline_arguments(args)
    result = run_local(
        arguments, runs_dir=args.runs_dir, name=args.name, verbose=args.verbose, quiet=args.quiet or args.json
    )
    if args.json:
        print(json.dumps(result.metrics, indent=2))
    elif args.quiet:
        print(result.run_dir)
    else:
        print(_summary(result))
    return 0


def _cluster_dataset(dataset: str) -> str:
    """The dataset as the cluster reads it: a built-in name or a gs:// URI, never a path on this machine."""
    from microfed.training.datasets import DATASET_NAMES

    if dataset.startswith("gs://"):
        return dataset
    name = dataset.strip().lower().replace("_", "-")
    if name in DATASET_NAMES:
        return name
    raise MicrofedError(
        f"--dataset {dataset!r} is not a dataset name or a gs:// URI; the cluster cannot read paths on this machine",
        hint=f"copy it to a bucket (gcloud storage cp -r {dataset} gs://BUCKET/) and pass --dataset gs://BUCKET/..., "
        f"or use one of {', '.join(DATASET_NAMES)}",
    )


def _cluster_model(model: str) -> None:
    """Refuse a factory file on this machine: the cluster's workers cannot read it."""
    from microfed.training.models import factory_file

    file = factory_file(model)
    if file is not None and not file.startswith("gs://"):
        raise MicrofedError(
            f"--model {model!r} names a file on this machine; the cluster's workers cannot read it",
            hint=f"copy it to a bucket (gcloud storage cp {file} gs://BUCKET/) and pass "
            "--model gs://BUCKET/FILE.py:FUNCTION, or install its package in the image and pass "
            "package.module:function",
        )


def _submit(args: argparse.Namespace) -> int:
    from microfed.pipelines.submit import submit

    dataset = _cluster_dataset(args.dataset)
    _cluster_model(args.model)
    # The other flags are checked here, before anything is uploaded; the dataset is the cluster's to read, so a
    # built-in name stands in for it during the local checks.
    arguments = pipeline_arguments(argparse.Namespace(**{**vars(args), "dataset": "fashion-mnist"}))
    arguments["dataset"] = dataset
    result = submit(
        args.host,
        arguments,
        namespace=args.namespace,
        experiment=args.experiment,
        pipeline_name=args.pipeline_name,
        image=args.image,
        existing_token=args.token,
    )
    print(result.run_url)
    return 0


def _compile(args: argparse.Namespace) -> int:
    from microfed.pipelines.pipeline import compile_pipeline

    path = compile_pipeline(args.output, image=args.image)
    print(f"wrote {path}: upload it in the Kubeflow Pipelines UI (Pipelines → Upload pipeline)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from microfed.training.export import export_model, parity_images_from_shards

    run_dir: Path = args.run_dir
    if not (run_dir / "model.safetensors").exists():
        raise MicrofedError(f"{run_dir} holds no model.safetensors", hint="pass a run folder written by `microfed run`")
    # parity on the run's own test images when its shards are still there, else on a fixed random batch
    test = next(run_dir.glob("kfp/*/split-dataset/shards/test.safetensors"), None)
    images = parity_images_from_shards(test.parent, 64) if test else None
    r = export_model(
        run_dir, args.out or run_dir / "export", fmt=args.fmt, parity_images=images, tolerance=args.tolerance
    )
    print(
        f"wrote {r['path']} ({r['bytes'] / 1e6:.1f} MB); parity: max |logit difference| "
        f"{r['parity']['max_abs_diff']:.1e} on {r['parity']['images']} images (tolerance {args.tolerance})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        # predict needs neither torch nor kfp: dispatch before the parser imports them
        from microfed.training.predict import main as predict_main

        return predict_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        commands = {"run": _run, "compile": _compile, "submit": _submit, "export": _export}
        return commands[args.command](args)
    except MicrofedError as e:
        if args.debug:
            raise
        print(f"microfed: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"microfed: hint: {e.hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
