"""``linear`` as one Hopper GEMM that rounds in its own epilogue (Pallas on Mosaic GPU).

Why: XLA compiles ``kernels.linear``'s recipe (a float32 GEMM, the bias added in float32,
one rounding) to a cuBLAS GEMM that writes float32 and a separate convert, a float32
round trip through memory: the 7B gate/up projection ran at 0.79 of torch's ``F.linear``
(benchmarks/results/probe_mosaic_gemm_h100.json). Asking XLA for a bf16 output instead
is fast on large shapes but is not the recipe on small ones (probe_gemm_round.py: paths
without a float32 sum, up to 368 ulps off). Here the recipe is the kernel's own code, on
every shape it takes:

    1. ``acc = sum_k x[m, k] * w[k, n]``   wgmma, float32 accumulator (K in order, 64 a step)
    2. ``acc = acc + float32(b[n])``       the bias, in float32, after the whole sum
    3. ``y = dt(acc)``                     one rounding, to x's dtype (or none: ``out_dtype=float32``
                                           returns the accumulator itself, lm_head's float32 logits)

Bits: identical to ``kernels.linear``'s XLA path and to torch's ``F.linear`` (cuBLAS) on
every element of the seven Qwen2.5 prefill projections measured (probe_mosaic_gemm.py).

The weight is ``[K, N]`` (``w_layout="KN"``, linear's ``[in, out]``) or ``[N, K]`` (``"NK"``:
nn.Linear's ``[out, in]``, lm_head's ``[V, D]``); an ``[N, K]`` tile is K-contiguous like x's,
and wgmma reads it transposed in shared memory, so neither layout is copied.

The kernel: a persistent grid (one program per SM) walks the output tiles in a snake
order that keeps a band of x's rows in L2. Each program has two compute warpgroups,
each owning a ``tile_m x tile_n`` float32 accumulator, and one memory warpgroup that
streams x and w tiles into shared memory by TMA, ``steps`` K-steps ahead (a warp-
specialised pipeline). The epilogue rounds the accumulator, stages it in shared memory
64 x 64 at a time and stores it by TMA.

Hopper (compute capability 9.x) only: wgmma and TMA. bf16/f16 only (wgmma's float32
inputs are TF32). Shapes: x ``[M, K]`` with K % 64 == 0 and M, N divisible by a tiling's
block (:func:`tiling`); :func:`why_not` says why a call does not fit ("" when it does).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._checks import require_choice
from kernels._grad import with_derivative_of

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SEMANTICS = ("warpgroup", "lane")
TILE_K = 64  # K a step: 64 bf16 = 128 bytes, one 128-byte swizzle row
EPI = 64  # the epilogue's staging tile, EPI x EPI
MEMORY_REGISTERS = 40  # registers a thread of the memory warpgroup keeps (the rest go to compute)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """One program's output block: two warpgroups' ``tile_m x tile_n`` accumulators, side by
    side along ``wg_dim`` ("n": block ``tile_m x 2 tile_n``; "m": ``2 tile_m x tile_n``);
    ``steps`` K-steps in flight; tiles visited in bands ``band`` tiles wide along M; at most
    ``slots`` EPI x EPI output tiles a warpgroup staged in shared memory at once."""

    tile_m: int
    tile_n: int
    wg_dim: str
    steps: int
    band: int = 8
    slots: int = 2

    @property
    def block(self) -> tuple[int, int]:
        return (self.tile_m * (2 if self.wg_dim == "m" else 1), self.tile_n * (2 if self.wg_dim == "n" else 1))


# Tried in order (probe_mosaic_gemm.py, H100): 128 x 256 blocks for wide outputs (gate/up:
# 682 us against cuBLAS's 685), 256 x 128 when N is not a multiple of 256 (0.5B q/o), and
# 128 x 128 blocks when the big ones leave most SMs idle (k/v, N = 512: 20.9 us against
# 37 with 64 blocks on 132 SMs).
TILINGS = (Tiling(128, 128, "n", 4), Tiling(128, 128, "m", 4), Tiling(128, 64, "n", 5), Tiling(64, 128, "m", 5))


W_LAYOUTS = ("KN", "NK")  # the weight [K, N] (linear's [in, out]) or [N, K] (nn.Linear's, lm_head's [V, D])
SMEM_BYTES = 227 * 1024  # shared memory a Hopper block may use; the 7B 128 x 256 blocks with 4 steps and
# two bf16 staging slots take 225 KiB of it (smem_bytes)


def tiling(m: int, n: int, k: int, num_sms: int, *, out_itemsize: int = 2) -> Tiling | None:
    """The first of :data:`TILINGS` whose block divides ``[M, N]`` and gives at least half as
    many blocks as SMs; else the dividing one with the most blocks; None if none divides
    (or K % 64 != 0). Its staging slots are cut to keep a wider output (float32 logits) in
    the shared memory a bf16 one takes (:func:`_fit`)."""
    if k % TILE_K:
        return None
    fits = [t for t in TILINGS if m % t.block[0] == 0 and n % t.block[1] == 0]
    for t in fits:
        if (m // t.block[0]) * (n // t.block[1]) * 2 >= num_sms:
            return _fit(t, out_itemsize)
    best = max(fits, key=lambda t: (m // t.block[0]) * (n // t.block[1]), default=None)
    return None if best is None else _fit(best, out_itemsize)


def smem_bytes(t: Tiling, in_itemsize: int, out_itemsize: int) -> int:
    """Shared memory a program of tiling ``t`` allocates: ``steps`` x and w tiles in flight,
    each warpgroup's staging slots, the bias (at most 2 x 256 x 4 bytes, counted always)."""
    bm, bn = t.block
    return (t.steps * (bm + bn) * TILE_K * in_itemsize + 2 * _slots(t) * EPI * EPI * out_itemsize
            + 2 * t.tile_n * 4)


def _slots(t: Tiling) -> int:
    """Staging slots a warpgroup uses: ``t.slots``, at most its tile's count of EPI x EPI tiles."""
    return max(1, min(t.slots, (t.tile_m * t.tile_n) // (EPI * EPI)))


def _fit(t: Tiling, out_itemsize: int) -> Tiling:
    """``t`` with fewer staging slots, then fewer steps, until it fits :data:`SMEM_BYTES`."""
    while smem_bytes(t, 2, out_itemsize) > SMEM_BYTES and _slots(t) > 1:
        t = dataclasses.replace(t, slots=_slots(t) - 1)
    while smem_bytes(t, 2, out_itemsize) > SMEM_BYTES and t.steps > 2:
        t = dataclasses.replace(t, steps=t.steps - 1)
    return t


def hopper() -> bool:
    """Whether JAX's default device is a Hopper GPU (compute capability 9.x)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def why_not(x_shape, w_shape, dtype, *, w_layout: str = "KN", out_dtype=None) -> str:
    """Why :func:`mosaic_linear` cannot take this call here ("" when it can)."""
    if not hopper():
        return f"a Hopper GPU (compute capability 9.x; JAX's default device is {jax.devices()[0].device_kind!r})"
    if jnp.dtype(dtype) not in DTYPES:
        return f"bfloat16/float16 inputs (got {jnp.dtype(dtype).name}; float32 stays on XLA at full precision)"
    m = 1
    for s in x_shape[:-1]:
        m *= s
    k, n = w_shape if w_layout == "KN" else w_shape[::-1]
    out_itemsize = jnp.dtype(out_dtype or dtype).itemsize
    if tiling(m, n, k, jax.devices()[0].core_count, out_itemsize=out_itemsize) is None:
        blocks = ", ".join(f"{a}x{b}" for a, b in sorted({t.block for t in TILINGS}))
        return (f"K % {TILE_K} == 0 and [rows, N] divisible by one of the blocks {blocks} "
                f"(got rows = {m}, K = {k}, N = {n})")
    return ""


def _epilogue(acc, bias, dt):
    """Steps 2 and 3 on a float32 accumulator tile: the bias (float32, broadcast over rows,
    or None) added after the whole sum, then the one rounding to ``dt`` (none for float32)."""
    if bias is not None:
        acc = acc + bias
    return acc.astype(dt)  # the single rounding to the output dtype (a no-op for float32 logits)


def _body(*refs, t: Tiling, m_blocks: int, n_blocks: int, k_steps: int, has_bias: bool, semantics: str,
          w_layout: str):
    """One program (persistent over output blocks); refs: x, w, (b), out in GMEM."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    x_gmem, w_gmem = refs[0], refs[1]
    b_gmem = refs[2] if has_bias else None
    o_gmem = refs[-1]
    dt = x_gmem.dtype
    swizzle = plgpu.find_swizzle(TILE_K * jnp.dtype(dt).itemsize * 8)
    in_tr = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dt).itemsize)), plgpu.SwizzleTransform(swizzle))
    out_swizzle = plgpu.find_swizzle(EPI * jnp.dtype(o_gmem.dtype).itemsize * 8)
    out_tr = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(o_gmem.dtype).itemsize)),
              plgpu.SwizzleTransform(out_swizzle))
    bm, bn = t.block

    nk = w_layout == "NK"
    if nk:  # w [N, K]: a [bn, TILE_K] tile, K-contiguous as x's
        w_spec = plgpu.BlockSpec((bn, TILE_K), lambda kk: (0, kk), transforms=in_tr, memory_space=plgpu.SMEM)
    else:  # w [K, N]: a [TILE_K, bn] tile
        w_spec = plgpu.BlockSpec((TILE_K, bn), lambda kk: (kk, 0), transforms=in_tr, memory_space=plgpu.SMEM)

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_steps,), memory_registers=MEMORY_REGISTERS,
            in_specs=[plgpu.BlockSpec((bm, TILE_K), lambda kk: (0, kk), transforms=in_tr, memory_space=plgpu.SMEM),
                      w_spec],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=t.steps, compute_context=compute_context)

    slots = _slots(t)  # double-buffered staging where the tiling allows (see _fit)
    scratch = dict(
        allocs=pipeline(lambda *a, **k: None, lambda *a, **k: None).get_allocations(x_gmem, w_gmem),
        out_smem=plgpu.SMEM((2, slots, EPI, EPI), o_gmem.dtype, transforms=out_tr),  # [wg, slot, EPI, EPI]
    )
    if has_bias:
        scratch["b_smem"] = plgpu.SMEM((2, t.tile_n), b_gmem.dtype)  # [wg, tile_n]: this block's bias
        scratch["b_bar"] = plgpu.Barrier(num_barriers=2)

    @functools.partial(pl.run_scoped, **scratch, collective_axes="wg")
    def _scope(allocs, out_smem, b_smem=None, b_bar=None):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_blocks * n_blocks,), collective_axes="sm")
        def _blocks(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_blocks, n_blocks), 0, t.band)  # bands along M
            # This warpgroup's tile within the block.
            wm = pl.ds(wg * t.tile_m, t.tile_m) if t.wg_dim == "m" else slice(None)
            wn = pl.ds(wg * t.tile_n, t.tile_n) if t.wg_dim == "n" else slice(None)
            n0 = ni * bn + (wg * t.tile_n if t.wg_dim == "n" else 0)  # this tile's first column

            def compute_context(run_pipeline):
                if has_bias:  # fetch the tile's bias while the K loop runs
                    plgpu.copy_gmem_to_smem(b_gmem.at[pl.ds(n0, t.tile_n)], b_smem.at[wg], b_bar.at[wg])

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((t.tile_m, t.tile_n), jnp.float32))
                def _acc(acc_ref):
                    run_pipeline(acc_ref)
                    acc = acc_ref[...]  # [tile_m, tile_n] f32: step 1, the whole K sum
                    bias = None
                    if has_bias:
                        plgpu.barrier_wait(b_bar.at[wg])
                        if semantics == "lane":  # the accumulator's column layout, named
                            b = plgpu.load(b_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(0))
                        else:  # warpgroup semantics infer it
                            b = b_smem.at[wg][...]
                        # float32(b): b's values are exact in f32, so the add below is the one rounding step 2 has
                        bias = lax.broadcast_in_dim(b.astype(jnp.float32), (t.tile_m, t.tile_n), (1,))
                    y = _epilogue(acc, bias, o_gmem.dtype)  # [tile_m, tile_n] in x's dtype
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last block's stores have read out_smem
                    for i in range(t.tile_m // EPI):
                        for j in range(t.tile_n // EPI):
                            slot = (i * (t.tile_n // EPI) + j) % slots
                            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)  # this slot is free
                            out_smem[wg, slot] = y[i * EPI:(i + 1) * EPI, j * EPI:(j + 1) * EPI]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot],
                                o_gmem.at[pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)].at[wm, wn]
                                .at[pl.ds(i * EPI, EPI), pl.ds(j * EPI, EPI)])

            def mma(_, x_smem, w_smem, acc_ref):
                # w's [TILE_K, tile_n] operand; from an [N, K] tile, its transpose (wgmma reads it so)
                w_op = plgpu.transpose_ref(w_smem.at[wn], (1, 0)) if nk else w_smem.at[:, wn]
                plgpu.wgmma(acc_ref, x_smem.at[wm], w_op)
                plgpu.wgmma_wait(0)
                return acc_ref

            w_block = w_gmem.at[pl.ds(ni * bn, bn), :] if nk else w_gmem.at[:, pl.ds(ni * bn, bn)]
            pipeline(mma, compute_context)(x_gmem.at[pl.ds(mi * bm, bm), :], w_block, allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # every store issued has read its staging tile


@functools.partial(jax.jit, static_argnames=("t", "num_sms", "semantics", "w_layout", "out_dtype"))
def _call(x2, w, b, *, t: Tiling, num_sms: int, semantics: str, w_layout: str = "KN", out_dtype=None):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x2.shape
    n = w.shape[1] if w_layout == "KN" else w.shape[0]
    bm, bn = t.block
    body = functools.partial(_body, t=t, m_blocks=m // bm, n_blocks=n // bn, k_steps=k // TILE_K,
                             has_bias=b is not None, semantics=semantics, w_layout=w_layout)
    sem = plgpu.LoweringSemantics.Warpgroup if semantics == "warpgroup" else plgpu.LoweringSemantics.Lane
    out = jax.ShapeDtypeStruct((m, n), out_dtype or x2.dtype)  # [M, N]
    f = plgpu.kernel(body, out_type=out, grid=(num_sms,), grid_names=("sm",),
                     num_threads=3, thread_name="wg",  # 2 compute warpgroups + 1 memory warpgroup
                     compiler_params=plgpu.CompilerParams(lowering_semantics=sem))
    return f(x2, w, b) if b is not None else f(x2, w)


def mosaic_linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *, semantics: str = "warpgroup",
                  w_layout: str = "KN", out_dtype: str | None = None, op: str = "linear") -> jax.Array:
    """``kernels.linear(x, w, b)`` (same recipe; arguments checked there) as the Hopper GEMM
    above. ValueError, naming what is missing, where :func:`why_not` names a reason.

    ``semantics``: Mosaic GPU's lowering, ``"warpgroup"`` or ``"lane"``; both lower this
    kernel to the same bits at the same speed (probe_mosaic_gemm.py), the choice is kept so
    that a JAX release that breaks one can be checked against the other.
    ``w_layout``: ``"KN"`` (w ``[K, N]``) or ``"NK"`` (w ``[N, K]``, read in place).
    ``out_dtype``: None (x's dtype: step 3 rounds) or ``"float32"`` (the accumulator, unrounded:
    lm_head's float32 logits). ``op`` names the caller in errors.
    Differentiable: ``jax.grad`` and ``jax.jvp`` see the XLA path's derivative (``kernels._grad``).
    """
    require_choice("semantics", semantics, SEMANTICS, op=op)
    require_choice("w_layout", w_layout, W_LAYOUTS, op=op)
    require_choice("out_dtype", out_dtype, (None, "float32"), op=op)
    why = why_not(x.shape, w.shape, x.dtype, w_layout=w_layout, out_dtype=out_dtype)
    if why:
        raise ValueError(f"{op}: implementation='mosaic' needs {why}; use implementation='xla'")
    k, n = w.shape if w_layout == "KN" else w.shape[::-1]
    num_sms = jax.devices()[0].core_count

    def fast(x, w, b):
        x2 = x.reshape(-1, k)  # [M, K]: the leading dims flattened (free for a contiguous x)
        t = tiling(x2.shape[0], n, k, num_sms, out_itemsize=jnp.dtype(out_dtype or x.dtype).itemsize)
        out = _call(x2, w, b, t=t, num_sms=num_sms, semantics=semantics, w_layout=w_layout,
                    out_dtype=out_dtype)  # [M, N]
        return out.reshape(*x.shape[:-1], n)  # [..., N]

    def reference(x, w, b):
        from kernels.projection import lm_head, linear  # the XLA path; that module imports this one on demand

        if out_dtype is None:
            return linear(x, w if w_layout == "KN" else w.T, b, implementation="xla")  # w.T: [K, N]
        logits = lm_head(x, w, logits_dtype="float32", w_layout="DV" if w_layout == "KN" else "VD",
                         implementation="xla")
        return logits if b is None else logits + b.astype(jnp.float32)  # the bias, in float32 as the epilogue adds it

    # Differentiated as the XLA path (kernels._grad): a pallas_call has no transpose rule.
    return with_derivative_of(fast, reference)(x, w, b)
