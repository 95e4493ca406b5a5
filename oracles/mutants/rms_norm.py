"""RMSNorm bug classes the suite must kill (each really happened; see shared/seeds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.rms_norm import check_args
from kernels.rms_norm import rms_norm as _real


def no_f32_upcast(x, weight, *, eps=1e-6, recipe="hf"):
    """The statistic in the input dtype (the seeds' first RMSNorm bug)."""
    check_args(x, weight, eps=eps, recipe=recipe)  # die of numerics, not of a missing ValueError
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(var + jnp.asarray(eps, x.dtype))
    if recipe == "gemma":
        return (y * (1 + weight.astype(x.dtype))).astype(x.dtype)
    out = jnp.promote_types(weight.dtype, x.dtype) if recipe == "hf" else x.dtype
    return (weight.astype(out) * y.astype(out)).astype(out)


def weight_before_downcast(x, weight, *, eps=1e-6, recipe="hf"):
    """Under "hf", multiplies by the weight in f32 and rounds once (Gemma's order)."""
    if recipe != "hf":
        return _real(x, weight, eps=eps, recipe=recipe)
    check_args(x, weight, eps=eps, recipe=recipe)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * y).astype(jnp.promote_types(weight.dtype, x.dtype))


def eps_1e5(x, weight, *, eps=1e-6, recipe="hf"):
    """Uses eps 1e-5 (Llama-1's default) whatever the model asked for."""
    return _real(x, weight, eps=1e-5, recipe=recipe)


MUTANTS = {
    "no_f32_upcast": no_f32_upcast,
    "weight_before_downcast": weight_before_downcast,
    "eps_1e5": eps_1e5,
}
