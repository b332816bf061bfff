"""The Trainer v2 TrainJob builder against the pinned CRD schema, both rank contracts, and the stand-in's trainer.

Validation is strict the way tests/test_pytorchjob.py's is: every object schema that lists `properties` rejects any
other field, since the API server would prune it silently. The CRD and the runtime are Trainer v2.3.0's
(tests/schemas/TRAINER.md); tests/trainer_standin.py models the controllers and cites its sources.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import textwrap
import time
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from microfed.training.errors import MicrofedError
from microfed.training.pytorchjob import JobConfig, Placement, build_pytorchjob, pytorchjob_to_dict
from microfed.training.rank_env import RankEnv, rank_contract, read_rank_env
from microfed.training.resources import ResourcePlan
from microfed.training.trainjob import (
    NODE,
    PATCH_MANAGER,
    RUNTIME_NAME,
    TORCH_RESERVED_ENV,
    build_trainjob,
)
from tests.trainer_standin import RUNTIME_MANIFEST, LocalTrainer, TrainJobRejected, _render_jobset

SCHEMAS = Path(__file__).with_name("schemas")  # sources and licence: schemas/TRAINER.md
TRAINJOB_CRD = SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml"
RUNTIME_CRD = SCHEMAS / "trainer.kubeflow.org_clustertrainingruntimes.yaml"
RFC1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")

CPU_PLAN = ResourcePlan(cpu_request=1.5, cpu_limit=2.0, memory_request=1536 * 1024**2, memory_limit=3 * 1024**3)
GPU_PLAN = ResourcePlan(
    accelerator="nvidia-tesla-t4",
    gpus=1,
    cpu_request=3.25,
    cpu_limit=4.0,
    memory_request=6 * 1024**3 + 12345,
    memory_limit=8 * 1024**3,
)


# --- strict CRD validation ---------------------------------------------------------------------------------


def _close_objects(schema: dict[str, Any]) -> None:
    """Forbid unlisted fields in every object schema that lists its properties and keeps no unknown fields."""
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and schema.get("x-kubernetes-preserve-unknown-fields") is not True
    ):
        schema["additionalProperties"] = False
    children: list[Any] = list(schema.get("properties", {}).values())
    for key in ("additionalProperties", "items", "not"):
        if isinstance(schema.get(key), dict):
            children.append(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        children.extend(schema.get(key, []))
    for child in children:
        _close_objects(child)


@cache
def _validator(crd_path: Path) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(crd_path.read_text())
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    _close_objects(schema)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(manifest: dict[str, Any], crd: Path = TRAINJOB_CRD) -> list[str]:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(crd).iter_errors(manifest)]
    # the CRD's CEL rules on the name (x-kubernetes-validations), which jsonschema does not run
    name = manifest["metadata"]["name"]
    if not RFC1035.fullmatch(name) or len(name) > 63:
        errors.append(f"metadata/name: {name!r} is not an RFC 1035 label of <= 63 characters")
    return errors


def make_config(workers: int = 3, plan: ResourcePlan = CPU_PLAN, **overrides: Any) -> JobConfig:
    fields: dict[str, Any] = {
        "name": "train-3f2a1b2c-1234-4abc-8def-0123456789ab",
        "namespace": "kubeflow-user",
        "image": "europe-docker.pkg.dev/proj/microfed/microfed:0.1.0",
        "workers": workers,
        "worker_args": ["--shards", "/data/shards", "--out", "/data/out", "--rounds", "3"],
        "plan": plan,
        "service_account": "microfed-worker",
        "labels": {"pipelines.kubeflow.org/run-id": "3f2a1b2c-1234-4abc-8def-0123456789ab"},
        "env": {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023"},
        **overrides,
    }
    return JobConfig(**fields)


CONFIGS = {
    "cpu": make_config(),
    "gpu": make_config(plan=GPU_PLAN),
    "one-worker": make_config(workers=1),
    "autopilot-spot": make_config(
        plan=GPU_PLAN, placement=Placement(mode="autopilot", spot=True), termination_grace_period_seconds=60
    ),
    "no-service-account": make_config(service_account=None, labels={}, env={}),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_trainjob_validates_against_the_pinned_crd(case: str) -> None:
    assert schema_errors(build_trainjob(CONFIGS[case])) == []


def test_strict_validator_rejects_misplaced_fields_and_wrong_types() -> None:
    good = build_trainjob(make_config())
    misplaced = copy.deepcopy(good)
    # serviceAccountName is no Trainer field: the API server would drop it and the pods run as `default`
    misplaced["spec"]["trainer"]["serviceAccountName"] = "microfed-worker"
    assert any("serviceAccountName" in e for e in schema_errors(misplaced))
    crd = yaml.safe_load(TRAINJOB_CRD.read_text())
    assert jsonschema.Draft7Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]).is_valid(misplaced)

    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["trainer"]["numNodes"] = "3"
    assert any("numNodes" in e for e in schema_errors(wrong_type))

    not_patchable = copy.deepcopy(good)  # PodSpecPatch has no priorityClassName in v2.3
    node = not_patchable["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    node["template"]["spec"]["template"]["spec"]["priorityClassName"] = "high"
    assert any("priorityClassName" in e for e in schema_errors(not_patchable))


def test_vendored_runtime_validates_and_has_the_shape_the_builder_relies_on() -> None:
    runtime = yaml.safe_load(RUNTIME_MANIFEST.read_text())
    assert schema_errors(runtime, RUNTIME_CRD) == []
    assert runtime["kind"] == "ClusterTrainingRuntime" and runtime["metadata"]["name"] == RUNTIME_NAME
    assert "torch" in runtime["spec"]["mlPolicy"]
    (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == NODE
    assert rjob["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert [c["name"] for c in rjob["template"]["spec"]["template"]["spec"]["containers"]] == [NODE]
    assert "failurePolicy" not in runtime["spec"]["template"]["spec"]  # so the first failed Job fails the JobSet


# --- the same pod as the PyTorchJob ------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_trainjob_runs_the_pod_the_pytorchjob_runs(case: str) -> None:
    cfg = CONFIGS[case]
    pod = pytorchjob_to_dict(build_pytorchjob(cfg))["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    (container,) = pod["spec"]["containers"]
    tj = build_trainjob(cfg)
    trainer = tj["spec"]["trainer"]
    assert tj["spec"]["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    assert trainer["numNodes"] == cfg.workers and trainer["numProcPerNode"] == 1
    assert trainer["image"] == container["image"]
    assert [*trainer["command"], *trainer["args"]] == container["command"]
    assert trainer["env"] == container["env"]
    assert trainer["resourcesPerNode"] == container["resources"]
    (patch,) = tj["spec"]["runtimePatches"]
    assert patch["manager"] == PATCH_MANAGER
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == NODE
    patched_pod = node["template"]["spec"]["template"]
    assert patched_pod["metadata"] == pod["metadata"]  # labels and the Istio annotation
    assert patched_pod["spec"] == {k: v for k, v in pod["spec"].items() if k != "containers"}
    assert tj["metadata"]["labels"] == pod["metadata"]["labels"]
    assert tj["spec"]["activeDeadlineSeconds"] == cfg.active_deadline_seconds


def test_rendered_jobset_gives_each_node_the_torch_plugin_env_and_the_placement() -> None:
    """What the trainer would make of the manifest (the stand-in's renderer, pure: no process starts)."""
    cfg = make_config(workers=4)
    tj = build_trainjob(cfg)
    runtime = yaml.safe_load(RUNTIME_MANIFEST.read_text())
    spec, labels = _render_jobset(tj, runtime)
    (rjob,) = spec["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert rjob["replicas"] == 1 and job["parallelism"] == job["completions"] == 4
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure" and pod["serviceAccountName"] == "microfed-worker"
    assert pod["tolerations"] and pod["nodeSelector"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["PET_NNODES"] == "4" and env["PET_NPROC_PER_NODE"] == "1"
    assert env["PET_MASTER_ADDR"] == f"{cfg.name}-node-0-0.{cfg.name}" and env["PET_MASTER_PORT"] == "29500"
    assert env["PET_NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert env["MICROFED_BACKEND"] == "gloo" and env["STORAGE_EMULATOR_HOST"]
    assert labels["app.kubernetes.io/name"] == "microfed"

    # Without numProcPerNode a CPU node gets its CPU request rounded up (1.5 -> 2): one process would read
    # PET_NPROC_PER_NODE=2, which read_rank_env refuses. That is why the builder asks for 1.
    del tj["spec"]["trainer"]["numProcPerNode"]
    spec, _ = _render_jobset(tj, runtime)
    env = {
        e["name"]: e.get("value")
        for e in spec["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["PET_NPROC_PER_NODE"] == "2"


def test_builder_refuses_what_the_trainer_or_jobset_would_refuse() -> None:
    for name in sorted(TORCH_RESERVED_ENV):
        with pytest.raises(MicrofedError, match=name):
            build_trainjob(make_config(env={name: "1"}))
    # MAX_JOB_NAME (45) + "-node-0-" + the last index + "-xxxxx" must stay <= 63 (JobSet's webhook): 4 digits fit
    long_name = "t" * 45
    assert len(build_trainjob(make_config(name=long_name, workers=10_000 - 1))["metadata"]["name"]) == 45
    with pytest.raises(MicrofedError, match="longer than 63"):
        build_trainjob(make_config(name=long_name, workers=10_000 + 1))


# --- the rank contracts ------------------------------------------------------------------------------------

PYTORCHJOB_ENV = {"RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}
TRAINJOB_ENV = {
    "PET_NODE_RANK": "2",
    "PET_NNODES": "4",
    "PET_MASTER_ADDR": "job-node-0-0.job",
    "PET_MASTER_PORT": "29500",
    "PET_NPROC_PER_NODE": "1",
}


def test_pytorchjob_contract() -> None:
    assert rank_contract(PYTORCHJOB_ENV) == "pytorchjob"
    assert read_rank_env(PYTORCHJOB_ENV) == RankEnv(2, 4, "job-master-0", 23456)
    rank, world, addr, port = read_rank_env(PYTORCHJOB_ENV)
    assert (rank, world, addr, port) == (2, 4, "job-master-0", 23456)


def test_trainjob_contract() -> None:
    assert rank_contract(TRAINJOB_ENV) == "trainjob"
    assert read_rank_env(TRAINJOB_ENV) == RankEnv(2, 4, "job-node-0-0.job", 29500)
    assert read_rank_env({k: v for k, v in TRAINJOB_ENV.items() if k != "PET_NPROC_PER_NODE"}).rank == 2


def test_rank_wins_when_both_contracts_are_present() -> None:
    # the v1 operator sets PET_* too; torchrun inside a TrainJob node gives each process its own RANK
    both = {**TRAINJOB_ENV, "PET_NPROC_PER_NODE": "2", "RANK": "5", "WORLD_SIZE": "8"}
    both |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"}
    assert read_rank_env(both) == RankEnv(5, 8, "127.0.0.1", 29400)


@pytest.mark.parametrize(
    ("base", "change", "named"),
    [
        (PYTORCHJOB_ENV, {"WORLD_SIZE": None}, "WORLD_SIZE"),
        (PYTORCHJOB_ENV, {"MASTER_ADDR": None}, "MASTER_ADDR"),
        (PYTORCHJOB_ENV, {"MASTER_PORT": ""}, "MASTER_PORT"),
        (PYTORCHJOB_ENV, {"RANK": "two"}, "RANK='two'"),
        (PYTORCHJOB_ENV, {"RANK": "4"}, "RANK=4"),
        (PYTORCHJOB_ENV, {"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
        (PYTORCHJOB_ENV, {"MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
        (TRAINJOB_ENV, {"PET_NNODES": None}, "PET_NNODES"),
        (TRAINJOB_ENV, {"PET_MASTER_ADDR": None}, "PET_MASTER_ADDR"),
        (TRAINJOB_ENV, {"PET_MASTER_ADDR": "a b"}, "PET_MASTER_ADDR"),
        (TRAINJOB_ENV, {"PET_MASTER_PORT": "29500x"}, "PET_MASTER_PORT"),
        (TRAINJOB_ENV, {"PET_NODE_RANK": "-1"}, "PET_NODE_RANK=-1"),
        (TRAINJOB_ENV, {"PET_NPROC_PER_NODE": "auto"}, "PET_NPROC_PER_NODE"),
    ],
)
def test_a_missing_or_malformed_variable_is_named(
    base: dict[str, str], change: dict[str, str | None], named: str
) -> None:
    env = {k: v for k, v in {**base, **change}.items() if v is not None}
    with pytest.raises(MicrofedError, match=re.escape(named)):
        read_rank_env(env)


def test_no_launcher_names_both_contracts() -> None:
    assert rank_contract({}) is None
    with pytest.raises(MicrofedError, match="neither RANK nor PET_NODE_RANK"):
        read_rank_env({"WORLD_SIZE": "2", "PET_NNODES": "2"})


# --- under the stand-in (processes) ------------------------------------------------------------------------

RENDEZVOUS = textwrap.dedent(
    """
    import datetime, sys
    import torch
    import torch.distributed as dist
    from microfed.training.rank_env import read_rank_env

    rank, world, addr, port = read_rank_env()
    dist.init_process_group(
        "gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    print(f"rank {rank} of {world}: sum {total.item():g}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _script_job(tmp_path: Path, script: str, name: str, workers: int = 2) -> dict[str, Any]:
    path = tmp_path / f"{name}.py"
    path.write_text(script)
    tj = build_trainjob(make_config(name=name, workers=workers, env={}))
    tj["spec"]["trainer"]["command"] = ["python", str(path)]
    tj["spec"]["trainer"]["args"] = []
    return tj


@pytest.mark.integration
def test_two_nodes_rendezvous_with_gloo_under_the_standin(tmp_path: Path) -> None:
    with LocalTrainer(tmp_path / "pods") as trainer:
        assert trainer.create(_script_job(tmp_path, RENDEZVOUS, "rdzv"))
        assert not trainer.create(_script_job(tmp_path, RENDEZVOUS, "rdzv"))  # 409: the name is taken
        trainer.wait_until(lambda: trainer.state("rdzv") != "Running", timeout=120, what="the TrainJob to finish")
        job = trainer.get("rdzv")
        assert job is not None
        (complete,) = job["status"]["conditions"]
        assert (complete["type"], complete["reason"]) == ("Complete", "AllJobsCompleted")
        pods = trainer.pods("rdzv")
        assert sorted(p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
        for p in pods:
            assert p.status.phase == "Succeeded" and p.metadata.name.startswith("rdzv-node-0-")
            index = p.metadata.annotations["batch.kubernetes.io/job-completion-index"]
            assert f"rank {index} of 2: sum 3" in trainer.pod_log(p.metadata.name)
            env = {e.name: e.value for e in p.spec.containers[0].env}
            assert env["PET_MASTER_ADDR"] == "rdzv-node-0-0.rdzv" and env["PET_NNODES"] == "2"


CRASHING = textwrap.dedent(
    """
    import sys, time
    from microfed.training.rank_env import read_rank_env

    rank, world, addr, port = read_rank_env()
    print(f"node {rank} starting", flush=True)
    if rank == 1:
        sys.exit(3)
    time.sleep(120)
    """
)


@pytest.mark.integration
def test_a_crashing_node_is_restarted_in_place_until_the_job_backoff_limit_then_everything_fails(
    tmp_path: Path,
) -> None:
    with LocalTrainer(tmp_path / "pods", backoff_scale=0.005, gc_seconds=1.0) as trainer:
        assert trainer.create(_script_job(tmp_path, CRASHING, "crash"))
        seen_restarts = 0
        while (state := trainer.state("crash")) == "Running":
            job = trainer.get("crash")
            assert job is not None and "conditions" not in job.get("status", {})  # nothing says it is failing
            for p in trainer.pods("crash"):
                seen_restarts = max(seen_restarts, p.status.container_statuses[0].restart_count)
            time.sleep(0.05)
        assert state == "Failed"
        assert seen_restarts >= 3  # the same pod, restarted in place
        job = trainer.get("crash")
        assert job is not None
        (failed,) = job["status"]["conditions"]
        assert failed["reason"] == "FailedJobs"
        assert failed["message"] == "jobset failed due to one or more job failures (first failed job: crash-node-0)"
        assert trainer.pods("crash") == []  # the failed Job deleted its pods, and their logs with them

        # Re-created at once: the predecessor's JobSet and snapshot are still there until the garbage collector
        # runs, so the new TrainJob first shows the OLD failure and cannot build its objects.
        trainer.delete("crash", propagation_policy="Background")
        assert trainer.create(_script_job(tmp_path, RENDEZVOUS, "crash"))
        trainer.wait_until(lambda: trainer.state("crash") == "Failed", timeout=10, what="the stale Failed")
        trainer.wait_until(
            lambda: any(r == "TrainJobResourcesCreationFailed" for r, _ in trainer.events("crash")),
            timeout=10,
            what="the snapshot error",
        )
        trainer.wait_until(lambda: trainer.state("crash") == "Complete", timeout=120, what="the new run to complete")


def test_the_standin_refuses_what_admission_refuses(tmp_path: Path) -> None:
    with LocalTrainer(tmp_path / "pods") as trainer:
        bad = build_trainjob(make_config(name="bad", env={}))
        bad["spec"]["trainer"]["env"].append({"name": "PET_NODE_RANK", "value": "0"})
        with pytest.raises(TrainJobRejected, match="reserved envs"):
            trainer.create(bad)
        missing = build_trainjob(make_config(name="bad", env={}))
        missing["spec"]["runtimeRef"]["name"] = "torch-distributed-missing"
        with pytest.raises(TrainJobRejected, match="must be created before the TrainJob"):
            trainer.create(missing)


@pytest.mark.integration
def test_reading_the_rank_contract_needs_no_kubernetes_client() -> None:
    code = (
        "import sys, microfed.training.trainjob as t; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'kubeflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_jobset_that_jobset_refuses_leaves_the_trainjob_without_any_condition(tmp_path: Path) -> None:
    """The TrainJob is admitted; only events say that its JobSet never came (the launcher must read them)."""
    name = "t" * 45
    tj = build_trainjob(make_config(name=name, workers=9_999, env={}))
    tj["spec"]["trainer"]["numNodes"] = 10_001  # past what build_trainjob allows, as another client could write
    with LocalTrainer(tmp_path / "pods") as trainer:
        assert trainer.create(tj)
        trainer.wait_until(
            lambda: any("JobSet name is too long" in m for _, m in trainer.events(name)), timeout=10, what="the event"
        )
        assert trainer.jobset(name) is None and trainer.pods(name) == []
        assert trainer.state(name) == "Running"  # nothing in the status says it will never run


@pytest.mark.integration
def test_a_foreground_delete_keeps_the_trainjob_until_its_jobset_and_snapshot_are_collected(tmp_path: Path) -> None:
    with LocalTrainer(tmp_path / "pods", gc_seconds=1.0) as trainer:
        assert trainer.create(_script_job(tmp_path, RENDEZVOUS, "fg"))
        trainer.wait_until(lambda: trainer.jobset("fg") is not None, timeout=10, what="the JobSet")
        jobset = trainer.jobset("fg")
        assert jobset is not None
        (owner,) = jobset["metadata"]["ownerReferences"]
        assert owner["uid"] == trainer.get("fg")["metadata"]["uid"] and owner["blockOwnerDeletion"]
        trainer.delete("fg")  # what the launcher's backend sends: propagationPolicy Foreground
        job = trainer.get("fg")
        assert job is not None and job["metadata"]["deletionTimestamp"]
        assert job["metadata"]["finalizers"] == ["foregroundDeletion"]
        assert not trainer.create(_script_job(tmp_path, RENDEZVOUS, "fg"))  # 409 while it is being deleted
        trainer.wait_until(lambda: trainer.get("fg") is None, timeout=10, what="the TrainJob to go")
        assert trainer.jobset("fg") is None and trainer.config_map("fg-runtime-snapshot") is None
        assert trainer.pods("fg") == []


def test_the_trainjob_is_built_through_kubeflows_own_trainjob_model() -> None:
    # kubeflow-trainer-api (the kubeflow SDK's models of this Trainer release): what is sent is what the model holds
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    from microfed.training.trainjob import _through_sdk_model

    manifest = build_trainjob(make_config(name="sdk", workers=3, env={}))
    model = TrainerV1alpha1TrainJob.from_dict(manifest)
    assert model.spec.trainer.num_nodes == 3 and model.spec.runtime_ref.name == "torch-distributed"
    assert model.to_dict() == manifest
    manifest["spec"]["trainer"]["numProccessPerNode"] = 1  # a typo the CRD would prune silently
    with pytest.raises(MicrofedError, match="does not survive kubeflow-trainer-api's TrainJob model"):
        _through_sdk_model(manifest)
