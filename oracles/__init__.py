"""PyTorch oracles reproducing transformers' numerics, plus the comparison, budget, sweep
and CLI machinery that decides pass or fail for the JAX kernels."""

from oracles.rms_norm import rms_norm
from oracles.softmax import softmax
from oracles.attention import gqa_attention
from oracles.rope import apply_rope, rope_cos_sin, rope_frequencies
from oracles.swiglu import swiglu
from oracles.projection import linear, lm_head

__all__ = [
    "rms_norm",
    "softmax",
    "gqa_attention",
    "rope_frequencies",
    "rope_cos_sin",
    "apply_rope",
    "swiglu",
    "linear",
    "lm_head",
]
