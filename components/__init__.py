"""KFP v2 components: typed adapters over microfed.training."""

from microfed.components.steps import aggregate, evaluate, export, split_dataset, train

__all__ = ["aggregate", "evaluate", "export", "split_dataset", "train"]
