"""``apply_rope`` as one Pallas (Triton) kernel: q and k rotated in one launch, tables read once.

XLA compiles ``apply_rope(q)`` and ``apply_rope(k)`` to two fusions. This kernel reads each
position's cos/sin row once for every tensor given, and rotates all of them in one
launch. Measured on an H100 by device time (CUPTI; benchmarks/results/h100.json),
Qwen2.5-7B prefill (q[4096, 28, 128], k[4096, 4, 128], bf16), as fractions of copy:
- this kernel: 25.7 us, 0.89;
- XLA's two fusions: 28.2 us, 0.81;
- ``x + 1`` over q and k: 0.87.

Layout: each tensor ``x[P, heads, H]`` (P = B * T positions, a free reshape of
``[B, T, heads, H]``), the tables ``[P, R]``. A program takes ``block_t`` positions and
loads, per tensor, ``[block_t, heads, R/2]`` tiles of the two halves that ``rotate_half``
pairs (heads padded to a power of two by masked loads: the padding is never read from or
written to memory; R/2 must be a power of two). Channels R..H (partial rotary) are
copied through.

Recipe, the same as :func:`kernels.rope.apply_rope` (``layout="half"``), per element in
the tensors' dtype ``dt`` (bfloat16 or float16, with tables of the same dtype):

    y1 = dt( dt(x1 * c1) + dt(-x2 * s1) )     first half  (rotate_half gives -x2)
    y2 = dt( dt(x2 * c2) + dt( x1 * s2) )     second half

Each product of two dt values is exact in float32 and the convert pair ``f32(dt(.))``
rounds it (Triton executes the pair; in interpret mode ``kernels._round.round_to``, which
XLA cannot drop); the two rounded products are added in float32 and the sum rounded to
dt, as torch's dt add does. Every step is one correctly rounded operation, so the output
is bit-identical to the XLA path and to torch on every backend: no reduction, no order of
sums to differ (tests/test_rope.py checks it).

float32 (and mixed, promoted to float32) inputs are not taken: there ``a*b + c*d`` may be
contracted to an FMA by the compiler, which changes the bits (kernels.rope guards its
XLA path against exactly that); they stay on the XLA path. So does ``layout="interleaved"``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels._checks import is_pow2, next_pow2, require_pow2
from kernels._round import round_to_in_kernel

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supports(x_dtype, table_dtype, *, layout: str, h: int, r: int) -> bool:
    """Whether the kernel computes this case (else the XLA path): "half" layout, bf16/f16
    tensors with tables of their dtype (see the module docstring for why not f32), R/2 a
    power of two and H - R zero or one (the column blocks are then exact: a block that
    starts inside a row must not run past its end; every Qwen2/Llama head dim qualifies)."""
    return (layout == "half" and jnp.dtype(x_dtype) in DTYPES and jnp.dtype(table_dtype) == jnp.dtype(x_dtype)
            and is_pow2(r // 2) and (r == h or is_pow2(h - r)))


def _kernel(c_ref, s_ref, *refs, n_x, n_pos, block_t, rot, evict, exact):
    x_refs, o_refs = refs[:n_x], refs[n_x:]
    half = rot // 2  # a power of two (supports): column blocks need no mask
    t0 = pl.program_id(0) * block_t
    row_ok = (t0 + jnp.arange(block_t)) < n_pos  # [bt]: the last program may run past P
    rows = pl.ds(t0, block_t)

    def table(ref, start):  # [bt, 1, R/2] f32 (exact upcast), to broadcast over heads
        m2 = jnp.broadcast_to(row_ok[:, None], (block_t, half))  # [bt, R/2]
        return plgpu.load(ref.at[rows, pl.ds(start, half)], mask=m2, other=0).astype(jnp.float32)[:, None, :]

    c1, c2, s1, s2 = table(c_ref, 0), table(c_ref, half), table(s_ref, 0), table(s_ref, half)
    for x_ref, o_ref in zip(x_refs, o_refs):
        dt = x_ref.dtype
        heads, h = x_ref.shape[1], x_ref.shape[2]
        np_ = next_pow2(heads)
        head_ok = jnp.arange(np_) < heads  # [Np]: heads padded to a power of two

        def mask(width):  # [bt, Np, width]: real positions and heads
            return jnp.broadcast_to(row_ok[:, None, None] & head_ok[None, :, None], (block_t, np_, width))

        m3 = mask(half)

        def rnd(v, dt=dt):  # an exact f32 product or sum, rounded to dt, kept in f32
            return round_to_in_kernel(v, dt, interpret=exact)

        # Exact upcasts: the products of two dt values are then exact in f32.
        x1 = plgpu.load(x_ref.at[rows, pl.ds(0, np_), pl.ds(0, half)], mask=m3, other=0,
                        eviction_policy=evict).astype(jnp.float32)
        x2 = plgpu.load(x_ref.at[rows, pl.ds(0, np_), pl.ds(half, half)], mask=m3, other=0,
                        eviction_policy=evict).astype(jnp.float32)
        y1 = rnd(x1 * c1) + rnd(-x2 * s1)  # [bt, Np, R/2]: f32 sum of two dt values, as torch's dt add
        y2 = rnd(x2 * c2) + rnd(x1 * s2)
        # The sums' one rounding to dt (exact values in, one round-to-nearest-even out).
        plgpu.store(o_ref.at[rows, pl.ds(0, np_), pl.ds(0, half)], y1.astype(dt), mask=m3, eviction_policy=evict)
        plgpu.store(o_ref.at[rows, pl.ds(0, np_), pl.ds(half, half)], y2.astype(dt), mask=m3, eviction_policy=evict)
        if rot < h:  # partial rotary: channels R..H pass through unchanged
            tp = h - rot  # a power of two (supports)
            tail = plgpu.load(x_ref.at[rows, pl.ds(0, np_), pl.ds(rot, tp)], mask=mask(tp), other=0)
            plgpu.store(o_ref.at[rows, pl.ds(0, np_), pl.ds(rot, tp)], tail, mask=mask(tp))


@functools.partial(jax.jit, static_argnames=("block_t", "num_warps", "eviction_policy", "interpret"))
def _call(xs, cos, sin, *, block_t, num_warps, eviction_policy, interpret):
    b, t = cos.shape[:2]
    rot = cos.shape[-1]
    p = b * t
    x3 = [x.reshape(p, x.shape[2], x.shape[3]) for x in xs]  # [B*T, heads, H]: a free view
    c2 = cos.reshape(p, rot)  # [B*T, R]
    s2 = sin.reshape(p, rot)  # [B*T, R]
    outs = pl.pallas_call(
        functools.partial(_kernel, n_x=len(xs), n_pos=p, block_t=block_t, rot=rot,
                          evict=None if interpret else eviction_policy, exact=interpret),
        out_shape=tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in x3),
        grid=(-(-p // block_t),),
        in_specs=[pl.no_block_spec] * (2 + len(xs)),
        out_specs=tuple(pl.no_block_spec for _ in xs),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="apply_rope_pallas",
    )(c2, s2, *x3)
    return tuple(o.reshape(x.shape) for o, x in zip(outs, xs))  # each [B, T, heads, H]


def pallas_apply_rope(xs, cos: jax.Array, sin: jax.Array, *, block_t: int = 2, num_warps: int = 8,
                      eviction_policy: str | None = None, interpret: bool = False) -> tuple:
    """Every ``x[B, T, heads, H]`` of ``xs`` rotated by the same ``cos``/``sin[B, T, R]``, one launch.

    The arguments are checked by :func:`kernels.rope.apply_rope` / ``apply_rope_qk``
    (call those; ``implementation="pallas"``); this raises only for what the kernel
    itself does not support (see :func:`supports`). ``block_t`` (positions a program,
    a power of two) and ``num_warps`` are Triton launch parameters. The defaults were the
    fastest of 16 pairs on an H100 (benchmarks/results/tune_memory_h100.json); a second
    sweep (tune_rope_h100.json) put three other settings within 1% of them, which is noise.
    ``eviction_policy``: Triton's L2 hint for the tensors' loads and stores (None,
    ``"evict_first"``, ``"evict_last"``); ignored in interpret mode.
    Returns a tuple, one rotated array per input, in its dtype.
    """
    require_pow2("block_t", block_t, op="pallas_apply_rope")
    for x in xs:
        if not supports(x.dtype, cos.dtype, layout="half", h=x.shape[-1], r=cos.shape[-1]):
            raise ValueError(f"pallas_apply_rope: the kernel takes bfloat16/float16 x with tables of its dtype, "
                             f"R/2 a power of two and H - R zero or one (layout 'half'), got x {x.dtype}"
                             f"{list(x.shape)} and tables {cos.dtype}{list(cos.shape)}; use implementation='xla'")
    if eviction_policy not in (None, "evict_first", "evict_last"):
        raise ValueError(f"pallas_apply_rope: eviction_policy must be None, 'evict_first' or 'evict_last', "
                         f"got {eviction_policy!r}")
    return _call(tuple(xs), cos, sin, block_t=block_t, num_warps=num_warps, eviction_policy=eviction_policy,
                 interpret=bool(interpret))
