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


def plain_f32_mean(x, weight, *, eps=1e-6, recipe="hf"):
    """The XLA path with a plain float32 sum of squares (rounded at every addition), as before
    the compensated one: where a few entries dominate a row, XLA's CPU reduction put the output
    at 6.1x the oracle's error against the float64 truth."""
    import importlib
    from unittest import mock

    k = importlib.import_module("kernels.rms_norm")  # the module (kernels.rms_norm is also the function's name)
    with mock.patch.object(k, "sum_axis", lambda v, axis: jnp.sum(v, axis=axis, keepdims=True)):  # traced under jit
        return _real(x, weight, eps=eps, recipe=recipe, implementation="xla")


def rows_not_flattened(x, weight, *, eps=1e-6, recipe="hf"):
    """The XLA path on ``x[..., D]`` as given, rows not flattened: the same values, but for
    ``x[1, R, D]`` XLA's CPU compiler sums the weight's gradient over the rows 4-5x less
    accurately than torch (R = 4000)."""
    from kernels.rms_norm import _xla_rows

    check_args(x, weight, eps=eps, recipe=recipe)
    return _xla_rows(x, weight, eps=eps, recipe=recipe)


MUTANTS = {
    "no_f32_upcast": no_f32_upcast,
    "plain_f32_mean": plain_f32_mean,
    "weight_before_downcast": weight_before_downcast,
    "eps_1e5": eps_1e5,
    "rows_not_flattened": rows_not_flattened,
}
