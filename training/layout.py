"""The on-disk contract: every file name the steps and the run folder use, and the typed records of the JSON files.

No other module spells one of these names (tests/test_layout.py scans the packages for them). A folder is a KFP
artifact, locally a folder and on a cluster a gs:// prefix:

    shards/        the split step: DATASET_FILE (DatasetManifest), shard_files(i) for each worker (uint8 images and
                   int64 labels in safetensors, a PartManifest beside them), TEST_FILES, VAL_FILES (when held out)
    micro-models/  the train step: micro_model_file(rank) and worker_record_file(rank) (WorkerRecord) per worker,
                   JOB_FILE (JobRecord), MODEL_CONFIG_FILE; rank 0's ROUNDS_FILE, BEST_ROUND_FILE,
                   SERVER_STATE_FILE; LOGS_DIR/worker_log_file(rank); CHECKPOINT_DIR/round_checkpoint_file(r)
    model/         the aggregate step: GLOBAL_MODEL_FILE, MODEL_CONFIG_FILE, AGGREGATE_FILE
    report/        the evaluate step: METRICS_FILE (Metrics), REPORT_FILE, and the JOB_FILE and DATASET_FILE the
                   report was made from
    exported/      the export step: ONNX_MODEL_FILE or TORCHSCRIPT_MODEL_FILE, and SIDECAR_FILE
    runs/<name>/   `microfed run`: GLOBAL_MODEL_FILE, MODEL_CONFIG_FILE, ONNX_MODEL_FILE, SIDECAR_FILE, PIPELINE_FILE,
                   METRICS_FILE, REPORT_FILE, KFP_LOG_FILE, EVENTS_FILE, KFP_DIR (kfp.local's pipeline root) and
                   RUN_ARTIFACTS_FILE (RunArtifacts: where in KFP_DIR each step's output is)

The records are TypedDicts over the JSON as written (plain `json.dumps` of the dict, so the bytes are what they
were); the readers check that the file holds an object with every required key and raise a MicrofedError that
names the file and the key otherwise. Only the standard library is imported here (training/io.py imports torch
only when a safetensors function runs): `microfed predict` runs without torch.

Words: `workers` is the number of workers everywhere in these records (`world_size` belongs to torch.distributed);
`split` is how the training examples were divided (stratified, iid, dirichlet), `strategy` the federated strategy.
"""

# No `from __future__ import annotations`: Python 3.11's TypedDict reads NotRequired only from real annotations.

import os
import re
from pathlib import Path
from typing import Any, NamedTuple, NotRequired, TypedDict, cast

from microfed.training.errors import MicrofedError
from microfed.training.io import read_json, write_json

__all__ = [
    "AGGREGATE_FILE",
    "BEST_ROUND_FILE",
    "CHECKPOINT_DIR",
    "DATASET_FILE",
    "ERRORS_FILE",
    "EVENTS_FILE",
    "EXPORT_DIR",
    "GLOBAL_MODEL_FILE",
    "JOB_FILE",
    "KFP_DIR",
    "KFP_LOG_FILE",
    "LOGS_DIR",
    "METRICS_FILE",
    "MODEL_CONFIG_FILE",
    "ONNX_MODEL_FILE",
    "PIPELINE_FILE",
    "REPORT_FILE",
    "ROUNDS_FILE",
    "RUN_ARTIFACTS_FILE",
    "SERVER_STATE_FILE",
    "SIDECAR_FILE",
    "TEST_FILES",
    "TORCHSCRIPT_MODEL_FILE",
    "USAGE_CACHE_FILE",
    "VAL_FILES",
    "DatasetInfo",
    "DatasetManifest",
    "JobRecord",
    "Metrics",
    "PartFiles",
    "PartManifest",
    "RunArtifacts",
    "ShardEntry",
    "SkippedFile",
    "SplitRecord",
    "WorkerRecord",
    "micro_model_file",
    "parse_dataset_manifest",
    "parse_job_record",
    "parse_worker_record",
    "pod_log_file",
    "progress_file",
    "read_dataset_manifest",
    "read_job_record",
    "read_metrics",
    "read_part_manifest",
    "read_run_artifacts",
    "recorded_test_set",
    "round_checkpoint_file",
    "round_of_checkpoint",
    "shard_files",
    "worker_log_file",
    "worker_record_file",
    "write_dataset_manifest",
    "write_job_record",
    "write_metrics",
    "write_part_manifest",
    "write_run_artifacts",
    "write_worker_record",
]

# ------------------------------------------------------------------------------------------------ file names


class PartFiles(NamedTuple):
    """The two files of a shard, the test set or the validation split."""

    tensors: str
    """`images` (uint8, N C H W) and `labels` (int64) in safetensors."""
    manifest: str
    """Its PartManifest."""


# shards/ (the split step)
DATASET_FILE = "dataset.json"
TEST_FILES = PartFiles("test.safetensors", "test.json")
VAL_FILES = PartFiles("val.safetensors", "val.json")


def shard_files(index: int) -> PartFiles:
    """Shard `index` (the worker of that RANK)."""
    return PartFiles(f"shard-{index:05d}.safetensors", f"shard-{index:05d}.json")


# micro-models/ (the train step); round checkpoints, the logs and the files of one rank are numbered with five digits
JOB_FILE = "job.json"
MODEL_CONFIG_FILE = "model_config.json"  # also in model/ and the run folder: architecture, class names, normalisation
ROUNDS_FILE = "rounds.json"  # rank 0: the strategy, every round's validation metrics, the best round
BEST_ROUND_FILE = "best-round.safetensors"  # rank 0: the global model of the best in-job round
# rank 0, a strategy with a server optimizer: the global model round R started from and the server state
SERVER_STATE_FILE = "server-state.safetensors"
LOGS_DIR = "logs"
CHECKPOINT_DIR = "checkpoints"
_ROUND_CHECKPOINT = re.compile(r"round-(\d{5})\.safetensors")


def micro_model_file(rank: int) -> str:
    return f"micro-model-{rank:05d}.safetensors"


def worker_record_file(rank: int) -> str:
    return f"worker-{rank:05d}.json"


def worker_log_file(rank: int) -> str:
    """Worker `rank`'s log in LOGS_DIR (the local launcher's; a PyTorchJob's are named after its pods)."""
    return f"worker-{rank:05d}.log"


def pod_log_file(pod: str, suffix: str = "") -> str:
    """A PyTorchJob pod's log in LOGS_DIR (`suffix`: a restarted pod's earlier log; a glob pattern matches them)."""
    return f"{pod}{suffix}.log"


def round_checkpoint_file(round_: int) -> str:
    """The checkpoint of round `round_` in CHECKPOINT_DIR."""
    return f"round-{round_:05d}.safetensors"


def round_of_checkpoint(name: str) -> int | None:
    """The round a file name in CHECKPOINT_DIR is the checkpoint of; None for any other name."""
    m = _ROUND_CHECKPOINT.fullmatch(name)
    return int(m.group(1)) if m else None


def progress_file(rank: int) -> str:
    """Worker `rank`'s progress record in the local launcher's progress folder (a temporary one)."""
    return f"progress-{rank:05d}.json"


# model/ (the aggregate step) and the run folder
GLOBAL_MODEL_FILE = "model.safetensors"
AGGREGATE_FILE = "aggregate.json"

# report/ (the evaluate step) and the run folder
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"

# exported/ (the export step), the run folder and `microfed export`'s EXPORT_DIR
ONNX_MODEL_FILE = "model.onnx"
TORCHSCRIPT_MODEL_FILE = "model.torchscript.pt"
SIDECAR_FILE = "model.json"  # class names, input description, the source model's checksum, the parity check
EXPORT_DIR = "export"

# the run folder (`microfed run`)
PIPELINE_FILE = "pipeline.yaml"
KFP_LOG_FILE = "kfp.log"
EVENTS_FILE = "events.jsonl"  # the steps' progress events (training/step_log.py `event`), which `run` draws
KFP_DIR = "kfp"
RUN_ARTIFACTS_FILE = "artifacts.json"
ERRORS_FILE = "errors.jsonl"  # in the run's temporary folder: the steps' errors (training/errors.py)
# beside the run folders (or under a cluster's pipeline root): measured usage that later resource plans start from
USAGE_CACHE_FILE = "usage-cache.json"

# ------------------------------------------------------------------------------------------------ records


class SplitRecord(TypedDict):
    """How the training examples were divided (shards.SplitConfig)."""

    split: str
    seed: int
    alpha: float
    ratios: list[float] | None
    workers: int
    val_fraction: float


class ShardEntry(TypedDict):
    file: str
    num_examples: int
    class_histogram: list[int]
    sha256: str


class SkippedFile(TypedDict):
    """An image file the loader left out (`--bad-images skip`)."""

    split: str
    """The dataset's split folder it was in: `train` or `test`."""
    file: str
    reason: str


class DatasetInfo(TypedDict):
    """What every manifest of a shards folder holds."""

    dataset: str
    class_names: list[str]
    image_shape: list[int]
    mean: list[float]
    std: list[float]
    split: SplitRecord
    num_skipped_files: int


class PartManifest(DatasetInfo):
    """The JSON beside a shard's (or the test set's, the validation split's) tensors."""

    shard: int | None
    file: str
    num_examples: int
    class_histogram: list[int]
    sha256: str


class DatasetManifest(DatasetInfo):
    """DATASET_FILE: the split step's summary of the shards folder."""

    num_train_examples: int
    num_val_examples: int
    num_test_examples: int
    shards: list[ShardEntry]
    skipped_files: list[SkippedFile]
    seconds: NotRequired[float]
    """The split step's duration (split_step adds it; write_shards alone does not)."""


class WorkerRecord(TypedDict):
    """worker_record_file(rank): one worker's n_k, micro-model file and history."""

    rank: int
    n_k: int
    file: str
    device: str
    threads: int
    rounds: list[dict[str, Any]]
    resumed_from_round: int
    stopped_after_round: int
    seconds: float
    usage: dict[str, Any]


class JobRecord(TypedDict):
    """JOB_FILE: the train step's record. The number of workers is len(workers)."""

    config: dict[str, Any]
    workers: list[WorkerRecord]
    plan: dict[str, Any] | None
    usage: dict[str, Any] | None
    seconds: float


class Metrics(TypedDict):
    """METRICS_FILE: the evaluate step's measurements; the run folder's copy adds `config` and more `timings`."""

    accuracy: float
    loss: float
    class_names: list[str]
    per_class_accuracy: dict[str, float | None]
    macro_accuracy: float | None
    classes_without_test_images: list[str]
    confusion_matrix: list[list[int]]
    num_test_examples: int
    skipped_images: dict[str, Any]
    shard_sizes: list[int]
    shard_class_histograms: list[list[int]]
    round_accuracy: list[float]
    round_loss: list[float]
    round_numbers: list[int]
    round_split: str
    selected_round: int | None
    strategy: str
    micro_model_accuracy: list[float]
    train_loss: list[list[float]]
    resource_plan: dict[str, Any] | None
    resource_usage: dict[str, Any] | None
    timings: dict[str, float]
    config: NotRequired[dict[str, Any]]


class RunArtifacts(TypedDict):
    """RUN_ARTIFACTS_FILE: where each step's output of a local run is, relative to the run folder."""

    shards: str
    micro_models: str
    global_model: str
    report: str
    exported: str


# ------------------------------------------------------------------------------------------------ reading, writing


def _checked(data: object, required: frozenset[str], where: str | os.PathLike[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise MicrofedError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = sorted(required - data.keys())
    if missing:
        raise MicrofedError(
            f"{where}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            hint="the file was not written by this version of microfed, or was changed; run the step again",
        )
    return data


def _read(path: Path, required: frozenset[str]) -> dict[str, Any]:
    return _checked(read_json(path), required, path)


def parse_dataset_manifest(data: object, where: str | os.PathLike[str]) -> DatasetManifest:
    """`data` (parsed JSON read from `where`) as a DatasetManifest; a MicrofedError naming `where` when it is not."""
    return cast(DatasetManifest, _checked(data, DatasetManifest.__required_keys__, where))


def read_dataset_manifest(shards_dir: str | os.PathLike[str]) -> DatasetManifest:
    return cast(DatasetManifest, _read(Path(shards_dir) / DATASET_FILE, DatasetManifest.__required_keys__))


def write_dataset_manifest(shards_dir: str | os.PathLike[str], manifest: DatasetManifest) -> None:
    write_json(Path(shards_dir) / DATASET_FILE, manifest)


def read_part_manifest(path: str | os.PathLike[str]) -> PartManifest:
    return cast(PartManifest, _read(Path(path), PartManifest.__required_keys__))


def write_part_manifest(path: str | os.PathLike[str], manifest: PartManifest) -> None:
    write_json(Path(path), manifest)


def parse_worker_record(data: object, where: str | os.PathLike[str]) -> WorkerRecord:
    return cast(WorkerRecord, _checked(data, WorkerRecord.__required_keys__, where))


def write_worker_record(out_dir: str | os.PathLike[str], record: WorkerRecord) -> None:
    write_json(Path(out_dir) / worker_record_file(record["rank"]), record)


def parse_job_record(data: object, where: str | os.PathLike[str]) -> JobRecord:
    return cast(JobRecord, _checked(data, JobRecord.__required_keys__, where))


def read_job_record(folder: str | os.PathLike[str]) -> JobRecord:
    return cast(JobRecord, _read(Path(folder) / JOB_FILE, JobRecord.__required_keys__))


def write_job_record(folder: str | os.PathLike[str], record: JobRecord) -> None:
    write_json(Path(folder) / JOB_FILE, record)


def read_metrics(folder: str | os.PathLike[str]) -> Metrics:
    return cast(Metrics, _read(Path(folder) / METRICS_FILE, Metrics.__required_keys__))


def write_metrics(folder: str | os.PathLike[str], metrics: Metrics) -> None:
    write_json(Path(folder) / METRICS_FILE, metrics)


def write_run_artifacts(run_dir: str | os.PathLike[str], artifacts: RunArtifacts) -> None:
    write_json(Path(run_dir) / RUN_ARTIFACTS_FILE, artifacts)


def read_run_artifacts(run_dir: str | os.PathLike[str]) -> RunArtifacts:
    return cast(RunArtifacts, _read(Path(run_dir) / RUN_ARTIFACTS_FILE, RunArtifacts.__required_keys__))


def recorded_test_set(run_dir: str | os.PathLike[str]) -> Path | None:
    """The test set's tensors of a run folder's own shards (RUN_ARTIFACTS_FILE's `shards`), or None when the run
    left no record (a run folder of an older microfed, or none) or its shards are gone."""
    try:
        shards = Path(run_dir) / read_run_artifacts(run_dir)["shards"]
    except MicrofedError:
        return None
    test = shards / TEST_FILES.tensors
    return test if test.is_file() else None
