"""Fused GQA attention as one Pallas (Triton) kernel, bit-compatible with ``gqa_attention``.

Same layout, masks and rounding recipes as :func:`kernels.attention.gqa_attention`
(its module docstring is the specification): ``q[B,T,N,H]``, ``k[B,S,K,H]``,
``v[B,S,K,H]`` -> ``out[B,T,N,H]`` in q's dtype; query head ``n`` reads kv head
``n // G`` (``G = N // K``) straight from k/v through the BlockSpec index map, so the
repeated kv heads are never materialised.

Dtype recipe, per (batch, query head, block of ``block_q`` queries) program, ``dt`` the
input dtype, ``scale`` taken as an f32 scalar:

``"hf"`` (transformers' eager attention):
    1. ``s = dt(q @ k^T)``                       f32 accumulation, rounded once to dt
    2. ``s = dt(f32(s) * f32(scale))``
    3. softcap ``cap``: ``s = dt(f32(s) / cap)``, ``s = dt(tanh(f32(s)))``, ``s = dt(f32(s) * cap)``
       (``tanh`` is ``kernels.attention.tanh_f32``'s arithmetic, in both recipes)
    4. mask (boolean: masked keys are excluded), then in f32:
       ``m = max(s[visible])``, ``e = exp(s - m)``, ``p = dt(e * (1 / sum(e)))``
    5. ``out = dt(f32acc(p @ v))``
``"fp32_logits"``:
    1. ``s = f32(q @ k^T) * f32(scale)``, kept in f32
    2. softcap in f32: ``s = tanh(s / cap) * cap``
    3-4. as steps 4-5 of "hf" (softmax in f32, ``p`` rounded to dt, PV in f32, one rounding)

Why two passes over the keys. Step 4 rounds ``p`` to dt *after* dividing by the row
sum, so the flash-attention trick (accumulate ``exp(s - m_running) @ v`` and divide at
the end, rescaling as the running max grows) would round a different number and
cannot reproduce these bits. Instead each program walks its keys twice:

* pass 1: per key block, the recipe's scores; running row max ``m`` and running sum
  ``l`` of ``exp(s - m)`` with online rescaling ``l = l * exp(m_old - m_new) + sum(exp(s - m_new))``,
  all f32. The final ``m`` is exactly the row max (max is order-free); ``l`` equals
  XLA's row sum up to f32 reordering and rescaling (relative error ~1e-7);
* pass 2: per key block, the same scores again, ``p = dt(exp(s - m) * (1 / l))``,
  ``acc += p @ v`` in f32; at the end ``out = dt(acc)``.

Trade: memory stays O(block) per program (nothing of size ``T x S`` ever exists, unlike
the ``[B,N,T,S]`` scores of the XLA path); the price is computing ``q k^T`` twice, so
the kernel does 1.5x the matmul flops of flash attention (2 QK^T + 1 PV instead of
1 + 1) and reads k twice. For decode (T small) the kernel is bandwidth-bound and
pass 1 reads only k, so the extra cost is about one more read of k.

Masks are computed per tile from int32 vectors (positions, validity, segment ids)
blocked along T and S; no ``[T,S]`` mask is materialised. A query row with no visible
key returns exactly 0. NaN/inf in k or v of keys that no row of a tile may see cannot
reach the output: masked scores are replaced by a select (never multiplied), and the
v rows of keys that no row of the tile sees are zeroed before the PV product (so
``0 * NaN`` cannot occur).

Triton constraints (the wrapper handles them): every block dimension must be a power
of two and ``tl.dot`` needs each of M, N, K >= 16, so ``block_q``/``block_k`` must be
powers of two >= 16 (they are clamped down to the padded sequence lengths), and a
head dim that is not a power of two (80, 96, ...) is zero-padded up to one (zero
columns add exact zeros to ``q . k`` and give zero output columns, which are dropped).
T and S are padded up to block multiples: padded keys are invisible, padded query
rows are dropped.

"Round to dt" inside the kernel: in interpret mode (lowered by XLA) through
``kernels._round.round_to``, a rounding XLA's simplifier cannot drop as excess
precision; on Triton as the convert pair ``f32(dt(x))``, which Triton executes (it has
no lowering for ``reduce_precision``). Both give the same values.

What differs from the XLA path is only the order of f32 sums (the row sum, the PV
accumulation per key block, the ``q . k`` dot), in interpret mode too. In bf16/f16 such
an f32 difference of an ulp occasionally flips the dt rounding of a probability or of
an "hf" score, which moves that row's outputs by an ulp or a few of their terms
(tests/test_attention_pallas.py bounds this). On a GPU, Triton's f32 ``x / y`` is
``div.full.f32`` (<= 2 ulp; used for ``1 / l`` and in the softcap) and its ``exp`` is
libdevice's ``__nv_expf``, where XLA's GPU code may use other implementations: more
f32-ulp differences of the same kind.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels._round import round_to, round_to_in_kernel
from kernels.attention import _check, tanh_f32

_OP = "pallas_attention"
_MIN_BLOCK = 16  # tl.dot's smallest M, N and K


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _require_pow2_block(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < _MIN_BLOCK or value & (value - 1):
        raise ValueError(f"{_OP}: {name} must be a power of two >= {_MIN_BLOCK} (Triton block shapes and "
                         f"tl.dot's minimum), got {value!r}")


def _require_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{_OP}: {name} must be a positive int, got {value!r}")


def _tile_scores(q, k, *, scale, softcap, recipe, exact):
    """Recipe steps 1-3 on one tile: ``q[bq,H] . k[bk,H] -> s[bq,bk]`` in f32 (on dt's grid for "hf")."""
    dt = q.dtype
    # HIGHEST: f32 inputs must use IEEE products (Triton's default for f32 is TF32).
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)  # [bq, bk] f32 accumulation
    scale32 = jnp.float32(scale)
    if recipe == "fp32_logits":
        s = s * scale32
        if softcap is not None:
            cap = jnp.float32(softcap)
            s = tanh_f32(s / cap) * cap
        return s
    # Round 1: the "hf" matmul returns dt (torch's matmul output dtype).
    s = round_to_in_kernel(s, dt, interpret=exact)
    # Round 2: `* scaling` on a dt tensor computes in f32 and rounds back to dt.
    s = round_to_in_kernel(s * scale32, dt, interpret=exact)
    if softcap is not None:
        cap = jnp.float32(softcap)
        # Gemma 2's three dt-tensor ops: each computed in f32 and rounded to dt.
        s = round_to_in_kernel(s / cap, dt, interpret=exact)
        s = round_to_in_kernel(tanh_f32(s), dt, interpret=exact)
        s = round_to_in_kernel(s * cap, dt, interpret=exact)
    return s  # f32 values on dt's grid: exactly the f32 upcast the softmax makes of HF's dt scores


def _kernel(q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, kval_ref, o_ref, *,
            scale, softcap, recipe, causal, sliding_window, has_segments, skip_blocks, plain_interior,
            block_q, block_k, num_kblocks, q_offset, t_len, exact):
    """One (batch, query head, query block) program: two passes over the key blocks.

    ``plain_interior`` (causal, default positions, no other mask): key blocks wholly
    before the block's first query are visible to every real row, so a ``lax.cond``
    skips their mask arithmetic and the zeroing of unused v rows. The scores, the
    softmax and the products are the same code for every tile (only the mask is in the
    cond): a compiler cannot round them differently in the two kinds of tile.
    """
    i = pl.program_id(2)
    dt = q_ref.dtype
    q = q_ref[...]  # [bq, Hp] dt
    qpos = qpos_ref[...]  # [bq] int32
    qseg = qseg_ref[...] if has_segments else None  # [bq] int32
    # Padded query rows (row >= T) see no key: they are dropped, and must not mark a key
    # as seen by the tile (that would let its v into the PV product as 0 * v).
    real_row = (i * block_q + jnp.arange(block_q, dtype=jnp.int32)) < t_len  # [bq]

    # Key blocks to visit. With the default positions (query row t at S - T + t, key s at s)
    # the blocks past the last query's position are entirely masked by causality and, with
    # a sliding window, so are the blocks before the first query's window: skipping them
    # changes no number (a fully masked block adds exp(-inf) = 0 to l and nothing to acc).
    lo, hi = 0, num_kblocks
    if skip_blocks:
        last_pos = q_offset + (i + 1) * block_q - 1  # position of the block's last row
        hi = jnp.minimum(num_kblocks, last_pos // block_k + 1)
        if sliding_window is not None:
            first_pos = q_offset + i * block_q  # position of the block's first row
            lo = jnp.maximum(0, (first_pos - sliding_window + 1) // block_k)
            lo = jnp.minimum(lo, hi)

    # Key blocks below `mid` lie wholly before the block's first query (plain_interior).
    mid = jnp.clip((q_offset + i * block_q + 1) // block_k, lo, hi) if plain_interior else lo

    def tile(j):
        """Scores ``[bq,bk]`` (f32) and visibility ``[bq,bk]`` of key block j."""
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]  # [bk, Hp] dt

        def masked():
            kpos = kpos_ref[pl.ds(start, block_k)]  # [bk] int32
            vis = real_row[:, None] & (kval_ref[pl.ds(start, block_k)] != 0)[None, :]  # [bq, bk] T/S padding, kv_valid
            if causal:
                vis = vis & (kpos[None, :] <= qpos[:, None])  # [bq, bk]
            if sliding_window is not None:
                vis = vis & (qpos[:, None] - kpos[None, :] < sliding_window)  # the W keys up to the query
            if has_segments:
                kseg = kseg_ref[pl.ds(start, block_k)]  # [bk] int32
                vis = vis & (qseg[:, None] == kseg[None, :])  # [bq, bk]
            return vis

        if plain_interior:  # interior tiles: only the padded query rows are invisible
            vis = lax.cond(j < mid, lambda: jnp.broadcast_to(real_row[:, None], (block_q, block_k)), masked)
        else:
            vis = masked()
        s = _tile_scores(q, k, scale=scale, softcap=softcap, recipe=recipe, exact=exact)  # [bq, bk] f32
        # A select, never arithmetic, removes masked scores: NaN/inf there cannot leak.
        return jnp.where(vis, s, -jnp.inf), vis

    # Pass 1: row max m and row sum l of exp(s - m), online, in f32.
    def pass1(j, carry):
        m, l = carry
        s, _ = tile(j)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [bq]
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no visible key yet: avoid -inf - -inf
        alpha = jnp.exp(m - m_use)  # [bq]: 1 exactly when the max did not move, 0 from -inf
        l = l * alpha + jnp.sum(jnp.exp(s - m_use[:, None]), axis=1)  # [bq]
        return m_new, l

    m0 = jnp.full((block_q,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((block_q,), jnp.float32)
    m, l = lax.fori_loop(lo, hi, pass1, (m0, l0))
    m = jnp.where(m == -jnp.inf, 0.0, m)  # a row with no visible key: every e is exp(-inf) = 0
    inv_l = 1.0 / jnp.where(l == 0.0, 1.0, l)  # reciprocal then multiply, as kernels.softmax

    # Pass 2: the same scores, p = dt(exp(s - m) * (1 / l)), acc += p @ v in f32.
    def pass2(j, acc):
        s, vis = tile(j)
        p = jnp.exp(s - m[:, None]) * inv_l[:, None]  # [bq, bk] f32
        if exact:  # interpret mode: on dt's grid first, so that XLA cannot skip the rounding below
            p = round_to(p, dt)
        # Probabilities rounded to dt for the PV matmul (HF's .to(query.dtype)).
        p = p.astype(dt)  # [bq, bk]
        start = pl.multiple_of(j * block_k, block_k)
        v = v_ref[pl.ds(start, block_k), :]  # [bk, Hp] dt
        # Keys no row of this tile sees: zero v so that p = 0 never meets NaN/inf (0 * NaN).
        # (Every key of an interior tile is seen by the block's first row, a real one.)
        def zero_unused():
            used = jnp.max(jnp.where(vis, 1, 0), axis=0) > 0  # [bk]
            return jnp.where(used[:, None], v, jnp.zeros((), dt))  # [bk, Hp]

        v = lax.cond(j < mid, lambda: v, zero_unused) if plain_interior else zero_unused()
        return acc + jnp.dot(p, v, precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)  # [bq, Hp] f32 accumulation

    acc = lax.fori_loop(lo, hi, pass2, jnp.zeros(o_ref.shape, jnp.float32))
    # One rounding of the f32 accumulator to dt, as torch's matmul output.
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=(
    "scale", "causal", "sliding_window", "softcap", "recipe", "block_q", "block_k", "num_warps",
    "num_stages", "interpret", "default_positions", "has_segments", "all_valid"))
def _pallas_attention(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, *, scale, causal, sliding_window,
                      softcap, recipe, block_q, block_k, num_warps, num_stages, interpret, default_positions,
                      has_segments, all_valid):
    """The padded pallas_call; arguments already checked and completed by :func:`pallas_attention`."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq = min(block_q, max(_MIN_BLOCK, _next_pow2(t)))  # no block larger than the padded T needs
    bk = min(block_k, max(_MIN_BLOCK, _next_pow2(s)))
    tp = -(-t // bq) * bq  # T padded to a multiple of bq
    sp = -(-s // bk) * bk  # S padded to a multiple of bk
    hp = max(_MIN_BLOCK, _next_pow2(h))  # Triton block dims are powers of two

    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, hp - h)))  # [B, Tp, N, Hp]; zero rows/columns
    k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, hp - h)))  # [B, Sp, K, Hp]
    v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, hp - h)))  # [B, Sp, K, Hp]
    if default_positions:  # q_pos and kv_pos are None: the defaults, S - T + t and s
        # Padded query rows continue the positions (they see no key and are dropped).
        q_pos = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32) + (s - t), (b, tp))  # [B, Tp]
        kv_pos = jnp.broadcast_to(jnp.arange(sp, dtype=jnp.int32), (b, sp))  # [B, Sp]
    else:
        q_pos = jnp.pad(q_pos, ((0, 0), (0, tp - t)))  # [B, Tp]
        kv_pos = jnp.pad(kv_pos, ((0, 0), (0, sp - s)))  # [B, Sp]
    # Validity as int32 (boolean refs are not portable to Triton); padded keys are invalid.
    kv_valid = jnp.pad(kv_valid.astype(jnp.int32), ((0, 0), (0, sp - s)))  # [B, Sp]
    q_seg = jnp.pad(q_seg, ((0, 0), (0, tp - t)))  # [B, Tp]
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, sp - s)))  # [B, Sp]

    kernel = functools.partial(
        _kernel, scale=scale, softcap=softcap, recipe=recipe, causal=causal, sliding_window=sliding_window,
        has_segments=has_segments, skip_blocks=causal and default_positions,
        plain_interior=causal and default_positions and all_valid and not has_segments and sliding_window is None,
        block_q=bq, block_k=bk, num_kblocks=sp // bk, q_offset=s - t, t_len=t, exact=interpret)
    sq = pl.squeezed
    q_spec = pl.BlockSpec((sq, bq, sq, hp), lambda bi, ni, i: (bi, i, ni, 0))
    kv_spec = pl.BlockSpec((sq, sp, sq, hp), lambda bi, ni, i: (bi, 0, ni // g, 0))  # GQA: kv head n // G
    qvec_spec = pl.BlockSpec((sq, bq), lambda bi, ni, i: (bi, i))
    kvec_spec = pl.BlockSpec((sq, sp), lambda bi, ni, i: (bi, 0))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, tp, n, hp), q.dtype),
        grid=(b, n, tp // bq),
        in_specs=[q_spec, kv_spec, kv_spec, qvec_spec, qvec_spec, kvec_spec, kvec_spec, kvec_spec],
        out_specs=q_spec,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="pallas_attention",
    )(q, k, v, q_pos, q_seg, kv_pos, kv_seg, kv_valid)  # [B, Tp, N, Hp]
    return out[:, :t, :, :h]  # [B, T, N, H]


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    kv_valid: jax.Array | None = None,
    segment_ids=None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    recipe: str = "hf",
    block_q: int = 64,
    block_k: int = 32,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """Grouped-query attention as one fused Pallas kernel; the numbers of :func:`gqa_attention`.

    Args:
      q: queries ``[B,T,N,H]``; k, v: keys and values ``[B,S,K,H]``; one float dtype.
      scale, causal, q_positions, kv_positions, kv_valid, segment_ids, sliding_window,
        softcap, recipe: as :func:`kernels.attention.gqa_attention` (same defaults, same masks).
      block_q, block_k: queries / keys per tile, powers of two >= 16 (clamped down to the
        padded T / S). num_warps, num_stages: Triton's launch and pipelining parameters.
        The defaults (64, 32, 4, 3) were the fastest of 11 shapes for a causal N28 K4 H128
        prefill of 4096 bf16 tokens on an H100 (benchmarks/results/pallas_tune_h100.json).
      interpret: run the kernel through Pallas' interpreter (any backend, CPU included).

    Dtype recipe, step by step: the module docstring (the same as ``gqa_attention``'s).

    Returns:
      ``[B,T,N,H]`` in q's dtype. A query with no visible key gives zeros.
    """
    _check(q, k, v, scale=scale, q_positions=q_positions, kv_positions=kv_positions, kv_valid=kv_valid,
           segment_ids=segment_ids, causal=causal, sliding_window=sliding_window, softcap=softcap,
           recipe=recipe, q_chunk=None)
    _require_pow2_block("block_q", block_q)
    _require_pow2_block("block_k", block_k)
    _require_positive_int("num_warps", num_warps)
    _require_positive_int("num_stages", num_stages)
    b, t, n, h = q.shape
    s = k.shape[1]
    scale = float(h ** -0.5 if scale is None else scale)  # a hashable static argument
    softcap = None if softcap is None else float(softcap)
    default_positions = q_positions is None and kv_positions is None
    if not default_positions:  # one explicit table: the other gets its default values
        if q_positions is None:
            q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))  # [B, T]
        if kv_positions is None:
            kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))  # [B, S]
        # Positions compare as int32 inside the kernel (any int dtype may come in).
        q_positions = jnp.asarray(q_positions).astype(jnp.int32)
        kv_positions = jnp.asarray(kv_positions).astype(jnp.int32)
    all_valid = kv_valid is None  # static: no padding mask to evaluate in interior tiles
    if all_valid:
        kv_valid = jnp.ones((b, s), jnp.bool_)  # [B, S]
    has_segments = segment_ids is not None
    if not has_segments:
        q_seg, kv_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)  # unused placeholders
    elif isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids  # [B, T], [B, S]
    else:
        q_seg, kv_seg = segment_ids[:, s - t:], segment_ids  # [B, T], [B, S]: queries are the last T keys
    return _pallas_attention(
        q, k, v,
        q_positions, kv_positions, jnp.asarray(kv_valid),
        # Segment ids compare as int32 inside the kernel (the two may come in different int dtypes).
        jnp.asarray(q_seg).astype(jnp.int32), jnp.asarray(kv_seg).astype(jnp.int32),
        scale=scale, causal=bool(causal), sliding_window=sliding_window, softcap=softcap, recipe=recipe,
        block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
        interpret=bool(interpret), default_positions=default_positions, has_segments=has_segments,
        all_valid=all_valid)
