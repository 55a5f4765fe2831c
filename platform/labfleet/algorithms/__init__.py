"""Algorithms: each registers (hyperparameter model, trainer) in `labfleet.algorithms.registry`."""
