"""Projection (linear / lm_head) bug classes the suite must kill."""

from __future__ import annotations

import jax.numpy as jnp

from oracles.mutants._lowprec import matmul_accumulating_in
from oracles.projection import drive as _real


def _weight(w, w_layout):
    return w.T if w_layout == "VD" else w  # [D, V]


def low_precision_accumulation(x, w, b=None, *, recipe="linear", w_layout="DV"):
    """The matmul accumulates in the model dtype (bf16 accumulation)."""
    acc = matmul_accumulating_in(x, _weight(w, w_layout), x.dtype).astype(jnp.float32)  # [..., O]
    if b is not None:
        acc = acc + b.astype(jnp.float32)
    return acc if recipe == "lm_head_f32" else acc.astype(x.dtype)


def f32_logits_in_model_dtype(x, w, b=None, *, recipe="linear", w_layout="DV"):
    """logits_dtype="float32" asked for, model-dtype logits returned."""
    return _real(x, w, b, recipe="lm_head" if recipe == "lm_head_f32" else recipe, w_layout=w_layout)


def f32_logits_from_rounded(x, w, b=None, *, recipe="linear", w_layout="DV"):
    """f32 logits made by upcasting the bf16-rounded logits (the f32 is only a container)."""
    out = _real(x, w, b, recipe="lm_head" if recipe == "lm_head_f32" else recipe, w_layout=w_layout)
    return out.astype(jnp.float32) if recipe == "lm_head_f32" else out


def bias_dropped(x, w, b=None, *, recipe="linear", w_layout="DV"):
    """q/k/v bias ignored (Qwen2 has biases on q, k and v; Llama has none)."""
    return _real(x, w, None, recipe=recipe, w_layout=w_layout)


def bias_after_rounding(x, w, b=None, *, recipe="linear", w_layout="DV"):
    """Round the matmul to the model dtype, then add the bias in the model dtype (two roundings)."""
    out = _real(x, w, None, recipe=recipe, w_layout=w_layout)
    return out if b is None else (out.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def tf32_inputs(x, w, b=None, *, recipe="linear", w_layout="DV"):
    """float32 operands rounded to TF32's 10-bit mantissa (XLA's default precision on GPUs)."""
    def tf32(a):
        if a.dtype != jnp.float32:
            return a
        bits = a.view(jnp.uint32)
        bits = (bits + jnp.uint32(0x1000)) & jnp.uint32(0xFFFFE000)  # round to 10 mantissa bits
        return bits.view(jnp.float32)

    return _real(tf32(x), tf32(w), b, recipe=recipe, w_layout=w_layout)


def vd_reshaped_not_transposed(x, w, b=None, *, recipe="linear", w_layout="DV"):
    """A [V, D] head (HF's layout, a tied table) reshaped to [D, V] instead of contracted over its D axis."""
    if w_layout != "VD":
        return _real(x, w, b, recipe=recipe, w_layout=w_layout)
    return _real(x, w.reshape(w.shape[1], w.shape[0]), b, recipe=recipe, w_layout="DV")  # [D, V] (wrong)


def grad_summed_sequentially(x, w, b=None, *, recipe="linear", w_layout="DV"):
    """The same values, bit for bit, but the CPU split matmul's derivative left to JAX: grad(x)
    of a few-row float32 projection pulled back through one sum over all N outputs, which
    XLA's CPU backend adds sequentially (session 20: 12x torch's error for a 4-row lm_head)."""
    import kernels._dot as dot

    real = dot._split_dot_ad
    dot._split_dot_ad = lambda x, w, c, cn, wc: dot.split_dot(x, w, chunks=c, w_contract=wc)
    try:  # traced here, so the jitted call keeps the swapped derivative
        return _real(x, w, b, recipe=recipe, w_layout=w_layout)
    finally:
        dot._split_dot_ad = real


MUTANTS = {
    "low_precision_accumulation": low_precision_accumulation,
    "f32_logits_in_model_dtype": f32_logits_in_model_dtype,
    "f32_logits_from_rounded": f32_logits_from_rounded,
    "bias_dropped": bias_dropped,
    "bias_after_rounding": bias_after_rounding,
    "tf32_inputs": tf32_inputs,
    "vd_reshaped_not_transposed": vd_reshaped_not_transposed,
    "grad_summed_sequentially": grad_summed_sequentially,
}
