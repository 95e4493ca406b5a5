"""Derivatives for the kernels JAX cannot differentiate: a fused kernel with its XLA twin's.

A ``pallas_call`` (Triton or Mosaic GPU) has no transpose rule, so ``jax.grad`` through
one of the fast paths stopped with a bare ``AssertionError``. Each such path computes the
function its op's XLA path computes (the same recipe, within its budgets), so its
derivative is that path's: :func:`with_derivative_of` runs the fast kernel for the value
and differentiates the XLA path for the tangent (``jax.custom_jvp``, so forward mode,
reverse mode and higher orders all work).

Cost, only when differentiated: the XLA path's forward runs as well, for what its
derivative needs (attention's probabilities: O(T * S) memory a head, not a flash
backward). A plain call runs the fast kernel alone.
"""

from __future__ import annotations

from typing import Callable

import jax


def with_derivative_of(fast: Callable, reference: Callable) -> Callable:
    """``fast(*args)``, differentiated as ``reference(*args)`` (both take the same arrays,
    pytrees allowed; integer and boolean inputs get the usual ``float0`` tangents).

    ``reference`` must compute the same function as ``fast`` (here: the op's XLA path with
    the same options), and any options both need must be closed over, not passed.
    """

    @jax.custom_jvp
    def f(*args):
        return fast(*args)

    @f.defjvp
    def _jvp(primals, tangents):
        _, t = jax.jvp(reference, primals, tangents)  # the reference's value is unused: XLA drops it
        # f, not fast: differentiated again (a second derivative), the value goes through this rule too.
        return f(*primals), t

    return f
