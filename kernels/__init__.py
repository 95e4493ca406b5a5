"""Verified JAX kernels for Qwen2-family decoders. JAX only: this package never imports torch.

Each kernel reproduces HuggingFace transformers' rounding recipe (see each module's
docstring) and is checked against a PyTorch oracle (the ``oracles`` package).
"""

from kernels.rms_norm import rms_norm
from kernels.softmax import softmax

__all__ = [
    "rms_norm",
    "softmax",
]
