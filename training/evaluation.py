"""Evaluation of a classifier on preloaded uint8 tensors: loss, accuracy, per-class accuracy, confusion matrix.

A class with no examples in the evaluated set has no accuracy: it is None ("no test images"), not 0.0, which
would read as a class the model always gets wrong; the macro average leaves such classes out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from microfed.training.train import Preprocess

__all__ = ["EvalResult", "evaluate", "macro_average"]


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    per_class_accuracy: list[float | None]
    """Share of each class's examples predicted correctly; None for a class with no examples here."""
    confusion_matrix: list[list[int]]
    """Rows are true classes, columns predicted classes."""
    num_examples: int

    @property
    def macro_accuracy(self) -> float | None:
        """Mean per-class accuracy over the classes that have examples (None when none has)."""
        return macro_average(self.per_class_accuracy)


def macro_average(per_class: Iterable[float | None]) -> float | None:
    """The unweighted mean of the defined values: classes without examples (None) are left out, not counted
    as 0, so a class missing from the test set does not drag the average down."""
    known = [v for v in per_class if v is not None]
    return sum(known) / len(known) if known else None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    preprocess: Preprocess,
    num_classes: int,
    batch_size: int = 512,
    all_reduce: bool = False,
) -> EvalResult:
    """Evaluate on the given examples. With `all_reduce`, every rank of a torch.distributed job passes its
    slice of the test set and all get the result over the whole of it."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=preprocess.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=preprocess.device)
    for begin in range(0, labels.numel(), batch_size):
        x = preprocess(images[begin : begin + batch_size])
        y = labels[begin : begin + batch_size].to(preprocess.device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    if all_reduce:
        dist.all_reduce(loss_sum)
        dist.all_reduce(confusion)
    return _summarize(loss_sum, confusion.view(num_classes, num_classes))


def _summarize(loss_sum: torch.Tensor, confusion: torch.Tensor) -> EvalResult:
    conf = confusion.cpu()
    n = int(conf.sum())
    support = conf.sum(1)
    per_class = conf.diag().double() / support.clamp_min(1).double()
    return EvalResult(
        loss=float(loss_sum.item()) / max(1, n),
        accuracy=float(conf.diag().sum()) / max(1, n),
        per_class_accuracy=[
            float(v) if int(count) else None for v, count in zip(per_class.tolist(), support.tolist(), strict=True)
        ],
        confusion_matrix=[[int(v) for v in row] for row in conf.tolist()],
        num_examples=n,
    )
