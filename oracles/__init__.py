"""PyTorch oracles reproducing transformers' numerics, plus the comparison, budget, sweep
and CLI machinery that decides pass or fail for the JAX kernels."""

from oracles.rms_norm import rms_norm
from oracles.softmax import softmax

__all__ = [
    "rms_norm",
    "softmax",
]
