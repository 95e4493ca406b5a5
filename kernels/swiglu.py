"""SwiGLU MLP (Qwen2MLP): ``down(silu(x @ w_gate) * (x @ w_up))``, in two rounding recipes.

Weights are stored ``[in, out]`` (JAX convention): ``w_gate, w_up: [D, F]``,
``w_down: [F, D]`` (torch's ``nn.Linear.weight`` is ``[out, in]``: transpose when
converting a checkpoint). Every matmul accumulates in float32 (``precision=HIGHEST``, so
a float32 matmul never falls to TF32 on GPUs) and rounds once, as torch's Linear does.

``"hf"`` (transformers' ``Qwen2MLP.forward``, five roundings to the model dtype):
    1. ``g = round(f32acc(x @ w_gate))``            gate projection
    2. ``u = round(f32acc(x @ w_up))``              up projection
    3. ``a = round(g / (1 + exp(-g)))``             silu computed in f32 (torch's CPU kernel
                                                    upcasts bf16/f16), rounded once
    4. ``h = round(a * u)``                         the product, rounded once
    5. ``y = round(f32acc(h @ w_down))``            down projection
``"fp32_act"`` (one rounding of the activation instead of three):
    1-2. ``g, u = f32acc(x @ w_gate), f32acc(x @ w_up)``   kept in float32, not rounded
    3-4. ``h = round(silu(g) * u)``                 silu and product in float32, rounded once
                                                    to the model dtype as the down projection's
                                                    input (the down weight stays in the model
                                                    dtype: no f32 copy of it is made)
    5. ``y = round(f32acc(h @ w_down))``

For float32 models the two recipes are the same computation. ``round`` is to
``x.dtype``; all of ``x`` and the weights must share that dtype (torch's Linear refuses
mixed dtypes too).
"""

from __future__ import annotations

import jax  # noqa: F401  (jax.Array annotations)
import jax.numpy as jnp

from kernels._checks import dtype_name, require_choice, require_float
from kernels._dot import dot_f32
from kernels._round import round_to

RECIPES = ("hf", "fp32_act")


def matmul_f32(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x[..., I] @ w[I, O]`` accumulated in float32 and returned in float32 (unrounded).

    ``kernels._dot.dot_f32``: full float32 (never TF32 on GPUs), and on CPU a long
    reduction over few rows is summed in chunks (XLA's sequential matrix-vector sum is
    3-14x less accurate than torch's gemv there).
    """
    return dot_f32(x, w)  # [..., O] f32


@jax.custom_jvp
def silu_f32(g: jax.Array) -> jax.Array:
    """``g / (1 + exp(-g))`` in float32, the formula torch's CPU silu kernel uses.

    Not ``jax.nn.silu``: that computes ``x * sigmoid(x)`` in the input dtype (two
    bf16 roundings; it differs from torch on ~40% of bf16 elements).

    Derivative: ``s (1 + g (1 - s))`` with ``s = 1 / (1 + exp(-g))``, torch's silu backward.
    Differentiating the formula above instead gives ``inf / inf = NaN`` once ``exp(-g)``
    overflows (g < -88): NaN gradients for every weight of such a row.
    """
    gf = g.astype(jnp.float32)  # torch computes silu of bf16/f16 in float32
    return gf / (1.0 + jnp.exp(-gf))


@silu_f32.defjvp
def _silu_f32_jvp(primals, tangents):
    (g,), (dg,) = primals, tangents
    gf = g.astype(jnp.float32)  # the derivative in float32, as the value
    s = 1.0 / (1.0 + jnp.exp(-gf))  # exp overflow gives s = 0, not NaN
    return silu_f32(g), dg.astype(jnp.float32) * (s * (1.0 + gf * (1.0 - s)))


def _check(x, w_gate, w_up, w_down, recipe):
    require_choice("recipe", recipe, RECIPES, op="swiglu")
    require_float("x", x, op="swiglu")
    if x.ndim < 1:
        raise ValueError(f"swiglu: x must have shape [..., D], got shape {tuple(x.shape)}")
    d = x.shape[-1]
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise ValueError(
                f"swiglu: {name} must have the dtype of x ({dtype_name(x.dtype)}), got {dtype_name(w.dtype)}"
            )
        if w.ndim != 2:
            raise ValueError(f"swiglu: {name} must be 2-D, got shape {tuple(w.shape)}")
    if w_gate.shape[0] != d:
        raise ValueError(f"swiglu: w_gate must have shape [D, F] with D = {d} (last dim of x), got {tuple(w_gate.shape)}")
    f = w_gate.shape[1]
    if w_up.shape != (d, f):
        raise ValueError(f"swiglu: w_up must have shape [D, F] = {(d, f)} like w_gate, got {tuple(w_up.shape)}")
    if w_down.shape != (f, d):
        raise ValueError(f"swiglu: w_down must have shape [F, D] = {(f, d)}, got {tuple(w_down.shape)}")


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *, recipe: str = "hf") -> jax.Array:
    """The gated MLP ``down(silu(x @ w_gate) * (x @ w_up))``.

    Args:
      x: activations ``[..., D]``, float32 / bfloat16 / float16.
      w_gate, w_up: ``[D, F]``; w_down: ``[F, D]``; all of ``x.dtype``.
      recipe: ``"hf"`` (round where Qwen2MLP rounds) or ``"fp32_act"`` (see the module
        docstring for the step-by-step dtype recipe).

    Returns:
      ``[..., D]`` in ``x.dtype``. NaN/inf propagate as in the matmuls; nothing is clipped.
    """
    _check(x, w_gate, w_up, w_down, recipe)
    dt = x.dtype
    g = matmul_f32(x, w_gate)  # f32 [..., F]
    u = matmul_f32(x, w_up)  # f32 [..., F]
    if recipe == "hf":
        # Linear rounds its output to the model dtype: g and u are rounded once each,
        # silu rounds once (computed in f32), and the product of two model-dtype values is
        # exact in f32, so multiplying in f32 and rounding is the correctly rounded product.
        # round_to keeps each rounding in float32 where XLA cannot drop it (excess precision).
        g, u = round_to(g, dt), round_to(u, dt)
        a = round_to(silu_f32(g), dt)
        h = (a * u).astype(dt)  # [..., F]
    else:
        # fp32_act: silu and the product stay in f32; one rounding, as the down input.
        h = (silu_f32(g) * u).astype(dt)  # [..., F]
    return matmul_f32(h, w_down).astype(dt)  # round once, as Linear does: [..., D]


def swiglu_fused(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *, recipe: str = "hf") -> jax.Array:
    """``swiglu`` with a fused gate/up weight ``[D, 2F]`` (gate first, then up), as many
    checkpoints store it (``gate, up = w_gate_up.chunk(2, dim=-1)``). Same recipe, same bits."""
    require_float("w_gate_up", w_gate_up, op="swiglu_fused")
    if w_gate_up.ndim != 2 or w_gate_up.shape[1] % 2:
        raise ValueError(f"swiglu_fused: w_gate_up must have shape [D, 2F] (an even last dim), got {tuple(w_gate_up.shape)}")
    f = w_gate_up.shape[1] // 2
    return swiglu(x, w_gate_up[:, :f], w_gate_up[:, f:], w_down, recipe=recipe)  # [D, F] halves
