"""Measured right-sizing: the monitor sees what a process uses, the cache round-trips, and it changes the next plan."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from microfed.training import step_train
from microfed.training.layout import USAGE_CACHE_FILE
from microfed.training.models import ModelConfig
from microfed.training.resources import (
    MEASURED_MEMORY_HEADROOM,
    MeasuredUsage,
    ResourcePlan,
    format_plan,
    plan_resources,
    shard_bytes_per_example,
)
from microfed.training.shards import SplitConfig, write_shards
from microfed.training.storage import read_bytes, write_bytes
from microfed.training.train import OptimConfig
from microfed.training.usage import (
    Usage,
    UsageKey,
    UsageMonitor,
    cache_uri,
    find_cgroup,
    job_usage,
    measured_from_workers,
    read_measured,
    request_utilisation,
    update_cache,
)
from microfed.training.worker import WorkerConfig
from tests.conftest import synthetic_dataset
from tests.gcs_emulator import GcsEmulator, gcs  # noqa: F401

MIB = 1024**2
GIB = 1024**3
FMNIST = ModelConfig(name="cnn-fmnist", num_classes=10, in_channels=1, image_size=(28, 28))
FMNIST_JOB: dict[str, Any] = {"batch_size": 128, "optimizer": "adam", "shard_examples": 20_000}
KEY = UsageKey(model="cnn-fmnist", image_shape=(1, 28, 28), batch_size=128, precision="fp32", optimizer="adam")
# 28 x 28 uint8 + an int64 label
PER_EXAMPLE = 28 * 28 + 8


def usage(**overrides: Any) -> Usage:
    values: dict[str, Any] = {
        "wall_seconds": 10.0,
        "cpu_seconds": 15.0,
        "cpu_cores_mean": 1.5,
        "cpu_cores_peak": 1.8,
        "memory_peak_bytes": 3 * GIB,
        "memory_source": "process VmHWM",
        "rss_start_bytes": 1 * GIB,
        "rss_peak_bytes": 3 * GIB,
    }
    return Usage(**{**values, **overrides})


# --- the monitor -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_monitor_sees_a_deliberate_allocation() -> None:
    with UsageMonitor(interval=0.05) as monitor:
        block = torch.ones(200 * MIB, dtype=torch.uint8)  # written, so every page is resident
        assert int(block[-1]) == 1
        del block
    u = monitor.usage
    assert u.rss_start_bytes is not None and u.rss_peak_bytes is not None
    assert u.memory_peak_bytes - u.rss_start_bytes >= 150 * MIB
    assert u.memory_source in ("process VmHWM", "cgroup v1 working set", "cgroup v2 working set")
    assert u.samples >= 1 and u.wall_seconds > 0


def test_monitor_sees_a_busy_cpu() -> None:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    monitor = UsageMonitor(interval=0.1).start()
    x = 0
    while time.process_time() - cpu0 < 1.0:  # one core-second of pure Python, however loaded the machine is
        x += 1
    u = monitor.stop(epoch_seconds=[2.0, 4.0])
    cores = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    assert u.cpu_seconds >= 0.98  # os.times counts in 10 ms ticks
    assert u.cpu_cores_mean == pytest.approx(cores, abs=0.05)  # what the process got, measured independently
    if u.cpu_cores_demand is not None:  # one busy thread wants one core, however many it got
        assert u.cpu_wait_seconds is not None and u.cpu_wait_seconds >= 0
        assert 0.8 < u.cpu_cores_demand < 1.3 and u.cpu_cores_demand >= u.cpu_cores_mean
    if cores < 0.55:  # other processes took the cores: the loop could not use one
        pytest.skip(f"the machine gave this process only {cores:.2f} cores")
    assert u.cpu_cores_mean > 0.5
    assert u.cpu_cores_peak >= u.cpu_cores_mean
    assert u.epoch_seconds_mean == 3.0
    assert u.gpu_memory_reserved_peak_bytes is None and u.gpu_utilization_mean is None  # a CPU monitor
    assert monitor.stop() is u  # stopping twice returns the same result
    assert Usage.from_dict(json.loads(json.dumps(u.to_dict()))) == u


def test_monitor_misuse_is_reported() -> None:
    monitor = UsageMonitor()
    with pytest.raises(ValueError, match="without start"):
        monitor.stop()
    with pytest.raises(ValueError, match="before stop"):
        _ = monitor.usage


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_monitor_records_gpu_memory() -> None:
    with UsageMonitor(torch.device("cuda", 0), interval=0.05) as monitor:
        block = torch.ones(256 * MIB, dtype=torch.uint8, device="cuda")
        del block
    u = monitor.usage
    assert u.gpu_memory_allocated_peak_bytes is not None and u.gpu_memory_allocated_peak_bytes >= 256 * MIB
    assert u.gpu_memory_reserved_peak_bytes is not None and u.gpu_name


def fake_cgroup_v2(tmp_path: Path, current: int, inactive: int, peak: int) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "memory.current").write_text(f"{current}\n")
    (root / "memory.stat").write_text(f"anon 1\nfile 2\ninactive_file {inactive}\nactive_file 3\n")
    (root / "memory.peak").write_text(f"{peak}\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/\n")
    return proc, root


def test_cgroup_v2_of_a_container_is_found_and_its_working_set_excludes_inactive_cache(tmp_path: Path) -> None:
    proc, root = fake_cgroup_v2(tmp_path, current=50 * GIB, inactive=10 * GIB, peak=60 * GIB)
    cg = find_cgroup(proc, root, environ={})
    assert cg is not None and cg.version == 2
    assert cg.working_set() == 40 * GIB and cg.peak_bytes() == 60 * GIB
    # a working set larger than this process's RSS is what the plan takes, and the record says so
    with UsageMonitor(cgroup=cg, interval=0.05) as monitor:
        pass
    u = monitor.usage
    assert u.memory_peak_bytes == 40 * GIB and u.memory_source == "cgroup v2 working set"
    assert u.cgroup_peak_bytes == 60 * GIB


def test_a_cgroup_that_may_be_the_whole_machine_is_not_used(tmp_path: Path) -> None:
    # cgroup v2 root without memory.current: the host's real root cgroup
    (tmp_path / "root").mkdir()
    (tmp_path / "proc").write_text("0::/\n")
    assert find_cgroup(tmp_path / "proc", tmp_path / "root", environ={}) is None
    # cgroup v1 (a hybrid host like this one): trusted only inside a Kubernetes pod
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.usage_in_bytes").write_text("300\n")
    (v1 / "memory" / "memory.stat").write_text("cache 5\ntotal_inactive_file 100\n")
    (v1 / "memory" / "memory.max_usage_in_bytes").write_text("400\n")
    (tmp_path / "proc1").write_text("4:memory:/some/slice\n1:cpu,cpuacct:/\n0::/\n")
    assert find_cgroup(tmp_path / "proc1", v1, environ={}) is None
    cg = find_cgroup(tmp_path / "proc1", v1, environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert cg is not None and cg.version == 1 and cg.working_set() == 200 and cg.peak_bytes() == 400
    assert find_cgroup(tmp_path / "missing", v1, environ={"KUBERNETES_SERVICE_HOST": "x"}) is None


# --- measured against requested ----------------------------------------------------------------------------


def test_request_utilisation_by_hand() -> None:
    plan = ResourcePlan(cpu_request=2.0, cpu_limit=4.0, memory_request=4 * GIB, memory_limit=6 * GIB)
    ratios = request_utilisation(plan, usage())
    assert ratios == {
        "cpu": 0.75,
        "cpu_peak": 0.9,
        "cpu_demand": None,
        "memory": 0.75,
        "memory_of_limit": 0.5,
        "gpu_memory": None,
    }
    assert request_utilisation(plan, usage(cpu_cores_demand=1.9))["cpu_demand"] == 0.95
    gpu_plan = ResourcePlan(accelerator="nvidia-tesla-t4", gpus=1, gpu_memory=2 * GIB)
    assert request_utilisation(gpu_plan, usage(gpu_memory_reserved_peak_bytes=GIB))["gpu_memory"] == 0.5


def test_job_usage_reports_each_replica_and_the_lowest_against_the_goal() -> None:
    plan = ResourcePlan(cpu_request=2.0, cpu_limit=4.0, memory_request=4 * GIB, memory_limit=6 * GIB)
    workers = [
        {"rank": 0, "n_k": 10, "usage": usage().to_dict()},
        {"rank": 1, "n_k": 20, "usage": usage(cpu_cores_mean=1.0, memory_peak_bytes=2 * GIB).to_dict()},
    ]
    report = job_usage(plan, workers, planned=True)
    assert [r["utilisation"]["cpu"] for r in report["replicas"]] == [0.75, 0.5]
    assert report["lowest_utilisation"] == {"cpu": 0.5, "cpu_demand": 0.5, "memory": 0.5}
    assert report["meets_goal"] is False and report["goal"] == 0.75
    # a replica that waited for cores was not over-requested: CPU is judged by demand
    waited = [{"rank": 0, "n_k": 10, "usage": usage(cpu_cores_mean=0.2, cpu_cores_demand=1.6).to_dict()}]
    report = job_usage(plan, waited, planned=True)
    assert report["lowest_utilisation"] == {"cpu": 0.1, "cpu_demand": 0.8, "memory": 0.75}
    assert report["meets_goal"] is True
    assert report["requested"]["memory_request"] == 4 * GIB
    assert job_usage(plan, workers[:1], planned=False)["meets_goal"] is True
    assert job_usage(plan, [{"rank": 0, "n_k": 1}], planned=True)["meets_goal"] is False  # nothing measured


def test_measurement_of_a_job_keeps_the_largest_need_beyond_each_shard() -> None:
    workers = [
        {"rank": 0, "n_k": 1000, "device": "cpu", "usage": usage(memory_peak_bytes=900 * MIB).to_dict()},
        {"rank": 1, "n_k": 3000, "device": "cpu", "usage": usage(cpu_cores_mean=0.8, cpu_cores_demand=1.2).to_dict()},
    ]
    found = measured_from_workers(workers, (1, 28, 28))
    assert found is not None
    m, extra = found
    assert m.device == "cpu" and m.bytes_per_example == PER_EXAMPLE == shard_bytes_per_example((1, 28, 28))
    assert m.memory_fixed_bytes == max(900 * MIB - 1000 * PER_EXAMPLE, 3 * GIB - 3000 * PER_EXAMPLE)
    assert m.cpu_cores == 1.5
    assert m.memory_bytes(2000) == m.memory_fixed_bytes + 2000 * PER_EXAMPLE
    assert extra["shard_examples"] == [1000, 3000] and extra["replicas"] == 2
    assert measured_from_workers([{"rank": 0, "n_k": 1}], (1, 28, 28)) is None


# --- the cache ---------------------------------------------------------------------------------------------


MEASURED = MeasuredUsage(
    device="cpu", memory_fixed_bytes=600 * MIB, bytes_per_example=PER_EXAMPLE, cpu_cores=0.83, source="test"
)


def test_cache_round_trips(base: str) -> None:
    assert read_measured(base, KEY) == {}  # no cache yet
    uri = update_cache(base, KEY, MEASURED, {"replicas": 3})
    assert uri == cache_uri(base) and uri.endswith(USAGE_CACHE_FILE)
    cuda = MeasuredUsage(
        device="cuda", memory_fixed_bytes=2 * GIB, bytes_per_example=PER_EXAMPLE, cpu_cores=1.0,
        gpu_memory_fixed_bytes=GIB,
    )  # fmt: skip
    update_cache(base, KEY, cuda)
    got = read_measured(base, KEY)
    assert set(got) == {"cpu", "cuda"}
    for kind, want in (("cpu", MEASURED), ("cuda", cuda)):
        assert got[kind].to_dict() | {"source": ""} == want.to_dict() | {"source": ""}
        assert uri in got[kind].source
    data = json.loads(read_bytes(uri))
    assert data["version"] == 1 and data["entries"][KEY.text()]["cpu"]["replicas"] == 3
    # a .json location is the file itself; other work has no entry
    assert read_measured(uri, KEY).keys() == {"cpu", "cuda"}
    assert read_measured(base, UsageKey(**{**KEY.__dict__, "batch_size": 64})) == {}
    assert read_measured("", KEY) == {}  # the cache turned off


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[]", b'{"version": 99, "entries": {}}'])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_replaced(tmp_path: Path, content: bytes) -> None:
    uri = str(tmp_path / USAGE_CACHE_FILE)
    write_bytes(uri, content)
    with pytest.warns(UserWarning, match=f"usage cache {uri} is unreadable and ignored"):
        assert read_measured(str(tmp_path), KEY) == {}
    with pytest.warns(UserWarning):
        plan = plan_resources(FMNIST, **FMNIST_JOB, measured=read_measured(str(tmp_path), KEY))
    assert plan.estimate["requests_from"] == "estimate"  # training goes on with the estimate
    with pytest.warns(UserWarning):
        update_cache(str(tmp_path), KEY, MEASURED)
    assert read_measured(str(tmp_path), KEY)["cpu"].memory_fixed_bytes == 600 * MIB


def test_a_malformed_entry_is_ignored_with_a_warning(tmp_path: Path) -> None:
    bad = {"version": 1, "entries": {KEY.text(): {"cpu": {"memory_fixed_bytes": "lots"}, "cuda": []}}}
    (tmp_path / USAGE_CACHE_FILE).write_text(json.dumps(bad))
    with pytest.warns(UserWarning, match="is malformed and ignored"):
        assert read_measured(str(tmp_path), KEY) == {}


# --- the next plan -----------------------------------------------------------------------------------------


def test_a_measurement_moves_the_plan_requests_to_measured_times_headroom() -> None:
    estimated = plan_resources(FMNIST, **FMNIST_JOB)
    planned = plan_resources(FMNIST, **FMNIST_JOB, measured={"cpu": MEASURED})
    host = 600 * MIB + 20_000 * PER_EXAMPLE
    request = -(-int(host * MEASURED_MEMORY_HEADROOM) // (64 * MIB)) * 64 * MIB
    assert planned.accelerator == estimated.accelerator == "none"
    assert planned.memory_request == request != estimated.memory_request
    assert planned.memory_limit == -(-int(request * 1.5) // (64 * MIB)) * 64 * MIB
    assert (planned.cpu_request, planned.cpu_limit) == (0.9, 1.8)  # 0.83 cores, up to 100 millicores
    assert planned.estimate["requests_from"] == "measurement"
    assert planned.estimate["estimated_requests"]["memory_request"] == estimated.memory_request
    assert "requests from a measurement" in format_plan(planned)
    # measured peak / request is what the goal asks: above 75%
    assert 0.75 <= host / planned.memory_request <= 1.0
    # a smaller shard rescales the measurement
    half = plan_resources(FMNIST, **{**FMNIST_JOB, "shard_examples": 10_000}, measured={"cpu": MEASURED})
    assert half.estimate["measured_host_bytes"] == host - 10_000 * PER_EXAMPLE


def test_a_gpu_measurement_keeps_the_accelerator_choice() -> None:
    effnet = ModelConfig(name="efficientnet_v2_s", num_classes=1000, in_channels=3, image_size=(224, 224))
    job: dict[str, Any] = {"batch_size": 64, "optimizer": "adam", "shard_examples": 50_000}
    allowed = ("none", "nvidia-tesla-t4", "nvidia-l4", "nvidia-tesla-a100")
    cuda = MeasuredUsage(device="cuda", memory_fixed_bytes=3 * GIB, bytes_per_example=3 * 224 * 224 + 8, cpu_cores=1.26)
    estimated = plan_resources(effnet, **job, accelerators=allowed)
    planned = plan_resources(effnet, **job, accelerators=allowed, measured={"cuda": cuda})
    assert planned.accelerator == estimated.accelerator != "none" and planned.gpus == 1
    assert planned.cpu_request == 1.3 and planned.memory_request != estimated.memory_request
    # a CPU measurement says nothing about a GPU replica
    assert plan_resources(effnet, **job, accelerators=allowed, measured={"cpu": MEASURED}) == estimated


def test_measured_memory_that_fits_no_replica_is_reported() -> None:
    huge = MeasuredUsage(device="cpu", memory_fixed_bytes=100 * GIB, bytes_per_example=PER_EXAMPLE, cpu_cores=1)
    with pytest.raises(ValueError, match="does not fit"):
        plan_resources(FMNIST, **FMNIST_JOB, measured={"cpu": huge})
    with pytest.raises(ValueError, match="holds a measurement of device"):
        plan_resources(FMNIST, **FMNIST_JOB, measured={"cuda": MEASURED})
    with pytest.raises(ValueError, match="non-negative"):
        MeasuredUsage(device="cpu", memory_fixed_bytes=-1, bytes_per_example=1, cpu_cores=1)


def write_dataset_manifest(folder: Path, shard_sizes: list[int]) -> Path:
    folder.mkdir(parents=True)
    manifest = {
        "dataset": "synthetic",
        "class_names": [str(i) for i in range(10)],
        "image_shape": [1, 28, 28],
        "mean": [0.5],
        "std": [0.25],
        "split": {
            "split": "iid",
            "seed": 0,
            "alpha": 0.5,
            "ratios": None,
            "workers": len(shard_sizes),
            "val_fraction": 0.0,
        },
        "num_skipped_files": 0,
        "num_train_examples": sum(shard_sizes),
        "num_val_examples": 0,
        "num_test_examples": 0,
        "shards": [{"num_examples": n} for n in shard_sizes],
        "skipped_files": [],
    }
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder


def test_the_usage_cache_changes_the_next_plan_of_the_train_step(base: str, tmp_path: Path) -> None:
    shards = write_dataset_manifest(tmp_path / "shards", [20_000, 20_000, 20_000])
    cfg = WorkerConfig(
        rounds=1, local_epochs=1, shards=str(shards), out=str(tmp_path / "out"), model="cnn-fmnist", optim=OptimConfig()
    )
    first = step_train._plan(cfg, ("none", "nvidia-tesla-t4"), base)  # no cache yet: the estimate
    key = UsageKey.from_plan(first)
    # the default batch is each worker's share of the global 128: ceil(128 / 3 shards) = 43
    assert key.text() == f"cnn-fmnist|1x28x28|batch=43|{cfg.optim.precision}|{cfg.optim.optimizer}"
    update_cache(base, key, MEASURED)
    second = step_train._plan(cfg, ("none", "nvidia-tesla-t4"), base)
    assert first.estimate["requests_from"] == "estimate" and second.estimate["requests_from"] == "measurement"
    assert second.memory_request < first.memory_request and second.cpu_request == 0.9
    assert second.accelerator == first.accelerator


@pytest.mark.integration
def test_a_local_train_step_records_usage_and_fills_the_cache(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(
        synthetic_dataset(n_train=120, n_test=60), shards, SplitConfig(val_fraction=0.0, workers=2, ratios=(1, 2))
    )
    cfg = WorkerConfig(
        shards=shards,
        out=tmp_path / "micro",
        model="cnn-small",
        rounds=1,
        local_epochs=2,
        threads=1,
        optim=OptimConfig(batch_size=16, lr=0.01),
    )
    cache = str(tmp_path / "root")
    job = step_train.train_step(cfg, workers=2, usage_cache=cache)
    for w in job["workers"]:
        u = Usage.from_dict(w["usage"])
        assert u.memory_peak_bytes > 100 * MIB and u.cpu_seconds > 0 and u.epoch_seconds_mean is not None
    report = job["usage"]
    assert report["plan"].startswith("the plan a cluster run would have got")
    assert [r["rank"] for r in report["replicas"]] == [0, 1]
    assert report["cache"] == os.path.join(cache, USAGE_CACHE_FILE)
    assert report["lowest_utilisation"]["memory"] > 0
    o = cfg.optim
    key = UsageKey(
        model="cnn-small", image_shape=(1, 16, 16), batch_size=16, precision=o.precision, optimizer=o.optimizer
    )
    assert read_measured(cache, key)["cpu"].cpu_cores > 0
    # the next run's plan starts from it
    again = step_train._plan(cfg, ("none",), cache)
    assert again.estimate["requests_from"] == "measurement"
