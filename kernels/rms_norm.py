"""RMSNorm, in the three rounding recipes that HuggingFace models use.

Every recipe computes the statistic in float32, whatever the input dtype:

    var = mean(float32(x) ** 2, axis=-1)          # f32 accumulation (float32 x: compensated)
    y   = float32(x) * rsqrt(var + eps)           # rsqrt, never 1/sqrt(...)

The sum of squares of a float32 ``x`` is compensated (``kernels._twofloat.sum_axis``:
TwoSum, rounded once), then divided by D: a float32 output shows the sum's rounding. On a
row where two outlier channels dominate, XLA's plain CPU sum was 2.4e-7 (relative) off and
torch's cascaded sum 5.6e-8, leaving the output at 6.1x the oracle's error against the
float64 truth (tests/test_rms_norm.py); over 1000 stratified cases the worst ratio went
6.1 -> 1.2. The price on a 2-core CPU: a float32 rms_norm of 512 rows takes 2.4-3.5x
the same recipe with the plain sum, of one row 1.2x (benchmarks/probe_row_sum.py).
bf16/f16 outputs cannot show it and keep the plain sum.

They differ only in where the weight is applied and where the result is rounded:

``"hf"`` (Qwen2, Llama, Mistral, Qwen3: ``Qwen2RMSNorm``)
    ``weight * y.astype(x.dtype)``. The normalised value is rounded to the input dtype
    *first*, then multiplied by the weight with torch-style type promotion: a bf16 weight
    on bf16 input gives bf16 (a second rounding); a float32 weight on bf16 input gives a
    float32 result.
``"gemma"`` (Gemma 1/2/3: ``GemmaRMSNorm``)
    ``(y * (1 + float32(weight))).astype(x.dtype)``: the weight is stored as an offset
    from 1, applied in float32, and the result is rounded once, to the input dtype.
``"fp32_weight"`` (OLMo 2/3, GPT-OSS, FlexOlmo)
    ``(float32(weight) * y).astype(x.dtype)``: weight applied in float32, rounded once.

The statistic is per row of the last axis; all leading axes are batch axes.

Implementations (``implementation=``): this module's XLA ops on any backend, or
``kernels.rms_norm_pallas`` (a Triton kernel that reads each row once, against XLA's
twice: benchmarks/README.md), the default on a CUDA GPU when a whole row (D padded to a
power of two) fits its program, or chunks of it do. Only the float32 order of the mean
square's sum differs between them (the Triton kernel's is a plain tree sum); both are held
to the same budgets.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels._checks import require_choice, require_float, require_gpu, require_positive
from kernels._round import round_to
from kernels._twofloat import sum_axis

RECIPES = ("hf", "gemma", "fp32_weight")


def torch_rsqrt(v: jax.Array) -> jax.Array:
    """float32 rsqrt rounded as torch rounds it on each platform.

    torch's CPU kernel computes ``1 / sqrt(v)`` (two roundings, up to ~1.5 ulp from the
    exact value); XLA would rewrite that into its own ``rsqrt`` (one rounding), so on CPU
    the sqrt is hidden behind an optimisation barrier to keep the two roundings. On GPU
    both torch and XLA call the CUDA ``rsqrtf`` intrinsic, so ``lax.rsqrt`` is used.
    """
    return jax.lax.platform_dependent(
        v,
        cpu=lambda a: 1.0 / jax.lax.optimization_barrier(jnp.sqrt(a)),
        default=jax.lax.rsqrt,
    )


def check_args(x: jax.Array, weight: jax.Array, *, eps: float, recipe: str) -> None:
    """Validate rms_norm's arguments (ValueError naming expected and actual)."""
    require_float("x", x, op="rms_norm")
    require_float("weight", weight, op="rms_norm")
    require_choice("recipe", recipe, RECIPES, op="rms_norm")
    require_positive("eps", eps, op="rms_norm")
    if x.ndim < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(
            f"rms_norm: weight must have shape [D] = ({x.shape[-1] if x.ndim else '?'},) "
            f"to match the last dim of x {tuple(x.shape)}, got {tuple(weight.shape)}"
        )


IMPLEMENTATIONS = ("xla", "pallas")


def rms_norm(x: jax.Array, weight: jax.Array, *, eps: float = 1e-6, recipe: str = "hf",
             implementation: str | None = None) -> jax.Array:
    """Normalise ``x[..., D]`` by its root mean square and scale by ``weight[D]``.

    Args:
      x: activations ``[..., D]``, float32 / bfloat16 / float16.
      weight: scale ``[D]`` (for ``"gemma"``, the offset from 1).
      eps: added to the mean square before the rsqrt. Use the model's ``rms_norm_eps``
        (Qwen2.5: 1e-6); a wrong eps is a real, measurable bug for rows whose
        mean square is near eps.
      recipe: ``"hf"``, ``"gemma"`` or ``"fp32_weight"`` (see the module docstring).
      implementation: ``"xla"`` (this function, any backend), ``"pallas"``
        (``kernels.rms_norm_pallas``: one Triton kernel that reads each row once; GPU;
        whole rows up to D = 16384, chunks beyond when a power of two >= 16 divides D)
        or ``None``: ``"pallas"`` on a CUDA GPU when D allows it, else ``"xla"`` (a
        choice made at trace time from the platform and the static D; both follow the
        same recipe, measured within the same budgets).

    Returns:
      ``"hf"``: dtype ``promote(weight.dtype, x.dtype)`` (torch's promotion rule, which
      JAX shares for these dtypes); ``"gemma"`` / ``"fp32_weight"``: ``x.dtype``.
      NaN or inf in a row propagates to that row's output; nothing is replaced.
    """
    check_args(x, weight, eps=eps, recipe=recipe)
    require_choice("implementation", implementation, (None, *IMPLEMENTATIONS), op="rms_norm")
    if implementation != "xla":
        from kernels.rms_norm_pallas import chunk_for, default_block_rows, pallas_rms_norm  # imports this module

        # Whole rows (the measured count a program) when one fits in MAX_ROW; wider rows: the
        # chunked kernel (block_rows=0), which needs a power-of-two chunk.
        block_rows = default_block_rows(x.shape[-1])

        def pallas(x, weight):
            return pallas_rms_norm(x, weight, eps=eps, recipe=recipe, block_rows=block_rows)

        if implementation == "pallas":
            require_gpu("pallas", op="rms_norm", module="kernels.rms_norm_pallas.pallas_rms_norm")
            return pallas(x, weight)
        if block_rows or chunk_for(x.shape[-1]) is not None:  # None: the fastest path of the platform
            return jax.lax.platform_dependent(x, weight, cuda=pallas,
                                              default=lambda x, w: _xla(x, w, eps=eps, recipe=recipe))
    return _xla(x, weight, eps=eps, recipe=recipe)


def _xla(x, weight, *, eps, recipe):
    """The recipe in XLA ops (any backend), on the rows flattened to ``[rows, D]``.

    Why flattened: the values are the same (every step is per row or per element), but the
    weight's gradient, the sum over rows of ``ct * y`` that reverse mode makes of its
    broadcast, came out of XLA's CPU compiler 4-5x less accurate than torch's for
    ``x[1, 4000, D]`` (a reduce over the middle axis of ``[1, R, D]``, fused with the
    product) and as accurate as torch's for ``x[4000, D]`` or ``x[2, 2000, D]``.
    """
    out = _xla_rows(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), weight, eps=eps, recipe=recipe)  # [rows, D]
    return out.reshape(x.shape)  # [..., D]


def _xla_rows(x, weight, *, eps, recipe):
    # The statistic is always computed in float32: a bf16/f16 sum of squares loses
    # the row's scale (and overflows f16 above |x| ~ 256).
    xf = x.astype(jnp.float32)
    if x.dtype == jnp.float32:  # the output is float32: the sum's rounding would show (module docstring)
        var = sum_axis(jnp.square(xf), -1) / jnp.float32(x.shape[-1])  # [..., 1]
    else:
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)  # [..., 1]
    y = xf * torch_rsqrt(var + jnp.float32(eps))  # f32 [..., D]
    if recipe == "hf":
        # Round the normalised value to the input dtype before the weight, as
        # Qwen2RMSNorm does; the product then follows torch-style promotion.
        # round_to: a rounding XLA cannot drop as excess precision when out_dtype is f32.
        out_dtype = jnp.promote_types(weight.dtype, x.dtype)
        return weight.astype(out_dtype) * round_to(y, x.dtype).astype(out_dtype)
    if recipe == "gemma":
        # Gemma applies (1 + w) in float32 and rounds once at the end.
        return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    # fp32_weight: the weight is upcast (torch promotes bf16 * f32 to f32), one rounding.
    return (weight.astype(jnp.float32) * y).astype(x.dtype)
