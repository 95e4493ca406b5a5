"""One float32-accumulating contraction for every matmul of the kernels.

``dot_f32(x, w)`` is ``x[..., K] @ w`` with products and sums in float32, returned in
float32 (unrounded), at ``precision=HIGHEST`` (a float32 matmul never falls to TF32 on
a GPU).

Why not a bare ``jnp.matmul``: XLA's CPU backend compiles a matmul with few rows (a
decode step, a single-row projection) to its own matrix-vector loop, which accumulates
each output as one sequential float32 sum over all K terms. Over K = 18944 (Qwen2.5-7B's
MLP width) that sum is measured 3x less accurate than torch's MKL gemv, and 14x on the
worst of 1000 fuzzed MLP cases (`benchmarks/results` and tolerances.yaml's provenance).
The CPU path therefore splits the reduction into ``c`` chunks of ``K / c`` terms, lets
XLA contract each chunk (a batched matmul), and adds the ``c`` float32 partial sums:
the error of a chunked sum grows like ``sqrt(K/c) + sqrt(c)`` instead of ``sqrt(K)``
ulps for random terms, and ``K/c`` terms per chunk is also how a blocked BLAS bounds
its sums. The price is a ``[..., c, N]`` float32 partial (``c`` times the output), so
the split is used only where that stays small: few rows (the case XLA sums
sequentially) and long reductions. Larger matmuls go to XLA's blocked gemm (Eigen),
which is as accurate as torch's there. Other backends (GPU: cuBLAS) get the plain
matmul: on the H100 one row is summed as accurately as the split already, and for 2-8
rows the split costs 1.4-7.5x XLA's GEMM (benchmarks/probe_f32_algorithm.py).
bfloat16/float16 inputs are not split either (unless their float32 sum is the
result, ``f32_result``): torch's CPU matmul for those sums in XLA's sequential order (a
swiglu down projection, K = 4864, one row: bit-exact with the plain matmul, 62% of
elements off by up to 17 bf16 ulps with the split), so the plain matmul is what
reproduces HF's bits, and their float32 sums are far more precise than the bf16/f16
rounding that follows. The exception is float16 with at most 8 rows, whose order
torch's CPU kernels were probed for (FPRev) and which the CPU path reproduces: one row
in 64 lanes (``_f16_row``), 2-8 rows in sequential blocks of 512 or 1024 terms on an
AVX-512 host with a native float16 ISA and in the one-row lanes elsewhere (``_f16_rows``,
``host_has_avx512_fp16``: torch's order depends on the host); bit-exact with torch from K = 64 to 18944, where XLA's own order
differed on up to 0.7% of outputs and left float16 SwiGLU up to 3 ulps (36% of one
fuzzed case's outputs) off. The chunk count depends only on static shapes, so a
compiled function has one fixed summation order.

Derivative (the CPU split path): reverse mode's ``grad x = ct @ w^T`` sums over the N
outputs, and JAX's own transpose of the split leaves that sum whole, which XLA's CPU
backend adds sequentially under jit (12x torch's error for a 4-row lm_head on an AVX2
host, 2.3x on an AVX-512 one with jax 0.11.2). ``_split_dot_ad`` keeps the value and differentiates
through ``_split_dot_x``, whose transpose splits the sum over N in chunks as the forward
splits K (0.60-0.65x torch's error on both hosts; forward mode and higher orders work
as before: ``jax.custom_jvp``). Timed in ``benchmarks/probe_dot_grad_cpu.py``.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

_HIGHEST = jax.lax.Precision.HIGHEST
# A chunk of this many terms at most ...
CHUNK = 128
# ... and at least this many chunks. torch's CPU gemm keeps 16 float32 partial sums per
# output (one per AVX-512 lane) within blocks of K, so even a short sum is split there;
# 32 chunks keep the kernel's error below torch's on the long tail of fuzzed cases (16
# left a one-row, K = 3584 projection with a 63x outlier channel at 2.47x torch's error;
# 32 gives 0.45x), at the speed of the plain matmul for one row (benchmarked in the
# commit that set it: 1-4 rows within 1.6x, 8 rows of a K = 896 matmul 3.5x slower).
LANES = 32
# Split only a reduction at least this long, into chunks of at least MIN_CHUNK terms.
MIN_SPLIT_K = 64
MIN_CHUNK = 8
# ... only for this many rows at most (XLA's own matrix-vector loop; more rows go to
# its blocked gemm, which is as accurate as torch's and which a split would slow down) ...
MAX_SPLIT_ROWS = 8
# ... and only while the float32 partials [rows, c, N] stay under this many elements.
MAX_PARTIAL_ELEMS = 1 << 23


def _chunk_count(k: int) -> int:
    """The number of chunks ``c`` (a divisor of ``k``): ``LANES`` where chunks keep at least
    ``MIN_CHUNK`` terms, and enough that ``k / c <= CHUNK``; 1 if no divisor fits.

    The smallest such divisor keeps chunks long and partials few. A ``k`` with no divisor
    in range (a large prime) is not split: padding it would copy the weight.
    """
    if k < MIN_SPLIT_K:
        return 1
    # LANES chunks, but none shorter than MIN_CHUNK terms (a 64-term sum in 32 chunks of 2
    # is a 32-term sequential sum again), and none longer than CHUNK.
    lo = max(min(LANES, k // MIN_CHUNK), -(-k // CHUNK))
    for c in range(lo, min(k, 4 * lo) + 1):
        if k % c == 0:
            return c
    return 1


# torch's CPU matmul of one float16 row (probed with FPRev on an AVX-512 host, K from 64
# to 18944; the same on an AVX2 host, session 20): 64 float32 lanes, lane l summing the
# products l, l + 64, l + 128, ... in order, then the lanes added pairwise (l + l + 32,
# then + 16, ... 1).
F16_LANES = 64


def _f16_row(x, w, *, w_contract):
    """One float16 row times ``w`` in torch's order (``F16_LANES`` above); float32 ``[..., N]``.

    Products of two float16 are exact in float32, so an FMA contraction of
    ``acc + x * w`` cannot change a sum; the loop fixes the order of the adds.
    """
    if w_contract == 0:
        return _f16_lane_rows(x, w)  # [..., N]: the same lanes, a row of one
    k = x.shape[-1]
    j = k // F16_LANES
    lead = x.shape[:-1]
    xs = x.reshape(j, F16_LANES).astype(jnp.float32)  # [J, 64]: element l + 64 i is xs[i, l]; f16 -> f32 exact
    ws = w.reshape(w.shape[0], j, F16_LANES)  # [N, J, 64]: a free view of the table [N, K]
    n = ws.shape[0]

    def body(i, acc):  # acc [N, 64]
        wi = jax.lax.dynamic_index_in_dim(ws, i, axis=1, keepdims=False).astype(jnp.float32)  # [N, 64]
        return acc + xs[i][None, :] * wi
    acc = jax.lax.fori_loop(0, j, body, jnp.zeros((n, F16_LANES), jnp.float32))  # [N, 64]
    while acc.shape[1] > 1:
        h = acc.shape[1] // 2
        acc = acc[:, :h] + acc[:, h:]  # [N, h]
    return acc.reshape(*lead, n)  # [..., N]


# torch's CPU matmul of 2 to 64 float16 rows (probed the same way, K from 128 to 18944):
# on an Intel AVX-512 host, each output summed sequentially within blocks of F16_BLOCK_SMALL
# terms when K <= 1024, else F16_BLOCK terms, the block sums added in order. On an AVX2
# host (torch's CPU capability "avx2": session 20, an AMD EPYC without AVX-512) the rows
# take the one-row order instead, 64 lanes added pairwise: bit-exact at K = 64, 896, 1152
# and 4864 over 6 rows, where every blocked order left 0.07-1.3% of outputs off. So does an
# AMD EPYC with AVX-512 but no AVX512-FP16 (session 24: torch capability "AVX512", bit-exact
# in the lanes at 7 shapes x 2-8 rows, the blocks 0.08-0.8% off): the blocked order is
# oneDNN's float16 matmul, which torch takes only on a CPU with a native float16 ISA.
F16_BLOCK_SMALL, F16_BLOCK = 512, 1024


@functools.cache
def host_has_avx512_fp16() -> bool:
    """Whether torch's float16 matmul of a few rows takes oneDNN's blocked order on this host:
    the flags torch's "avx512" capability needs (avx512f, bw, vl, dq) and a native float16
    ISA (avx512_fp16 or amx_fp16, which oneDNN's float16 matmul needs) in /proc/cpuinfo, and
    ``ATEN_CPU_CAPABILITY`` (torch's own override) naming none below "avx512". The override
    can only lower the capability: torch ignores one the host lacks (measured: "avx512" on an
    AVX2 host left torch in its AVX2 order). Read once, at trace time: it picks the float16
    summation order that reproduces torch's on this host. Not reproduced: torch's scalar
    kernels (``ATEN_CPU_CAPABILITY=default``), whose order differs from both."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
        has = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags and bool({"avx512_fp16", "amx_fp16"} & flags)
    except OSError:
        has = True  # no cpuinfo to read (not Linux): the order probed first
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    return has and (not cap or cap.startswith("avx512"))


def _f16_rows(x, w):
    """A few float16 rows times ``w[K, N]`` in torch's order on this host; float32 ``[..., N]``:
    blocked sequential on an AVX-512 host with a native float16 ISA, 64 lanes otherwise
    (``F16_BLOCK`` above).

    Products of two float16 are exact in float32 (an FMA contraction changes nothing);
    the loops fix the order of the adds (XLA's own small matmul differs from torch on
    ~0.2% of outputs).
    """
    return _f16_blocks(x, w) if host_has_avx512_fp16() else _f16_lane_rows(x, w)


def _f16_blocks(x, w):
    """``_f16_rows``'s AVX-512 order: sequential within blocks of ``F16_BLOCK_SMALL`` /
    ``F16_BLOCK`` terms, the block sums added in order; float32 ``[..., N]``."""
    k = x.shape[-1]
    n = w.shape[1]
    lead = x.shape[:-1]
    xs = x.reshape(-1, k).astype(jnp.float32).T  # [K, R]: exact f16 -> f32; a row per term
    kc = F16_BLOCK_SMALL if k <= 2 * F16_BLOCK_SMALL else F16_BLOCK

    def body(i, acc):  # acc [R, N]
        wi = jax.lax.dynamic_index_in_dim(w, i, axis=0, keepdims=False).astype(jnp.float32)  # [N]
        return acc + xs[i][:, None] * wi[None, :]

    total = None
    for start in range(0, k, kc):
        part = jax.lax.fori_loop(start, min(k, start + kc), body, jnp.zeros((xs.shape[1], n), jnp.float32))  # [R, N]
        total = part if total is None else total + part
    return total.reshape(*lead, n)  # [..., N]


def _f16_lane_rows(x, w):
    """A few float16 rows times ``w[K, N]`` in the one-row order (``F16_LANES``), each row
    alike: torch's order for them on an AVX2 host; float32 ``[..., N]``. K a multiple of 64
    (else the blocked order, which torch's AVX2 kernels were not probed for)."""
    k = x.shape[-1]
    if k % F16_LANES:
        return _f16_blocks(x, w)
    j, n, lead = k // F16_LANES, w.shape[1], x.shape[:-1]
    xs = x.reshape(-1, j, F16_LANES).astype(jnp.float32)  # [R, J, 64]: f16 -> f32 exact
    ws = w.reshape(j, F16_LANES, n)  # [J, 64, N]: a free view of [K, N]

    def body(i, acc):  # acc [64, R, N]
        wi = jax.lax.dynamic_index_in_dim(ws, i, axis=0, keepdims=False).astype(jnp.float32)  # [64, N]
        xi = jax.lax.dynamic_index_in_dim(xs, i, axis=1, keepdims=False)  # [R, 64]
        return acc + xi.T[:, :, None] * wi[:, None, :]
    acc = jax.lax.fori_loop(0, j, body, jnp.zeros((F16_LANES, xs.shape[0], n), jnp.float32))  # [64, R, N]
    while acc.shape[0] > 1:
        h = acc.shape[0] // 2
        acc = acc[:h] + acc[h:]  # [h, R, N]: lane l + lane l + h
    return acc.reshape(*lead, n)  # [..., N]


def _plain(x, w, dims):
    return jax.lax.dot_general(x, w, dimension_numbers=(dims, ((), ())), precision=_HIGHEST,
                               preferred_element_type=jnp.float32)


def split_dot(x: jax.Array, w: jax.Array, *, chunks: int, w_contract: int) -> jax.Array:
    """``dot_f32``'s split form: the K products in ``chunks`` chunks of ``K / chunks`` terms
    (``chunks`` divides K), each summed by XLA, then the chunk sums added in float32."""
    c = chunks
    k = x.shape[-1]
    n = w.shape[1 - w_contract]
    rows = math.prod(x.shape[:-1])
    if w_contract == 0:
        x2 = x.reshape(rows, c, k // c).swapaxes(0, 1)  # [c, rows, K/c]: the chunk is the batch
        ws = w.reshape(c, k // c, n)  # [c, K/c, N]: row-major, a free view
        part = jax.lax.dot_general(x2, ws, dimension_numbers=(((2,), (1,)), ((0,), (0,))),
                                   precision=_HIGHEST, preferred_element_type=jnp.float32)  # [c, rows, N]
        total = jnp.sum(part, axis=0)  # [rows, N]: the c partial sums, added in float32
    else:
        # A table [N, K] read in place, its K contiguous: a batched matmul over c would
        # make XLA transpose (copy) it. Products and the two sums instead, which XLA
        # fuses into one pass over the table (measured as fast as its plain matmul).
        x4 = x.reshape(rows, 1, c, k // c).astype(jnp.float32)  # [rows, 1, c, K/c]; products in f32
        w4 = w.reshape(1, n, c, k // c).astype(jnp.float32)  # [1, N, c, K/c]; bf16/f16 products are exact in f32
        total = jnp.sum(jnp.sum(x4 * w4, axis=3), axis=2)  # [rows, N]: each chunk, then the c partials
    return total.reshape(*x.shape[:-1], n)  # [..., N]


def _out_chunk_count(n: int, rows: int, k: int) -> int:
    """The chunks of the output axis N for ``split_dot``'s derivative (``_split_dot_ad``):
    ``_chunk_count(n)``, or where its float32 partials ``[rows, K, c]`` would pass
    ``MAX_PARTIAL_ELEMS``, the largest divisor of ``n`` that keeps them under it (longer
    chunks, still far shorter than one sequential sum over N); 1 if none does."""
    c = _chunk_count(n)
    most = MAX_PARTIAL_ELEMS // max(1, rows * k)
    if c <= most:
        return c
    return next((d for d in range(min(most, n), 1, -1) if n % d == 0), 1)


def _split_dot_x(t: jax.Array, w: jax.Array, *, chunks: int, out_chunks: int, w_contract: int) -> jax.Array:
    """``split_dot``'s product, linear in ``t`` (a tangent of x), written so that its
    transpose (reverse mode's ``grad x = ct @ w^T``, a sum over the N outputs) is split too.

    Why: transposed by JAX, ``split_dot`` pulls ``ct[rows, N]`` back through one sum over
    all N terms, which XLA's CPU backend, under jit, adds sequentially: a few-row lm_head's
    grad(x) (N = V) measured 12.1x torch's error on an AVX2 host, a swiglu's grad through
    its down projection (N = D = 3584) 3.1x. Here ``t`` is broadcast over ``out_chunks``
    chunks of N explicitly (``broadcast_in_dim``), and each product is formed against a
    chunk of ``N / out_chunks`` outputs, so the transpose sums each chunk's terms, then the
    chunk partials: the two-level sum of ``split_dot``'s forward, over N. Forward (a
    ``jax.jvp``), the K sum is split into ``chunks`` as in ``split_dot``. Products and
    sums in float32 (bf16/f16 products are exact in float32). Reverse mode runs one fused
    pass over ``w``; its only buffer is the ``[rows, K, out_chunks]`` float32 partials
    (bounded by ``_out_chunk_count``).
    """
    c, cn = chunks, out_chunks
    k = t.shape[-1]
    n = w.shape[1 - w_contract]
    rows = math.prod(t.shape[:-1])
    tf = t.reshape(rows, c, k // c).astype(jnp.float32)  # [rows, c, K/c]; bf16/f16 -> f32 exact
    # The explicit broadcast over the N chunks is what reverse mode turns into the sum of
    # the cn chunk partials; the implicit one over a chunk's N/cn outputs, into each chunk's sum.
    tb = jax.lax.broadcast_in_dim(tf, (rows, c, k // c, cn), (0, 1, 2))  # [rows, c, K/c, cn]
    if w_contract == 0:
        w5 = w.reshape(c, k // c, cn, n // cn).astype(jnp.float32)  # [c, K/c, cn, N/cn]: a free view of [K, N]; exact
        prod = tb[..., None] * w5[None]  # [rows, c, K/c, cn, N/cn]
        total = jnp.sum(jnp.sum(prod, axis=2), axis=1)  # [rows, cn, N/cn]: each K chunk, then the c partials
    else:
        w5 = w.reshape(cn, n // cn, c, k // c).astype(jnp.float32)  # [cn, N/cn, c, K/c]: a free view of [N, K]; exact
        prod = tb.transpose(0, 3, 1, 2)[:, :, None] * w5[None]  # [rows, cn, N/cn, c, K/c]
        total = jnp.sum(jnp.sum(prod, axis=4), axis=3)  # [rows, cn, N/cn]: each K chunk, then the c partials
    return total.reshape(*t.shape[:-1], n)  # [..., N]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _split_dot_ad(x, w, chunks, out_chunks, w_contract):
    """``split_dot`` (the value, bit for bit), differentiated through ``_split_dot_x`` in x so
    that reverse mode's sum over N is split as the forward's sum over K is. In w, the
    derivative is ``split_dot``'s own: its transpose sums over the few rows only."""
    return split_dot(x, w, chunks=chunks, w_contract=w_contract)


def _split_dot_ad_jvp(chunks, out_chunks, w_contract, primals, tangents):
    x, w = primals
    tx, tw = tangents
    terms = []  # a zero tangent (symbolic) costs nothing: no matmul of zeros
    if not isinstance(tx, SymbolicZero):
        terms.append(_split_dot_x(tx, w, chunks=chunks, out_chunks=out_chunks, w_contract=w_contract))
    if not isinstance(tw, SymbolicZero):
        terms.append(split_dot(x, tw, chunks=chunks, w_contract=w_contract))
    return _split_dot_ad(x, w, chunks, out_chunks, w_contract), functools.reduce(jnp.add, terms)


_split_dot_ad.defjvp(_split_dot_ad_jvp, symbolic_zeros=True)


def dot_f32(x: jax.Array, w: jax.Array, *, w_contract: int = 0, f32_result: bool = False) -> jax.Array:
    """``x[..., K]`` contracted with axis ``w_contract`` of the 2-D ``w``; float32 result.

    ``w_contract=0``: ``w`` is ``[K, N]`` (a Linear weight stored ``[in, out]``).
    ``w_contract=1``: ``w`` is ``[N, K]`` (``nn.Linear``'s layout, a tied embedding table), read
    in place.
    ``f32_result=True``: the caller keeps the float32 sum as its result (f32 logits from
    bf16/f16 inputs), so bf16/f16 inputs are split too: their sum is then the answer, not
    something rounded to bf16 afterwards (measured: f32 logits from bf16 inputs needed
    3.7x, from f16 5.5x, torch's float32 error unsplit).
    Returns ``[..., N]`` float32: products and sums in float32, never rounded to the
    inputs' dtype (the caller rounds, once).
    """
    k = x.shape[-1]
    n = w.shape[1 - w_contract]
    rows = math.prod(x.shape[:-1])
    dims = ((x.ndim - 1,), (w_contract,))
    if x.dtype == jnp.float16 and not f32_result and rows == 1 and k % F16_LANES == 0:
        return jax.lax.platform_dependent(x, w, cpu=lambda x, w: _f16_row(x, w, w_contract=w_contract),
                                          default=lambda x, w: _plain(x, w, dims))
    if x.dtype == jnp.float16 and not f32_result and 1 < rows <= MAX_SPLIT_ROWS and w_contract == 0:
        return jax.lax.platform_dependent(x, w, cpu=_f16_rows, default=lambda x, w: _plain(x, w, dims))
    c = _chunk_count(k)
    # (The [N, K] form's partials are fused away: only the batched matmul materialises them.)
    too_big = w_contract == 0 and rows * c * n > MAX_PARTIAL_ELEMS
    lowp = x.dtype != jnp.float32 and not f32_result
    if lowp or c == 1 or rows > MAX_SPLIT_ROWS or too_big:
        return _plain(x, w, dims)  # [..., N]
    cn = _out_chunk_count(n, rows, k)
    return jax.lax.platform_dependent(x, w, cpu=lambda x, w: _split_dot_ad(x, w, c, cn, w_contract),
                                      default=lambda x, w: _plain(x, w, dims))
