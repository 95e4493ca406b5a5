"""RMSNorm as one Pallas (Triton) kernel: each row read from memory once, written once.

XLA compiles ``kernels.rms_norm`` to one fusion that reads every row twice (once for
the mean square, once to normalise): 0.72 of the copy bandwidth on an H100 for
Qwen2.5-7B's ``x[4096, 3584]`` (device time, benchmarks/README.md). Two kernels here,
both reading each row once:

* the whole-row kernel (the default, ``block_rows=R`` >= 1): a program loads R whole
  rows into registers, D padded to a power of two by masked loads (any D), and stores
  them normalised. The mean square is one f32 tree sum over the padded row. Measured
  side by side on the H100's clock (benchmarks/results/tune_memory_h100.json): 21.2 us
  (0.92 of copy; ``x + 1`` over the same tensors takes 21.6) against 23.7 us for the
  chunked kernel and 26.8 us for XLA. The default rows a program: :func:`default_block_rows`;
* the chunked kernel (``block_rows=0``): one program per row sums the squares chunk by
  chunk (``chunk`` a power of two dividing D, the second read then comes from L1/L2),
  then normalises. It needs such a divisor >= 16.

Same recipes and roundings as :func:`kernels.rms_norm.rms_norm` (its module docstring
is the specification); only the order of the float32 sum of squares differs, as XLA's
and torch's orders differ from each other. "Round to dt, go on in f32" is the convert
pair here (Triton executes it; it has no ``reduce_precision``), ``kernels._round.round_to``
in interpret mode, where XLA could otherwise drop the pair as excess precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels._checks import is_pow2, next_pow2
from kernels._grad import with_derivative_of
from kernels._round import round_to_in_kernel
from kernels.rms_norm import _xla, check_args, torch_rsqrt

MAX_CHUNK = 1024  # float32 lanes per program (4 warps: 8 per thread)
MIN_CHUNK = 16
MAX_ROW = 16384  # padded elements a whole-row program holds (8 warps: 64 float32 registers a thread)


def chunk_for(d: int) -> int | None:
    """The largest power of two <= MAX_CHUNK dividing ``d`` (None below MIN_CHUNK)."""
    c = d & -d  # the largest power of two dividing d
    c = min(c, MAX_CHUNK)
    return c if c >= MIN_CHUNK else None


def _rsqrt(var, *, eps, exact):
    # interpret mode runs on the host: torch's two-rounding rsqrt there, as kernels.rms_norm does.
    return torch_rsqrt(var + jnp.float32(eps)) if exact else jax.lax.rsqrt(var + jnp.float32(eps))


def _scale(xf, r, w, *, dt, out_dt, recipe, exact):
    """The recipe's tail on f32 ``xf[rows, cols]``, the row factors ``r[rows, 1]`` and ``w[cols]``:
    the output in ``out_dt`` (see kernels.rms_norm for each recipe's roundings)."""
    y = xf * r
    if recipe == "hf":
        # Round to x's dtype first (Qwen2RMSNorm), then the weight product in out_dt = promote(weight, x).
        yr = round_to_in_kernel(y, dt, interpret=exact)
        out = w.astype(out_dt)[None, :] * yr.astype(out_dt)
    elif recipe == "gemma":
        out = y * (1.0 + w.astype(jnp.float32))[None, :]  # (1 + w) in f32, one rounding below
    else:
        out = w.astype(jnp.float32)[None, :] * y  # fp32_weight: one rounding below
    return out.astype(out_dt)


def _kernel(x_ref, w_ref, o_ref, *, d, chunk, eps, recipe, exact):
    row = pl.program_id(0)
    dt = x_ref.dtype
    cols = [pl.ds(c * chunk, chunk) for c in range(d // chunk)]
    acc = jnp.zeros((1, chunk), jnp.float32)
    for c in cols:
        xf = x_ref[pl.ds(row, 1), c].astype(jnp.float32)  # [1, chunk]: the statistic is always f32
        acc = acc + xf * xf
    r = _rsqrt(jnp.sum(acc) / jnp.float32(d), eps=eps, exact=exact)  # of the mean square
    for c in cols:
        xf = x_ref[pl.ds(row, 1), c].astype(jnp.float32)  # [1, chunk]
        o_ref[pl.ds(row, 1), c] = _scale(xf, r, w_ref[c], dt=dt, out_dt=o_ref.dtype, recipe=recipe, exact=exact)


def _row_kernel(x_ref, w_ref, o_ref, *, d, n_rows, block_rows, eps, recipe, exact):
    """``block_rows`` whole rows per program, each loaded once into registers: D padded to a
    power of two ``Dp`` by masked loads (the padding reads as 0 and adds 0 to the sum of
    squares; it is never stored)."""
    dp = padded_width(d)
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)  # [R]
    cols = jnp.arange(dp)  # [Dp]
    ok = (rows < n_rows)[:, None] & (cols < d)[None, :]  # [R, Dp]
    first = pl.program_id(0) * block_rows
    x = plgpu.load(x_ref.at[pl.ds(first, block_rows), pl.ds(0, dp)], mask=ok, other=0)  # [R, Dp] dt
    w = plgpu.load(w_ref.at[pl.ds(0, dp)], mask=cols < d, other=0)  # [Dp]
    xf = x.astype(jnp.float32)  # the statistic is always f32
    r = _rsqrt(jnp.sum(xf * xf, axis=1, keepdims=True) / jnp.float32(d), eps=eps, exact=exact)  # [R, 1]
    out = _scale(xf, r, w, dt=x_ref.dtype, out_dt=o_ref.dtype, recipe=recipe, exact=exact)  # [R, Dp]
    plgpu.store(o_ref.at[pl.ds(first, block_rows), pl.ds(0, dp)], out, mask=ok)


def padded_width(d: int) -> int:
    """D rounded up to a power of two: the whole-row kernel's row width (masked beyond D)."""
    return next_pow2(d)


def default_block_rows(d: int) -> int:
    """Whole rows a program for width ``d``: 1 from a padded width of 4096, else 2 (0, the
    chunked kernel, past ``MAX_ROW``).

    Measured on an H100 (bf16, 4096 rows, 8 warps; benchmarks/README.md): for Qwen2.5-7B's
    D = 3584, 1 row beat 2 in each of three sweeps (21.17 against 21.49 us,
    tune_memory_session6_h100.json; 21.14 / 21.29, probe_stream_h100.json; 21.18 / 21.36,
    tune_memory_h100.json). 0.5B's D = 896 keeps 2 rows: 6.34 us with 8 warps (4 warps: 6.15, but
    see ``num_warps`` in :func:`pallas_rms_norm`).
    """
    dp = padded_width(d)
    return 0 if dp > MAX_ROW else 1 if dp >= 4096 else 2


@functools.partial(jax.jit, static_argnames=("eps", "recipe", "chunk", "block_rows", "num_warps", "interpret"))
def _call(x2, weight, *, eps, recipe, chunk, block_rows, num_warps, interpret):
    rows, d = x2.shape
    out_dt = jnp.promote_types(weight.dtype, x2.dtype) if recipe == "hf" else x2.dtype
    if block_rows:
        kernel = functools.partial(_row_kernel, d=d, n_rows=rows, block_rows=block_rows, eps=eps, recipe=recipe,
                                   exact=interpret)
        grid = (-(-rows // block_rows),)
    else:
        kernel = functools.partial(_kernel, d=d, chunk=chunk, eps=eps, recipe=recipe, exact=interpret)
        grid = (rows,)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, d), out_dt),
        grid=grid,
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.no_block_spec,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="rms_norm_pallas",
    )(x2, weight)


def pallas_rms_norm(x: jax.Array, weight: jax.Array, *, eps: float = 1e-6, recipe: str = "hf",
                    block_rows: int | None = None, num_warps: int = 8, interpret: bool = False) -> jax.Array:
    """:func:`kernels.rms_norm.rms_norm` as one Pallas kernel (GPU; ``interpret=True`` anywhere).

    Args:
      x, weight, eps, recipe: as :func:`kernels.rms_norm.rms_norm` (same dtype recipe).
      block_rows: whole rows per program (any D up to ``MAX_ROW`` padded), or 0 for the
        chunked kernel, which needs a power of two >= 16 dividing D (every Qwen2.5
        width: 896 = 7 x 128, 3584 = 7 x 512, ...). ValueError naming D otherwise.
        None: :func:`default_block_rows`.
      num_warps: Triton's launch parameter. It sets the order of the f32 sum of squares, so
        changing it can move an f32 row's rsqrt factor by an ulp (and every element of the
        row with it): at 0.5B, 4 warps ran 3% faster than 8 but flipped whole rows of
        examples the GPU budget's mismatch fraction was measured on, so 8 stays.

    Differentiable: ``jax.grad`` and ``jax.jvp`` see the XLA path's derivative (``kernels._grad``).
    """
    check_args(x, weight, eps=eps, recipe=recipe)
    d = x.shape[-1]
    if block_rows is None:
        block_rows = default_block_rows(d)
    if not (is_pow2(block_rows) or (type(block_rows) is int and block_rows == 0)):
        raise ValueError(f"pallas_rms_norm: block_rows must be 0 (chunked) or a power of two, got {block_rows!r}")
    if block_rows and padded_width(d) * block_rows > MAX_ROW:
        raise ValueError(f"pallas_rms_norm: {block_rows} rows of D = {d} (padded to {padded_width(d)}) exceed "
                         f"{MAX_ROW} elements a program; use fewer rows or block_rows=0")
    chunk = chunk_for(d)
    if not block_rows and chunk is None:
        raise ValueError(f"pallas_rms_norm: D = {d} (x {tuple(x.shape)}) has no power-of-two divisor >= "
                         f"{MIN_CHUNK} for the chunked kernel (block_rows=0); use block_rows >= 1")

    def fast(x, weight):
        out = _call(x.reshape(-1, d), weight, eps=float(eps), recipe=recipe, chunk=chunk, block_rows=block_rows,
                    num_warps=num_warps, interpret=bool(interpret))  # [rows, D]
        return out.reshape(*x.shape[:-1], d)  # [..., D]

    # Differentiated as the XLA path (kernels._grad): a pallas_call has no transpose rule.
    return with_derivative_of(fast, functools.partial(_xla, eps=eps, recipe=recipe))(x, weight)
