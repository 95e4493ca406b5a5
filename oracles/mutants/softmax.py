"""Softmax bug classes the suite must kill."""

from __future__ import annotations

import jax.numpy as jnp

from kernels.softmax import check_args, softmax


def _masked(x, where, axis, e_fn):
    # Validate exactly as the real kernel does: a mutant must die of its numerics,
    # not of a missing ValueError.
    where = check_args(x, axis=axis, where=where)
    if where is None:
        return e_fn(x)
    xm = jnp.where(where, x, jnp.asarray(-jnp.inf, x.dtype))
    p = e_fn(xm)
    return jnp.where(where & jnp.any(where, axis=axis, keepdims=True), p, 0).astype(x.dtype)


def input_dtype(x, *, axis=-1, where=None):
    """Max, exp and sum kept in the input dtype (bf16 scores; jax.nn without the upcast)."""

    def f(v):
        m = jnp.max(v, axis=axis, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0)
        e = jnp.exp(v - m)
        return e / jnp.sum(e, axis=axis, keepdims=True)

    return _masked(x, where, axis, f)


def no_max_subtraction(x, *, axis=-1, where=None):
    """exp(x) / sum(exp(x)) in f32: overflows for scores above ~88."""

    def f(v):
        e = jnp.exp(v.astype(jnp.float32))
        return (e / jnp.sum(e, axis=axis, keepdims=True)).astype(x.dtype)

    return _masked(x, where, axis, f)


def plain_f32_sum(x, *, axis=-1, where=None):
    """The kernel's recipe with a plain float32 row sum (rounded at every addition), as
    before the compensated one: on a float32 row with one dominant entry XLA's CPU
    reduction put its probability 4.5 ulps from the truth, torch's cascaded sum 0.7."""

    def f(v):
        v = v.astype(jnp.float32)  # the kernel's upcast
        m = jnp.max(v, axis=axis, keepdims=True)
        e = jnp.exp(v - m)
        return (e * (1.0 / jnp.sum(e, axis=axis, keepdims=True))).astype(x.dtype)

    return _masked(x, where, axis, f)


def isfinite_shift(x, *, axis=-1, where=None):
    """Session 19's exact shift, ``where((x == m) & isfinite(m), 0, x - m)``, on bf16/f16 rows:
    the kernel's values, but isfinite on the row maxima split XLA's GPU softmax into three
    kernels, a second pass over x for the max among them (924 us against 623,
    benchmarks/probe_softmax_fusion.py). float32 rows, which never took this shift, are the
    kernel's. Only a structural test can see it: no value differs."""
    if x.dtype == jnp.float32:
        return softmax(x, axis=axis, where=where)

    def f(v):
        v = v.astype(jnp.float32)  # the kernel's upcast
        m = jnp.max(v, axis=axis, keepdims=True)
        e = jnp.exp(jnp.where((v == m) & jnp.isfinite(m), 0.0, v - m))
        return (e * (1.0 / jnp.sum(e, axis=axis, keepdims=True))).astype(x.dtype)

    return _masked(x, where, axis, f)


MUTANTS = {"input_dtype": input_dtype, "no_max_subtraction": no_max_subtraction, "plain_f32_sum": plain_f32_sum,
           "isfinite_shift": isfinite_shift}
