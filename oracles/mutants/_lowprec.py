"""Shared by the matmul mutants: a matmul whose accumulator is kept in a low-precision dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul_accumulating_in(x, w, dtype, *, chunk: int = 16):
    """``x[..., K] @ w[K, O]`` with the running sum rounded to ``dtype`` after every ``chunk``
    products (XLA's CPU dot upcasts bf16 internally, so a plain ``preferred_element_type=bf16``
    dot would not show the bug). Returns ``dtype``."""
    k = x.shape[-1]
    pad = (-k) % chunk
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])  # [..., K']
        w = jnp.pad(w, [(0, pad), (0, 0)])  # [K', O]
    n = (k + pad) // chunk
    xs = x.reshape(*x.shape[:-1], n, chunk)  # [..., n, c]
    ws = w.reshape(n, chunk, w.shape[-1])  # [n, c, O]
    parts = jnp.einsum("...nc,nco->n...o", xs, ws, preferred_element_type=jnp.float32)  # [n, ..., O]

    def step(acc, p):
        return (acc.astype(jnp.float32) + p).astype(dtype), None  # the bug: round the running sum

    acc, _ = jax.lax.scan(step, jnp.zeros(parts.shape[1:], dtype), parts)
    return acc  # [..., O]
