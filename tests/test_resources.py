"""Resource plan: hand-checkable memory parts, the measured dry run, and the accelerator choice."""

from __future__ import annotations

import json

import pytest
import torch

from microfed.training import resources as res
from microfed.training.errors import MicrofedError
from microfed.training.models import ModelConfig, build_model, count_parameters
from microfed.training.resources import (
    ACCELERATORS,
    GPUS,
    MemoryEstimate,
    ResourcePlan,
    estimate_memory,
    format_plan,
    plan_resources,
)
from microfed.training.train import OPTIMIZERS, PRECISIONS

pytestmark = pytest.mark.unit

ALL = ("none", "nvidia-tesla-t4", "nvidia-l4", "nvidia-tesla-a100")
FMNIST = ModelConfig(name="cnn-fmnist", num_classes=10, in_channels=1, image_size=(28, 28))
EFFNET = ModelConfig(name="efficientnet_v2_s", num_classes=1000, in_channels=3, image_size=(224, 224))
# Fashion-MNIST's 60,000 training images over 3 workers; an ImageNet-sized class count at 50,000 per shard.
FMNIST_JOB = {"batch_size": 128, "optimizer": "adam", "shard_examples": 20_000}
EFFNET_JOB = {"batch_size": 64, "optimizer": "adam", "shard_examples": 50_000}
MIB64 = 64 * 1024**2


def fits(name: str, estimate: MemoryEstimate, headroom: float = 1.25) -> bool:
    return estimate.device_bytes * headroom <= GPUS[name].usable_bytes


# --- the two reference cases -------------------------------------------------------------------------------


def test_cnn_fmnist_trains_on_cpu_even_when_gpus_are_allowed() -> None:
    plan = plan_resources(FMNIST, accelerators=ALL, **FMNIST_JOB)
    est = estimate_memory(FMNIST, **FMNIST_JOB)

    assert (plan.accelerator, plan.gpus, plan.gpu_memory) == ("none", 0, 0)
    assert est.shard_bytes + est.parameter_bytes < plan.memory_request < 2 * 1024**3
    assert 1.0 <= plan.cpu_request <= plan.cpu_limit
    assert plan.memory_limit >= plan.memory_request
    assert plan.estimate["train_gflop_per_epoch"] < plan.estimate["cpu_threshold_gflop"]


def test_efficientnet_at_224_gets_the_smallest_gpu_that_holds_it() -> None:
    plan = plan_resources(EFFNET, accelerators=ALL, **EFFNET_JOB)
    est = estimate_memory(EFFNET, **EFFNET_JOB)

    gpus = list(GPUS)
    chosen = gpus.index(plan.accelerator)
    assert plan.gpus == 1 and plan.gpu_memory == est.device_bytes
    assert fits(plan.accelerator, est)
    assert not any(fits(smaller, est) for smaller in gpus[:chosen])
    # 9.2 GiB of activations at batch 64 plus the 7 GiB shard the worker copies onto the GPU, x1.25, is more
    # than a T4's 14 GiB: the L4 (21.5 GiB usable) is the smallest that holds it, and no A100 is handed out.
    assert plan.accelerator == "nvidia-l4"


def test_efficientnet_on_a_smaller_batch_and_shard_gets_a_t4() -> None:
    plan = plan_resources(EFFNET, accelerators=ALL, batch_size=32, optimizer="adam", shard_examples=20_000)

    assert plan.accelerator == "nvidia-tesla-t4"


def test_efficientnet_stays_on_cpu_when_only_cpu_is_allowed() -> None:
    plan = plan_resources(EFFNET, accelerators=("none",), **EFFNET_JOB)
    est = estimate_memory(EFFNET, **EFFNET_JOB)

    assert (plan.accelerator, plan.gpus) == ("none", 0)
    assert plan.cpu_request == res.MAX_CPU_CORES  # the compute need is far above what the cap delivers
    assert plan.memory_request == -(-int(est.total_bytes * 1.25) // MIB64) * MIB64


def test_gpu_work_falls_back_to_cpu_when_no_allowed_gpu_holds_it() -> None:
    plan = plan_resources(EFFNET, accelerators=("none", "nvidia-tesla-t4"), **EFFNET_JOB)

    assert plan.accelerator == "none"
    assert plan.estimate["train_gflop_per_epoch"] > plan.estimate["cpu_threshold_gflop"]


def test_compute_threshold_decides_cpu_against_gpu() -> None:
    cheap_threshold = plan_resources(FMNIST, accelerators=ALL, cpu_threshold_gflop=1.0, **FMNIST_JOB)

    assert cheap_threshold.accelerator == "nvidia-tesla-t4"


# --- requests derive from the estimate ---------------------------------------------------------------------


def test_doubling_the_batch_doubles_activations_and_grows_the_request() -> None:
    job = {**EFFNET_JOB, "batch_size": 32}
    small, large = (estimate_memory(EFFNET, **{**job, "batch_size": b}) for b in (32, 64))
    plan_small, plan_large = (
        plan_resources(EFFNET, accelerators=("none",), **{**job, "batch_size": b}) for b in (32, 64)
    )

    assert large.activation_bytes / small.activation_bytes == pytest.approx(2.0, rel=0.02)
    assert plan_large.memory_request > plan_small.memory_request
    assert large.shard_bytes == small.shard_bytes and large.parameter_bytes == small.parameter_bytes


def test_doubling_the_shard_doubles_its_bytes_exactly() -> None:
    one, two = (estimate_memory(FMNIST, **{**FMNIST_JOB, "shard_examples": n}) for n in (20_000, 40_000))

    assert two.shard_bytes == 2 * one.shard_bytes
    assert one.shard_bytes == 20_000 * (1 * 28 * 28 + 8)  # uint8 pixels + an int64 label
    assert two.activation_bytes == one.activation_bytes


def test_memory_request_is_the_estimate_times_headroom_rounded_to_64_mib() -> None:
    est = estimate_memory(FMNIST, **FMNIST_JOB)
    plans = {h: plan_resources(FMNIST, headroom=h, **FMNIST_JOB) for h in (1.0, 1.25, 2.0)}

    for headroom, plan in plans.items():
        assert plan.memory_request == -(-int(est.total_bytes * headroom) // MIB64) * MIB64
        assert plan.memory_request - MIB64 < est.total_bytes * headroom <= plan.memory_request
    assert plans[1.0].memory_request < plans[1.25].memory_request < plans[2.0].memory_request


# --- hand-checkable parts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [FMNIST, EFFNET], ids=lambda a: a.name)
def test_parameter_gradient_and_optimizer_bytes(arch: ModelConfig) -> None:
    params = count_parameters(build_model(arch))
    adam, adamw, sgd = (estimate_memory(arch, **{**FMNIST_JOB, "optimizer": o}) for o in ("adam", "adamw", "sgd"))

    assert adam.parameters == params
    assert adam.parameter_bytes == adam.gradient_bytes == params * 4  # fp32
    assert adam.optimizer_bytes == adamw.optimizer_bytes == 2 * adam.parameter_bytes
    assert sgd.optimizer_bytes == sgd.parameter_bytes


def test_cnn_fmnist_numbers_by_hand() -> None:
    est = estimate_memory(FMNIST, **FMNIST_JOB)

    assert est.parameter_bytes == 421_642 * 4
    # Forward multiply-adds x2: conv1 28*28*32*9, conv2 14*14*64*32*9, fc 3136*128 and 128*10; x3 for training.
    forward = 2 * (28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 3136 * 128 + 128 * 10)
    assert est.train_flops_per_example == 3 * forward
    # Saved for backward per example, at least: the input, conv1's output (ReLU), conv2's output and the
    # 3136 pooled features, in fp32.
    lower = 4 * (28 * 28 + 32 * 28 * 28 + 64 * 14 * 14 + 3136) * 128
    assert lower <= est.activation_bytes < 2 * lower
    assert est.total_bytes == sum(
        (est.parameter_bytes, est.gradient_bytes, est.optimizer_bytes, est.activation_bytes, est.shard_bytes)
    ) + (est.runtime_bytes)


def test_bf16_shrinks_efficientnet_activations() -> None:
    fp32, bf16 = (estimate_memory(EFFNET, **{**EFFNET_JOB, "precision": p}) for p in ("fp32", "bf16"))

    assert bf16.activation_bytes < 0.7 * fp32.activation_bytes
    assert bf16.parameter_bytes == fp32.parameter_bytes  # master weights stay fp32


def test_dry_run_leaves_the_global_rng_alone() -> None:
    uncached = ModelConfig(name="cnn-small", num_classes=3, in_channels=1, image_size=(20, 20))
    torch.manual_seed(123)
    before = torch.get_rng_state()

    estimate_memory(uncached, batch_size=8, optimizer="sgd", shard_examples=10)

    assert torch.equal(torch.get_rng_state(), before)


# --- errors ------------------------------------------------------------------------------------------------


def test_a_model_too_big_for_every_allowed_gpu_raises_naming_it() -> None:
    with pytest.raises(MicrofedError, match=r"efficientnet_v2_s does not fit.*nvidia-l4") as err:
        plan_resources(EFFNET, accelerators=("nvidia-l4", "nvidia-tesla-t4"), **{**EFFNET_JOB, "batch_size": 4096})

    assert "batch-size" in err.value.hint


def test_a_replica_too_big_for_cpu_raises() -> None:
    with pytest.raises(MicrofedError, match=r"efficientnet_v2_s does not fit.*CPU"):
        plan_resources(EFFNET, accelerators=("none",), **{**EFFNET_JOB, "shard_examples": 1_000_000})


def test_unknown_accelerator_names_the_allowed_ones() -> None:
    with pytest.raises(MicrofedError, match="nvidia-h100") as err:
        plan_resources(FMNIST, accelerators=("none", "nvidia-h100"), **FMNIST_JOB)

    assert all(name in err.value.hint for name in ACCELERATORS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"precision": "fp16"}, "precision"),
        ({"batch_size": 0}, "batch_size"),
        ({"shard_examples": 0}, "shard_examples"),
        ({"accelerators": ()}, "no accelerators"),
        ({"headroom": 0.5}, "headroom"),
    ],
)
def test_bad_inputs_raise(change: dict[str, object], message: str) -> None:
    kwargs: dict[str, object] = {**FMNIST_JOB, **change}
    with pytest.raises(MicrofedError, match=message):
        plan_resources(FMNIST, **kwargs)  # type: ignore[arg-type]


def test_every_optimizer_and_precision_of_the_train_loop_is_known() -> None:
    for optimizer in OPTIMIZERS:
        estimate_memory(FMNIST, **{**FMNIST_JOB, "optimizer": optimizer})
    for precision in PRECISIONS:
        estimate_memory(FMNIST, **{**FMNIST_JOB, "precision": precision})


# --- table and output --------------------------------------------------------------------------------------


def test_gpu_table_is_in_accelerator_order_and_smallest_first() -> None:
    usable = [GPUS[name].usable_bytes for name in ACCELERATORS[1:]]

    assert tuple(GPUS) == ACCELERATORS[1:]
    assert usable == sorted(usable)
    assert all(0 < spec.usable_bytes < spec.total_bytes for spec in GPUS.values())


def test_plan_is_json_and_formats_on_one_line() -> None:
    cpu = plan_resources(FMNIST, accelerators=ALL, **FMNIST_JOB)
    gpu = plan_resources(EFFNET, accelerators=ALL, **EFFNET_JOB)

    for plan in (cpu, gpu):
        assert json.loads(json.dumps(plan.to_dict()))["estimate"]["model"] == plan.estimate["model"]
    assert "\n" not in format_plan(cpu) and format_plan(cpu).startswith("CPU, 1 core")
    assert "params 1.6 MiB" in format_plan(cpu) and "adam state" in format_plan(cpu)
    assert format_plan(gpu).startswith("GPU nvidia-l4 x1") and "usable" in format_plan(gpu)
    assert format_plan(ResourcePlan()).startswith("CPU, 1 core (limit 2), 2.0 GiB")
