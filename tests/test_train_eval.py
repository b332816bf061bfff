"""Train loop pieces and evaluation, on hand-checkable inputs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from microfed.training.errors import MicrofedError
from microfed.training.evaluation import evaluate
from microfed.training.models import ModelConfig, build_model
from microfed.training.train import OptimConfig, Preprocess, make_optimizer, make_scheduler, train_epoch
from tests.conftest import synthetic_dataset

CPU = torch.device("cpu")


class FixedLogits(nn.Module):
    """Predicts the class stored in the first pixel: a model whose confusion matrix is known in advance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = x[:, 0, 0, 0].round().long()
        return nn.functional.one_hot(pred, 3).float() * 10


def test_evaluate_counts_a_known_confusion_matrix() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0])
    images = predicted.view(-1, 1, 1, 1).to(torch.uint8).expand(-1, 1, 2, 2).contiguous()
    # mean 0, std 1/255 turns the uint8 pixel back into the class index
    pre = Preprocess([0.0], [1 / 255], CPU)
    res = evaluate(FixedLogits(), images, labels, preprocess=pre, num_classes=3, batch_size=4)
    assert res.confusion_matrix == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert res.accuracy == pytest.approx(4 / 6)
    assert res.per_class_accuracy == pytest.approx([0.5, 1.0, 0.5])
    assert res.num_examples == 6


def test_preprocess_normalises_and_augments_without_changing_shape() -> None:
    images = torch.full((4, 1, 8, 8), 255, dtype=torch.uint8)
    x = Preprocess([0.5], [0.25], CPU)(images)
    assert torch.allclose(x, torch.full_like(x, 2.0))
    g = torch.Generator().manual_seed(0)
    y = Preprocess([0.5], [0.25], CPU, augment="crop-flip")(images, g)
    assert y.shape == (4, 1, 8, 8) and y.dtype == torch.float32


def test_cosine_schedule_warms_up_then_decays_to_zero() -> None:
    model = nn.Linear(2, 2)
    cfg = OptimConfig(lr=0.1, warmup_fraction=0.1)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and max(lrs) == pytest.approx(0.1)
    assert lrs[-1] < 0.001


def test_train_epoch_learns_the_synthetic_bands() -> None:
    torch.manual_seed(0)
    data = synthetic_dataset(n_train=150, n_test=60).train
    model = build_model(ModelConfig(name="cnn-small", num_classes=3, in_channels=1, image_size=(16, 16)))
    cfg = OptimConfig(lr=0.01, batch_size=16, precision="fp32")
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, total_steps=5 * 10)
    pre = Preprocess([0.3], [0.3], CPU)
    g = torch.Generator().manual_seed(1)
    stats = [
        train_epoch(
            model, data.images, data.labels, preprocess=pre, optimizer=opt, scheduler=sched, batch_size=16, generator=g
        )
        for _ in range(5)
    ]
    assert stats[-1].loss < stats[0].loss and stats[-1].accuracy > 0.9
    assert stats[0].examples == 150


def test_a_diverging_loss_stops_training_with_a_hint() -> None:
    data = synthetic_dataset(n_train=30).train
    model = build_model(ModelConfig(name="cnn-small", num_classes=3, in_channels=1, image_size=(16, 16)))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    cfg = OptimConfig(batch_size=8, precision="fp32")
    opt = make_optimizer(model, cfg)
    with pytest.raises(MicrofedError, match="diverged"):
        train_epoch(
            model,
            data.images,
            data.labels,
            preprocess=Preprocess([0.3], [0.3], CPU),
            optimizer=opt,
            scheduler=make_scheduler(opt, cfg, 4),
            batch_size=8,
            generator=torch.Generator(),
        )


@pytest.mark.parametrize(
    ("field", "value"), [("optimizer", "rmsprop"), ("schedule", "step"), ("augment", "mixup"), ("precision", "fp8")]
)
def test_optim_config_names_the_bad_field(field: str, value: str) -> None:
    with pytest.raises(MicrofedError, match=value):
        OptimConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.integration
def test_the_wheel_installs_the_folders_under_the_microfed_namespace(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(root),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("microfed-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("training/worker.py", "training/aggregation.py", "components/steps.py", "pipelines/cli.py"):
        assert f"microfed/{module}" in names
    assert not any(n.startswith(("training/", "components/", "pipelines/", "tests/")) for n in names)
