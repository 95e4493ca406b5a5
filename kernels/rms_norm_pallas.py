"""RMSNorm as one Pallas (Triton) kernel: each row read from memory once, written once.

XLA compiles ``kernels.rms_norm`` to one fusion that reads every row twice (once for
the mean square, once to normalise): 0.75 of the copy bandwidth on an H100 for
Qwen2.5-7B's ``x[4096, 3584]`` (benchmarks/README.md). Here one program owns one row:
it sums the squares chunk by chunk (``chunk`` a power of two dividing D, the row's
second read then comes from L1/L2), then normalises and stores.

Same recipes and roundings as :func:`kernels.rms_norm.rms_norm` (its module docstring
is the specification); only the order of the float32 sum of squares differs (``chunk``
float32 lanes accumulated over the chunks, then a tree), as XLA's and torch's orders
differ from each other. "Round to dt, go on in f32" is the convert pair here (Triton
executes it; it has no ``reduce_precision``), ``kernels._round.round_to`` in interpret
mode, where XLA could otherwise drop the pair as excess precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels._round import round_to_in_kernel
from kernels.rms_norm import check_args, torch_rsqrt

MAX_CHUNK = 1024  # float32 lanes per program (4 warps: 8 per thread)
MIN_CHUNK = 16


def chunk_for(d: int) -> int | None:
    """The largest power of two <= MAX_CHUNK dividing ``d`` (None below MIN_CHUNK)."""
    c = d & -d  # the largest power of two dividing d
    c = min(c, MAX_CHUNK)
    return c if c >= MIN_CHUNK else None


def _kernel(x_ref, w_ref, o_ref, *, d, chunk, eps, recipe, exact):
    row = pl.program_id(0)
    dt = x_ref.dtype
    cols = [pl.ds(c * chunk, chunk) for c in range(d // chunk)]
    acc = jnp.zeros((1, chunk), jnp.float32)
    for c in cols:
        xf = x_ref[pl.ds(row, 1), c].astype(jnp.float32)  # [1, chunk]: the statistic is always f32
        acc = acc + xf * xf
    var = jnp.sum(acc) / jnp.float32(d)  # the mean square
    # interpret mode runs on the host: torch's two-rounding rsqrt there, as kernels.rms_norm does.
    r = torch_rsqrt(var + jnp.float32(eps)) if exact else jax.lax.rsqrt(var + jnp.float32(eps))
    for c in cols:
        xf = x_ref[pl.ds(row, 1), c].astype(jnp.float32)  # [1, chunk]
        y = xf * r
        w = w_ref[c]  # [chunk]
        if recipe == "hf":
            out_dt = o_ref.dtype  # promote(weight, x), computed by the wrapper
            # Round to x's dtype first (Qwen2RMSNorm), then the weight product in out_dt.
            yr = round_to_in_kernel(y, dt, interpret=exact)
            out = w.astype(out_dt)[None, :] * yr.astype(out_dt)
        elif recipe == "gemma":
            out = y * (1.0 + w.astype(jnp.float32))[None, :]  # (1 + w) in f32, one rounding below
        else:
            out = w.astype(jnp.float32)[None, :] * y  # fp32_weight: one rounding below
        o_ref[pl.ds(row, 1), c] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "recipe", "chunk", "num_warps", "interpret"))
def _call(x2, weight, *, eps, recipe, chunk, num_warps, interpret):
    rows, d = x2.shape
    out_dt = jnp.promote_types(weight.dtype, x2.dtype) if recipe == "hf" else x2.dtype
    kernel = functools.partial(_kernel, d=d, chunk=chunk, eps=eps, recipe=recipe, exact=interpret)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, d), out_dt),
        grid=(rows,),
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.no_block_spec,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="rms_norm_pallas",
    )(x2, weight)


def pallas_rms_norm(x: jax.Array, weight: jax.Array, *, eps: float = 1e-6, recipe: str = "hf",
                    num_warps: int = 4, interpret: bool = False) -> jax.Array:
    """:func:`kernels.rms_norm.rms_norm` as one Pallas kernel (GPU; ``interpret=True`` anywhere).

    Needs a power of two >= 16 dividing D (every Qwen2.5 width: 896 = 7 x 128,
    3584 = 7 x 512, ...); otherwise ValueError naming D.
    """
    check_args(x, weight, eps=eps, recipe=recipe)
    d = x.shape[-1]
    chunk = chunk_for(d)
    if chunk is None:
        raise ValueError(f"pallas_rms_norm: D = {d} (x {tuple(x.shape)}) has no power-of-two divisor >= "
                         f"{MIN_CHUNK}; use kernels.rms_norm")
    out = _call(x.reshape(-1, d), weight, eps=float(eps), recipe=recipe, chunk=chunk, num_warps=num_warps,
                interpret=bool(interpret))  # [rows, D]
    return out.reshape(*x.shape[:-1], d)  # [..., D]
