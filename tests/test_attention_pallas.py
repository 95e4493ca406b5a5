"""pallas_attention (the fused Pallas kernel) against gqa_attention (the XLA path), in interpret mode.

The kernel runs through Pallas' interpreter (``interpret=True``), so these tests run on
CPU; the same kernel body lowers to Triton on a GPU. Shapes are tiny and the blocks
are 16 (Triton's smallest) so that every case has several query and key tiles.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels.attention import _visible, gqa_attention
from kernels.attention_pallas import Q_ORDERS, pallas_attention
from oracles import budgets, registry
from oracles.compare import ulp_distance

# Structural equality between two implementations of one recipe. The bounds are the
# attention entry's properties in tolerances.yaml (pallas_max_ulps, pallas_min_bitwise_frac;
# their provenance is there); the ulp floor is the entry's parity floor_rel. Kernel and
# XLA evaluate the same expression and differ only in the order of f32 sums: the row sum
# l (blocked, with online rescaling by exp(m_old - m_new)), the PV accumulation (per key
# block) and the q.k dot. Ulps are taken at max(|ref|, floor_rel * max|ref|, term sum),
# the term sum of an output being sum_s p_s |v_s| (float64 p): reordering an f32 sum moves
# it by a few f32 ulps of the sum of its terms' magnitudes, which is hundreds of ulps of
# an output that cancels far below them. In bf16/f16 an f32 difference of an ulp
# occasionally flips the rounding of a probability or of an "hf" score to the other
# neighbour, so a few outputs move by up to |s| ulps and the rest stay bit-identical.


@functools.cache
def _bounds(dtype: str) -> tuple[float, float, float]:
    """(max ulps, min bit-identical fraction, ulp floor_rel) for ``dtype`` on this backend
    (tolerances.yaml read once per dtype, not once per comparison)."""
    bud = budgets.load().lookup("attention", dtype, registry.backend())
    return (bud.properties["pallas_max_ulps"], bud.properties["pallas_min_bitwise_frac"], bud.parity.floor_rel)


NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}
BLOCKS = dict(block_q=16, block_k=16)
# The reference, jitted: one compile per case instead of one per op (the cold run's cost).
reference = jax.jit(gqa_attention,
                    static_argnames=("scale", "causal", "sliding_window", "softcap", "recipe", "q_chunk"))


def _term_sum(q, k, v, kw, *, signed: bool = False) -> np.ndarray:
    """``sum_s p_s |v_s|`` per output ``[B,T,N,H]``, from float64 probabilities of the same masks;
    ``signed``: ``sum_s p_s v_s``, the float64 truth of the attention itself."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    k64 = np.repeat(k.astype(np.float64), g, axis=2)  # [B, S, N, H]: query head n reads kv head n // G
    v64 = np.repeat(v.astype(np.float64), g, axis=2)  # [B, S, N, H]
    v64 = v64 if signed else np.abs(v64)
    sc = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), k64) * kw.get("scale", h ** -0.5)  # [B, N, T, S]
    if kw.get("softcap") is not None:
        sc = np.tanh(sc / kw["softcap"]) * kw["softcap"]
    qpos = kw.get("q_positions", np.broadcast_to(np.arange(s - t, s, dtype=np.int32), (b, t)))  # [B, T]
    kpos = kw.get("kv_positions", np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)))  # [B, S]
    seg = kw.get("segment_ids")
    qseg, kseg = (None, None) if seg is None else seg if isinstance(seg, tuple) else (seg[:, s - t:], seg)
    vis = np.asarray(_visible(jnp.asarray(qpos), jnp.asarray(kpos), qseg, kseg, kw.get("kv_valid"),
                              causal=kw.get("causal", True), sliding_window=kw.get("sliding_window")))  # [B, T, S]
    vis = vis[:, None]  # [B, 1, T, S]
    sc = np.where(vis, sc, -np.inf)
    m = np.max(sc, axis=-1, keepdims=True)  # [B, N, T, 1]
    e = np.where(vis, np.exp(sc - np.where(np.isfinite(m), m, 0.0)), 0.0)
    p = e / np.maximum(e.sum(-1, keepdims=True), np.finfo(np.float64).tiny)  # [B, N, T, S]
    return np.einsum("bnts,bsnh->btnh", p, v64)  # [B, T, N, H]


def _arrays(seed, b, t, s, n, kh, h, dtype):
    rng = np.random.default_rng(seed)
    dt = NP_DTYPES[dtype]
    q = rng.standard_normal((b, t, n, h)).astype(dt)
    k = rng.standard_normal((b, s, kh, h)).astype(dt)
    v = rng.standard_normal((b, s, kh, h)).astype(dt)
    return q, k, v


def _require_equal(got, ref, terms, dtype: str, what: str) -> None:
    """The structural equality of tolerances.yaml's pallas_* properties, on numpy outputs."""
    got = np.asarray(got).astype(np.float64)
    ref = np.asarray(ref).astype(np.float64)
    assert got.shape == ref.shape, what
    assert np.isfinite(got).all() and np.isfinite(ref).all(), f"{what}: non-finite output"
    max_ulps, min_same, floor_rel = _bounds(dtype)
    # ulps at max(|ref|, floor_rel * max|ref|, terms), as the op's parity measure takes them.
    worst = float(ulp_distance(got, ref, dtype=dtype, floor_rel=floor_rel, term_scale=terms).max(initial=0.0))
    same = float(np.mean(got == ref))
    assert worst <= max_ulps, f"{what}: {worst:.2f} ulps > {max_ulps}"
    assert same >= min_same, f"{what}: only {same:.4f} of outputs bit-identical (budget {min_same})"


def _segments(b, s, cuts):
    """Packed-sequence ids [B,S]: a new segment starts at each cut (cuts[b] for row b)."""
    ids = np.zeros((b, s), np.int32)
    for r in range(b):
        for c in cuts[r]:
            ids[r, c:] += 1
    return ids


def _kv_valid_left_pad(b, s, pads):
    valid = np.ones((b, s), bool)
    for r, p in enumerate(pads):
        valid[r, :p] = False
    return valid


# name -> (B, T, S, N, K, H, kwargs). Each exercises one mask kind; GQA (N=4, K=2; decode
# N=16, K=2) and MHA (N=K) alternate; H=48 exercises the zero-padding of the head dim to
# 64. Every case has at least 64 query rows (B*T*N), so that one row moved by a flipped
# rounding (see above) is a small fraction of the outputs.
CASES = {
    "causal": (2, 37, 37, 4, 2, 32, lambda b, t, s: {}),
    "non_causal_h48": (1, 20, 37, 4, 4, 48, lambda b, t, s: dict(causal=False)),
    "decode": (4, 1, 40, 16, 2, 32, lambda b, t, s: {}),
    "decode_k3": (2, 3, 40, 6, 3, 32, lambda b, t, s: {}),  # K = 3: no power of two; G * T = 6 rows a kv head
    "chunk": (2, 12, 45, 4, 2, 32, lambda b, t, s: {}),
    "kv_valid_empty_rows": (2, 24, 24, 4, 4, 32,
                            lambda b, t, s: dict(kv_valid=_kv_valid_left_pad(b, s, [0, 5]))),
    "segments": (2, 33, 33, 4, 2, 32, lambda b, t, s: dict(segment_ids=_segments(b, s, [[9, 20], [17]]))),
    "segments_pair": (2, 10, 30, 4, 4, 32, lambda b, t, s: dict(
        causal=False, segment_ids=(np.array([[0] * 4 + [1] * 6, [1] * 10], np.int32), _segments(b, s, [[12], [25]])))),
    "sliding_window": (1, 40, 40, 4, 2, 32, lambda b, t, s: dict(sliding_window=5)),
    "softcap": (2, 18, 18, 4, 2, 32, lambda b, t, s: dict(softcap=2.0, scale=0.3)),
    "positions": (2, 6, 48, 8, 2, 32, lambda b, t, s: dict(
        q_positions=np.array([[24, 25, 26, 27, 28, 29], [3, 4, 5, 6, 7, 8]], np.int32),
        kv_positions=np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(), sliding_window=20)),
}


# Every mask kind in bf16 and f16 with "hf" (the recipe with the most roundings); f32 (where
# both recipes are the same maths) on the cases that add something to f32: the IEEE dot
# (precision HIGHEST), the padded head dim, T=1 and the softcap's f32 tanh; "fp32_logits"
# in bf16/f16 on the cases that touch its own code (f32 scores and softcap) and the
# masks' edge cases (the mask code is shared by both recipes). Each combination costs
# one interpret-mode compile (1-1.5 s on a cold cache).
MATRIX = ([(c, d, "hf") for c in CASES for d in ("bfloat16", "float16")]
          + [(c, "float32", "hf") for c in ("causal", "non_causal_h48", "decode", "softcap")]
          + [(c, d, "fp32_logits") for c in ("causal", "decode", "softcap", "kv_valid_empty_rows")
             for d in ("bfloat16", "float16")])


# The split-key kernel (decode=True) on every case (each has at most 128 query rows a kv
# head, G * T): every mask kind, H = 48 padded to 64, T = 1 and T > 1, MHA and GQA, splits
# of 2 blocks of 16 keys (S = 18 ... 48: 1 to 4 splits, the last partly padding).
SPLIT = dict(block_k=16, num_splits=2)
KERNEL_OPTS = {"query_tiled": dict(decode=False, **BLOCKS), "split_key": dict(decode=True, **SPLIT)}
DECODE_CASES = [c for c in CASES if CASES[c][1] * (CASES[c][3] // CASES[c][4]) <= 128]
DECODE_MATRIX = ([(c, d, "hf") for c in DECODE_CASES for d in ("bfloat16", "float16")]
                 + [(c, "float32", "hf") for c in ("decode", "non_causal_h48", "softcap")]
                 + [(c, d, "fp32_logits") for c in ("decode", "softcap", "kv_valid_empty_rows")
                    for d in ("bfloat16", "float16")])


@pytest.mark.parametrize(("case", "dtype", "recipe", "kernel"),
                         [(*m, "query_tiled") for m in MATRIX] + [(*m, "split_key") for m in DECODE_MATRIX])
def test_equals_gqa_attention(case, dtype, recipe, kernel):
    b, t, s, n, kh, h, make_kwargs = CASES[case]
    q, k, v = _arrays(list(CASES).index(case), b, t, s, n, kh, h, dtype)
    kw = dict(make_kwargs(b, t, s), recipe=recipe)
    ref = reference(q, k, v, **kw)
    got = pallas_attention(q, k, v, **kw, **KERNEL_OPTS[kernel], interpret=True)
    assert got.dtype == ref.dtype == jnp.dtype(NP_DTYPES[dtype])
    _require_equal(got, ref, _term_sum(q, k, v, kw), dtype, f"{case} {dtype} {recipe} {kernel}")


def test_split_count_changes_only_the_sum_order():
    """1, 2 and 8 splits of the same keys: the same bf16 "hf" outputs up to the pallas budget
    (the splits' partial sums are the only f32 reordering), and 1 split is bit-identical
    to itself run twice (no nondeterminism: no atomics, a fixed order of the final sum)."""
    q, k, v = _arrays(21, 2, 1, 128, 16, 4, 32, "bfloat16")
    outs = [np.asarray(pallas_attention(q, k, v, block_k=16, num_splits=ns, decode=True, interpret=True))
            for ns in (1, 2, 8)]
    ref = reference(q, k, v)
    for o in outs:
        _require_equal(o, ref, _term_sum(q, k, v, {}), "bfloat16", "split count")
    again = np.asarray(pallas_attention(q, k, v, block_k=16, num_splits=8, decode=True, interpret=True))
    np.testing.assert_array_equal(again, outs[2])


# A decode cache of S = 160 slots (10 key blocks of 16), filled to 75 keys in batch row 0
# (5 blocks, the last one partly) and to none in row 1: the masks a decode loop passes,
# each hiding the unfilled slots (and, with the window, the keys before it).
FILL, SLOTS = 75, 160


def _cache_masks(name: str, s: int) -> dict:
    kpos = np.broadcast_to(np.arange(s, dtype=np.int32), (2, s)).copy()
    qpos = np.array([[FILL - 1], [0]], np.int32)  # [B, 1]
    valid = np.zeros((2, s), bool)
    valid[0, :FILL] = True  # row 1: nothing filled
    if name == "kv_valid":  # kernels.models.qwen2's decode step: positions and kv_valid
        return dict(q_positions=qpos, kv_positions=kpos, kv_valid=valid)
    if name == "kv_valid_only":  # no positions: the default causal alignment sees every slot
        return dict(kv_valid=valid)
    return dict(q_positions=qpos, kv_positions=kpos, kv_valid=valid, sliding_window=37)  # "window": 38..74


@pytest.mark.parametrize("flash", [False, True], ids=["two_pass", "flash"])
@pytest.mark.parametrize("mask", ["kv_valid", "kv_valid_only", "window"])
def test_decode_reads_only_the_visible_span(mask, flash):
    """The split-key kernels deal out only each batch row's span of visible key blocks over
    their splits (``_split_blocks``): a cache of 160 slots filled to 75 keys gives the
    bits of the same cache cut after its last visible block (80 slots), though its
    unfilled slots hold NaN, and a row with nothing filled gives zeros. float32, where
    the splits' f32 partial sums show in the output bits: reading all 10 blocks in the
    static splits (5 a split) groups the 5 visible ones differently (3 + 2 here), so the
    bits of a kernel that reads every block differ (the mutant below)."""
    cut = -(-FILL // 16) * 16
    q, k0, v0 = _arrays(31, 2, 1, SLOTS, 16, 2, 32, "float32")
    k, v = k0.copy(), v0.copy()
    k[:, FILL:], v[:, FILL:] = np.nan, np.nan  # the unfilled slots
    kw = dict(recipe="fp32_logits", flash=flash, block_k=16, num_splits=2, decode=True, interpret=True)
    full = np.asarray(pallas_attention(q, k, v, **_cache_masks(mask, SLOTS), **kw))
    short = np.asarray(pallas_attention(q, k[:, :cut], v[:, :cut], **_cache_masks(mask, cut), **kw))
    assert np.isfinite(full).all() and np.all(full[1] == 0.0)
    np.testing.assert_array_equal(full, short)
    if not flash:  # and they are the recipe's numbers (flash has its own budgets: test_attention.py)
        kv = _cache_masks(mask, cut)
        _require_equal(short, reference(q, k0[:, :cut], v0[:, :cut], recipe="fp32_logits", **kv),
                       _term_sum(q, k0[:, :cut], v0[:, :cut], kv), "float32", mask)


def test_visible_span_test_catches_a_kernel_that_reads_every_block(monkeypatch):
    """The mutant: every batch row's span the whole cache (the kernels as they were before:
    every block read, in the static splits). Its bits differ from the cut cache's, so
    ``test_decode_reads_only_the_visible_span`` fails it (float32, the two-pass kernel)."""
    import kernels.attention_pallas as kp

    def every_block(q_pos, kv_pos, kv_valid, *, t, block_k, causal, sliding_window):
        b, s = kv_valid.shape
        return jnp.broadcast_to(jnp.array([0, -(-s // block_k)], jnp.int32), (b, 2))  # [B, 2]: every block

    monkeypatch.setattr(kp, "_visible_span", every_block)
    jax.clear_caches()  # the kernels are traced again with the mutant
    try:
        with pytest.raises(AssertionError, match="not equal"):
            test_decode_reads_only_the_visible_span("kv_valid", False)
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_deal_blocks_partitions_the_span():
    """``deal_blocks`` gives each split one run of the span, in split order, the runs
    covering ``[first, first + nb)`` once with nothing outside it (0 blocks for a split past
    the end or an empty span), and with the whole padded cache as the span (``nb =
    n_split * steps``) the static splits. ``block_span`` finds a row's first and last
    visible key's blocks, and 0 blocks for a row with none."""
    from kernels.attention_pallas import block_span, deal_blocks

    for n_split in (1, 2, 3, 8):
        for first in (0, 5):
            for nb in range(0, 3 * n_split + 2):
                runs = [tuple(int(x) for x in deal_blocks(jnp.int32(first), jnp.int32(nb), j, n_split=n_split))
                        for j in range(n_split)]
                covered = [b for start, count in runs for b in range(start, start + count)]
                assert covered == list(range(first, first + nb)), (n_split, first, nb, runs)
        steps = 3
        assert [tuple(int(x) for x in deal_blocks(jnp.int32(0), jnp.int32(n_split * steps), j, n_split=n_split))
                for j in range(n_split)] == [(j * steps, steps) for j in range(n_split)]
    ok = np.zeros((3, 100), bool)
    ok[0, 17:40] = True  # keys 17..39: blocks 1..2 of 16
    ok[1, [0, 99]] = True  # blocks 0 and 6: the span is 0..6
    assert block_span(jnp.asarray(ok), block_k=16).tolist() == [[1, 2], [0, 7], [6, 0]]


def test_default_blocks_agree():
    """The default 64x64 blocks, launched heavy first (clamped to the padded T and S: 1 x 2
    tiles here), agree too, and so do the split-key kernel's defaults (block_k 64, 128
    splits for K = 2: here 2 splits of 64, the last one partly padding)."""
    q, k, v = _arrays(7, 1, 21, 100, 4, 2, 64, "bfloat16")
    _require_equal(pallas_attention(q, k, v, decode=False, interpret=True), reference(q, k, v),
                   _term_sum(q, k, v, {}), "bfloat16", "default blocks")
    qd = q[:, -1:]  # [1, 1, 4, 64]: one decode step, G * T = 2 rows, the kernel chosen by default
    _require_equal(pallas_attention(qd, k, v, interpret=True), reference(qd, k, v), _term_sum(qd, k, v, {}),
                   "bfloat16", "default split-key kernel")


@pytest.mark.parametrize("kwargs", [dict(), dict(sliding_window=6)], ids=["causal", "window"])
def test_block_skipping_changes_no_bit(kwargs):
    """Skipping key blocks outside the causal range (default positions) gives the bits of
    visiting them all (explicit positions equal to the defaults disable the skipping)."""
    b, t, s = 1, 30, 45
    q, k, v = _arrays(3, b, t, s, 4, 2, 32, "float32")
    explicit = dict(q_positions=np.arange(s - t, s, dtype=np.int32)[None, :],
                    kv_positions=np.arange(s, dtype=np.int32)[None, :])
    skipped = pallas_attention(q, k, v, **kwargs, **BLOCKS, decode=False, interpret=True)
    visited = pallas_attention(q, k, v, **kwargs, **explicit, **BLOCKS, decode=False, interpret=True)
    np.testing.assert_array_equal(np.asarray(skipped), np.asarray(visited))


@pytest.mark.parametrize("case", ["causal", "segments", "sliding_window"])
def test_launch_order_changes_no_bit(case):
    """``q_order`` only reorders the programs: every order gives the bits of the grid's own,
    with 3 query blocks of 16 rows, the last one padded."""
    b, t, s, n, kh, h, make_kwargs = CASES[case]
    q, k, v = _arrays(list(CASES).index(case), b, t, s, n, kh, h, "bfloat16")
    kw = dict(make_kwargs(b, t, s), **BLOCKS, decode=False, interpret=True)
    assert -(-t // BLOCKS["block_q"]) >= 3
    outs = {o: pallas_attention(q, k, v, **kw, q_order=o) for o in Q_ORDERS}
    for o in Q_ORDERS:
        np.testing.assert_array_equal(np.asarray(outs[o].astype(jnp.float32)),
                                      np.asarray(outs["in_order"].astype(jnp.float32)), err_msg=o)
    _require_equal(outs["zigzag"], reference(q, k, v, **make_kwargs(b, t, s)), _term_sum(q, k, v, make_kwargs(b, t, s)),
                   "bfloat16", f"{case} zigzag")


# Both kernels in both numerics: the recipe's two passes, and flash's one (fp32_logits).
ALL_KERNEL_OPTS = {**KERNEL_OPTS, **{f"{name}_flash": dict(opts, flash=True, recipe="fp32_logits")
                                     for name, opts in KERNEL_OPTS.items()}}
KERNELS = pytest.mark.parametrize("kernel", list(ALL_KERNEL_OPTS.values()), ids=list(ALL_KERNEL_OPTS))


@KERNELS
def test_fully_masked_rows_are_exactly_zero(kernel):
    b, t, s = 2, 24, 24
    q, k, v = _arrays(5, b, t, s, 2, 2, 32, "bfloat16")
    kv_valid = _kv_valid_left_pad(b, s, [0, 5])  # row 1: queries 0..4 see only padding
    out = np.asarray(pallas_attention(q, k, v, kv_valid=kv_valid, **kernel, interpret=True).astype(jnp.float32))
    assert np.all(out[1, :5] == 0.0)
    assert np.all(np.abs(out[1, 5:]).sum(-1) > 0) and np.all(np.abs(out[0]).sum(-1) > 0)


@KERNELS
@pytest.mark.parametrize("poison", [np.nan, np.inf])
@pytest.mark.parametrize("mask", ["kv_valid", "cache_slots", "segments"])
def test_masked_kv_cannot_reach_output(mask, poison, kernel):
    """NaN/inf in k and v of keys that no query may see changes no bit of the output."""
    b, t, s = 2, 6, 40
    q, k, v = _arrays(11, b, t, s, 4, 2, 32, "bfloat16")
    if mask == "kv_valid":  # padding in the middle of the keys
        kw = dict(causal=False, kv_valid=_kv_valid_left_pad(b, s, [0, 0]))
        kw["kv_valid"][:, 10:19] = False
        hidden = ~kw["kv_valid"]
    elif mask == "cache_slots":  # unfilled cache slots after the queries' positions, no kv_valid
        qpos = np.broadcast_to(np.arange(20, 26, dtype=np.int32), (b, t)).copy()
        kw = dict(q_positions=qpos, kv_positions=np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy())
        hidden = np.zeros((b, s), bool)
        hidden[:, 26:] = True
    else:  # keys of another packed sequence (segment 0), queries in segment 1
        seg = _segments(b, s, [[15], [15]])
        kw = dict(segment_ids=seg)
        hidden = seg == 0
    bad_k, bad_v = k.copy(), v.copy()
    bad_k[hidden] = poison
    bad_v[hidden] = poison
    clean = np.asarray(pallas_attention(q, k, v, **kw, **kernel, interpret=True).astype(jnp.float32))
    dirty = np.asarray(pallas_attention(q, bad_k, bad_v, **kw, **kernel, interpret=True).astype(jnp.float32))
    assert np.isfinite(dirty).all()
    np.testing.assert_array_equal(dirty, clean)


@pytest.mark.parametrize("bad", [
    dict(block_q=24), dict(block_k=8), dict(num_warps=0), dict(recipe="flash"), dict(sliding_window=4, causal=False),
    dict(num_splits=3), dict(num_splits=0), dict(flash=True), dict(flash=True, recipe="hf"), dict(flash=1),
])
def test_bad_arguments_raise(bad):
    q, k, v = _arrays(0, 1, 4, 4, 2, 2, 16, "float32")
    with pytest.raises(ValueError):
        pallas_attention(q, k, v, **bad, interpret=True)


def test_split_key_kernel_refuses_too_many_rows():
    q, k, v = _arrays(0, 1, 17, 17, 16, 2, 16, "float32")  # G * T = 8 * 17 = 136 > 128 rows a kv head
    with pytest.raises(ValueError, match="G\\*T = 8\\*17 = 136"):
        pallas_attention(q, k, v, decode=True, interpret=True)
    assert pallas_attention(q, k, v, interpret=True).shape == q.shape  # None picks the query-tiled kernel


def test_dtype_mismatch_raises():
    q, k, v = _arrays(0, 1, 4, 4, 2, 2, 16, "float32")
    with pytest.raises(ValueError, match="share one dtype"):
        pallas_attention(q, k.astype(ml_dtypes.bfloat16), v, interpret=True)


@pytest.mark.parametrize("kernel", ["query_tiled", "split_key"])
def test_flash_differs_from_the_recipe_only_by_rounding(kernel):
    """flash=True reorders the same maths: the output sits within a bf16 rounding or two of
    the recipe's (what the budgets of implementations.pallas_flash bound against the
    oracle), and its error against the float64 truth is of the same size."""
    b, t, s, n, kh, h = 2, 8, 70, 8, 2, 32  # 5 key blocks of 16; split-key: 2 splits, the last partly padding
    q, k, v = _arrays(21, b, t, s, n, kh, h, "bfloat16")
    q = (q.astype(np.float32) * 3).astype(q.dtype)  # scores ~10: the running max moves between blocks
    kw = dict(recipe="fp32_logits", **KERNEL_OPTS[kernel])
    flash = np.asarray(pallas_attention(q, k, v, **kw, flash=True, interpret=True).astype(jnp.float32), np.float64)
    recipe = np.asarray(pallas_attention(q, k, v, **kw, interpret=True).astype(jnp.float32), np.float64)
    truth = _term_sum(q, k, v, dict(causal=True), signed=True)  # [B, T, N, H] float64
    scale = np.abs(truth).max()
    err_flash, err_recipe = np.abs(flash - truth).max() / scale, np.abs(recipe - truth).max() / scale
    assert not np.array_equal(flash, recipe), "flash=True returned the recipe's bits: the flag did nothing"
    assert err_flash <= 2 * err_recipe, f"flash error {err_flash:.3g} vs the recipe's {err_recipe:.3g}"
    assert np.abs(flash - recipe).max() / scale < 2 ** -6  # a couple of bf16 roundings, not a wrong formula


def test_gqa_attention_pallas_flash_refuses_the_hf_recipe():
    q, k, v = _arrays(0, 1, 4, 4, 2, 2, 16, "bfloat16")
    with pytest.raises(ValueError, match="implementation='pallas_flash' needs recipe='fp32_logits'"):
        gqa_attention(q, k, v, recipe="hf", implementation="pallas_flash")


# Each mask kind, softcap and both recipes, in bf16 (the dtype the GPU default serves), on
# the query-tiled kernel, and the decode cases on the split-key kernel and with flash numerics.
GRAD_MATRIX = ([(c, "hf", "query_tiled", False) for c in CASES]
               + [("softcap", "fp32_logits", "query_tiled", False), ("decode", "hf", "split_key", False),
                  ("kv_valid_empty_rows", "fp32_logits", "split_key", True)])


@pytest.mark.parametrize(("case", "recipe", "kernel", "flash"), GRAD_MATRIX)
def test_gradient_is_the_xla_paths(case, recipe, kernel, flash):
    """jax.vjp through the kernel is jax.vjp through gqa_attention's XLA path with the same
    options, to the bit (kernels._grad differentiates that twin): every mask and option must
    reach it. Before, any jax.grad through the GPU default stopped with an AssertionError."""
    from oracles.gradients import seeded_vjp

    b, t, s, n, kh, h, make_kwargs = CASES[case]
    q, k, v = _arrays(list(CASES).index(case), b, t, s, n, kh, h, "bfloat16")
    kw = dict(make_kwargs(b, t, s), recipe=recipe)
    got = seeded_vjp(lambda q, k, v: pallas_attention(q, k, v, **kw, **KERNEL_OPTS[kernel], flash=flash,
                                                      interpret=True), q, k, v)
    want = seeded_vjp(lambda q, k, v: gqa_attention(q, k, v, **kw, implementation="xla"), q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == w.dtype and bool(jnp.isfinite(w.astype(jnp.float32)).all()), f"{case}: d{name}"
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                      err_msg=f"{case} {recipe} {kernel}: d{name}")
