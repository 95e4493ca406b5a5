"""``apply_rope`` as one Pallas (Triton) kernel: q and k rotated in one launch, tables read once.

XLA compiles ``apply_rope(q)`` and ``apply_rope(k)`` to two fusions. This kernel reads each
position's cos/sin row once for every tensor given, and rotates all of them in one
launch. Measured on an H100 by device time (CUPTI; benchmarks/results/h100.json),
Qwen2.5-7B prefill (q[4096, 28, 128], k[4096, 4, 128], bf16), as fractions of copy:
- this kernel: 25.4 us, 0.905;
- XLA's two fusions: 28.1 us, 0.82;
- ``x + 1`` over q and k: 0.87-0.90.

Layout: each tensor ``x[P, heads, H]`` (P = B * T positions, a free reshape of
``[B, T, heads, H]``), the tables ``[P, R]``. A program takes ``block_t`` positions and
loads, per tensor, ``[block_t, heads, R/2]`` tiles of the two halves that ``rotate_half``
pairs (heads padded to a power of two by masked loads: the padding is never read from or
written to memory; R/2 must be a power of two). Channels R..H (partial rotary) are
copied through. By default a program issues every tensor's loads before its first store
(``schedule="loads_first"``). Rotating and storing q before loading k (session 9's
kernel) puts two memory latencies in a row in every program: that kernel ran 1.6-2.1%
slower at 7B and 2% at 0.5B (benchmarks/probe_rope.py, three sweeps timed in turns).

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
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels._checks import is_pow2, next_pow2, require_pow2
from kernels._grad import with_derivative_of
from kernels._round import round_to_in_kernel

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supports(x_dtype, table_dtype, *, layout: str, h: int, r: int) -> bool:
    """Whether the kernel computes this case (else the XLA path): "half" layout, bf16/f16
    tensors with tables of their dtype (see the module docstring for why not f32), R/2 a
    power of two and H - R zero or one (the column blocks are then exact: a block that
    starts inside a row must not run past its end; every Qwen2/Llama head dim qualifies)."""
    return (layout == "half" and jnp.dtype(x_dtype) in DTYPES and jnp.dtype(table_dtype) == jnp.dtype(x_dtype)
            and is_pow2(r // 2) and (r == h or is_pow2(h - r)))


SCHEDULES = ("per_tensor", "loads_first", "program_per_tensor")


def _kernel(c_ref, s_ref, *refs, n_x, n_pos, block_t, rot, evict, exact, schedule, starts):
    """One program's positions of each tensor (``schedule``: see :func:`pallas_apply_rope`)."""
    x_refs, o_refs = refs[:n_x], refs[n_x:]
    half = rot // 2  # a power of two (supports): column blocks need no mask

    def rows_of(t0, bt):  # [bt] mask of real positions (the last program may run past P), the slice
        return (t0 + jnp.arange(bt)) < n_pos, pl.ds(t0, bt)

    def tables(t0, bt):  # c1, c2, s1, s2: [bt, 1, R/2] f32 (exact upcasts), to broadcast over heads
        row_ok, rows = rows_of(t0, bt)
        m2 = jnp.broadcast_to(row_ok[:, None], (bt, half))  # [bt, R/2]

        def table(ref, start):
            return plgpu.load(ref.at[rows, pl.ds(start, half)], mask=m2, other=0).astype(jnp.float32)[:, None, :]

        return table(c_ref, 0), table(c_ref, half), table(s_ref, 0), table(s_ref, half)

    def mask(x_ref, t0, bt, width):  # [bt, Np, width]: real positions and heads (padded to a power of two)
        row_ok, _ = rows_of(t0, bt)
        np_ = next_pow2(x_ref.shape[1])
        head_ok = jnp.arange(np_) < x_ref.shape[1]  # [Np]
        return jnp.broadcast_to(row_ok[:, None, None] & head_ok[None, :, None], (bt, np_, width))

    def load(x_ref, t0, bt):  # the two halves that rotate_half pairs, exact f32 upcasts: [bt, Np, R/2] each
        _, rows = rows_of(t0, bt)
        heads = pl.ds(0, next_pow2(x_ref.shape[1]))
        m3 = mask(x_ref, t0, bt, half)
        # Exact upcasts: the products of two dt values are then exact in f32.
        return tuple(plgpu.load(x_ref.at[rows, heads, pl.ds(c, half)], mask=m3, other=0,
                                eviction_policy=evict).astype(jnp.float32) for c in (0, half))

    def rotate_store(x_ref, o_ref, t0, bt, x1, x2, tabs):
        dt = x_ref.dtype
        c1, c2, s1, s2 = tabs
        _, rows = rows_of(t0, bt)
        heads = pl.ds(0, next_pow2(x_ref.shape[1]))
        m3 = mask(x_ref, t0, bt, half)

        def rnd(v):  # an exact f32 product or sum, rounded to dt, kept in f32
            return round_to_in_kernel(v, dt, interpret=exact)

        y1 = rnd(x1 * c1) + rnd(-x2 * s1)  # [bt, Np, R/2]: f32 sum of two dt values, as torch's dt add
        y2 = rnd(x2 * c2) + rnd(x1 * s2)
        # The sums' one rounding to dt (exact values in, one round-to-nearest-even out).
        plgpu.store(o_ref.at[rows, heads, pl.ds(0, half)], y1.astype(dt), mask=m3, eviction_policy=evict)
        plgpu.store(o_ref.at[rows, heads, pl.ds(half, half)], y2.astype(dt), mask=m3, eviction_policy=evict)
        h = x_ref.shape[2]
        if rot < h:  # partial rotary: channels R..H pass through unchanged
            tp = h - rot  # a power of two (supports)
            mt = mask(x_ref, t0, bt, tp)
            tail = plgpu.load(x_ref.at[rows, heads, pl.ds(rot, tp)], mask=mt, other=0)
            plgpu.store(o_ref.at[rows, heads, pl.ds(rot, tp)], tail, mask=mt)

    pid = pl.program_id(0)
    if schedule == "program_per_tensor":  # programs [starts[i], starts[i+1]) rotate tensor i alone
        for i, (x_ref, o_ref) in enumerate(zip(x_refs, o_refs)):
            bt = block_t[i]

            @pl.when((pid >= starts[i]) & (pid < starts[i + 1]))
            def _(x_ref=x_ref, o_ref=o_ref, i=i, bt=bt):
                t0 = (pid - starts[i]) * bt
                rotate_store(x_ref, o_ref, t0, bt, *load(x_ref, t0, bt), tables(t0, bt))
        return
    bt = block_t[0]
    t0 = pid * bt
    tabs = tables(t0, bt)
    if schedule == "loads_first":  # every tensor's loads issued before the first store
        halves = [load(x_ref, t0, bt) for x_ref in x_refs]
        for x_ref, o_ref, (x1, x2) in zip(x_refs, o_refs, halves):
            rotate_store(x_ref, o_ref, t0, bt, x1, x2, tabs)
        return
    for x_ref, o_ref in zip(x_refs, o_refs):  # "per_tensor": load, rotate, store, then the next
        rotate_store(x_ref, o_ref, t0, bt, *load(x_ref, t0, bt), tabs)


def _blocks(xs, block_t, schedule):
    """Positions a program for each tensor. ``program_per_tensor``: ``block_t`` for the one
    with the most heads, more for the others, so that every program moves about as many
    bytes (a 7B q of 28 heads, padded to 32: 2 positions; k of 4 heads: 16)."""
    if schedule != "program_per_tensor":
        return (block_t,) * len(xs)
    widest = max(next_pow2(x.shape[2]) for x in xs)
    return tuple(block_t * widest // next_pow2(x.shape[2]) for x in xs)


@functools.partial(jax.jit, static_argnames=("block_t", "num_warps", "eviction_policy", "schedule", "interpret"))
def _call(xs, cos, sin, *, block_t, num_warps, eviction_policy, schedule, interpret):
    b, t = cos.shape[:2]
    rot = cos.shape[-1]
    p = b * t
    x3 = [x.reshape(p, x.shape[2], x.shape[3]) for x in xs]  # [B*T, heads, H]: a free view
    c2 = cos.reshape(p, rot)  # [B*T, R]
    s2 = sin.reshape(p, rot)  # [B*T, R]
    bts = _blocks(xs, block_t, schedule)
    counts = [-(-p // bt) for bt in bts] if schedule == "program_per_tensor" else [-(-p // bts[0])]
    starts = tuple(int(v) for v in np.cumsum([0, *counts]))  # program ranges, one per tensor (or one for all)
    outs = pl.pallas_call(
        functools.partial(_kernel, n_x=len(xs), n_pos=p, block_t=bts, rot=rot,
                          evict=None if interpret else eviction_policy, exact=interpret, schedule=schedule,
                          starts=starts),
        out_shape=tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in x3),
        grid=(starts[-1],),
        in_specs=[pl.no_block_spec] * (2 + len(xs)),
        out_specs=tuple(pl.no_block_spec for _ in xs),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="apply_rope_pallas",
    )(c2, s2, *x3)
    return tuple(o.reshape(x.shape) for o, x in zip(outs, xs))  # each [B, T, heads, H]


def pallas_apply_rope(xs, cos: jax.Array, sin: jax.Array, *, block_t: int = 1, num_warps: int = 4,
                      eviction_policy: str | None = None, schedule: str = "loads_first",
                      interpret: bool = False) -> tuple:
    """Every ``x[B, T, heads, H]`` of ``xs`` rotated by the same ``cos``/``sin[B, T, R]``, one launch.

    The arguments are checked by :func:`kernels.rope.apply_rope` / ``apply_rope_qk``
    (call those; ``implementation="pallas"``); this raises only for what the kernel
    itself does not support (see :func:`supports`). ``block_t`` (positions a program,
    a power of two) and ``num_warps`` are Triton launch parameters. The defaults (1 position,
    4 warps, ``"loads_first"``) are the fastest or within 0.3% of it at both Qwen2.5 sizes
    on an H100 (benchmarks/results/probe_rope_sweep{1,2,3}_h100.json, in turns: 7B 25.06 us
    against 25.46 for session 9's per_tensor 2 / 8 warps; 0.5B 8.02 against 8.18, where
    8 warps with 1 position lose 10%).
    ``eviction_policy``: Triton's L2 hint for the tensors' loads and stores (None,
    ``"evict_first"``, ``"evict_last"``); ignored in interpret mode.
    ``schedule``: how a program's work is ordered. ``"per_tensor"``: a program takes
    ``block_t`` positions of every tensor, loading, rotating and storing one tensor
    after the other. ``"loads_first"``: the same, with every tensor's loads issued before
    the first store. ``"program_per_tensor"``: each program rotates one tensor only,
    ``block_t`` positions of the one with the most heads and proportionally more of the
    others. The outputs are the same bits under every schedule.
    Returns a tuple, one rotated array per input, in its dtype. Differentiable: ``jax.grad``
    and ``jax.jvp`` see the XLA path's derivative (``kernels._grad``).
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
    if schedule not in SCHEDULES:
        raise ValueError(f"pallas_apply_rope: schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    from kernels.rope import _xla  # kernels.rope imports this module on demand

    def fast(xs, cos, sin):
        return _call(xs, cos, sin, block_t=block_t, num_warps=num_warps, eviction_policy=eviction_policy,
                     schedule=schedule, interpret=bool(interpret))

    def reference(xs, cos, sin):
        return tuple(_xla(x, cos, sin, layout="half") for x in xs)

    # Differentiated as the XLA path (kernels._grad): a pallas_call has no transpose rule.
    return with_derivative_of(fast, reference)(tuple(xs), cos, sin)
