"""Fused GQA attention as Pallas (Triton) kernels, bit-compatible with ``gqa_attention``.

Same layout, masks and rounding recipes as :func:`kernels.attention.gqa_attention`
(its module docstring is the specification): ``q[B,T,N,H]``, ``k[B,S,K,H]``,
``v[B,S,K,H]`` -> ``out[B,T,N,H]`` in q's dtype; query head ``n`` reads kv head
``n // G`` (``G = N // K``) straight from k/v through the BlockSpec index map, so the
repeated kv heads are never materialised.

Two kernels, one recipe (``decode=`` picks; by default the split-key kernel whenever it
applies):

* query-tiled (prefill): one program per (batch, query head, block of queries) walks
  all keys twice (below);
* split-key (decode, ``G * T <= 128`` query rows a kv head): one program per (batch
  row, kv head, split of the keys) holds the G * T query rows that read that kv head, so
  k and v are read once, by ``B * K * num_splits`` programs. Pass 1 stores the split's
  scores (the recipe's values, in dt for "hf") and its row max / sum; pass 2 combines
  every split's max and sum into the global ones, rounds ``p = dt(exp(s - m) * (1 / l))``
  as below and writes the split's f32 ``p @ v``; XLA adds the splits in f32 and rounds
  once. Only the f32 orders differ from the query-tiled kernel (and from XLA): the row
  sum over splits, the PV sum over splits. With any mask (``kv_valid``, positions,
  segments, a window) the splits share out only each batch row's span of key blocks
  that some query may see (``_visible_span``, ``deal_blocks``): a decode step against
  a preallocated cache reads its filled part, not every slot (a 7B step with 512 of
  32768 slots filled: 9.2 us against 36.3 before, on an H100,
  benchmarks/results/probe_decode_span_h100.json), and a cache of any length filled to
  the same keys gives the same bits.

``flash=True`` runs either kernel in one pass with flash-attention numerics instead
(recipe "fp32_logits" only; not the recipe's bits, see ``pallas_attention``): the
query-tiled kernel divides by the row sum at its end, the split-key kernel reads each
key block of k and v together and a second small kernel combines the splits.

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

from kernels._checks import next_pow2, require_choice, require_pow2
from kernels._grad import with_derivative_of
from kernels._round import round_to, round_to_in_kernel
from kernels.attention import _check, _mask_vectors, gqa_attention, tanh_f32

_OP = "pallas_attention"
_MIN_BLOCK = 16  # tl.dot's smallest M, N and K


def _require_pow2_block(name: str, value) -> None:
    require_pow2(name, value, op=_OP, minimum=_MIN_BLOCK, why=" (Triton block shapes and tl.dot's minimum)")


def _require_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{_OP}: {name} must be a positive int, got {value!r}")


def _tile_dot(q, k):
    """``q[bq,H] . k[bk,H] -> [bq,bk]``, f32 accumulation (recipe step 1 before any rounding)."""
    # HIGHEST: f32 inputs must use IEEE products (Triton's default for f32 is TF32).
    return lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)  # [bq, bk] f32 accumulation


def _tile_scores(q, k, *, scale, softcap, recipe, exact):
    """Recipe steps 1-3 on one tile: ``q[bq,H] . k[bk,H] -> s[bq,bk]`` in f32 (on dt's grid for "hf")."""
    return _recipe_steps(_tile_dot(q, k), q.dtype, scale=scale, softcap=softcap, recipe=recipe, exact=exact)


def _recipe_steps(s, dt, *, scale, softcap, recipe, exact):
    """Recipe steps 1-3 after the dot: f32 ``q . k`` -> the recipe's scores (f32; on dt's grid for "hf")."""
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


def _key_mask(vis, qpos, kpos, qseg, kseg, *, causal, sliding_window):
    """``vis[rows,bk]`` narrowed by causality, the sliding window and segments (per-row and
    per-key int32 vectors; ``qseg``/``kseg`` None without segments)."""
    if causal:
        vis = vis & (kpos[None, :] <= qpos[:, None])  # [rows, bk]
    if sliding_window is not None:
        vis = vis & (qpos[:, None] - kpos[None, :] < sliding_window)  # the W keys up to the query
    if qseg is not None:
        vis = vis & (qseg[:, None] == kseg[None, :])  # [rows, bk]
    return vis


def _online_stats(m, l, s):
    """One tile's step of the row max ``m`` and the row sum ``l`` of ``exp(s - m)`` (f32,
    ``[rows]``), from the tile's scores ``s[rows, bk]`` (masked keys -inf)."""
    m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [rows]
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no visible key yet: avoid -inf - -inf
    alpha = jnp.exp(m - m_use)  # [rows]: 1 exactly when the max did not move, 0 from -inf
    return m_new, l * alpha + jnp.sum(jnp.exp(s - m_use[:, None]), axis=1)


def _finish_stats(m, l):
    """The final row max and ``1 / l`` (``[rows]`` f32); a row with no visible key gets
    ``m = 0`` (its every ``e`` is exp(-inf) = 0) and ``1 / 1``."""
    m = jnp.where(m == -jnp.inf, 0.0, m)
    return m, 1.0 / jnp.where(l == 0.0, 1.0, l)  # reciprocal then multiply, as kernels.softmax


def _probabilities(s, m, inv_l, dt, *, exact):
    """Recipe step 4's ``p = dt(exp(s - m) * (1 / l))``, ``[rows, bk]`` in dt; masked keys: 0."""
    p = jnp.exp(s - m[:, None]) * inv_l[:, None]  # [rows, bk] f32
    if exact:  # interpret mode: on dt's grid first, so that XLA cannot skip the rounding below
        p = round_to(p, dt)
    return p.astype(dt)  # rounded to dt for the PV matmul (HF's .to(query.dtype))


def _zero_unused(v, vis):
    """``v[bk, Hp]`` with the keys that no row of ``vis[rows, bk]`` sees set to 0, so that
    ``p = 0`` never meets NaN/inf there (0 * NaN)."""
    used = jnp.max(jnp.where(vis, 1, 0), axis=0) > 0  # [bk]
    return jnp.where(used[:, None], v, jnp.zeros((), v.dtype))  # [bk, Hp]


Q_ORDERS = ("in_order", "heavy_first", "zigzag")


def _q_block(pid, num_qblocks, *, q_order):
    """The query block that launch index ``pid`` (grid axis 2, CUDA's slowest) computes.

    ``"in_order"``: block ``pid``; ``"heavy_first"``: the last block (the most keys under
    causality) first; ``"zigzag"``: first, last, second, second to last, ...
    """
    if q_order == "heavy_first":
        return num_qblocks - 1 - pid
    if q_order == "zigzag":
        return jnp.where(pid % 2 == 0, pid // 2, num_qblocks - 1 - pid // 2)
    return pid


def _kernel(q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref, kval_ref, o_ref, *,
            scale, softcap, recipe, causal, sliding_window, has_segments, skip_blocks, plain_interior,
            block_q, block_k, num_kblocks, num_qblocks, q_order, q_offset, t_len, exact, flash):
    """One (batch, query head, query block) program: two passes over the key blocks.

    ``plain_interior`` (causal, default positions, no other mask): key blocks wholly
    before the block's first query are visible to every real row, so a ``lax.cond``
    skips their mask arithmetic and the zeroing of unused v rows. The scores, the
    softmax and the products are the same code for every tile (only the mask is in the
    cond): a compiler cannot round them differently in the two kinds of tile.
    """
    i = _q_block(pl.program_id(2), num_qblocks, q_order=q_order)  # the same map as the BlockSpecs'
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
            kseg = kseg_ref[pl.ds(start, block_k)] if has_segments else None  # [bk] int32
            return _key_mask(vis, qpos, kpos, qseg, kseg, causal=causal, sliding_window=sliding_window)

        if plain_interior:  # interior tiles: only the padded query rows are invisible
            vis = lax.cond(j < mid, lambda: jnp.broadcast_to(real_row[:, None], (block_q, block_k)), masked)
        else:
            vis = masked()
        s = _tile_scores(q, k, scale=scale, softcap=softcap, recipe=recipe, exact=exact)  # [bq, bk] f32
        # A select, never arithmetic, removes masked scores: NaN/inf there cannot leak.
        return jnp.where(vis, s, -jnp.inf), vis

    def values(j, vis):
        """``v[bk, Hp]`` of key block j, the keys no row of the tile sees zeroed."""
        start = pl.multiple_of(j * block_k, block_k)
        v = v_ref[pl.ds(start, block_k), :]  # [bk, Hp] dt
        # (Every key of an interior tile is seen by the block's first row, a real one.)
        return lax.cond(j < mid, lambda: v, lambda: _zero_unused(v, vis)) if plain_interior else _zero_unused(v, vis)

    m0 = jnp.full((block_q,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((block_q,), jnp.float32)
    if flash:  # one pass: p = dt(exp(s - m_running)), the PV sum divided by the row sum at the end
        def flash_step(j, carry):
            s, vis = tile(j)
            return _flash_step(*carry, s, values(j, vis), dt, exact=exact)

        _, l, acc = lax.fori_loop(lo, hi, flash_step, (m0, l0, jnp.zeros(o_ref.shape, jnp.float32)))
        # A row with no visible key: acc = 0, l = 0 -> 0 / 1. One rounding of the f32 quotient to dt.
        o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
        return

    # Pass 1: row max m and row sum l of exp(s - m), online, in f32.
    m, l = lax.fori_loop(lo, hi, lambda j, ml: _online_stats(*ml, tile(j)[0]), (m0, l0))
    m, inv_l = _finish_stats(m, l)

    # Pass 2: the same scores, p = dt(exp(s - m) * (1 / l)), acc += p @ v in f32.
    def pass2(j, acc):
        s, vis = tile(j)
        p = _probabilities(s, m, inv_l, dt, exact=exact)  # [bq, bk] dt
        return acc + jnp.dot(p, values(j, vis), precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)  # [bq, Hp] f32 accumulation

    acc = lax.fori_loop(lo, hi, pass2, jnp.zeros(o_ref.shape, jnp.float32))
    # One rounding of the f32 accumulator to dt, as torch's matmul output.
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=(
    "scale", "causal", "sliding_window", "softcap", "recipe", "block_q", "block_k", "num_warps",
    "num_stages", "q_order", "interpret", "default_positions", "has_segments", "all_valid", "flash"))
def _pallas_attention(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, *, scale, causal, sliding_window,
                      softcap, recipe, block_q, block_k, num_warps, num_stages, q_order, interpret,
                      default_positions, has_segments, all_valid, flash):
    """The padded pallas_call; arguments already checked and completed by :func:`pallas_attention`."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq = min(block_q, max(_MIN_BLOCK, next_pow2(t)))  # no block larger than the padded T needs
    bk = min(block_k, max(_MIN_BLOCK, next_pow2(s)))
    tp = -(-t // bq) * bq  # T padded to a multiple of bq
    sp = -(-s // bk) * bk  # S padded to a multiple of bk
    hp = max(_MIN_BLOCK, next_pow2(h))  # Triton block dims are powers of two

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
        block_q=bq, block_k=bk, num_kblocks=sp // bk, num_qblocks=tp // bq, q_order=q_order,
        q_offset=s - t, t_len=t, exact=interpret, flash=flash)
    sq = pl.squeezed
    qb = functools.partial(_q_block, num_qblocks=tp // bq, q_order=q_order)  # launch index -> query block
    q_spec = pl.BlockSpec((sq, bq, sq, hp), lambda bi, ni, i: (bi, qb(i), ni, 0))
    kv_spec = pl.BlockSpec((sq, sp, sq, hp), lambda bi, ni, i: (bi, 0, ni // g, 0))  # GQA: kv head n // G
    qvec_spec = pl.BlockSpec((sq, bq), lambda bi, ni, i: (bi, qb(i)))
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


# ---------------------------------------------------------------------------------------------
# Decode: few query rows, many keys. The query-tiled kernel above gives each (batch, query
# head) one program that walks all S keys: at T = 1 that is B * N programs (28 on an H100's
# 132 SMs for Qwen2.5-7B), each tile 1/16 full, and every kv head read G times. Here the
# keys are split instead (flash-decoding), and the G * T query rows of one kv head share
# each program, so k and v are read once, by B * K * num_splits programs.
# ---------------------------------------------------------------------------------------------

_DECODE_MAX_ROWS = 128  # G * T query rows held in one tile (the [rows, block_k] scores live in registers)
# Default splits: about this many programs a batch row, two per H100 SM. Measured for a 7B
# step (K = 4): 64 splits 32.4 us, 128 splits 34.0, 32 splits 33.9 at their best block
# and launch (benchmarks/results/tune_memory_session6_h100.json).
_DECODE_PROGRAMS = 256
# The one-pass flash kernel reads k and v together: about 128 programs a batch row, one per
# H100 SM, were fastest for both 7B (32 splits: 28.4 us a step, against 29.4 with 64) and
# 0.5B (64 splits: 11.6 us, against 14.2 with 32) (benchmarks/results/probe_decode_flash_h100.json).
_FLASH_PROGRAMS = 128


class _Masks:
    """The optional per-row / per-key mask inputs of the decode kernels, by name.

    Only the vectors a call needs are passed to the kernels (no placeholder arrays, so no
    XLA op runs to make them): row positions and key positions unless the defaults
    (computed from indices), segment ids with segments, key validity with ``kv_valid``.
    """

    def __init__(self, *, default_positions, has_segments, all_valid):
        self.row_names = (() if default_positions else ("rpos",)) + (("rseg",) if has_segments else ())
        self.key_names = ((() if default_positions else ("kpos",)) + (("kseg",) if has_segments else ())
                          + (() if all_valid else ("kval",)))
        self.names = self.row_names + self.key_names

    def split(self, refs, *, ranged: bool):
        """``refs`` = the kernel's leading mask refs, then (``ranged``) its batch row's ``[2]``
        span ref, then the rest: (dict, span ref or None, rest)."""
        n = len(self.names)
        masks, rest = dict(zip(self.names, refs[:n])), refs[n:]
        return (masks, rest[0], rest[1:]) if ranged else (masks, None, rest)


def _decode_rows(masks, *, rp, rows, t_len, q_offset):
    """Per row ``r = g * T + t`` of a kv head's tile (query head ``h * G + g``, query ``t``):
    (real, position, segment id), each ``[Rp]``; the same for every kv head."""
    r = jnp.arange(rp, dtype=jnp.int32)
    real = r < rows  # padded rows see no key
    qpos = masks["rpos"][...] if "rpos" in masks else q_offset + r % t_len  # [Rp] int32
    qseg = masks["rseg"][...] if "rseg" in masks else None  # [Rp] int32
    return real, qpos, qseg


def _decode_visible(masks, key, local, *, real, qpos, qseg, block_k, s_len, causal, sliding_window):
    """Visibility ``[Rp, bk]`` of the keys ``key ... key + bk - 1`` (global indices; the key
    mask refs hold this split's keys, where the block starts at ``local``)."""
    idx = key + jnp.arange(block_k, dtype=jnp.int32)  # [bk] global key index
    ok = idx < s_len  # S padding
    if "kval" in masks:
        ok = ok & (masks["kval"][pl.ds(local, block_k)] != 0)
    vis = real[:, None] & ok[None, :]  # [Rp, bk]
    kpos = masks["kpos"][pl.ds(local, block_k)] if "kpos" in masks else idx  # [bk] int32
    kseg = masks["kseg"][pl.ds(local, block_k)] if "kseg" in masks else None
    return _key_mask(vis, qpos, kpos, qseg, kseg, causal=causal, sliding_window=sliding_window)


def _visible_span(q_pos, kv_pos, kv_valid, *, t, block_k, causal, sliding_window):
    """``[B, 2]`` int32: each batch row's first key block that a query of the row may see,
    and the number of blocks from it through the last such block (0: no visible key).

    A superset of the visible keys, so that it only decides which blocks the split-key
    kernels read (they mask every key inside those blocks as before): ``kv_valid``,
    causality through the rows' largest position and the window through their smallest
    (``_visible``'s ``kp <= qp`` and ``qp - kp < W`` for some row); segments are left to
    the kernels. ``q_pos``/``kv_pos`` None: the default positions ``S - T + t`` and ``s``.
    """
    s = kv_valid.shape[1]
    if q_pos is None:
        idx = jnp.arange(s, dtype=jnp.int32)  # [S]
        kp, q_hi, q_lo = idx[None, :], s - 1, s - t  # [1, S], scalars
    else:
        kp, q_hi, q_lo = kv_pos, q_pos.max(axis=1, keepdims=True), q_pos.min(axis=1, keepdims=True)  # [B,S], [B,1] x 2
    ok = kv_valid  # [B, S] bool
    if causal:
        ok = ok & (kp <= q_hi)
    if sliding_window is not None:
        ok = ok & (kp > q_lo - sliding_window)
    return block_span(ok, block_k=block_k)


def block_span(ok, *, block_k: int):
    """bool ``ok [B, S]`` (keys that may be read) -> ``[B, 2]`` int32: each batch row's first
    key block holding such a key and the number of blocks from it through the last one
    (0 blocks: no such key). The split-key kernels here and ``attention_mosaic`` deal these
    blocks out over their splits (:func:`deal_blocks`)."""
    s = ok.shape[1]
    idx = jnp.arange(s, dtype=jnp.int32)  # [S]
    lo = jnp.min(jnp.where(ok, idx, s), axis=1)  # [B] first such key (S: none)
    hi = jnp.max(jnp.where(ok, idx + 1, 0), axis=1)  # [B] one past the last (0: none)
    first = lo // block_k
    return jnp.stack([first, jnp.maximum(-(-hi // block_k) - first, 0)], axis=1).astype(jnp.int32)  # [B, 2]


def deal_blocks(first, nb, j, *, n_split: int):
    """Split ``j``'s key blocks ``(first block, count)`` of a row's span ``[first, first +
    nb)`` (:func:`block_span`), dealt out in runs of ``ceil(nb / n_split)``: blocks no query
    may see (a cache's unfilled slots, keys past a window) are never read, and a cache of
    any length filled to the same keys gives the same splits, so the same bits. With every
    block visible (``nb = n_split * steps``) the runs are the static splits. Scalars, traced
    inside a kernel (Triton or Mosaic GPU: max/min rather than a clamp)."""
    per = lax.div(nb + (n_split - 1), n_split)  # ceil(nb / n_split); nb >= 0, so no floor correction
    start = j * per
    return first + start, jnp.minimum(jnp.maximum(nb - start, 0), per)


def _split_keys(span_ref, j, *, steps, n_split, block_k):
    """Split ``j``'s key blocks: ``(count, keys)``, where ``keys(i)`` is ``(key, local)`` of
    its ``i``-th block: the global index of the block's first key and that key's index in
    the kernel's key refs. Without a span (``span_ref`` None: every key may be visible)
    split ``j`` holds blocks ``j * steps ...`` of the padded cache and its key refs hold
    only its own keys; with one (the key refs span the whole cache), its share of the
    row's span (:func:`deal_blocks`)."""
    if span_ref is None:
        first, count, base = j * steps, steps, j * steps * block_k
    else:
        (first, count), base = deal_blocks(span_ref[0], span_ref[1], j, n_split=n_split), 0

    def keys(i):
        key = pl.multiple_of((first + i) * block_k, block_k)
        return key, pl.multiple_of(key - base, block_k)

    return count, keys


def _decode_scores_kernel(*refs, mask_set, scale, softcap, recipe, steps, rowinfo, vis_opts, exact, ranged,
                          n_split):
    """Pass 1 of one (batch row, kv head, key split) program: the head's rows' scores over
    the split's keys, stored (``s_ref``, the recipe's values: dt for "hf", f32 for
    "fp32_logits"; masked keys -inf), with the split's row max ``m`` and row sum ``l`` of
    ``exp(s - m)`` (online, f32). ``ranged`` (every decode kernel alike): a ``[2]`` span
    ref follows the mask refs, the key refs span the whole cache, and the split's blocks
    come from :func:`_split_keys`; otherwise split ``j`` walks its own ``steps`` blocks."""
    masks, span_ref, (q_ref, k_ref, s_ref, m_ref, l_ref) = mask_set.split(refs, ranged=ranged)
    b, kv, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_k, rp, rows = vis_opts["block_k"], rowinfo["rp"], rowinfo["rows"]
    # This kv head's G * T packed rows, zeros below them (a masked load: the padding is
    # never materialised in memory).
    real_rows = (jnp.arange(rp) < rows)[:, None]  # [Rp, 1]
    q = plgpu.load(q_ref.at[b, pl.ds(kv * rows, rp), :], mask=real_rows, other=0)  # [Rp, Hp] dt
    real, qpos, qseg = _decode_rows(masks, **rowinfo)
    count, keys = _split_keys(span_ref, j, steps=steps, n_split=n_split, block_k=block_k)

    def step(i, carry):
        m, l = carry
        key, local = keys(i)
        s = _tile_scores(q, k_ref[pl.ds(local, block_k), :], scale=scale, softcap=softcap, recipe=recipe,
                         exact=exact)  # [Rp, bk] f32
        vis = _decode_visible(masks, key, local, real=real, qpos=qpos, qseg=qseg, **vis_opts)
        s = jnp.where(vis, s, -jnp.inf)  # a select: NaN/inf of masked keys cannot leak
        s_ref[:, pl.ds(local, block_k)] = s.astype(s_ref.dtype)  # exact: "hf" scores are on dt's grid
        return _online_stats(m, l, s)  # [Rp] each

    m, l = lax.fori_loop(0, count, step, (jnp.full((rp,), -jnp.inf, jnp.float32), jnp.zeros((rp,), jnp.float32)))
    m_ref[...] = m
    l_ref[...] = l


def _decode_pv_kernel(*refs, mask_set, steps, rowinfo, vis_opts, all_used, exact, ranged, n_split):
    """Pass 2 of one (batch row, kv head, key split) program: the head's row max and sum
    combined over all splits (``m = max_j m_j``, ``l = sum_j l_j exp(m_j - m)``), then
    ``p = dt(exp(s - m) * (1 / l))`` and this split's ``p @ v`` in f32 (``acc_ref``; the
    splits are added by the caller)."""
    masks, span_ref, (s_ref, v_ref, m_ref, l_ref, acc_ref) = mask_set.split(refs, ranged=ranged)
    j = pl.program_id(2)
    block_k = vis_opts["block_k"]
    dt = v_ref.dtype
    mj = m_ref[...]  # [n_split, Rp] every split's row max
    m = jnp.max(mj, axis=0)  # [Rp]: exactly the row max (max is order-free)
    m = jnp.where(m == -jnp.inf, 0.0, m)  # a row with no visible key: every e is exp(-inf) = 0
    l = jnp.sum(l_ref[...] * jnp.exp(mj - m[None, :]), axis=0)  # [Rp]; an empty split: 0 * exp(-inf) = 0
    m, inv_l = _finish_stats(m, l)
    real, qpos, qseg = _decode_rows(masks, **rowinfo)
    count, keys = _split_keys(span_ref, j, steps=steps, n_split=n_split, block_k=block_k)  # pass 1's blocks

    def step(i, acc):
        key, local = keys(i)
        s = s_ref[:, pl.ds(local, block_k)].astype(jnp.float32)  # [Rp, bk]: exact (dt or f32 values)
        p = _probabilities(s, m, inv_l, dt, exact=exact)  # [Rp, bk] dt; masked keys: 0
        v = v_ref[pl.ds(local, block_k), :]  # [bk, Hp] dt
        if not all_used:
            v = _zero_unused(v, _decode_visible(masks, key, local, real=real, qpos=qpos, qseg=qseg, **vis_opts))
        return acc + jnp.dot(p, v, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)  # [Rp, Hp]

    acc_ref[...] = lax.fori_loop(0, count, step, jnp.zeros(acc_ref.shape, jnp.float32))


def _flash_step(m, l, acc, s, v, dt, *, exact):
    """One key block of flash numerics: the running row max ``m`` and sum ``l`` ([rows] f32)
    and the unnormalised ``acc`` ([rows, Hp] f32), from the block's scores ``s[rows, bk]``
    (f32, masked keys -inf) and values ``v[bk, Hp]`` (dt, unseen keys zeroed).

    ``e = exp(s - m_new)`` in f32 goes into ``l`` unrounded; ``p = dt(e)`` (unnormalised,
    in (0, 1]) into ``acc += p @ v`` (f32 accumulation); both are first rescaled by
    ``alpha = exp(m_old - m_new)`` (1 exactly while the max does not move).
    """
    m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [rows]
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no visible key yet: avoid -inf - -inf
    alpha = jnp.exp(m - m_use)  # [rows]
    e = jnp.exp(s - m_use[:, None])  # [rows, bk] f32; masked keys exp(-inf) = 0
    p = round_to(e, dt) if exact else e  # interpret mode: on dt's grid first (XLA cannot drop it)
    # p to dt for the tensor-core product (flash attention's P.to(dt)); e stays f32 for l.
    pv = jnp.dot(p.astype(dt), v, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return m_new, l * alpha + jnp.sum(e, axis=1), acc * alpha[:, None] + pv  # [rows], [rows], [rows, Hp]


def _decode_flash_kernel(*refs, mask_set, scale, softcap, recipe, steps, rowinfo, vis_opts, all_used, exact, ranged,
                         n_split):
    """One pass of one (batch row, kv head, key split) program, flash numerics: the split's
    row max ``m``, row sum ``l`` of ``exp(s - m)`` and unnormalised f32
    ``acc = sum dt(exp(s - m)) v`` (``_flash_step``); the combine kernel divides."""
    masks, span_ref, (q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref) = mask_set.split(refs, ranged=ranged)
    b, kv, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_k, rp, rows = vis_opts["block_k"], rowinfo["rp"], rowinfo["rows"]
    dt = v_ref.dtype
    real_rows = (jnp.arange(rp) < rows)[:, None]  # [Rp, 1]
    q = plgpu.load(q_ref.at[b, pl.ds(kv * rows, rp), :], mask=real_rows, other=0)  # [Rp, Hp] dt
    real, qpos, qseg = _decode_rows(masks, **rowinfo)
    count, keys = _split_keys(span_ref, j, steps=steps, n_split=n_split, block_k=block_k)

    def step(i, carry):
        key, local = keys(i)
        s = _tile_scores(q, k_ref[pl.ds(local, block_k), :], scale=scale, softcap=softcap, recipe=recipe,
                         exact=exact)  # [Rp, bk] f32
        vis = _decode_visible(masks, key, local, real=real, qpos=qpos, qseg=qseg, **vis_opts)
        s = jnp.where(vis, s, -jnp.inf)  # a select: NaN/inf of masked keys cannot leak
        v = v_ref[pl.ds(local, block_k), :]  # [bk, Hp] dt
        if not all_used:
            v = _zero_unused(v, vis)
        return _flash_step(*carry, s, v, dt, exact=exact)

    init = (jnp.full((rp,), -jnp.inf, jnp.float32), jnp.zeros((rp,), jnp.float32),
            jnp.zeros(acc_ref.shape, jnp.float32))
    m, l, acc = lax.fori_loop(0, count, step, init)
    m_ref[...] = m
    l_ref[...] = l
    acc_ref[...] = acc


@functools.partial(jax.jit, static_argnames=(
    "scale", "causal", "sliding_window", "softcap", "recipe", "block_k", "num_splits", "num_warps", "num_stages",
    "interpret", "default_positions", "has_segments", "all_valid", "flash"))
def _pallas_decode(q, k, v, q_pos, kv_pos, kv_valid, q_seg, kv_seg, *, scale, causal, sliding_window, softcap,
                   recipe, block_k, num_splits, num_warps, num_stages, interpret, default_positions, has_segments,
                   all_valid, flash):
    """The two split-key pallas_calls and the sum over splits (``flash``: :func:`_flash_decode`'s
    one pass and combine); arguments checked by :func:`pallas_attention`.

    With the default masks nothing but the two kernels and the final sum runs: q is read
    in place (at T = 1 the packed rows are q's own layout), and no mask vector is built.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    rows = g * t  # a kv head's query rows
    rp = max(_MIN_BLOCK, next_pow2(rows))  # padded (by masked loads) for tl.dot: M >= 16, a power of two
    hp = max(_MIN_BLOCK, next_pow2(h))
    bk = min(block_k, max(_MIN_BLOCK, next_pow2(s)))
    if num_splits is None:  # about _DECODE_PROGRAMS (one pass: _FLASH_PROGRAMS) programs a batch row
        programs = _FLASH_PROGRAMS if flash else _DECODE_PROGRAMS
        num_splits = max(1, next_pow2(programs // kh + 1) // 2)  # the power of two <= programs / K
    n_split = min(num_splits, next_pow2(-(-s // bk)))  # no split without a real key
    steps = -(-s // (bk * n_split))  # key blocks per split
    chunk = bk * steps
    sp = n_split * chunk  # S padded: every split holds `steps` whole key blocks

    # Row n * T + t: query head n at query t, so kv head c's rows are c * G * T ... + G * T - 1.
    qr = q.reshape(b, n, h) if t == 1 else q.transpose(0, 2, 1, 3).reshape(b, n * t, h)  # [B, N*T, H]
    if hp != h:  # zero columns add exact zeros to q . k and give zero output columns (dropped)
        qr = jnp.pad(qr, ((0, 0), (0, 0), (0, hp - h)))  # [B, N*T, Hp]
    if sp != s or hp != h:
        k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, hp - h)))  # [B, Sp, K, Hp]
        v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, hp - h)))  # [B, Sp, K, Hp]
    mask_set = _Masks(default_positions=default_positions, has_segments=has_segments, all_valid=all_valid)
    vectors = {
        "rpos": lambda: jnp.tile(q_pos, (1, g)),  # [B, G*T]: row r has t = r % T
        "rseg": lambda: jnp.tile(q_seg, (1, g)),  # [B, G*T]
        "kpos": lambda: kv_pos,  # [B, S]
        "kseg": lambda: kv_seg,  # [B, S]
        # Validity as int32 (boolean refs are not portable to Triton).
        "kval": lambda: kv_valid.astype(jnp.int32),  # [B, S]
    }
    mask_in = []
    for name in mask_set.names:
        x = vectors[name]()
        # Row vectors padded to Rp, key vectors to Sp (padded rows and keys are cut by index).
        mask_in.append(jnp.pad(x, ((0, 0), (0, (rp if name in mask_set.row_names else sp) - x.shape[1]))))
    sq = pl.squeezed
    # With the default masks (positions, no kv_valid, segments or window) the last query
    # (position S - 1) sees every key: no key is unused, so v needs no zeroing, and every
    # split reads its own `steps` blocks. Otherwise (`ranged`) each batch row's span of
    # visible key blocks is computed first (one small XLA reduction, the same for every layer
    # of a model step) and dealt out over the splits (_split_keys): a decode step reads
    # the filled part of its cache, not all of it. The key refs then span the whole cache.
    all_used = default_positions and all_valid and not has_segments and sliding_window is None
    ranged = not all_used
    key_cols, key_block = (sp, lambda bi, c, j: (bi, 0)) if ranged else (chunk, lambda bi, c, j: (bi, j))
    mask_specs = [pl.BlockSpec((sq, rp), lambda bi, c, j: (bi, 0)) for _ in mask_set.row_names] + [
        pl.BlockSpec((sq, key_cols), key_block) for _ in mask_set.key_names]
    if ranged:  # the span rides after the mask vectors: [2] a program, its batch row's
        mask_in.append(_visible_span(None if default_positions else q_pos, None if default_positions else kv_pos,
                                     kv_valid, t=t, block_k=bk, causal=causal, sliding_window=sliding_window))
        mask_specs.append(pl.BlockSpec((sq, 2), lambda bi, c, j: (bi, 0)))

    rowinfo = dict(rp=rp, rows=rows, t_len=t, q_offset=s - t)
    vis_opts = dict(block_k=bk, s_len=s, causal=causal, sliding_window=sliding_window)
    # One kv head's keys of one split (ranged: of the whole cache): [chunk or Sp, Hp], rows
    # K * Hp apart in the cache.
    kv_spec = (pl.BlockSpec((sq, sp, sq, hp), lambda bi, c, j: (bi, 0, c, 0)) if ranged
               else pl.BlockSpec((sq, chunk, sq, hp), lambda bi, c, j: (bi, j, c, 0)))
    scores_spec = (pl.BlockSpec((sq, sq, rp, sp), lambda bi, c, j: (bi, c, 0, 0)) if ranged
                   else pl.BlockSpec((sq, sq, rp, chunk), lambda bi, c, j: (bi, c, 0, j)))
    part = pl.BlockSpec((sq, sq, sq, rp), lambda bi, c, j: (bi, c, j, 0))
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    # "hf" scores are dt values (stored in dt, half the bytes); "fp32_logits" keeps f32.
    s_dt = q.dtype if recipe == "hf" else jnp.float32
    common = dict(mask_set=mask_set, steps=steps, rowinfo=rowinfo, vis_opts=vis_opts, exact=interpret,
                  ranged=ranged, n_split=n_split)
    grid = (b, kh, n_split)
    if flash:
        return _flash_decode(q, qr, k, v, mask_in, mask_specs, kv_spec, part, params, common, grid, scale=scale,
                             softcap=softcap, recipe=recipe, all_used=all_used, rows=rows, interpret=interpret)
    scores, m_part, l_part = pl.pallas_call(
        functools.partial(_decode_scores_kernel, scale=scale, softcap=softcap, recipe=recipe, **common),
        out_shape=(jax.ShapeDtypeStruct((b, kh, rp, sp), s_dt),
                   jax.ShapeDtypeStruct((b, kh, n_split, rp), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, n_split, rp), jnp.float32)),
        grid=grid,
        in_specs=[*mask_specs, pl.no_block_spec, kv_spec],  # q whole: the kernel loads its head's rows
        out_specs=(scores_spec, part, part),
        compiler_params=params, interpret=interpret, name="pallas_decode_scores",
    )(*mask_in, qr, k)  # [B, K, Rp, Sp], [B, K, n_split, Rp] x 2
    whole = pl.BlockSpec((sq, sq, n_split, rp), lambda bi, c, j: (bi, c, 0, 0))  # the head's m / l of every split
    acc = pl.pallas_call(
        functools.partial(_decode_pv_kernel, all_used=all_used, **common),
        out_shape=jax.ShapeDtypeStruct((b, n_split, kh, rp, hp), jnp.float32),
        grid=grid,
        in_specs=[*mask_specs, scores_spec, kv_spec, whole, whole],
        out_specs=pl.BlockSpec((sq, sq, sq, rp, hp), lambda bi, c, j: (bi, j, c, 0, 0)),
        compiler_params=params, interpret=interpret, name="pallas_decode_pv",
    )(*mask_in, scores, v, m_part, l_part)  # [B, n_split, K, Rp, Hp]
    # The splits' f32 partial sums added in f32, then one rounding to dt, as torch's matmul output.
    # Padding cut before the sum, so that XLA fuses the slice into the reduction (cut after
    # it, the slice ran as its own device copy: 1.1 us of a 37 us 7B decode step).
    o = jnp.sum(acc[:, :, :, :rows, :h], axis=1).astype(q.dtype)  # [B, K, G*T, H]
    return o.reshape(b, n, t, h).transpose(0, 2, 1, 3)  # [B, K*G = N, T, H] -> [B, T, N, H]


def _flash_decode(q, qr, k, v, mask_in, mask_specs, kv_spec, part, params, common, grid, *, scale, softcap, recipe,
                  all_used, rows, interpret):
    """The one-pass split-key pallas_call (flash numerics), then a second one that combines its splits."""
    b, t, n, h = q.shape
    kh, n_split, rp, hp = k.shape[2], grid[2], common["rowinfo"]["rp"], k.shape[3]
    sq = pl.squeezed
    m_part, l_part, acc = pl.pallas_call(
        functools.partial(_decode_flash_kernel, scale=scale, softcap=softcap, recipe=recipe, all_used=all_used,
                          **common),
        out_shape=(jax.ShapeDtypeStruct((b, kh, n_split, rp), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, n_split, rp), jnp.float32),
                   jax.ShapeDtypeStruct((b, n_split, kh, rp, hp), jnp.float32)),
        grid=grid,
        in_specs=[*mask_specs, pl.no_block_spec, kv_spec, kv_spec],  # q whole: the kernel loads its head's rows
        out_specs=(part, part, pl.BlockSpec((sq, sq, sq, rp, hp), lambda bi, c, j: (bi, j, c, 0, 0))),
        compiler_params=params, interpret=interpret, name="pallas_decode_flash",
    )(*mask_in, qr, k, v)  # [B, K, n_split, Rp] x 2, [B, n_split, K, Rp, Hp]
    # The splits combined by a second, small kernel (XLA made three fusions of it: 4 us of a
    # 30 us 7B step, benchmarks/results/probe_decode_flash_h100.json).
    out = combine_splits(m_part, l_part, acc, rows=rows, dtype=q.dtype, interpret=interpret)  # [B, N*T, Hp]
    if hp != h:
        out = out[:, :, :h]  # [B, N*T, H]
    return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)  # [B, N, T, H] -> [B, T, N, H] (T = 1: a bitcast)


_COMBINE_COLS = 16  # head-dim columns a combine program sums (a 7B step: 4 x 8 programs)
_COMBINE_WARPS = 4


def combine_splits(m_part, l_part, acc, *, rows: int, dtype, interpret: bool = False) -> jax.Array:
    """The split-key flash partials summed: ``m_part``/``l_part`` ``[B, K, n_split, Rp]`` (each
    split's row max and row sum) and ``acc`` ``[B, n_split, K, Rp, Hp]`` (its unnormalised
    f32 ``p @ v``), of which each kv head's first ``rows`` rows are real, give
    ``[B, K * rows, Hp]`` in ``dtype`` (:func:`_flash_combine_kernel`). Also the combine of
    the Mosaic GPU decode kernel (kernels.attention_mosaic, implementation="mosaic_flash"), which writes
    the same partials."""
    b, kh, n_split, rp = m_part.shape
    hp = acc.shape[-1]
    hb = min(hp, _COMBINE_COLS)
    sq = pl.squeezed
    return pl.pallas_call(
        functools.partial(_flash_combine_kernel, rows=rows, hb=hb),
        out_shape=jax.ShapeDtypeStruct((b, kh * rows, hp), dtype),  # q's packed rows: kv head c's at c * rows
        grid=(b, kh, hp // hb),
        in_specs=[pl.BlockSpec((sq, sq, n_split, rp), lambda bi, c, i: (bi, c, 0, 0)),
                  pl.BlockSpec((sq, sq, n_split, rp), lambda bi, c, i: (bi, c, 0, 0)),
                  pl.BlockSpec((sq, n_split, sq, rp, hb), lambda bi, c, i: (bi, 0, c, 0, i))],
        out_specs=pl.no_block_spec,  # whole: each program stores its head's real rows (masked)
        compiler_params=plgpu.CompilerParams(num_warps=_COMBINE_WARPS, num_stages=1), interpret=interpret,
        name="pallas_decode_flash_combine",
    )(m_part, l_part, acc)  # [B, K*rows, Hp]


def _flash_combine_kernel(m_ref, l_ref, acc_ref, o_ref, *, rows, hb):
    """One (batch row, kv head, ``hb`` columns) program: the splits' flash sums combined in
    f32, each rescaled to the global row max, ``o = dt(sum_j w_j acc_j / sum_j w_j l_j)``
    with ``w_j = exp(m_j - m)``; only the head's ``rows`` real rows are stored."""
    b, c, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    mj = m_ref[...]  # [n_split, Rp]
    m = jnp.max(mj, axis=0)  # [Rp]: the row max (max is order-free)
    w = jnp.exp(mj - jnp.where(m == -jnp.inf, 0.0, m)[None, :])  # [n_split, Rp]; an empty split: exp(-inf) = 0
    l = jnp.sum(l_ref[...] * w, axis=0)  # [Rp]
    num = jnp.sum(acc_ref[...] * w[:, :, None], axis=0)  # [Rp, hb]
    # A row with no visible key: num = 0, l = 0 -> 0 / 1. One rounding of the f32 quotient to dt.
    o = (num / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)  # [Rp, hb]
    rp = o.shape[0]
    real = (jnp.arange(rp) < rows)[:, None]  # [Rp, 1]: the padded rows belong to the next head
    plgpu.store(o_ref.at[b, pl.ds(c * rows, rp), pl.ds(i * hb, hb)], o, mask=real)


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
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
    q_order: str = "heavy_first",
    decode: bool | None = None,
    num_splits: int | None = None,
    flash: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """Grouped-query attention as one fused Pallas kernel; the numbers of :func:`gqa_attention`.

    Args:
      q: queries ``[B,T,N,H]``; k, v: keys and values ``[B,S,K,H]``; one float dtype.
      scale, causal, q_positions, kv_positions, kv_valid, segment_ids, sliding_window,
        softcap, recipe: as :func:`kernels.attention.gqa_attention` (same defaults, same masks).
      block_q, block_k: queries / keys per tile, powers of two >= 16 (clamped down to the
        padded T / S). num_warps, num_stages: Triton's launch and pipelining parameters.
        The defaults (64, 64, 4, 3, with ``q_order="heavy_first"``) were the fastest of
        15 for a causal N28 K4 H128 prefill of 4096 bf16 tokens on an H100, on the
        device's clock (benchmarks/results/pallas_tune_session7_h100.json): "hf" 859 us,
        "fp32_logits" 699 us, against 898 and 793 us for session 3's (64, 32, 4, 3) in order.
      q_order: the order in which the query-tiled kernel launches its query blocks,
        one of ``Q_ORDERS`` (launch order only: the numbers are the same). Measured, not
        modelled: with 64-key blocks "heavy_first" (the longest causal programs first)
        beat "in_order" by 7% in both recipes; with 32-key blocks it lost by 10-17%
        (same file).
      decode: the split-key kernel (True), for few query rows: the ``G * T`` rows that
        read one kv head (at most 128) share each program, each kv head's keys are split
        over ``num_splits`` programs (a power of two; fewer when S is short; None: the
        largest power of two <= 256 / K, about 256 programs a batch row; with ``flash``
        128 / K), each pass writes per-split results (scores and row max/sum, then f32
        partial ``p @ v``) and the splits are added in f32 at the end. With a mask the
        splits cover only the blocks from each batch row's first visible key to its last
        (unfilled cache slots are never read). False: the query-tiled kernel.
        None: the split-key kernel when it applies.
      flash: flash-attention numerics in one pass over the keys, for recipe
        ``"fp32_logits"`` only: ``p = dt(exp(s - m_running))`` unnormalised, ``acc = acc *
        exp(m_old - m_new) + p @ v`` in f32, and one division by the row sum (of the f32
        ``exp`` values) at the end; the split-key kernel divides after a second small
        kernel combines its splits (each rescaled by ``exp(m_split - m)``). This is
        torch SDPA's and cuDNN's order of operations, not the recipe's (which rounds
        the *normalised* probabilities and needs the row sum first, hence two passes): its bits differ from the recipe's by a few ulps, within the
        ``implementations.pallas_flash`` budgets of tolerances.yaml, and depend on
        ``block_k`` (and the split count) through the running max. k and v are read
        once, together (decode: 1 kernel and the combine, against 2 and the split sum).
        float32: plain f32 scores, not ``gqa_attention``'s XLA pair scores, so its
        accuracy against the float64 truth is up to ~20x the oracle's error (the GPU
        budget); bf16/f16 are as accurate as the oracle.
      interpret: run the kernel through Pallas' interpreter (any backend, CPU included).

    Dtype recipe, step by step: the module docstring (the same as ``gqa_attention``'s;
    ``flash`` above).

    Differentiable: ``jax.grad`` and ``jax.jvp`` see the derivative of ``gqa_attention``'s
    XLA path with the same options (``kernels._grad``; it materialises the probabilities,
    O(T * S) memory a head: the backward is not a fused kernel).

    Returns:
      ``[B,T,N,H]`` in q's dtype. A query with no visible key gives zeros.
    """
    _check(q, k, v, scale=scale, q_positions=q_positions, kv_positions=kv_positions, kv_valid=kv_valid,
           segment_ids=segment_ids, causal=causal, sliding_window=sliding_window, softcap=softcap,
           recipe=recipe, q_chunk=None)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    fits = g * t <= _DECODE_MAX_ROWS
    if decode is None:
        decode = fits
    elif decode and not fits:
        raise ValueError(f"{_OP}: decode=True needs G*T <= {_DECODE_MAX_ROWS} query rows a kv head, got "
                         f"G*T = {g}*{t} = {g * t} (q {tuple(q.shape)}, k {tuple(k.shape)}); use decode=False")
    _require_pow2_block("block_q", block_q)
    _require_pow2_block("block_k", block_k)
    _require_positive_int("num_warps", num_warps)
    _require_positive_int("num_stages", num_stages)
    require_choice("q_order", q_order, Q_ORDERS, op=_OP)
    if num_splits is not None:
        require_pow2("num_splits", num_splits, op=_OP)
    if not isinstance(flash, bool):
        raise ValueError(f"{_OP}: flash must be a bool, got {flash!r}")
    if flash and recipe != "fp32_logits":
        raise ValueError(f"{_OP}: flash=True needs recipe='fp32_logits', got recipe={recipe!r}: the \"hf\" recipe "
                         f"rounds its scores to {q.dtype} and its normalised probabilities, which one pass cannot do")
    scale = float(h ** -0.5 if scale is None else scale)  # a hashable static argument
    softcap = None if softcap is None else float(softcap)
    opts = dict(scale=scale, causal=bool(causal), sliding_window=sliding_window, softcap=softcap)

    def fast(q, k, v, masks):
        return _fused(q, k, v, **masks, **opts, recipe=recipe, decode=decode, block_q=block_q, block_k=block_k,
                      num_warps=num_warps, num_stages=num_stages, q_order=q_order, num_splits=num_splits,
                      flash=flash, interpret=interpret)

    def reference(q, k, v, masks):  # flash=True is recipe "fp32_logits": the same function
        return gqa_attention(q, k, v, **masks, **opts, recipe=recipe, implementation="xla")

    masks = dict(q_positions=q_positions, kv_positions=kv_positions, kv_valid=kv_valid, segment_ids=segment_ids)
    # Differentiated as the XLA path (kernels._grad): a pallas_call has no transpose rule.
    return with_derivative_of(fast, reference)(q, k, v, masks)


def _fused(q, k, v, *, q_positions, kv_positions, kv_valid, segment_ids, scale, causal, sliding_window, softcap,
           recipe, decode, block_q, block_k, num_warps, num_stages, q_order, num_splits, flash, interpret):
    """:func:`pallas_attention` (arguments checked there) without its derivative."""
    b, t = q.shape[:2]
    s = k.shape[1]
    default_positions = q_positions is None and kv_positions is None
    has_segments = segment_ids is not None
    q_seg, kv_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)  # placeholders: no segments
    if not default_positions or has_segments:
        # The XLA path's mask vectors, int32: an explicit table's partner gets its default values.
        qp, kp, qs, ks = _mask_vectors(b, t, s, q_positions, kv_positions, segment_ids)
        if not default_positions:  # with both defaults the kernel derives them from its block indices
            q_positions, kv_positions = qp, kp  # [B, T], [B, S]
        if has_segments:
            q_seg, kv_seg = qs, ks  # [B, T], [B, S]
    all_valid = kv_valid is None  # static: no padding mask to evaluate in interior tiles
    if all_valid:
        kv_valid = jnp.ones((b, s), jnp.bool_)  # [B, S]
    # Only the blocking differs between the two kernels; masks and recipe are passed alike.
    kernel, blocks = ((_pallas_decode, dict(num_splits=num_splits)) if decode
                      else (_pallas_attention, dict(block_q=block_q, q_order=q_order)))
    return kernel(
        q, k, v,
        q_positions, kv_positions, jnp.asarray(kv_valid), q_seg, kv_seg,
        scale=scale, causal=bool(causal), sliding_window=sliding_window, softcap=softcap, recipe=recipe,
        **blocks, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
        interpret=bool(interpret), default_positions=default_positions, has_segments=has_segments,
        all_valid=all_valid, flash=flash)
