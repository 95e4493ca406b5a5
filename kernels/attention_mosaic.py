"""A decode step of ``gqa_attention`` with flash numerics as one Hopper kernel (Pallas on
Mosaic GPU): ``gqa_attention(implementation="mosaic_flash")``.

Why: a decode step only streams the KV cache. The Triton flash kernel
(``implementation="pallas_flash"``) streams it at 0.86 of copy bandwidth with its own
loads, where a bare TMA read of the same 64 MiB reaches 0.93. Here the cache is read by
TMA: a memory warpgroup keeps ``stages`` key blocks of k and v in flight in shared memory
while ``wgs`` compute warpgroups run the two products on the tensor cores (wgmma). A 7B
step (S = 32768) on an H100, in turns: 28.0 us with the split combine against 28.9 for
``pallas_flash``; with a ``kv_valid`` mask no faster (0.99-1.07x its time,
benchmarks/README.md, ``probe_decode_mosaic.py --ship``).

Numerics: flash attention's, step for step those of ``pallas_attention(flash=True)``
(``_flash_step``) for recipe ``"fp32_logits"``, one kv head's G query rows (padded to
wgmma's 64 rows; padding rows never meet a real row and are never stored) against one
split of the keys:

    1. ``s = (q . k) * scale``                 wgmma, f32 accumulation; the scale in f32
       softcap ``cap``: ``s = tanh(s / cap) * cap`` in f32 (``kernels.attention.tanh_f32``)
       mask: ``s = -inf`` where the key is not visible (a select: NaN/inf of a masked
       key cannot leak); in a block with some keys masked their v rows are zeroed in
       shared memory, and a block with none visible has its product dropped (no ``0 * NaN``)
    2. ``m_new = max(m, max_k s)``             the running row max (f32)
    3. ``alpha = exp(m - m_new)``, ``e = exp(s - m_new)``   f32 (1 exactly while the max stays)
    4. ``l = l * alpha + sum_k e``             the row sum, of the unrounded e
    5. ``acc = acc * alpha + dt(e) @ v``       p rounded to the input dtype for the tensor
                                               cores (flash attention's ``P.to(dt)``), the
                                               product accumulated in f32 from zero
    6. each split's ``(m, l, acc)`` -> ``attention_pallas.combine_splits``: the splits
       rescaled to the global max, ``o = dt(sum acc / sum l)``, one rounding; a row with
       no visible key gives 0.

Its bits are not the recipe's (normalised after the PV sum): within its own budgets,
``implementations.mosaic_flash`` in tolerances.yaml. With the Triton kernel's splits and
blocks it matches that kernel on 99.9% of outputs (1 ulp elsewhere). ``approx=True``
computes exp as ex2.approx (Triton's exp; 0.3 us faster a 7B step, up to 14 ulps off on
tiny outputs); the default is XLA's exp.

Masks: one query a batch row sees a set of keys that depends on the key alone, so every
mask of ``gqa_attention`` (causality at the query's position, a sliding window,
``kv_valid``, positions, segments) is one boolean ``[B, S]`` (``vis``), fetched by TMA
with each key block. A cache length S that is not a multiple of the key blocks reads
past the end (TMA fills zeros) and masks those keys. With a mask the splits read only
each batch row's span of blocks from its first visible key through its last
(``attention_pallas.block_span``, dealt out by ``deal_blocks`` as in the Pallas
split-key kernels; dynamic loop counts in both warpgroups): a decode step against a
preallocated cache reads its filled part (a 7B step with 512 of 32768 slots filled:
7.3 us against 28.7 before, a full cache 30.2 against 29.2; H100,
benchmarks/results/probe_decode_span_mosaic_h100.json), and a cache of any length
filled to the same keys gives the same bits.

``fuse=True`` (session 13, measured slower: 28.3 us a 7B step against 27.5 with the
combine as a second launch, ``probe_decode_mosaic.py --fused``; not used by
``gqa_attention``) moves step 6 into the kernel: the head's last H / 16 programs wait on
a semaphore for every split's partials and sum 16 columns each (:func:`_combine`), in
registers, the sum over the splits in split order (within 1 ulp of ``combine_splits``).

What it takes (:func:`why_not` names what is missing): a Hopper GPU (compute
capability 9.x), bf16/f16, one query (T = 1), H a multiple of 64, G <= 64 query heads
per kv head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._checks import dtype_name
from kernels._grad import with_derivative_of
from kernels.attention import _all_keys_used, _mask_vectors, _visible, gqa_attention, tanh_f32
from kernels.linear_mosaic import hopper

_OP = "gqa_attention"
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
ROWS = 64  # one warpgroup's wgmma M: a kv head's G query rows, padded
BLOCK_K = 64  # keys a step (k and v tiles of 64 x H)


def default_stages(h: int) -> int:
    """Key blocks in flight: 2 for H = 128 (a 7B step 27.3 us against 27.8 with 3 and 28.2
    with 4), 3 for H = 64, whose blocks are half the bytes (0.5B: 11.7 us against 12.0 with
    2 or 4; results/probe_decode_mosaic_stages_h100.json)."""
    return 3 if h <= 64 else 2


Q_MODES = ("rows", "padded")
# Compute warpgroups: with 2, each takes every other key block with its own partial sums;
# measured slower than 1 (7B: 27.3 against 25.9 us, results/probe_decode_mosaic_read_h100.json).
WARPGROUPS = 1


def default_splits(s: int, kh: int, b: int = 1, *, block_k: int, num_sms: int) -> int:
    """Splits of the keys a (batch row, kv head): the largest power of two with
    ``B * K * splits <= num_sms`` (one program a SM), at most one a key block."""
    n = 1
    while b * kh * n * 2 <= num_sms and n * 2 * block_k <= max(s, block_k):
        n *= 2
    return n


def why_not(q_shape, k_shape, dtype) -> str:
    """What :func:`mosaic_decode` needs that ``q [B,T,N,H]``, ``k [B,S,K,H]`` here lack, every
    reason joined by "; " ("" when it can take them). The GPU comes last, so that off a
    Hopper GPU an otherwise valid call names only that."""
    _, t, n, h = q_shape
    kh = k_shape[2]
    reasons = {
        f"bfloat16/float16 inputs (got {jnp.dtype(dtype).name})": jnp.dtype(dtype) not in DTYPES,
        f"one query a batch row, a decode step (got T = {t})": t != 1,
        f"a head dim that is a multiple of 64 (got H = {h})": h % 64 != 0,
        f"at most {ROWS} query heads per kv head (got {n // kh})": n // kh > ROWS,
        f"a Hopper GPU (compute capability 9.x; JAX's default device is {jax.devices()[0].device_kind!r})":
            not hopper(),
    }
    return "; ".join(why for why, hit in reasons.items() if hit)


def _flash_update(acc, alpha, pv):
    """Step 5's running sum, ``acc * alpha + pv``: ``acc [ROWS, H]`` f32 rescaled to the new
    row max (``alpha [ROWS]``), plus the block's f32 product ``pv`` (summed from zero)."""
    return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv


def _kernel(q_ref, k_ref, v_ref, vis_ref, span_ref, m_ref, l_ref, acc_ref, o_ref, scoped, *, scale, softcap, g, rp,
            block_k, steps, n_split, stages, wgs, q_mode, fuse, trim):
    """One (key split, kv head, batch row) program: warpgroups ``0 .. wgs - 1`` compute, each
    on every ``wgs``-th of the split's key blocks with its own ``(m, l, acc)``; warpgroup
    ``wgs`` loads. ``vis_ref`` (None: every key visible): int32 ``[B, blocks, block_k +
    VIS_TAIL]``, a key block's record (:func:`_vis_records`), fetched with the block;
    ``span_ref`` (with it): int32 ``[B, 2]``, the row's span of blocks with a visible key,
    of which split ``j`` reads its share (``attention_pallas.deal_blocks``: a dynamic count,
    maybe 0); without it split ``j`` reads its ``steps`` blocks. ``fuse``: the compute
    warpgroup then takes part in the fused combine (:func:`_combine`, less ``trim``)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from kernels.attention_pallas import deal_blocks

    (q_plain, q_smem, k_smem, v_smem, vis_smem, o_smem, ml_smem, out_smem), \
        (k_full, v_full, vis_full, q_full, q_ready, o_turn), (k_free, v_free) = scoped
    masked = vis_ref is not None
    j, c, b = lax.axis_index("split"), lax.axis_index("head"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    dt = k_ref.dtype
    h = k_ref.shape[-1]

    def blocks():  # (the split's first key block, its count); read by each warpgroup where it needs them
        if span_ref is None:
            return j * steps, steps
        return deal_blocks(span_ref[b, 0], span_ref[b, 1], j, n_split=n_split)  # two scalar loads from memory

    @pl.when(wg < wgs)
    def _compute():
        plgpu.set_max_registers(232, action="increase")

        @pl.when(wg == 0)
        def _stage_q():  # q into wgmma's swizzled layout, once, for every compute warpgroup
            if q_mode == "rows":  # the head's G rows (TMA, issued first by the memory warpgroup), swizzled
                # Rows rp.. of q_plain stay as they are: wgmma's rows are independent and
                # the softmax is per row, so they only reach rows that are never stored.
                plgpu.barrier_wait(q_full)
                q_smem[...] = plgpu.load(q_plain, (), layout=plgpu.Layout.WGMMA)  # [ROWS, H], through registers
                plgpu.commit_smem()  # visible to the tensor cores
            else:  # q padded by XLA: [B, K, ROWS, H]
                plgpu.copy_gmem_to_smem(q_ref.at[b, c], q_smem, q_full)
                plgpu.barrier_wait(q_full)
            if wgs > 1:
                plgpu.barrier_arrive(q_ready)

        if wgs > 1:
            @pl.when(wg > 0)
            def _wait_q():
                plgpu.barrier_wait(q_ready)

        scale32 = jnp.float32(scale)
        zero = plgpu.layout_cast(jnp.zeros((ROWS, h), jnp.float32), plgpu.Layout.WGMMA)  # each PV sum's start

        def step(t, carry):
            m, l, acc = carry
            i = t * wgs + wg  # this warpgroup's t-th key block
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(k_full.at[slot])

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                return s_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_k), jnp.float32))  # [ROWS, bk] f32: step 1's q . k
            plgpu.barrier_arrive(k_free.at[slot])  # the product has read this k tile
            s = s * scale32  # step 1's scale, in f32
            if softcap is not None:  # in f32, the Triton kernel's arithmetic
                s = tanh_f32(s / jnp.float32(softcap)) * jnp.float32(softcap)
            if masked:  # [bk] along the scores' columns; a select, so NaN/inf of a masked key cannot leak
                plgpu.barrier_wait(vis_full.at[slot])  # once a block: a barrier's phase is counted per wait
                keep = plgpu.load(vis_smem.at[slot, pl.ds(0, block_k)], (), layout=plgpu.Layout.WGMMA.reduce(0)) != 0
                s = jnp.where(lax.broadcast_in_dim(keep, s.shape, [1]), s, -jnp.inf)  # [ROWS, bk]
            m_new = jnp.maximum(m, s.max(axis=1))  # [ROWS] step 2
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no finite score yet: avoid -inf - -inf
            alpha = jnp.exp(m - m_use)  # [ROWS] step 3
            e = jnp.exp(s - lax.broadcast_in_dim(m_use, s.shape, [0]))  # [ROWS, bk] f32
            l = l * alpha + e.sum(axis=1)  # [ROWS] step 4
            p = e.astype(dt)  # step 5's one rounding of p, for the tensor cores
            plgpu.barrier_wait(v_full.at[slot])
            if masked and trim != "zero_v":
                n_vis = vis_smem[slot, block_k]  # the block's visible keys

                @pl.when(n_vis != block_k)  # not all of them ...
                def _some_masked():
                    @pl.when(n_vis != 0)  # ... but some (none: the product is dropped below)
                    def _zero_masked_v():  # masked keys' v rows to 0 in shared memory: their p = 0 must not meet NaN
                        keep = plgpu.load(vis_smem.at[slot, pl.ds(0, block_k)], (),
                                          layout=plgpu.Layout.WGMMA.reduce(1)) != 0  # [bk] along v's rows
                        vt = plgpu.load(v_smem.at[slot], (), layout=plgpu.Layout.WGMMA)  # [bk, H] dt
                        v_smem.at[slot][...] = jnp.where(lax.broadcast_in_dim(keep, vt.shape, [0]), vt,
                                                         jnp.zeros_like(vt))
                        plgpu.commit_smem()  # visible to the tensor cores

            def pv(o_acc):
                plgpu.wgmma(o_acc, p, v_smem.at[slot])

            pv_sum = pl.run_state(pv)(plgpu.ACC.init(zero))  # [ROWS, H] f32, summed from zero
            if masked:  # no visible key: p = 0, and the product (of v rows that may hold NaN) is 0
                empty = plgpu.load(vis_smem.at[slot, pl.ds(block_k, ROWS)], (),
                                   layout=plgpu.Layout.WGMMA.reduce(1)) == 0  # [ROWS]: the count, on every row
                pv_sum = jnp.where(lax.broadcast_in_dim(empty, pv_sum.shape, [0]), zero, pv_sum)
            plgpu.barrier_arrive(v_free.at[slot])
            acc = _flash_update(acc, alpha, pv_sum)  # [ROWS, H] step 5
            return m_new, l, acc

        m0 = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l0 = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc0 = plgpu.layout_cast(jnp.zeros((ROWS, h), jnp.float32), plgpu.Layout.WGMMA)
        count = blocks()[1]
        # This warpgroup's blocks wg, wg + wgs, ... < count (static: steps // wgs; count >= 0,
        # so the dynamic division needs no floor correction).
        mine = steps // wgs if span_ref is None else lax.div(count + (wgs - 1) - wg, wgs)
        m, l, acc = lax.fori_loop(0, mine, step, (m0, l0, acc0))
        # This warpgroup's partials (part j * wgs + wg), the head's rp rows only: staged in
        # shared memory, stored by TMA; the compute warpgroups take the one staging buffer in turn.
        part = j * wgs + wg
        if wgs > 1:
            @pl.when(wg > 0)
            def _my_turn():
                plgpu.barrier_wait(o_turn)
        o_smem[...] = acc
        ml_smem.at[wg, 0][...] = m
        ml_smem.at[wg, 1][...] = l
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rp)], acc_ref.at[b, part, c])
        plgpu.copy_smem_to_gmem(ml_smem.at[wg, 0, pl.ds(0, rp)], m_ref.at[b, c, part])
        plgpu.copy_smem_to_gmem(ml_smem.at[wg, 1, pl.ds(0, rp)], l_ref.at[b, c, part])
        plgpu.wait_smem_to_gmem(0, wait_read_only=wgs > 1 or not fuse)  # fused: written, for the waiters
        if fuse:
            _combine(m_ref, l_ref, acc_ref, o_ref, out_smem, g=g, b=b, c=c, j=j, trim=trim)
        if wgs > 1:
            @pl.when(wg == 0)
            def _next_turn():
                plgpu.barrier_arrive(o_turn)
            plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        if q_mode == "rows":  # q first: 1-row tiles take rows of a [B, N, H] q whatever N is
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(c * g, rp)], q_plain.at[pl.ds(0, rp)], q_full)
        blk0, count = blocks()

        def fetch(i, slot):
            keys = (b, pl.ds((blk0 + i) * block_k, block_k), c)  # [bk, H], rows K * H apart in the cache
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_full.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_full.at[slot])
            if masked:  # the block's visibility, with v (it is read twice, before v is freed)
                plgpu.copy_gmem_to_smem(vis_ref.at[b, blk0 + i], vis_smem.at[slot], vis_full.at[slot])

        for i in range(stages):  # the first `stages` blocks into empty slots
            if span_ref is None:
                fetch(i, i)
            else:
                pl.when(i < count)(functools.partial(fetch, i, i))

        @pl.loop(0, steps - stages if span_ref is None else jnp.maximum(count - stages, 0))
        def _refill(i):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            fetch(i + stages, slot)


COMBINE_COLS = 16  # head-dim columns a waiter combines: [8 rows, 16 columns], one element a thread
# What ``_decode(trim=...)`` leaves out, for the probe's timing breakdowns only: "" nothing;
# of the fused combine's tail, "reset": the semaphores are left as they are (XLA zeroes
# them before each call), "sum": also the waiters' loads, sums and stores (they only wait:
# the synchronisation alone; the output is not computed); of the masked kernel, "zero_v":
# the masked keys' v rows are not zeroed (NaN/inf there would leak).
TRIMS = ("", "reset", "sum", "zero_v")


def _combine_layout(parts: int):
    """[parts, 8, COMBINE_COLS] f32 in one warpgroup: each thread holds one (row, column)'s
    ``parts`` values (warps: 4 x 2 rows; lanes: 2 rows x 16 columns), so the sums over the
    parts stay in its registers."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa

    t = fa.TiledLayout(fa.Tiling(((parts, 8, COMBINE_COLS), (2, COMBINE_COLS), (1,))), warp_dims=(-5,),
                       lane_dims=(-3, -2), vector_dim=-1, _check_canonical=False).canonicalize()
    return plgpu.Layout.TILED(t.tiling, warp_dims=t.warp_dims, lane_dims=t.lane_dims, vector_dim=t.vector_dim)


def _combine(m_ref, l_ref, acc_ref, o_ref, out_smem, *, g, b, c, j, trim):
    """The split combine, fused: every program of a (batch row, kv head) signals once its
    partials are in memory; the head's last ``H / 16`` programs (the waiters) each wait for
    all of them and combine 16 columns, as ``attention_pallas.combine_splits`` does. The
    semaphores are left at zero (the first waiter takes the others' reads back)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    _, parts, kh, rp, h = acc_ref.shape
    wn = h // COMBINE_COLS  # waiters a head
    done = pl.get_global(plgpu.SemaphoreType.REGULAR((o_ref.shape[0] * kh,)))  # partials in memory, a head
    read = pl.get_global(plgpu.SemaphoreType.REGULAR((o_ref.shape[0] * kh,)))  # waiters past their loads
    at = b * kh + c
    plgpu.semaphore_signal(done.at[at], 1, memory_scope="gpu")  # release: after the partials' TMA completed
    wi = j - (parts - wn)  # this program's waiter index (< 0: not a waiter)

    @pl.when(wi >= 0)
    def _wait_and_sum():
        plgpu.semaphore_wait(done.at[at], parts, decrement=False, memory_scope="gpu")  # acquire
        if trim == "sum":
            return
        lay = _combine_layout(parts)
        cols = pl.ds(wi * COMBINE_COLS, COMBINE_COLS)
        acc = plgpu.load(acc_ref.at[b, :, c, :, cols], (), layout=lay, optimized=False)  # [parts, 8, 16]
        mj = plgpu.load(m_ref.at[b, c], (), layout=lay.reduce(2), optimized=False)  # [parts, 8]
        lj = plgpu.load(l_ref.at[b, c], (), layout=lay.reduce(2), optimized=False)  # [parts, 8]
        m = mj.max(axis=0)  # [8]: the row max (max is order-free)
        m_use = jnp.where(m == -jnp.inf, 0.0, m)
        w = jnp.exp(mj - plgpu.layout_cast(lax.broadcast_in_dim(m_use, mj.shape, [1]), lay.reduce(2)))  # [parts, 8]
        l = (lj * w).sum(axis=0)  # [8]
        num = (acc * plgpu.layout_cast(lax.broadcast_in_dim(w, acc.shape, [0, 1]), lay)).sum(axis=0)  # [8, 16]
        l_use = jnp.where(l == 0.0, 1.0, l)  # a row with no visible key: 0 / 1
        o = num / plgpu.layout_cast(lax.broadcast_in_dim(l_use, num.shape, [0]), lay.reduce(0))  # [8, 16] f32
        out_smem[...] = o.astype(out_smem.dtype)  # one rounding of the f32 quotient to dt
        plgpu.commit_smem()

        if trim not in ("reset", "sum"):
            @pl.when(wi > 0)
            def _():
                plgpu.semaphore_signal(read.at[at], 1, memory_scope="gpu")

            @pl.when(wi == 0)
            def _():  # every waiter has read: both semaphores back to zero
                if wn > 1:
                    plgpu.semaphore_wait(read.at[at], wn - 1, memory_scope="gpu")
                plgpu.semaphore_wait(done.at[at], parts, memory_scope="gpu")

        plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, g)], o_ref.at[b, pl.ds(c * g, g), cols])  # the head's g rows
        plgpu.wait_smem_to_gmem(0)


VIS_TAIL = ROWS  # int32 words after a block's mask: its visible-key count, once a query row


def _vis_records(vis, *, s_pad: int, block_k: int):
    """bool ``vis [B, S]`` -> int32 ``[B, S_pad / bk, bk + VIS_TAIL]``: each key block's
    mask (1 visible, 0 masked; the keys past S masked) and then its count of visible keys,
    repeated for each of wgmma's rows, one TMA record a block (a multiple of 128 bytes, as
    TMA from a warpgroup needs). int32: the wgmma layouts take 32-bit words. The count
    lets the kernel skip zeroing the v rows of a block with every key visible, and drop
    the product of a block with none (its v rows may hold NaN)."""
    b, s = vis.shape
    keep = jnp.pad(vis.astype(jnp.int32), ((0, 0), (0, s_pad - s)))  # [B, S_pad]: past S masked
    keep = keep.reshape(b, s_pad // block_k, block_k)  # [B, blocks, bk]
    count = jnp.broadcast_to(keep.sum(axis=-1, keepdims=True), keep.shape[:2] + (VIS_TAIL,))  # [B, blocks, VIS_TAIL]
    return jnp.concatenate([keep, count], axis=-1)  # [B, blocks, bk + VIS_TAIL]


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "block_k", "num_splits", "stages", "wgs", "q_mode",
                                             "approx", "fuse", "trim"))
def _decode(q, k, v, vis=None, *, scale, softcap=None, block_k, num_splits, stages, wgs, q_mode, approx, fuse=False,
            trim=""):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from kernels.attention_pallas import block_span, combine_splits

    b, _, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    rp = -(-g // 8) * 8  # the head's rows stored: whole 8-row tiles
    chunk = block_k * num_splits * wgs
    s_pad = -(-s // chunk) * chunk  # keys as the grid walks them; past S, TMA reads zeros
    if s_pad != s and vis is None:
        vis = jnp.ones((b, s), jnp.bool_)  # [B, S]: only the keys past S are masked
    span = None
    if vis is not None:
        # Only the blocks from each row's first visible key through its last are read, dealt
        # out over the splits: a decode step against a preallocated cache reads its filled
        # part. Without a mask every block is read in the static splits (no span to load).
        span = block_span(vis, block_k=block_k)  # [B, 2]: first block, count
        vis = _vis_records(vis, s_pad=s_pad, block_k=block_k)  # [B, S_pad / bk, bk + VIS_TAIL]
    steps = s_pad // (block_k * num_splits)
    stages = min(stages, steps)
    parts = num_splits * wgs  # partial sums a head: one a compute warpgroup of each split
    if q_mode == "rows":
        qq = q.reshape(b, n, h)  # [B, N, H]: T = 1, a bitcast
    else:
        qq = jnp.pad(q.reshape(b, kh, g, h), ((0, 0), (0, 0), (0, ROWS - g), (0, 0)))  # [B, K, ROWS, H]
    swz = 128  # bytes: a 64-element bf16/f16 row
    tr = (plgpu.TilingTransform((8, swz // 2)), plgpu.SwizzleTransform(swz))
    o_tr = (plgpu.TilingTransform((8, swz // 4)), plgpu.SwizzleTransform(swz))  # f32
    dt = q.dtype
    masked = vis is not None

    def entry(q_ref, k_ref, v_ref, *refs):
        (vis_ref, span_ref), refs = (refs[:2], refs[2:]) if masked else ((None, None), refs)
        m_ref, l_ref, acc_ref, *o_ref = refs
        q_tr = (plgpu.TilingTransform((1, swz // 2)), plgpu.SwizzleTransform(swz))
        scratch = [plgpu.SMEM((ROWS, h), dt, transforms=q_tr),  # q as loaded: the head's rp rows (TMA), the rest unused
                   plgpu.SMEM((ROWS, h), dt, transforms=tr),  # q, wgmma's operand
                   plgpu.SMEM((stages, block_k, h), dt, transforms=tr),  # k blocks
                   plgpu.SMEM((stages, block_k, h), dt, transforms=tr),  # v blocks
                   plgpu.SMEM((stages, block_k + VIS_TAIL), jnp.int32),  # the blocks' records (masked only)
                   plgpu.SMEM((ROWS, h), jnp.float32, transforms=o_tr),  # acc staging
                   plgpu.SMEM((wgs, 2, ROWS), jnp.float32),  # m, l staging
                   plgpu.SMEM((8, COMBINE_COLS), dt)]  # the fused combine's output staging
        full = (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages), plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier())
        free = (plgpu.Barrier(num_arrivals=1, num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *scoped: _kernel(q_ref, k_ref, v_ref, vis_ref, span_ref, m_ref, l_ref, acc_ref,
                                    o_ref[0] if fuse else None, scoped, scale=scale, softcap=softcap, g=g, rp=rp,
                                    block_k=block_k, steps=steps, n_split=num_splits, stages=stages, wgs=wgs,
                                    q_mode=q_mode, fuse=fuse, trim=trim),
            scratch, full, free, collective_axes="wg")

    outs = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((b, kh, parts, rp), jnp.float32),
                  jax.ShapeDtypeStruct((b, kh, parts, rp), jnp.float32),
                  jax.ShapeDtypeStruct((b, parts, kh, rp, h), jnp.float32),
                  *([jax.ShapeDtypeStruct((b, n, h), dt)] if fuse else [])),
        grid=(num_splits, kh, b), grid_names=("split", "head", "batch"),
        num_threads=wgs + 1, thread_name="wg",  # compute warpgroups + 1 memory warpgroup
        # approx: exp as ex2.approx (Triton's exp, the Triton flash kernel's); else as XLA's.
        compiler_params=plgpu.CompilerParams(approx_math=approx),
    )(qq, k, v, *([vis, span] if masked else []))  # [B, K, parts, rp] x 2, [B, parts, K, rp, H] (, [B, N, H] fused)
    out = outs[3] if fuse else combine_splits(*outs, rows=g, dtype=dt)  # [B, N, H]
    return out.reshape(b, 1, n, h)  # [B, T = 1, N, H]


def mosaic_decode(q, k, v, vis=None, *, scale: float, softcap: float | None = None, block_k: int = BLOCK_K,
                  num_splits: int | None = None, stages: int | None = None, wgs: int = WARPGROUPS, q_mode: str = "rows",
                  approx: bool = False, fuse: bool = False) -> jax.Array:
    """One decode step (``q [B,1,N,H]``, caches ``k, v [B,S,K,H]``), recipe "fp32_logits"
    with flash numerics (module docstring). ``vis``: bool ``[B, S]``, the keys the query
    of each batch row sees (None: every key). ValueError, naming what is missing, where
    :func:`why_not` names a reason.

    ``num_splits``: key splits a kv head (default :func:`default_splits`: one program a
    SM); ``stages``: key blocks in flight (default :func:`default_stages`); ``q_mode``:
    ``"rows"`` loads a head's query rows from q in place, ``"padded"`` pads q to 64 rows a
    head in XLA first (one more launch);
    ``approx``: exp as ex2.approx; ``fuse``: the split combine inside the kernel (module
    docstring; one compute warpgroup, at most 8 query heads a kv head, fewer waiting
    programs than SMs).
    """
    why = why_not(q.shape, k.shape, q.dtype)
    if why:
        raise ValueError(f"mosaic_decode needs {why}")
    if q_mode not in Q_MODES:
        raise ValueError(f"mosaic_decode: q_mode must be one of {Q_MODES}, got {q_mode!r}")
    b, s, kh = k.shape[0], k.shape[1], k.shape[2]
    if vis is not None and (tuple(vis.shape) != (b, s) or vis.dtype != jnp.bool_):
        raise ValueError(f"mosaic_decode: vis must be bool [B, S] = [{b}, {s}], got {dtype_name(vis.dtype)} "
                         f"{tuple(vis.shape)}")
    if num_splits is None:
        num_splits = default_splits(s, kh, b, block_k=block_k, num_sms=jax.devices()[0].core_count)
    if stages is None:
        stages = default_stages(q.shape[-1])
    if stages % wgs:  # each compute warpgroup waits on its own slots only (a barrier's phase is per waiter)
        raise ValueError(f"mosaic_decode: stages ({stages}) must be a multiple of the compute warpgroups ({wgs})")
    if fuse and (wgs != 1 or q.shape[2] // kh > 8 or q.shape[-1] % COMBINE_COLS):
        raise ValueError("mosaic_decode: fuse=True takes one compute warpgroup and at most 8 query heads a kv head")
    if fuse and b * kh * (q.shape[-1] // COMBINE_COLS) >= jax.devices()[0].core_count:
        # The waiters spin: fewer of them than SMs leaves a SM for every program they wait on.
        raise ValueError("mosaic_decode: fuse=True needs fewer waiting programs (B * K * H / 16) than SMs")
    return _decode(q, k, v, vis, scale=float(scale), softcap=None if softcap is None else float(softcap),
                   block_k=block_k, num_splits=num_splits, stages=stages, wgs=wgs, q_mode=q_mode, approx=approx,
                   fuse=fuse)


def mosaic_attention(q, k, v, *, scale, causal, q_positions, kv_positions, kv_valid, segment_ids, sliding_window,
                     softcap, recipe):
    """``gqa_attention(implementation="mosaic_flash")`` (arguments checked there): every mask
    reduced to the one query's visible keys, ``vis [B, S]``, then :func:`mosaic_decode`.
    ValueError names every option it cannot honour; nothing falls back. Differentiable:
    ``jax.grad`` and ``jax.jvp`` see the XLA path's derivative (``kernels._grad``)."""
    b, t = q.shape[:2]
    s = k.shape[1]
    bad = []
    if recipe != "fp32_logits":
        bad.append(f"recipe='fp32_logits' (got {recipe!r}: flash numerics round unnormalised probabilities; "
                   f"implementation='pallas' keeps the recipe's bits)")
    why = why_not(q.shape, k.shape, q.dtype)
    if why:
        bad.append(why)
    if bad:
        raise ValueError(f"{_OP}: implementation='mosaic_flash' needs {'; '.join(bad)}. Use implementation="
                         f"'pallas_flash' (any GPU, every shape) or 'xla'.")
    opts = dict(scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap)

    def fast(q, k, v, masks):
        vis = None
        if not _all_keys_used(**masks, sliding_window=sliding_window):
            qp, kp, q_seg, kv_seg = _mask_vectors(b, t, s, masks["q_positions"], masks["kv_positions"],
                                                  masks["segment_ids"])
            vis = _visible(qp, kp, q_seg, kv_seg, masks["kv_valid"], causal=causal,
                           sliding_window=sliding_window)[:, 0]  # [B, S]
        return mosaic_decode(q, k, v, vis, scale=scale, softcap=softcap)

    def reference(q, k, v, masks):
        return gqa_attention(q, k, v, **masks, **opts, recipe=recipe, implementation="xla")

    masks = dict(q_positions=q_positions, kv_positions=kv_positions, kv_valid=kv_valid, segment_ids=segment_ids)
    # Differentiated as the XLA path (kernels._grad): a pallas_call has no transpose rule.
    return with_derivative_of(fast, reference)(q, k, v, masks)
