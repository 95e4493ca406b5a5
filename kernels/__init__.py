"""Verified JAX kernels for Qwen2-family decoders. JAX only: this package never imports torch.

Each kernel reproduces HuggingFace transformers' rounding recipe (see each module's
docstring) and is checked against a PyTorch oracle (the ``oracles`` package).
"""

from kernels.rms_norm import rms_norm
from kernels.softmax import softmax
from kernels.attention import gqa_attention
from kernels.rope import apply_rope, apply_rope_qk, rope_cos_sin, rope_frequencies
from kernels.swiglu import swiglu, swiglu_fused
from kernels.projection import linear, lm_head
from kernels.embedding import embed

__all__ = [
    "rms_norm",
    "softmax",
    "gqa_attention",
    "rope_frequencies",
    "rope_cos_sin",
    "apply_rope",
    "apply_rope_qk",
    "swiglu",
    "swiglu_fused",
    "linear",
    "lm_head",
    "embed",
]
