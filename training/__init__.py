"""Plain PyTorch half of microfed: datasets, shards, models, train loop, aggregation, evaluation, worker.

Nothing here imports KFP: the worker runs under torchrun or a PyTorchJob on its own.
"""
