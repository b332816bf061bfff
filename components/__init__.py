"""KFP v2 components: typed adapters over microfed.training.

The components (components/steps.py) load on first use, not when this package is imported: the train component's
body imports microfed.components.train_adapter inside KFP's executor, where `kfp.dsl` has no `component`
decorator (the executor sets `_KFP_RUNTIME`, and kfp/dsl/__init__.py then leaves the compile-time names out), so
components/steps.py cannot be imported there.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microfed.components.steps import aggregate, evaluate, export, split_dataset, train

__all__ = ["aggregate", "evaluate", "export", "split_dataset", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from microfed.components import steps

        return getattr(steps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
