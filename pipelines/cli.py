"""The `microfed` command: run the pipeline locally, compile it for Kubeflow Pipelines, or submit a run there.

microfed run [--dataset fashion-mnist] [--model cnn-fmnist] [--workers 3] ...
microfed compile -o pipeline.yaml
microfed submit --host http://localhost:8080 [--namespace NS] [--experiment NAME] [--workers 3] ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from microfed.training.config import ConfigField, RunConfig, add_arguments, config_fields
from microfed.training.errors import MicrofedError
from microfed.training.layout import (
    EXPORT_DIR,
    GLOBAL_MODEL_FILE,
    METRICS_FILE,
    MODEL_CONFIG_FILE,
    PIPELINE_FILE,
    REPORT_FILE,
)
from microfed.training.text import printable

__all__ = ["build_parser", "main", "pipeline_arguments"]


def _registry_help() -> str:
    # the strategies' registry (it imports torch) is read when a parser is built, not when this module is imported
    from microfed.training.strategies import strategy_help

    return strategy_help()


def _fields(command: str) -> dict[str, ConfigField]:
    """The RunConfig fields that are options of `microfed COMMAND` (training/config.py: name, type, default, help and
    range all come from there), so `run`, `submit`, the compiled YAML and the Kubeflow UI show the same defaults."""
    return {f.name: f for f in config_fields() if command in f.cli}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, reporting a bad command line as the CLI reports every user error: one error line (values
    escaped) and a hint, exit code 2; not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"microfed: error: {printable(message)}\nmicrofed: hint: `{self.prog} --help` lists the options\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="microfed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline on this machine with kfp.local")
    _add_pipeline_params(run, "run")
    run.add_argument("--runs-dir", default="runs", help="parent folder of run folders (default: runs)")
    run.add_argument("--name", default=None, help="run folder name (default: a timestamp)")
    run.add_argument("--json", action="store_true", help="print only metrics.json (no progress, no summary)")
    run.add_argument("--quiet", action="store_true", help="print only the run folder (no progress, no summary)")
    run.add_argument("--verbose", action="store_true", help="show every step's full KFP log (always in kfp.log)")
    comp = sub.add_parser("compile", help="write the pipeline YAML to upload to Kubeflow Pipelines")
    comp.add_argument("-o", "--output", default=PIPELINE_FILE, help=f"output file (default: {PIPELINE_FILE})")
    comp.add_argument(
        "--image",
        default=None,
        help="container image for every step and worker (default: MICROFED_IMAGE or microfed:0.1.0)",
    )
    _add_submit_parser(sub)
    exp = sub.add_parser("export", help="write a run's global model as ONNX or TorchScript, checked against PyTorch")
    exp.add_argument("run_dir", type=Path, help="a run folder written by `microfed run`")
    from microfed.training.step_export import EXPORT_DEFAULTS as EXPORT

    exp.add_argument("--format", dest="fmt", choices=["onnx", "torchscript"], default=EXPORT["export_format"])
    exp.add_argument("--out", type=Path, default=None, help=f"output folder (default: RUN_DIR/{EXPORT_DIR})")
    exp.add_argument(
        "--tolerance",
        type=float,
        default=EXPORT["tolerance"],
        help=f"largest allowed logit difference (default: {EXPORT['tolerance']:g})",
    )
    exp.add_argument(
        "--parity-images",
        type=int,
        default=EXPORT["parity_images"],
        help=f"test images the export is checked on (default: {EXPORT['parity_images']})",
    )
    exp.add_argument(
        "--model-code",
        default=None,
        metavar="FILE",
        help="for a model built by your own factory: the .py file (or package.module) to rebuild it with. "
        "model_config.json names it, but code a run folder names never runs unless you name it here; "
        "a file must have the sha256 recorded at training",
    )
    exp.add_argument(
        "--allow-changed-model-code",
        action="store_true",
        help="load --model-code even when its sha256 (or module) differs from what training recorded",
    )
    # handled in main() before this parser is built (no torch needed); listed here for --help
    sub.add_parser("predict", help="classify images with an exported ONNX model: predict MODEL IMAGE... (no torch)")
    return parser


def _add_pipeline_params(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per pipeline parameter the command takes: `submit` has the cluster settings besides `run`'s."""
    add_arguments(parser, _fields(command), extra_help={"strategy": _registry_help})


def _add_submit_parser(sub: Any) -> None:
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
    _add_pipeline_params(submit, "submit")


def pipeline_arguments(args: argparse.Namespace, command: str = "run") -> dict[str, Any]:
    """The pipeline arguments from parsed flags, checked by RunConfig before any step runs; a local dataset or
    factory file becomes an absolute path, because the steps run in other processes."""
    from microfed.training.datasets import check_source
    from microfed.training.models import absolute_factory_path

    values = {name: getattr(args, name) for name in _fields(command)}
    RunConfig.from_flat(values)  # every field's type, range and choice (training/config.py)
    dataset = values["dataset"]
    try:
        kind = check_source(dataset)
        if kind != "name" and not dataset.startswith("gs://"):
            # the steps run elsewhere (another process, or a pod): give them an absolute path
            path = Path(dataset).expanduser().resolve()
            if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
                raise MicrofedError(f"--dataset {dataset!r}: cannot read {path}", hint="check its permissions")
            values["dataset"] = str(path)
    except (OSError, RuntimeError) as e:  # RuntimeError: Path.expanduser of an unknown ~user
        raise MicrofedError(
            f"--dataset {dataset!r}: {getattr(e, 'strerror', None) or e}", hint="check the path (or dataset name)"
        ) from None
    # likewise a factory file (path/file.py:function) for the workers; checked to exist here
    try:
        values["model"] = absolute_factory_path(values["model"])
    except (OSError, RuntimeError) as e:
        raise MicrofedError(
            f"--model {values['model']!r}: {getattr(e, 'strerror', None) or e}", hint="check the factory file's path"
        ) from None
    return values


def _summary(result: Any) -> str:
    m = result.metrics
    t = m["timings"]
    names = m["class_names"]
    # class names come from the data (folder names, a CSV's labels): escaped, so none can forge a line
    shown = {n: printable(n, max_chars=60) for n in names}
    width = max(len(s) for s in shown.values())
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
        "per class       " + "\n                ".join(f"{shown[n]:<{width}}  {_class_accuracy(m, n)}" for n in names),
        *_class_mean_line(m),
        *_skipped_line(m),
        "seconds         " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()),
        f"model           {printable(result.run_dir / GLOBAL_MODEL_FILE)} (+ {MODEL_CONFIG_FILE})",
        f"metrics         {printable(result.run_dir / METRICS_FILE)}",
        f"report          {printable(result.run_dir / REPORT_FILE)}",
    ]
    return "\n".join(lines)


def _class_accuracy(m: dict[str, Any], name: str) -> str:
    """A class's test accuracy; null in metrics.json when the test set holds none of its images."""
    accuracy = m["per_class_accuracy"][name]
    return "no test images" if accuracy is None else f"{accuracy:.4f}"


def _class_mean_line(m: dict[str, Any]) -> list[str]:
    """The mean class accuracy, over the classes with test images only (a class without any is not a 0)."""
    if m.get("macro_accuracy") is None:
        return []
    absent = sum(1 for a in m["per_class_accuracy"].values() if a is None)
    note = f"  (leaving out {absent} class{'es' if absent > 1 else ''} without test images)" if absent else ""
    return [f"class mean      {m['macro_accuracy']:.4f}{note}"]


def _skipped_line(m: dict[str, Any]) -> list[str]:
    """What --bad-images skip left out (metrics' `skipped_images`): counts per split, the first few files."""
    skipped = m.get("skipped_images") or {}
    total = int(skipped.get("total") or 0)
    if not total:
        return []
    counts = ", ".join(f"{split} {skipped[split]}" for split in ("train", "test") if skipped.get(split))
    files = [str(e.get("file")) for e in skipped.get("examples") or []]
    more = f" and {total - len(files)} more" if total > len(files) and files else ""
    # the names come from the upload: metrics.json holds them escaped already; printable again costs nothing
    named = f": {printable(', '.join(files))}{more}" if files else ""
    return [f"skipped images  {total} unreadable, left out (--bad-images skip; {counts or 'see dataset.json'}){named}"]


def _run(args: argparse.Namespace) -> int:
    from microfed.pipelines.local_run import run_local, tool_environment

    arguments = pipeline_arguments(args)
    # This process draws the report too: its matplotlib, imported during the run, keeps to the cache folder as
    # the steps' does (set for the run only, so that a caller's environment is left as it was).
    with _environment(tool_environment()):
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


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _submit(args: argparse.Namespace) -> int:
    from microfed.pipelines.submit import submit

    # submit() checks the arguments, and what a cluster can read, before it uploads anything
    result = submit(
        args.host,
        {name: getattr(args, name) for name in _fields("submit")},
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
    from microfed.training.layout import recorded_test_set
    from microfed.training.step_export import export_step

    run_dir: Path = args.run_dir
    if not (run_dir / GLOBAL_MODEL_FILE).exists():
        raise MicrofedError(
            f"{run_dir} holds no {GLOBAL_MODEL_FILE}", hint="pass a run folder written by `microfed run`"
        )
    # parity on the run's own test images when its shards are still there, else on a fixed random batch
    test = recorded_test_set(run_dir)
    out = args.out or run_dir / EXPORT_DIR
    record = export_step(
        run_dir,
        test.parent if test else None,
        out,
        fmt=args.fmt,
        parity_images=args.parity_images,
        tolerance=args.tolerance,
        model_code=args.model_code,
        allow_changed_model_code=args.allow_changed_model_code,
        trust_recorded_code=False,
    )
    print(f"wrote {printable(Path(out) / record['file'])}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        # predict needs neither torch nor kfp: dispatch before the parser imports them
        from microfed.training.predict import main as predict_main

        return predict_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # while torch and kfp load, the slowest moment of a start
        print("microfed: interrupted", file=sys.stderr)
        return 130
    try:
        commands = {"run": _run, "compile": _compile, "submit": _submit, "export": _export}
        return commands[args.command](args)
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        run_dir = getattr(e, "run_dir", None)  # local_run.RunInterrupted: its steps and workers have stopped
        where = f"; the run folder {run_dir} is left as it was" if run_dir is not None else ""
        print(f"microfed: interrupted{printable(where)}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped
    except MicrofedError as e:
        if args.debug:
            raise
        return _error(e.message, e.hint, e.exit_code)
    except OSError as e:  # the machine's, not a bug: a full disk, a permission, a path that vanished
        if args.debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        return _error(f"{e.strerror or e}{where}", "run again with --debug for the traceback", 2)
    except Exception as e:
        if args.debug:
            raise
        return _error(f"unexpected {type(e).__name__}: {e}", "this is likely a bug; --debug shows the traceback", 1)


def _error(message: str, hint: str, code: int) -> int:
    """Print a user-facing error as one line (and a hint): data it quotes escaped, never a traceback."""
    print(f"microfed: error: {printable(message)}", file=sys.stderr)
    if hint:
        print(f"microfed: hint: {printable(hint)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
