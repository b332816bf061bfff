"""KFP v2 components: typed adapters over microfed.training."""

from microfed.components.steps import aggregate, evaluate, split_dataset, train

__all__ = ["aggregate", "evaluate", "split_dataset", "train"]
