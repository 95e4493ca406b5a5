"""Softmax, always carried out in float32, with an optional boolean mask.

Recipe, for input ``x`` of any float dtype (this is transformers' eager recipe
``softmax(x, dim=-1, dtype=torch.float32).to(x.dtype)``, plus a mask):

    xf  = float32(x)                          # upcast: bf16/f16 exp and sums lose the tail
    m   = max(xf[visible])                    # row max over visible entries only
    e   = exp(xf - m), exactly 0 where masked
    s   = sum(e)                              # float32 x: compensated (TwoSum), rounded once
                                              # (kernels._twofloat.sum_axis); bf16/f16: a plain f32 sum
    p   = e * (1 / s)                         # reciprocal-then-multiply, as torch's CPU kernel
    out = p.astype(x.dtype)                   # one rounding, at the end

Why the compensated sum for float32: a float32 output shows the sum's rounding. A row
with one dominant entry and 127 small ones, summed by XLA's CPU reduction, put the
probability of the dominant entry 4.5 ulps from the float64 truth, where torch's cascaded
sum put it 0.7 ulps off (accuracy ratio 3.8 against a budget of 1.5; found by the
stratified ``parity tighten`` sample). The compensated sum is the float32 nearest the
exact one, so it is never further from the truth than torch's. A bf16/f16 output rounds
2**-16 of a relative error away, and keeps the plain sum (the GPU's bandwidth-bound path).
The cost on the 2-core CPU (benchmarks/probe_row_sum.py): float32 softmax 1.4-2.4x the plain
sum's time (XLA runs the pair reduce as a scalar loop).

Derivative: float32 rows differentiate the steps above (the shift under stop_gradient);
bf16/f16 rows take torch's softmax backward, ``p * (c - sum(p * c))``, and an exact 0 shift
for the row max (``_probabilities``, ``_shifted``: why each).

Masked entries are exactly 0. A row with no visible entry is all zeros (never NaN,
never the uniform average that an additive ``finfo.min`` mask gives). NaN in a
visible entry makes its row NaN; NaN in a masked entry has no effect.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels._checks import require_float
from kernels._twofloat import sum_axis


def check_args(x: jax.Array, *, axis: int, where: jax.Array | None) -> jax.Array | None:
    """Validate softmax's arguments; return ``where`` broadcast to ``x.shape`` (or None)."""
    require_float("x", x, op="softmax")
    if not -x.ndim <= axis < max(x.ndim, 1):
        raise ValueError(f"softmax: axis must be in [-{x.ndim}, {x.ndim}) for x of shape {tuple(x.shape)}, got {axis}")
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise ValueError(f"softmax: where must be a boolean mask, got dtype {where.dtype}")
    try:
        return jnp.broadcast_to(where, x.shape)
    except ValueError:
        raise ValueError(
            f"softmax: where of shape {tuple(where.shape)} does not broadcast to x of shape {tuple(x.shape)}"
        ) from None


def _row_sum(e: jax.Array, axis: int, *, compensated: bool) -> jax.Array:
    """``sum(e, axis, keepdims=True)`` of the float32 exponentials, compensated or plain."""
    if compensated:
        return sum_axis(e, axis)
    return jnp.sum(e, axis=axis, keepdims=True)


def softmax(x: jax.Array, *, axis: int = -1, where: jax.Array | None = None) -> jax.Array:
    """Softmax of ``x`` along ``axis``, computed in float32, returned in ``x.dtype``.

    Args:
      x: scores, any shape, float32 / bfloat16 / float16.
      axis: the axis to normalise over.
      where: optional boolean mask broadcastable to ``x.shape``; True means visible.

    Returns:
      An array of ``x``'s shape and dtype. Masked entries are exactly 0; rows with no
      visible entry are all 0.
    """
    return _softmax(x, axis=axis, where=where, compensated=x.dtype == jnp.float32)


def _softmax(x: jax.Array, *, axis: int, where: jax.Array | None, compensated: bool) -> jax.Array:
    """:func:`softmax` with the kind of row sum named by the caller: compensated where the
    probabilities stay float32 (their rounding shows), plain where the caller rounds them
    further (``kernels.attention``'s fp32_logits recipe takes float32 scores of bf16/f16
    inputs and rounds the probabilities to that dtype: the compensated sum would buy
    nothing there and cost 1.4-2.4x on the CPU)."""
    where = check_args(x, axis=axis, where=where)
    # Always in float32 (jax.nn's rule and HF's dtype=torch.float32): in bf16 the
    # row sum keeps 8 bits and the normalised tail collapses.
    # The derivative: see _probabilities.
    if compensated:
        p = _steps(x.astype(jnp.float32), where, axis, compensated, False)  # f32, x's shape
    else:
        p = _probabilities(x.astype(jnp.float32), where, axis, compensated, True)  # f32, x's shape
    return p.astype(x.dtype)  # the one rounding


def _steps(xf: jax.Array, where: jax.Array | None, axis: int, compensated: bool, exact_top: bool) -> jax.Array:
    """The float32 probabilities of float32 scores (steps 2-5 of the module docstring),
    differentiable as written (the shift under stop_gradient). ``exact_top``: the shift by
    :func:`_shifted`, whose select has no derivative at the row max (only where a custom
    derivative replaces this function's: :data:`_probabilities`)."""
    shift = _shifted if exact_top else jnp.subtract
    # The shift m cancels out of the result, so it gets no derivative (stop_gradient, as
    # jax.nn.softmax): differentiated, its terms cancel only to a row sum's rounding, all of
    # it landing on the row's largest entry (a 4096-long row's gradient at 17x torch's error).
    if where is None:
        m = jax.lax.stop_gradient(jnp.max(xf, axis=axis, keepdims=True))
        e = jnp.exp(shift(xf, m))
        return e * (1.0 / _row_sum(e, axis, compensated=compensated))

    visible_row = jnp.any(where, axis=axis, keepdims=True)
    # Masked entries become -inf so that they can neither be the max nor carry a NaN in.
    m = jax.lax.stop_gradient(jnp.max(jnp.where(where, xf, -jnp.inf), axis=axis, keepdims=True))
    m = jnp.where(visible_row, m, 0.0)  # a fully masked row would give -inf - -inf = NaN
    e = jnp.where(where, jnp.exp(shift(jnp.where(where, xf, m), m)), 0.0)
    s = jnp.where(visible_row, _row_sum(e, axis, compensated=compensated), 1.0)
    # The final select keeps masked entries exactly 0 even when a visible +inf or NaN
    # makes the row sum NaN (0 * NaN would otherwise leak into them).
    return jnp.where(where, e * (1.0 / s), 0.0)


_probabilities = functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))(_steps)
_probabilities.__doc__ = """:func:`_steps` with the derivative in terms of the probabilities, torch's
softmax backward in reverse mode (``_probabilities_jvp``): the bf16/f16 rows (a plain row sum).

Why: differentiated as written, the gradient goes through the unnormalised ``e`` and
``1 / s``, which cancel only to rounding: a saturated row (one probability 1, the rest 0),
whose true gradient is ~1e-18, came out at 0.0024 in bf16 attention where torch's is exactly
0 (`parity gradients`, session 19; :func:`_shifted` makes its top entry exact as well).
Why not float32 (:func:`_steps` differentiated, as before): there the backward's own row sum
``sum(p * c)`` shows, and JAX's transpose makes it XLA's plain float32 sum, less accurate
than torch's: 7.2x torch's error over 60 float32 cases against 3.0x for the steps as written.
"""


def _shifted(xf: jax.Array, m: jax.Array) -> jax.Array:
    """``xf - m``, exactly 0 where ``xf`` is the row max. When ``xf`` is a product fused into
    this subtraction (attention's ``scores * scale``), XLA's CPU backend contracts the two
    into one FMA of the unrounded product, and the row max's entry came out as its rounding
    error (exp of it: e != 1, the top probability 0.99999994 where torch's is exactly 1,
    and a saturated row's gradient 0.0024 where the truth is ~1e-18). The compare reads the
    rounded value, as the max did. ``m - m`` is that 0, and keeps ``inf - inf = NaN`` for an
    infinite max (torch's NaN row).

    Why ``m - m`` and not ``isfinite(m)``: an op on the row maxima themselves (isfinite) split
    XLA's GPU softmax into three kernels, a second pass over x for the max among them: 924 us
    against 623 us for this form, one kernel, on a 7B x[1, 28, 4096, 4096] bf16 on an H100
    (benchmarks/probe_softmax_fusion.py)."""
    return jnp.where(xf == m, m - m, xf - m)


@_probabilities.defjvp
def _probabilities_jvp(axis, compensated, exact_top, primals, tangents):
    xf, where = primals
    dx = tangents[0]
    p = _probabilities(xf, where, axis, compensated, exact_top)
    if where is not None:
        dx = jnp.where(where, dx, 0.0)  # a masked entry's tangent (inf, NaN) must not reach 0 * it
    # No derivative of the shift m: it cancels out of p (jax.nn.softmax's stop_gradient).
    # Written so that its transpose (reverse mode) is torch's softmax backward, one rounded
    # product after the subtraction: ct_x = p * (c - sum(p * c)). The same map written as
    # p * (dx - sum(p * dx)) transposes to p * c - p * sum(p * c), two rounded products that
    # cancel: 5.6x torch's error on a float32 row of scores up to 1e4 (parity gradients).
    w = p * dx
    return p, w - p * jnp.sum(w, axis=axis, keepdims=True)
