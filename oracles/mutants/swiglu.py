"""SwiGLU bug classes the suite must kill (DESIGN.md; the seeds' late-layer MLP bugs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.swiglu import matmul_f32, silu_f32
from kernels.swiglu import swiglu as _real
from oracles.mutants._lowprec import matmul_accumulating_in


def _mlp(x, w_gate, w_up, w_down, *, recipe, act=silu_f32, swap=False, matmul=None, clamp=None):
    """The real recipe, with one piece replaced."""
    dt = x.dtype
    mm = matmul or (lambda a, b: matmul_f32(a, b))
    g, u = mm(x, w_gate), mm(x, w_up)  # [..., F]
    if swap:
        g, u = u, g
    if recipe == "hf":
        g, u = g.astype(dt), u.astype(dt)
        h = (act(g).astype(dt).astype(jnp.float32) * u.astype(jnp.float32)).astype(dt)
    else:
        h = (act(g) * u.astype(jnp.float32)).astype(dt)
    if clamp is not None:
        h = jnp.clip(h, -clamp, clamp)
    return mm(h, w_down).astype(dt)


def gelu_for_silu(x, w_gate, w_up, w_down, *, recipe="hf"):
    """GELU (erf form) where the model says SiLU (a wrong hidden_act)."""
    return _mlp(x, w_gate, w_up, w_down, recipe=recipe,
                act=lambda g: jax.nn.gelu(g.astype(jnp.float32), approximate=False))


def gate_up_swapped(x, w_gate, w_up, w_down, *, recipe="hf"):
    """silu(x @ w_up) * (x @ w_gate): the two halves of a fused weight read the wrong way round."""
    return _mlp(x, w_gate, w_up, w_down, recipe=recipe, swap=True)


def product_rounding_swapped(x, w_gate, w_up, w_down, *, recipe="hf"):
    """Each recipe rounds the activation product as the other one does."""
    return _real(x, w_gate, w_up, w_down, recipe="fp32_act" if recipe == "hf" else "hf")


def silu_in_model_dtype(x, w_gate, w_up, w_down, *, recipe="hf"):
    """``jax.nn.silu`` on the bf16/f16 gate: x * sigmoid(x) in the model dtype (two roundings)."""
    return _mlp(x, w_gate, w_up, w_down, recipe=recipe, act=lambda g: jax.nn.silu(g.astype(x.dtype)))


def low_precision_accumulation(x, w_gate, w_up, w_down, *, recipe="hf"):
    """All three matmuls accumulate in the model dtype (bf16 accumulation)."""
    return _mlp(x, w_gate, w_up, w_down, recipe=recipe,
                matmul=lambda a, b: matmul_accumulating_in(a, b, x.dtype).astype(jnp.float32))


def clamped_product(x, w_gate, w_up, w_down, *, recipe="hf"):
    """The activation product saturated at |h| <= 64: massive activations under-amplified
    (the seeds' late-layer MLP that came out ~4x too small)."""
    return _mlp(x, w_gate, w_up, w_down, recipe=recipe, clamp=64.0)


MUTANTS = {
    "gelu_for_silu": gelu_for_silu,
    "gate_up_swapped": gate_up_swapped,
    "product_rounding_swapped": product_rounding_swapped,
    "silu_in_model_dtype": silu_in_model_dtype,
    "low_precision_accumulation": low_precision_accumulation,
    "clamped_product": clamped_product,
}
