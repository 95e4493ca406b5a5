"""``linear`` and ``lm_head`` for a few rows (a decode step) as one Pallas (Triton) GEMV.

Why: a decode step multiplies one row (a row a sequence of the batch) by every weight of
the model, so it is bound by reading the weights. XLA compiles such a dot to a reduce
fusion, whose speed depends on the weight's layout and shape (measured in
benchmarks/probe_gemv.py). Here every weight tile is read once, in its stored layout,
with the whole recipe in the kernel:

    1. ``acc = sum_k x[r, k] * w[k, n]``   float32 products (exact for bf16/f16) and sums:
                                           ``block_k`` lanes an output, each summing every
                                           ``block_k``-th term in order, then the lanes added
                                           by Triton's tree reduction
    2. ``acc = acc + float32(b[n])``       the bias, in float32, after the whole sum
    3. ``y = dt(acc)``                     one rounding, to x's dtype (none for ``out_dtype=float32``:
                                           lm_head's float32 logits are the sum itself)

the recipe of :func:`kernels.projection.linear` (torch's ``nn.Linear``), with another float32
summation order than XLA's or cuBLAS's: within the op's budgets, not bit-identical.

The weight is ``[K, N]`` (``w_layout="KN"``, linear's ``[in, out]``) or ``[N, K]`` (``"NK"``,
lm_head's ``[V, D]``), read in place. A program owns ``block_n`` outputs of every row and
walks K in steps of ``block_k``, accumulating a row's float32 products elementwise in a
tile shaped as the weight's (no cross-thread sum inside the loop); ``splits > 1`` shares K out
over ``splits`` programs a column block, whose float32 partials XLA then adds in order
(another kernel, for shapes with too few column blocks to fill the GPU).

GPU (Triton), or ``interpret=True`` anywhere. Rows: at most :data:`MAX_ROWS`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels._checks import is_pow2

W_LAYOUTS = ("KN", "NK")  # [K, N] (linear's [in, out]) or [N, K] (nn.Linear's, lm_head's [V, D])
MAX_ROWS = 8  # rows a call takes: a decode step's batch; more rows are a GEMM's work
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _epilogue(y, bias, dt):
    """Steps 2 and 3 on an output row's float32 sums ``y[bn]``: the bias (float32, or None)
    added after the whole sum, then the one rounding to ``dt``."""
    if bias is not None:
        y = y + bias  # torch adds the bias in f32, after the whole sum
    return y.astype(dt)  # the one rounding (none for float32 logits)


def _kernel(x_ref, w_ref, *rest, k: int, n: int, rows: int, block_k: int, block_n: int, k_steps: int,
            w_layout: str, has_bias: bool, split: bool):
    """One program: outputs ``[rows, block_n]`` (its column block) over K steps ``k_steps``
    (the K range of its split). Each row has its own 2-D accumulator, shaped as the weight
    tile, so the products need no change of layout (a 3-D ``[rows, ...]`` one cost a
    shared-memory round trip a step: 0.57 of copy on the 7B gate projection)."""
    b_ref = rest[0] if has_bias else None
    o_ref = rest[-1]
    j = pl.program_id(0)
    s = pl.program_id(1)
    cols = j * block_n + jnp.arange(block_n)  # [bn]
    c_ok = cols < n
    k0 = s * (k_steps * block_k)  # the first K index of this split
    kn = w_layout == "KN"

    def body(i, accs):  # accs: a [bk, bn] (KN) or [bn, bk] (NK) float32 accumulator a row
        first = k0 + i * block_k
        k_ok = first + jnp.arange(block_k) < k  # [bk]
        if kn:
            w = plgpu.load(w_ref.at[pl.ds(first, block_k), pl.ds(j * block_n, block_n)],
                           mask=k_ok[:, None] & c_ok[None, :], other=0)  # [bk, bn]
        else:
            w = plgpu.load(w_ref.at[pl.ds(j * block_n, block_n), pl.ds(first, block_k)],
                           mask=c_ok[:, None] & k_ok[None, :], other=0)  # [bn, bk]
        wf = w.astype(jnp.float32)  # products of bf16/f16 values are exact in float32
        out = []
        for r, acc in enumerate(accs):
            xr = plgpu.load(x_ref.at[jnp.int32(r), pl.ds(first, block_k)], mask=k_ok, other=0).astype(jnp.float32)  # [bk]
            out.append(acc + (xr[:, None] if kn else xr[None, :]) * wf)
        return tuple(out)

    shape = (block_k, block_n) if kn else (block_n, block_k)
    accs = jax.lax.fori_loop(0, k_steps, body, tuple(jnp.zeros(shape, jnp.float32) for _ in range(rows)))
    bias = None
    if has_bias:
        bias = plgpu.load(b_ref.at[pl.ds(j * block_n, block_n)], mask=c_ok, other=0).astype(jnp.float32)  # [bn]
    for r, acc in enumerate(accs):
        y = jnp.sum(acc, axis=0 if kn else 1)  # [bn]: the block_k lanes of each output
        if split:  # float32 partials; the caller adds the splits and the bias, and rounds
            plgpu.store(o_ref.at[s, jnp.int32(r), pl.ds(j * block_n, block_n)], y, mask=c_ok)
            continue
        plgpu.store(o_ref.at[jnp.int32(r), pl.ds(j * block_n, block_n)], _epilogue(y, bias, o_ref.dtype), mask=c_ok)


@functools.partial(jax.jit, static_argnames=("w_layout", "out_dtype", "block_n", "block_k", "splits",
                                             "num_warps", "num_stages", "interpret"))
def _call(x2, w, b, *, w_layout, out_dtype, block_n, block_k, splits, num_warps, num_stages, interpret):
    rows, k = x2.shape
    n = w.shape[1] if w_layout == "KN" else w.shape[0]
    steps = -(-k // block_k)  # K steps in all
    k_steps = -(-steps // splits)  # a split's
    split = splits > 1
    has_bias = b is not None and not split
    kernel = functools.partial(_kernel, k=k, n=n, rows=rows, block_k=block_k, block_n=block_n, k_steps=k_steps,
                               w_layout=w_layout, has_bias=has_bias, split=split)
    out_shape = (jax.ShapeDtypeStruct((splits, rows, n), jnp.float32) if split
                 else jax.ShapeDtypeStruct((rows, n), out_dtype))
    args = (x2, w) + ((b,) if has_bias else ())
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(-(-n // block_n), splits),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.no_block_spec,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="linear_pallas",
    )(*args)
    if not split:
        return out
    acc = out[0]
    for p in range(1, splits):
        acc = acc + out[p]  # [rows, N]: the splits' float32 partials, added in order
    return _epilogue(acc, None if b is None else b.astype(jnp.float32)[None, :], out_dtype)  # bias in f32


def why_not(x_shape, dtype) -> str:
    """Why :func:`pallas_linear` cannot take this call ("" when it can): the rows and dtype."""
    if jnp.dtype(dtype) not in DTYPES:
        return f"float32/bfloat16/float16 inputs (got {jnp.dtype(dtype).name})"
    rows = math.prod(x_shape[:-1])
    if rows > MAX_ROWS:
        return f"at most {MAX_ROWS} rows, a decode step's (got {rows}: a GEMM's work)"
    return ""


def _num_sms() -> int:
    """The GPU's SM count (132 on an H100); 132 where JAX's device has none (interpret mode)."""
    return getattr(jax.devices()[0], "core_count", 0) or 132


def default_blocks(k: int, n: int, *, w_layout: str, num_sms: int | None = None) -> tuple[int, int, int, int]:
    """``(block_n, block_k, splits, num_warps)`` for a weight of K x N.

    Measured on an H100 (benchmarks/probe_gemv.py, results/probe_gemv_h100.json: one row,
    bf16, every projection of a Qwen2.5-0.5B and -7B decode step, 11 tilings each):

    * ``"KN"``: 256 columns x 32 K a step with 8 warps from N = 2048 (the 7B q/o, gate and
      down projections, the 0.5B gate), else 64 x 32 with 4 warps (k/v, the 0.5B q/o);
      K split until the programs are at least two a SM, each split at least 4 K steps:
      a 7B q projection has 14 column blocks, 19 splits (12.6 us against 188 unsplit).
    * ``"NK"`` (the lm_head): 16 rows x 256 K a step, 4 warps, no split (V / 16 programs).
    """
    if w_layout == "NK":
        return 16, 256, 1, 4
    bn, bk, warps = (256, 32, 8) if n >= 2048 else (64, 32, 4)
    blocks = -(-n // bn)
    sms = num_sms or _num_sms()
    splits = 1 if blocks >= 2 * sms else max(1, min(-(-2 * sms // blocks), -(-k // bk) // 4))
    return bn, bk, splits, warps


def pallas_linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *, w_layout: str = "KN",
                  out_dtype=None, block_n: int | None = None, block_k: int | None = None,
                  splits: int | None = None, num_warps: int | None = None, num_stages: int = 3,
                  interpret: bool = False, op: str = "linear") -> jax.Array:
    """``x[..., K] @ w`` (+ ``b``) for at most :data:`MAX_ROWS` rows, as one Pallas GEMV.

    Recipe: float32 products and sums, the bias added in float32, one rounding to
    ``x.dtype`` (or ``out_dtype=float32``: the float32 sum, unrounded); see the module
    docstring for the summation order.

    Args:
      x: ``[..., K]``, at most ``MAX_ROWS`` rows; w: ``[K, N]`` (``"KN"``) or ``[N, K]`` (``"NK"``)
        of x's dtype; b: optional ``[N]`` of x's dtype.
      block_n, block_k, splits, num_warps: the tiling (``block_n``, ``block_k`` powers of two;
        ``splits`` >= 1) and the warps a program; each None: :func:`default_blocks`'s.
        They set the float32 summation order (``block_k`` lanes, ``splits`` partials).
      num_stages: Triton's software pipelining depth.
      op: the op named in errors (``"linear"`` or ``"lm_head"``).

    Returns ``[..., N]`` in ``out_dtype`` (default x's dtype).
    """
    if w_layout not in W_LAYOUTS:
        raise ValueError(f"{op}: w_layout must be one of {list(W_LAYOUTS)}, got {w_layout!r}")
    lacks = why_not(x.shape, x.dtype)
    if lacks:
        raise ValueError(f"{op}: implementation='pallas' needs {lacks}")
    k = x.shape[-1]
    kw, n = w.shape if w_layout == "KN" else w.shape[::-1]
    if kw != k:
        raise ValueError(f"{op}: w {tuple(w.shape)} ({w_layout}) does not contract with x {tuple(x.shape)}")
    for name, a, shape in (("w", w, w.shape), ("b", b, (n,))):
        if a is not None and (a.dtype != x.dtype or a.shape != shape):
            raise ValueError(f"{op}: {name} must be {jnp.dtype(x.dtype).name} {shape} (x's dtype), "
                             f"got {jnp.dtype(a.dtype).name} {tuple(a.shape)}")
    dn, dk, ds, dw = default_blocks(k, n, w_layout=w_layout)
    block_n, block_k, splits, num_warps = (d if v is None else v for v, d in
                                           ((block_n, dn), (block_k, dk), (splits, ds), (num_warps, dw)))
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if not is_pow2(v):
            raise ValueError(f"{op}: {name} must be a power of two, got {v!r}")
    if type(splits) is not int or splits < 1:
        raise ValueError(f"{op}: splits must be an int >= 1, got {splits!r}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    rows = math.prod(x.shape[:-1])
    out = _call(x.reshape(rows, k), w, b, w_layout=w_layout, out_dtype=out_dtype, block_n=block_n,
                block_k=block_k, splits=splits, num_warps=num_warps, num_stages=num_stages,
                interpret=bool(interpret))  # x as [rows, K]; out [rows, N]
    return out.reshape(*x.shape[:-1], n)  # [..., N]
