"""Float32 pairs ``hi + lo`` (about 48 significant bits) for the few sums whose rounding matters.

Error-free transformations (Dekker 1971, Knuth's TwoSum), written so that XLA cannot
undo them:

* a product is split into exact partial products: each factor is cut into a 12-bit
  head (``reduce_precision``, an op XLA keeps) and the exact remainder, so every
  partial product ``head * head`` fits float32's 24 bits. An FMA contraction by XLA
  (its CPU backend contracts ``a * b + c``) then cannot change a result, because the
  contracted product is exact anyway;
* a sum uses TwoSum (``s = a + b``, ``err = (a - (s - bb)) + (b - bb)``, ``bb = s - a``):
  adds and subtracts only, which XLA does not reassociate between two arrays. It does
  reassociate around a *constant*: its simplifier folds ``(x + c) - c`` to ``x``, so
  ``two_sum(1, -u)`` came back with ``err = 0`` for 39% of ``u`` (the softcap's tanh,
  session 17). An operand that is a literal is passed through ``opaque`` first.

Used by ``kernels.attention`` for float32 scores, whose rounding the softmax amplifies
by ``|s|`` (one ulp of a score of 1e4 is a 1e-3 relative change of its probability).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a = head + tail`` exactly, ``head`` with 12 significant bits, ``tail`` with at most 12."""
    head = jax.lax.reduce_precision(a, exponent_bits=8, mantissa_bits=11)
    return head, a - head  # exact: a and head agree in their first 12 bits


def split_const(c: float) -> tuple[float, float]:
    """A Python float as ``hi + lo`` of two float32 (about 48 bits of it)."""
    hi = float(np.float32(c))
    return hi, float(np.float32(c - hi))


def opaque(x: jax.Array) -> jax.Array:
    """``x`` as a value XLA cannot see through (a constant becomes an array it must read),
    so that no simplification rewrites the error-free sums it enters."""
    return jax.lax.optimization_barrier(x)


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a + b = s + err`` exactly (Knuth), for any magnitudes; neither may be a
    constant XLA can fold (wrap one in ``opaque``: see the module docstring)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def renormalize(hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The same value with ``hi`` the float32 nearest to ``hi + lo`` (needs ``|hi| >= |lo|``)."""
    s = hi + lo
    return s, lo - (s - hi)  # Dekker's FastTwoSum: exact when |hi| >= |lo|


def mul(ah: jax.Array, at: jax.Array, bh: jax.Array, bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(ah + at) * (bh + bt)`` for split factors: the exact head product and the rest."""
    return ah * bh, (ah * bt + at * bh) + at * bt  # ah * bh is exact (12 x 12 bits)


def mul_const(hi: jax.Array, lo: jax.Array, c: float) -> tuple[jax.Array, jax.Array]:
    """``(hi + lo) * c`` as a renormalised pair, ``c`` a Python float taken to 48 bits."""
    c_hi, c_lo = split_const(c)
    m, e = math.frexp(c_hi)
    ch = math.ldexp(round(m * 4096.0), e - 12)  # c_hi's 12-bit head (round half even, as split)
    hh, ht = split(hi)
    p, err = mul(hh, ht, jnp.float32(ch), jnp.float32(c_hi - ch))  # c_hi - ch: exact, 12 bits
    return renormalize(p, err + (hi * c_lo + lo * c_hi))


def sum_last(hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of ``hi + lo`` over the last axis (a power of two long), as a pair: a TwoSum tree.

    Each level adds the two halves with TwoSum and carries every rounding error into
    ``lo`` (whose own rounding is ~2**-24 of the errors: second order).
    """
    width = hi.shape[-1]
    if width & (width - 1):
        raise ValueError(f"sum_last: the last axis must be a power of two long, got {width}")
    while width > 1:
        width //= 2
        s, err = two_sum(hi[..., :width], hi[..., width:])  # [..., width]
        lo = (lo[..., :width] + lo[..., width:]) + err  # [..., width]
        hi = s
    return renormalize(hi[..., 0], lo[..., 0])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def sum_axis(x: jax.Array, axis: int) -> jax.Array:
    """float32 ``sum(x, axis, keepdims=True)``, compensated and rounded once.

    One pass (an XLA reduce of pairs ``hi + lo``): each addition is a TwoSum whose
    rounding error goes to ``lo``, so the result is within ~2**-46 of the exact sum
    relative to the sum of ``|x|``, then rounded to float32 once; for terms of one sign,
    the float32 nearest the exact sum. A plain float32 sum rounds at every addition:
    ``1 + 127`` small terms summed by XLA's CPU reduction came out 2.7e-7 off (1.1 ulps of
    the sum), where torch's cascaded sum was 8.6e-8 off (softmax's float32 accuracy).
    Non-finite sums are the plain sum's: inf where it overflows or a term is inf, NaN where
    a term is NaN or infinities of both signs meet.
    """

    def add(a, b):  # (hi, lo) + (hi, lo), the error of the hi sum carried into lo
        (ah, al), (bh, bl) = a, b
        hi, err = two_sum(ah, bh)
        return hi, (al + bl) + err

    zero = jnp.float32(0.0)
    hi, lo = jax.lax.reduce((x, jnp.zeros_like(x)), (zero, zero), add, (axis % x.ndim,))
    # A non-finite hi is the plain sum's answer (inf, or NaN); its TwoSum error is NaN (inf - inf).
    return jnp.expand_dims(jnp.where(jnp.isfinite(hi), hi + lo, hi), axis)  # the one rounding of the pair


@sum_axis.defjvp
def _sum_axis_jvp(axis, primals, tangents):
    # A sum is linear: its tangent is the sum of the tangents. JAX cannot differentiate the
    # pair reduce itself (a variadic reduce with a custom body); a plain sum is enough here,
    # because the gradient is not what the compensation is for (and it transposes to a broadcast).
    (x,), (dx,) = primals, tangents
    return sum_axis(x, axis), jnp.sum(dx, axis=axis, keepdims=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def dot_last(a: jax.Array, b: jax.Array, lanes: int = 32) -> tuple[jax.Array, jax.Array]:
    """``sum(a * b, axis=-1)`` of float32 arrays (broadcast against each other) as a pair.

    Every product is cut into its three leading exact partial products (head x head,
    head x tail, tail x head), each added with TwoSum into one of ``lanes`` accumulators
    (element ``h`` goes to lane ``h % lanes``; the errors go to a second accumulator with
    the smallest partial, tail x tail, ~2**-24 of the product); the lanes are then added
    by ``sum_last``. Measured: within ~2**-46 of the exact sum relative to the sum of
    ``|a * b|`` (a plain float32 sum: ~2**-22), in 1.4x the time of ``sum(a * b)`` on
    this CPU at 2**27 products (the lane loop vectorises; a pairwise tree over the whole
    axis took 23x, 16 lanes 1.6x).
    """
    n = a.shape[-1]
    steps = -(-n // lanes)
    pad = steps * lanes - n  # zeros add exactly nothing
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])  # [..., steps * lanes]
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, pad)])  # [..., steps * lanes]
    ah, at = split(a)
    bh, bt = split(b)
    shape = jnp.broadcast_shapes(a.shape[:-1], b.shape[:-1]) + (lanes,)
    hi = jnp.zeros(shape, jnp.float32)  # [..., lanes]
    lo = jnp.zeros(shape, jnp.float32)  # [..., lanes]
    for j in range(steps):
        cols = slice(j * lanes, (j + 1) * lanes)
        x, xt, y, yt = ah[..., cols], at[..., cols], bh[..., cols], bt[..., cols]  # [..., lanes]
        for term in (x * y, x * yt, xt * y):  # exact: 12 x 12 bits each
            hi, err = two_sum(hi, term)
            lo = lo + err
        lo = lo + xt * yt
    return sum_last(hi, lo)


@dot_last.defjvp
def _dot_last_jvp(lanes, primals, tangents):
    # The pair's tangent is the product rule's, in plain float32 and all in ``hi`` (``lo`` is a
    # rounding error, whose derivative is 0 in exact arithmetic). Differentiating the TwoSum
    # lanes themselves would give the same value through ~8 ops a product.
    (a, b), (da, db) = primals, tangents
    hi, lo = dot_last(a, b, lanes)

    def dot(x, y):  # a dot (batched GEMM), not a broadcast product: its transpose is a GEMM too
        return jnp.einsum("...h,...h->...", x, y, precision=jax.lax.Precision.HIGHEST,  # never TF32
                          preferred_element_type=jnp.float32)  # [...], the broadcast of a and b

    return (hi, lo), (dot(da, b) + dot(a, db), jnp.zeros_like(lo))
