"""Which PyTorch build the container image holds, and so which accelerators its replicas can use.

The Dockerfile builds a CPU image by default (`ARG TORCH_VARIANT=cpu`). A resource plan may still pick a GPU; the
replicas then get nccl on a torch without CUDA and fail at the first collective, after a GPU node was bought. So
the image states its variant at build time (`ENV MICROFED_TORCH_VARIANT=${TORCH_VARIANT}`), and the train step,
which runs in the same image as the replicas, drops the accelerators the image cannot drive before planning.

Without the variable (an image built some other way, a local install) the torch that is installed decides:
`torch.version.cuda` is None on a CPU build.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch

from .errors import MicrofedError

__all__ = [
    "CPU_VARIANT",
    "TORCH_VARIANT_ENV",
    "image_torch_variant",
    "supports_cuda",
    "usable_accelerators",
    "variant_from_cuda_version",
]

TORCH_VARIANT_ENV = "MICROFED_TORCH_VARIANT"
CPU_VARIANT = "cpu"


def variant_from_cuda_version(cuda: str | None) -> str:
    """The wheel-index tag of a torch build with CUDA `cuda` ("12.8" → "cu128"), or "cpu" without CUDA."""
    return f"cu{cuda.replace('.', '')}" if cuda else CPU_VARIANT


def image_torch_variant(environ: Mapping[str, str] | None = None) -> str:
    """The image's torch variant: `MICROFED_TORCH_VARIANT` (the Dockerfile sets it from its build argument), else
    the installed torch's CUDA version."""
    env = os.environ if environ is None else environ
    stated = env.get(TORCH_VARIANT_ENV, "").strip().lower()
    return stated or variant_from_cuda_version(torch.version.cuda)


def supports_cuda(variant: str) -> bool:
    """Whether a torch of `variant` (cpu, cu126, cu128, ...) can use an NVIDIA GPU."""
    return variant.strip().lower().startswith("cu")


def _print(message: str) -> None:
    print(f"[microfed] {message}", flush=True)


def usable_accelerators(
    requested: Sequence[str], variant: str, *, log: Callable[[str], None] = _print
) -> tuple[str, ...]:
    """The accelerators of `requested` (in its order) that an image of torch `variant` can use.

    With a CUDA variant that is all of them. With any other, the GPU types are dropped with a note through `log`
    and `none` (CPU) stays; when nothing is left (only GPUs were requested), MicrofedError names the `accelerators`
    pipeline parameter and the CUDA image build.
    """
    if isinstance(requested, str):  # ("none") without the comma is a string, as in resources.plan_resources
        requested = [requested]
    if supports_cuda(variant):
        return tuple(requested)
    usable = tuple(a for a in requested if a == "none")
    dropped = [a for a in requested if a != "none"]
    if not dropped:
        return usable
    if not usable:
        raise MicrofedError(
            f"accelerators {', '.join(dropped)} need a CUDA build of PyTorch, but the image holds the "
            f"{variant!r} build ({TORCH_VARIANT_ENV})",
            hint=(
                "build and push the CUDA image (make image IMAGE=... TORCH_VARIANT=cu128) and compile the pipeline "
                "with it, or add none to the `accelerators` pipeline parameter to train on CPU"
            ),
        )
    log(
        f"not planning on {', '.join(dropped)}: the image holds the {variant!r} build of PyTorch "
        f"({TORCH_VARIANT_ENV}); build it with TORCH_VARIANT=cu128 to train on GPUs"
    )
    return usable
