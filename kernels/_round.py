"""Rounding to bfloat16/float16 that XLA cannot optimise away.

A recipe that rounds an intermediate to the model dtype and then computes on in
float32 (``x.astype(dt).astype(jnp.float32)``) states a rounding that XLA's algebraic
simplifier may delete: with ``xla_allow_excess_precision`` (on by default) a convert
pair is "excess precision" and goes. Measured: XLA GPU dropped RMSNorm's rounding
before a float32 weight (2-4% of elements off), XLA CPU dropped float16 RoPE's, and a
softcap's ``dt(s / cap)`` before ``tanh`` (37% of a bf16 attention's elements off).

``round_to(x, dt)`` returns float32 values on ``dt``'s grid (round to nearest, ties
to even, float16's subnormals and overflow included) through ``reduce_precision``,
an op XLA keeps. A later ``.astype(dt)`` of the result is exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def round_to(x: jax.Array, dt) -> jax.Array:
    """float32 ``x`` rounded to ``dt`` (bf16, f16 or f32), returned in float32.

    ``reduce_precision`` rounds the mantissa; float16's narrower exponent range is
    handled by hand: below its smallest normal the grid is multiples of 2**-24
    (``reduce_precision`` with 5 exponent bits would flush those to 0), and what rounds
    past 65504 overflows to inf. float32 is returned as it is.
    """
    x = x.astype(jnp.float32)  # the recipes' intermediates are float32 (a no-op for them)
    fi = jnp.finfo(dt)
    if fi.nmant >= 23:
        return x
    r = jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=fi.nmant)
    if fi.nexp == 8:  # bfloat16: float32's own exponent range
        return r
    spacing = float(fi.smallest_subnormal)  # 2**-24 for float16
    sub = jnp.round(x / spacing) * spacing  # exact scaling by a power of two; round-half-even
    r = jnp.where(jnp.abs(x) < float(fi.smallest_normal), sub, r)
    return jnp.where(jnp.abs(r) > float(fi.max), jnp.sign(r) * jnp.inf, r)  # float16 overflow


@round_to.defjvp
def _round_to_jvp(dt, primals, tangents):
    # A rounding's derivative is the identity, as torch's autograd passes a cast's gradient
    # through (in the cast's dtype). Differentiating the code above instead gave float16 a
    # zero derivative below its smallest normal (jnp.round has none): every gradient through
    # a float16 value under 6.1e-5 vanished (swiglu's weight gradients: 1046x torch's error).
    # The tangent is put on dt's grid by a convert pair, which JAX can transpose.
    (x,), (dx,) = primals, tangents
    dx = dx.astype(jnp.float32)  # the value's dtype (x may come in as bf16/f16)
    if jnp.finfo(dt).nmant < 23:
        dx = dx.astype(dt).astype(jnp.float32)  # the tangent rounded to dt, as torch's cast backward rounds
    return round_to(x, dt), dx


def round_to_in_kernel(x: jax.Array, dt, *, interpret: bool) -> jax.Array:
    """``round_to`` inside a Pallas kernel: float32 ``x`` on ``dt``'s grid, kept in float32.

    ``interpret`` (the kernel lowered by XLA): ``round_to``, which XLA's simplifier cannot
    delete as excess precision. On Triton: the convert pair ``f32(dt(x))``, which Triton
    executes (round to nearest even, f16 subnormals and overflow included) and which is
    the same values; Triton has no lowering for ``reduce_precision``.
    """
    if interpret:
        return round_to(x, dt)
    return x.astype(dt).astype(jnp.float32)  # round to dt, back to f32 for the next f32 step
