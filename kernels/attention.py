"""Grouped-query attention (GQA) with every mask a decoder needs, in two rounding recipes.

Layout: ``q[B,T,N,H]``, ``k[B,S,K,H]``, ``v[B,S,K,H]`` -> ``out[B,T,N,H]`` in q's dtype.
Query head ``n`` reads kv head ``n // G`` with ``G = N // K`` (HF's ``repeat_kv``:
[h0,h0,h1,h1], never tiled [h0,h1,h0,h1]). The repeat is never materialised: q is
viewed as ``[B,T,K,G,H]`` and each kv head is contracted with its G query heads.

Recipes (``s`` are the scores, ``p`` the probabilities, ``dt`` the input dtype):

``"hf"`` (transformers' ``eager_attention_forward``, Qwen2/Llama/Mistral/Gemma 2):
    1. ``s = dt(q @ k^T)``               matmul: f32 accumulation, rounded once to dt
    2. ``s = dt(f32(s) * f32(scale))``   the scaling rounds again to dt
    3. softcap (if any), each step rounded to dt as torch does on dt tensors:
       ``s = dt(s / cap)``, ``s = dt(tanh(s))``, ``s = dt(s * cap)``
    4. mask, then ``p = dt(softmax_f32(s))``: softmax in f32, probabilities rounded to dt
    5. ``out = dt(p @ v)``               matmul: f32 accumulation, rounded once
    This is what a port of a HF checkpoint wants when it must reproduce HF's eager
    numbers (the reference logits of a model card, a parity test).
``"fp32_logits"`` (``jax.nn.dot_product_attention``'s choice, and flash kernels'):
    1. ``s = f32(q @ k^T) * f32(scale)`` kept in f32 (no rounding to dt)
    2. softcap in f32, mask, softmax in f32
    3. ``p = dt(p)``, ``out = dt(p @ v)`` with f32 accumulation
    This is more accurate (a bf16 score of 1e3 has an ulp of 8, so "hf" shifts
    probabilities by up to e^4); use it for new training/serving code that need not
    match HF's eager bits. For float32 inputs the two recipes are identical.

float32 inputs, problems of at most 2**24 score multiply-adds (``B*N*T*S*H``; decided
once per call, so ``q_chunk`` does not change it): the scores are carried as pairs of
float32 ``hi + lo`` (~48 bits, ``kernels._twofloat``) through the scale, the softcap and
into the exponent, and rounded only as probabilities. The softmax multiplies a score's
error by ``|s|`` (one float32 ulp of a score of 1e4 moves its probability by 1e-3), so
with float32 scores the output error is a few score roundings: two equally good
summation orders (torch's and XLA's) were up to 20x apart on single cases (the
kernel/oracle error ratio over 1000 fuzzed cases). With the pairs, and the row sum
compensated (``_twofloat.sum_axis``: a plain float32 sum rounds each addition at the ulp
of the largest term), the error is the probabilities' own rounding: at most the oracle's
(ratio 1.0) over 1000 stratified fp32_logits cases, 1.41x before the sum was compensated;
at most 1.13x over the hf recipe's 1000, softcaps among them (the softcap's pair tanh
errs by ``1 - tanh``'s float32 error, a fraction of a score's ulp; when XLA had folded
that part away, one case reached 2.96x: ``_tanh_pair``). The cost is about 1.5x a plain
elementwise q.k; larger float32 problems use XLA's matmul (torch's class of accuracy,
``precision=HIGHEST``: never TF32).

Matmuls use ``precision=HIGHEST`` and ``preferred_element_type=float32``: f32 inputs
never fall to TF32 on a GPU, and bf16/f16 products accumulate in f32 and round once,
as torch's CPU matmul does.

Masking (``True`` = visible). Query t sits at position ``q_positions[b,t]`` (default
``S - T + t``: bottom-right aligned, so a KV-cache decode step with T new tokens sees
the whole cache), key s at ``kv_positions[b,s]`` (default ``s``). A key is visible when
all of these hold:

* ``causal``: ``kv_pos <= q_pos``;
* ``sliding_window=W``: ``q_pos - kv_pos < W``: the W keys up to and including the
  query (HF's ``sliding_window_overlay``, ``kv_idx > q_idx - W``); needs ``causal``;
* ``kv_valid[b,s]`` (padding, unfilled cache slots);
* ``segment_ids``: the query's segment equals the key's (packed sequences).

The mask is applied *after* the softcap and before the softmax, as a boolean mask
(masked scores are excluded, not added to ``finfo.min``): on every row with at least
one visible key this gives HF's bits exactly. It differs from HF in two documented ways:

* a query row with no visible key returns **zeros**; HF's additive ``finfo.min`` mask
  gives the uniform average of the masked values there (garbage that looks valid);
* a masked key cannot influence anything: a key visible to no query of its batch row
  has its k and v zeroed before the matmuls, so NaN or inf in padding or in unfilled
  cache slots does not leak (HF's ``0 * NaN`` gives NaN).

Memory: the direct path holds the scores and probabilities of all queries at once,
``[B,N,T,S]`` in f32 (plus a ``[B,T,S]`` mask): for a 32k-token prefill of Qwen2.5-0.5B
(N=14) that is 56 GiB per copy. ``q_chunk=C`` processes the queries in blocks of C
(a ``lax.map``), holding ``[B,N,C,S]`` at a time, with the same numerics (every query
row is computed exactly as in the direct path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import _twofloat as tf
from kernels._checks import dtype_name, require_choice, require_float, require_gpu, require_ndim, require_positive
from kernels._round import round_to
from kernels.softmax import _softmax

RECIPES = ("hf", "fp32_logits")
IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "pallas_flash", "mosaic_flash")
_OP = "gqa_attention"


def _require_int(name: str, x, *, shape: tuple, letters: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{_OP}: {name} must be an integer array [{letters}], got dtype {dtype_name(x.dtype)}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{_OP}: {name} must have shape [{letters}] = {shape}, got {tuple(x.shape)}")


def _check(q, k, v, *, scale, q_positions, kv_positions, kv_valid, segment_ids, causal, sliding_window,
           softcap, recipe, q_chunk):
    for name, x in (("q", q), ("k", k), ("v", v)):
        require_float(name, x, op=_OP)
    require_ndim("q", q, 4, op=_OP, letters="BTNH")
    require_ndim("k", k, 4, op=_OP, letters="BSKH")
    require_ndim("v", v, 4, op=_OP, letters="BSKH")
    require_choice("recipe", recipe, RECIPES, op=_OP)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{_OP}: q, k, v must share one dtype, got q {dtype_name(q.dtype)}, "
                         f"k {dtype_name(k.dtype)}, v {dtype_name(v.dtype)}")
    b, t, n, h = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{_OP}: k and v must have the same shape [B,S,K,H], got k {tuple(k.shape)}, v {tuple(v.shape)}")
    bk, s, kh, hk = k.shape
    if bk != b:
        raise ValueError(f"{_OP}: batch of k/v {tuple(k.shape)} (B={bk}) does not match q {tuple(q.shape)} (B={b})")
    if hk != h:
        raise ValueError(f"{_OP}: head dim of k/v {tuple(k.shape)} (H={hk}) does not match q {tuple(q.shape)} (H={h})")
    if kh == 0 or n % kh:
        raise ValueError(f"{_OP}: query heads N={n} (q {tuple(q.shape)}) must be a multiple of kv heads "
                         f"K={kh} (k {tuple(k.shape)})")
    if q_positions is not None:
        _require_int("q_positions", q_positions, shape=(b, t), letters="B,T")
    if kv_positions is not None:
        _require_int("kv_positions", kv_positions, shape=(b, s), letters="B,S")
    if causal and t > s and q_positions is None:
        raise ValueError(f"{_OP}: causal attention with T={t} queries (q {tuple(q.shape)}) but only S={s} keys "
                         f"(k {tuple(k.shape)}) and no q_positions: bottom-right alignment needs T <= S")
    if kv_valid is not None:
        if kv_valid.dtype != jnp.bool_ or tuple(kv_valid.shape) != (b, s):
            raise ValueError(f"{_OP}: kv_valid must be a boolean array [B,S] = {(b, s)}, got "
                             f"{dtype_name(kv_valid.dtype)} with shape {tuple(kv_valid.shape)}")
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError(f"{_OP}: segment_ids must be one array [B,S] or a pair ([B,T], [B,S]), "
                                 f"got a sequence of {len(segment_ids)}")
            _require_int("segment_ids[0] (query ids)", segment_ids[0], shape=(b, t), letters="B,T")
            _require_int("segment_ids[1] (kv ids)", segment_ids[1], shape=(b, s), letters="B,S")
        else:
            _require_int("segment_ids", segment_ids, shape=(b, s), letters="B,S")
            if t > s:
                raise ValueError(f"{_OP}: one segment_ids array [B,S] needs T <= S, got T={t}, S={s}; pass a pair")
    if sliding_window is not None:
        if not isinstance(sliding_window, int) or isinstance(sliding_window, bool):
            raise ValueError(f"{_OP}: sliding_window must be an int, got {sliding_window!r}")
        require_positive("sliding_window", sliding_window, op=_OP)
        if not causal:
            raise ValueError(f"{_OP}: sliding_window={sliding_window} needs causal=True (HF's bidirectional "
                             f"window |q - kv| <= W is a different mask)")
    if softcap is not None:
        require_positive("softcap", softcap, op=_OP)
    if scale is not None:
        require_positive("scale", scale, op=_OP)
    if q_chunk is not None:
        if not isinstance(q_chunk, int) or isinstance(q_chunk, bool):
            raise ValueError(f"{_OP}: q_chunk must be an int, got {q_chunk!r}")
        require_positive("q_chunk", q_chunk, op=_OP)


def _visible(q_pos, kv_pos, q_seg, kv_seg, kv_valid, *, causal, sliding_window):
    """Boolean visibility ``[B,T,S]`` (True = the query may attend to the key)."""
    qp = q_pos[:, :, None]  # [B, T, 1]
    kp = kv_pos[:, None, :]  # [B, 1, S]
    vis = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), dtype=jnp.bool_)  # [B, T, S]
    if causal:
        vis = vis & (kp <= qp)
    if sliding_window is not None:
        vis = vis & (qp - kp < sliding_window)  # the W keys up to and including the query
    if kv_valid is not None:
        vis = vis & kv_valid[:, None, :]
    if q_seg is not None:
        vis = vis & (q_seg[:, :, None] == kv_seg[:, None, :])
    return vis


def _all_keys_used(q_positions, kv_positions, kv_valid, segment_ids, sliding_window) -> bool:
    """Every key visible to some query: no mask array and no window (causal: the last
    query, at position S - 1, sees every key)."""
    return (kv_valid is None and segment_ids is None and sliding_window is None and q_positions is None
            and kv_positions is None)


def _mask_vectors(b: int, t: int, s: int, q_positions, kv_positions, segment_ids):
    """The per-query and per-key vectors :func:`_visible` compares, int32: positions
    ``[B,T]``, ``[B,S]`` (defaults ``S - T + t`` and ``s``) and segment ids ``[B,T]``,
    ``[B,S]`` (None without segments; one array: the queries' are its last T columns)."""
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))  # [B, T]
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))  # [B, S]
    # Positions compare as int32 (ample for 2^17-token contexts); any int dtype may come in.
    q_positions = jnp.asarray(q_positions).astype(jnp.int32)
    kv_positions = jnp.asarray(kv_positions).astype(jnp.int32)
    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            q_seg, kv_seg = segment_ids
        else:
            q_seg, kv_seg = segment_ids[:, s - t:], segment_ids  # [B, T], [B, S]
        # One int type for the comparison (the two may come in different int dtypes).
        q_seg, kv_seg = jnp.asarray(q_seg).astype(jnp.int32), jnp.asarray(kv_seg).astype(jnp.int32)
    return q_positions, kv_positions, q_seg, kv_seg


# float32 problems of at most this many score multiply-adds carry their scores as pairs.
_PAIR_SCORES = 1 << 24


def _scores(qg, k):
    """``q . k`` per (query head, key), f32 accumulation: ``[B,T,K,G,H] x [B,S,K,H] -> [B,K,G,T,S]``."""
    return jnp.einsum("btkgh,bskh->bkgts", qg, k, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)  # [B, K, G, T, S]


def _scores_pair(qg, k):
    """float32 ``q . k`` as a pair ``hi + lo`` within ~2**-46 of the exact dot (``kernels._twofloat``)."""
    b, t, kh, g, h = qg.shape
    q6 = qg.transpose(0, 2, 3, 1, 4)[:, :, :, :, None, :]  # [B, K, G, T, 1, H]
    k6 = k.transpose(0, 2, 1, 3)[:, :, None, None, :, :]  # [B, K, 1, 1, S, H]
    return tf.dot_last(q6, k6)  # 2 x [B, K, G, T, S]


# tanh's Taylor coefficients c_n = 2^2n (2^2n - 1) B_2n / (2n)! for x^3 ... x^19 (B: Bernoulli
# numbers). On |x| < 0.625 the next term is below 2^-26 of the sum.
_TANH_TAYLOR = (-1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075, -929569 / 638512875,
                6404582 / 10854718875, -443861162 / 1856156927625)


def tanh_f32(x: jax.Array) -> jax.Array:
    """``tanh`` of a float32 array to ~1 ulp (mean 0.24 ulp, max 1.26 on a 2M-point grid; 1.6 on the H100).

    Not ``jnp.tanh``: XLA's CPU tanh is a rational approximation of up to 4.6 ulps (mean
    0.81), against torch's 0.57 (SLEEF): through a softcap of 50 it made the attention
    error 3-5x the oracle's. Here ``|x| < 0.625`` uses the Taylor series (Horner, the
    leading ``x`` added last so its rounding is the only one of size), larger ``|x|``
    uses ``1 - 2 / (exp(2|x|) + 1)`` (no cancellation there: the result is above 0.55),
    and the sign is put back with a select (not ``copysign``, which Triton cannot lower:
    the Pallas kernel calls this function too; only ``tanh(-0)`` differs, giving +0).
    """
    a = jnp.abs(x)
    tail, u = _tanh_terms(a)
    y = jnp.where(a < 0.625, a + tail, 1.0 - u)
    return jnp.where(x < 0, -y, y)


# tanh_f32 where XLA differentiates it (the Pallas kernels call tanh_f32 itself: Mosaic GPU
# cannot lower a custom_jvp inside a kernel, and nothing differentiates a kernel's body).
_tanh_f32_ad = jax.custom_jvp(tanh_f32)


@_tanh_f32_ad.defjvp
def _tanh_f32_jvp(primals, tangents):
    # 1 - tanh^2, not the formula's own derivative: 2 / (exp(2a) + 1) differentiates to
    # inf / inf = NaN once exp(2a) overflows (|x| > 44: a score of 1e4 under a softcap of 50).
    (x,), (dx,) = primals, tangents
    y = tanh_f32(x)
    return y, dx * (1.0 - y * y)


def _tanh_terms(a):
    """For ``a >= 0``: the Taylor tail ``tanh(a) - a`` (used below 0.625) and
    ``u = 2 / (exp(2a) + 1) = 1 - tanh(a)`` (used above), unrounded into a sum."""
    x2 = a * a
    p = jnp.float32(_TANH_TAYLOR[-1])
    for c in _TANH_TAYLOR[-2::-1]:
        p = p * x2 + jnp.float32(c)
    return a * (x2 * p), 2.0 / (jnp.exp(2.0 * a) + 1.0)


@jax.custom_jvp
def _tanh_pair(hi, lo):
    """``tanh(hi + lo)`` as a pair: ``tanh_f32``'s two branches, each kept unrounded.

    Below 0.625 the Taylor form ``a + a * (x^2 p)`` is already a head and a small tail;
    above, ``1 - u`` with ``u = 2 / (exp(2a) + 1)`` is split exactly by TwoSum, so the
    error is that of ``u`` (a few ulps of ``u`` <= 0.45, and far below an ulp of the
    result once ``tanh`` saturates, where a rounded float32 tanh loses most). ``lo``
    enters to first order, times ``1 - tanh^2 = u (2 - u)``. Measured (test_softcap_tanh_is_accurate,
    |x| < 20): within 3.4 float32 ulps of the small part (``tanh - a`` or ``u``, or ``lo``), CPU and H100.
    """
    a = jnp.abs(hi)
    la = jnp.where(hi < 0, -lo, lo)  # a + la = |hi + lo|
    tail, u = _tanh_terms(a)
    # 1 as an opaque array: with a literal 1, XLA folds the TwoSum's error to 0 (kernels._twofloat).
    big_hi, big_lo = tf.two_sum(tf.opaque(jnp.ones_like(a)), -u)
    small = a < 0.625
    t_hi = jnp.where(small, a, big_hi)
    t_lo = jnp.where(small, tail, big_lo) + u * (2.0 - u) * la
    t_hi, t_lo = tf.renormalize(t_hi, t_lo)
    return jnp.where(hi < 0, -t_hi, t_hi), jnp.where(hi < 0, -t_lo, t_lo)


@_tanh_pair.defjvp
def _tanh_pair_jvp(primals, tangents):
    # As tanh_f32's: 1 - tanh^2 of the pair, carried in hi (see _twofloat.dot_last's rule).
    (hi, lo), (dhi, dlo) = primals, tangents
    t_hi, t_lo = _tanh_pair(hi, lo)
    return (t_hi, t_lo), ((dhi + dlo) * (1.0 - t_hi * t_hi), jnp.zeros_like(t_lo))


def _scaled_scores_pair(qg, k, *, scale, softcap):
    """float32 steps 1-3 as pairs ``hi + lo`` ``[B,K,G,T,S]`` (see ``_attend``)."""
    hi, lo = _scores_pair(qg, k)  # [B, K, G, T, S] each
    hi, lo = tf.mul_const(hi, lo, scale)  # the Python scale to 48 bits, not rounded to f32
    if softcap is not None:
        hi, lo = tf.mul_const(hi, lo, 1.0 / softcap)
        hi, lo = _tanh_pair(hi, lo)
        hi, lo = tf.mul_const(hi, lo, softcap)
    return hi, lo


def _softmax_pair(hi, lo, vis):
    """Softmax of the pair scores over the last axis (masked: exactly 0; no visible key: 0).

    The shift is the row's largest score as a pair ``m + m_lo``, so
    ``exp(hi + lo - m - m_lo) = exp(d) * (1 + d_lo)`` with ``d + d_lo`` split by TwoSum:
    the probabilities see the scores to ~48 bits, not to float32's 24, and the largest
    score's term is exactly 1 (a lone visible key gets probability exactly 1).
    """
    row = jnp.any(vis, axis=-1, keepdims=True)
    hi = jnp.where(vis, hi, -jnp.inf)
    # The shift gets no derivative: it cancels out (kernels.softmax says why that matters).
    m = jax.lax.stop_gradient(jnp.max(hi, axis=-1, keepdims=True))
    # The max's lo (ties: the largest).
    m_lo = jax.lax.stop_gradient(jnp.max(jnp.where(hi == m, lo, -jnp.inf), axis=-1, keepdims=True))
    m, m_lo = jnp.where(row, m, 0.0), jnp.where(row, m_lo, 0.0)  # no visible key: no -inf - -inf
    d, d_err = tf.two_sum(jnp.where(vis, hi, m), -m)
    d_lo = (jnp.where(vis, lo, m_lo) - m_lo) + d_err
    e = jnp.exp(d)
    # Materialised once: XLA CPU contracts `e + e * d_lo` into an FMA in some fusions and
    # not in others; the row sum must add the very values it then scales.
    e = jax.lax.optimization_barrier(jnp.where(vis, e + e * d_lo, 0.0))
    # Compensated, rounded once (a plain f32 sum put the fp32_logits accuracy ratio at 1.41).
    den = jnp.where(row, tf.sum_axis(e, -1), 1.0)
    # Reciprocal, then multiply (torch's CPU softmax; XLA rewrites a division by a
    # broadcast row sum into this anyway).
    return jnp.where(vis, e * (1.0 / den), 0.0)


def _scaled_scores(qg, k, *, scale, softcap, recipe):
    """Steps 1-3 of the recipe: scores ``[B,K,G,T,S]``, in q's dtype ("hf") or f32."""
    dt = qg.dtype
    s = _scores(qg, k)  # [B, K, G, T, S] f32
    scale32 = jnp.float32(scale)  # torch's CPU kernel uses the Python scale as an f32 "opmath" scalar
    if recipe == "fp32_logits":
        s = s * scale32  # scores stay f32
        if softcap is not None:
            cap = jnp.float32(softcap)
            s = _tanh_f32_ad(s / cap) * cap
        return s
    # Each step below is computed in f32 and rounded to dt, kept in f32 (round_to: a
    # rounding XLA cannot drop as excess precision).
    # Round 1: torch's matmul returns the input dtype.
    s = round_to(s, dt)
    # Round 2: `* scaling` on a dt tensor computes in f32 and rounds back to dt.
    s = round_to(s * scale32, dt)
    if softcap is not None:
        cap = jnp.float32(softcap)
        # Gemma 2's three dt-tensor ops, each computed in f32 and rounded to dt.
        s = round_to(s / cap, dt)
        s = round_to(_tanh_f32_ad(s), dt)
        s = round_to(s * cap, dt)
    s = s.astype(dt)  # exact: s is on dt's grid; the softmax sees the dt tensor HF has
    return s


def _attend(q, q_pos, q_seg, k, v, kv_pos, kv_seg, kv_valid, *, scale, causal, sliding_window, softcap, recipe,
            pair, all_used=False):
    """The direct path: all T queries of ``q`` at once (holds ``[B,N,T,S]`` scores).

    ``pair`` (float32 only): the scores are carried as pairs ``hi + lo`` through the
    scale, the softcap and into the exponent (``_scaled_scores_pair``, ``_softmax_pair``).
    ``all_used``: the caller knows statically that every key is visible to some query
    (no kv_valid, segments, window or explicit positions, and all T queries at once):
    the zeroing of unused keys is then the identity and is skipped (it copies k and v:
    2/3 of a decode step's memory traffic).
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    dt = q.dtype
    vis = _visible(q_pos, kv_pos, q_seg, kv_seg, kv_valid, causal=causal, sliding_window=sliding_window)
    # Keys that no query of this block may see are zeroed, so NaN/inf there cannot leak
    # through 0 * NaN in the matmuls (HF's eager path does leak it).
    if not all_used:
        used = jnp.any(vis, axis=1)[:, :, None, None]  # [B, S, 1, 1]
        k = jnp.where(used, k, jnp.zeros((), dt))
        v = jnp.where(used, v, jnp.zeros((), dt))
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]: query head n = k * G + g reads kv head k
    where = vis[:, None, None, :, :]  # [B, 1, 1, T, S]
    if pair:
        p = _softmax_pair(*_scaled_scores_pair(qg, k, scale=scale, softcap=softcap), where)  # [B, K, G, T, S] f32
    else:
        s = _scaled_scores(qg, k, scale=scale, softcap=softcap, recipe=recipe)  # [B, K, G, T, S]
        # Softmax in f32 (kernels.softmax); masked entries exactly 0, a row with no visible key all 0.
        # The probabilities are rounded to dt below: the compensated row sum only for float32.
        p = _softmax(s, axis=-1, where=where, compensated=dt == jnp.float32)  # [B, K, G, T, S], s's dtype
    # Probabilities go to the input dtype for the PV matmul (HF's .to(query.dtype); jax.nn too).
    p = p.astype(dt)
    o = jnp.einsum("bkgts,bskh->btkgh", p, v, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)  # [B, T, K, G, H] f32 accumulation
    # One rounding of the f32 accumulator to the input dtype, as torch's matmul.
    return o.astype(dt).reshape(b, t, n, h)  # [B, T, N, H]


def _cudnn(q, k, v, *, scale, causal, q_positions, kv_positions, kv_valid, segment_ids, sliding_window,
           softcap, recipe, q_chunk):
    """``jax.nn.dot_product_attention(implementation="cudnn")`` behind this op's contract."""
    t, s = q.shape[1], k.shape[1]
    unsupported = {
        "recipe='hf' (cuDNN keeps the scores in f32; use implementation='pallas')": recipe != "fp32_logits",
        f"dtype {dtype_name(q.dtype)} (cuDNN takes bfloat16/float16)": q.dtype not in (jnp.bfloat16, jnp.float16),
        "softcap": softcap is not None, "segment_ids": segment_ids is not None,
        "q_positions/kv_positions": q_positions is not None or kv_positions is not None,
        "kv_valid": kv_valid is not None, "q_chunk (cuDNN is already blocked)": q_chunk is not None,
        f"causal with T={t} != S={s} (jax.nn aligns causal masks top-left; this op bottom-right)": causal and t != s,
        # Last, so that off a GPU an otherwise valid call names only this.
        f"a CUDA GPU with cuDNN (JAX's default backend is {jax.default_backend()!r})":
            jax.default_backend() not in ("gpu", "cuda"),
    }
    bad = [name for name, hit in unsupported.items() if hit]
    if bad:
        raise ValueError(f"{_OP}: implementation='cudnn' cannot honour: {'; '.join(bad)}. "
                         f"Use implementation='xla' (or 'pallas' on a GPU).")
    window = None if sliding_window is None else (sliding_window - 1, 0)  # W keys: itself and W-1 before
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, local_window_size=window,
                                        implementation="cudnn")  # [B, T, N, H]


def gqa_attention(
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
    q_chunk: int | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Grouped-query attention ``softmax(mask(q k^T * scale)) v`` (see the module docstring).

    Args:
      q: queries ``[B,T,N,H]``; k, v: keys and values ``[B,S,K,H]``; one float dtype.
      scale: score scale; default ``H ** -0.5`` (HF's ``head_dim**-0.5``).
      causal: mask keys after the query (bottom-right aligned when S > T).
      q_positions: int ``[B,T]``, default ``S - T + t``. kv_positions: int ``[B,S]``, default ``s``.
      kv_valid: bool ``[B,S]``, False for padding or unfilled cache slots.
      segment_ids: int ``[B,S]`` (the queries' ids are its last T columns, the same
        bottom-right alignment as ``causal``), or a pair ``(q_ids[B,T], kv_ids[B,S])``.
      sliding_window: W: each query sees the W keys up to and including itself.
      softcap: ``cap * tanh(s / cap)`` on the scaled scores, before masking (Gemma 2).
      recipe: ``"hf"`` or ``"fp32_logits"`` (module docstring: which to use when).
      q_chunk: process queries in blocks of this many (bounded memory, same numerics).
      implementation: ``"xla"`` (this module: any backend, every option), ``"cudnn"``
        (``jax.nn.dot_product_attention``'s cuDNN flash kernel: GPU only, recipe
        ``"fp32_logits"``, bf16/f16, masks it can express: causal with T == S or none,
        a sliding window; it normalises after the PV matmul, so its bits differ from the
        recipe's: its own GPU budgets, ``implementations.cudnn`` in tolerances.yaml,
        within 5 ulps of the recipe with ~42% of outputs moved, as accurate against
        the float64 truth; on an H100 a 7B causal prefill at 1.4x torch SDPA flash) or
        ``"pallas"`` (``kernels.attention_pallas``: fused two-pass GPU kernels, query-tiled
        or split-key, that keep either recipe's roundings; ``q_chunk`` does not apply,
        their memory is O(block); the split-key (decode) kernels read only the key
        blocks from the first to the last key a mask leaves visible, so a step against
        a preallocated cache reads its filled slots), or ``"pallas_flash"`` (the same
        kernels in one pass with flash-attention numerics,
        ``pallas_attention(flash=True)``: recipe ``"fp32_logits"`` only, every mask and
        softcap; it normalises after the PV matmul like cuDNN, within its own budgets,
        ``implementations.pallas_flash`` in tolerances.yaml; a 7B decode step 0.84x the
        time of "pallas" on an H100), or
        ``"mosaic_flash"`` (``kernels.attention_mosaic``: a decode step, T = 1, with the
        same flash numerics as one Hopper kernel fed by TMA: Hopper GPUs only, bf16/f16,
        H a multiple of 64, every mask and softcap; its own budgets,
        ``implementations.mosaic_flash``; a 7B decode step 0.97x the time of
        "pallas_flash" on an H100; like the split-key kernels it reads only the key
        blocks from the first to the last visible key).
        ``None``: ``"pallas"`` for bf16/f16 on a CUDA GPU (the fastest path that meets
        its GPU budget), ``"xla"`` otherwise (float32 everywhere: its pair scores). An
        option a path cannot honour raises ValueError; nothing falls back silently.

    Dtype recipe, step by step: see the module docstring ("hf" rounds the scores to the
    input dtype twice, "fp32_logits" keeps them in f32; both: softmax in f32,
    probabilities rounded to the input dtype, PV accumulated in f32, output rounded once).

    Returns:
      ``[B,T,N,H]`` in q's dtype. A query with no visible key gives zeros.
    """
    _check(q, k, v, scale=scale, q_positions=q_positions, kv_positions=kv_positions, kv_valid=kv_valid,
           segment_ids=segment_ids, causal=causal, sliding_window=sliding_window, softcap=softcap,
           recipe=recipe, q_chunk=q_chunk)
    require_choice("implementation", implementation, (None, *IMPLEMENTATIONS), op=_OP)
    b, t, n, h = q.shape
    s = k.shape[1]
    scale = h ** -0.5 if scale is None else scale
    call_opts = dict(scale=scale, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
                     kv_valid=kv_valid, segment_ids=segment_ids, sliding_window=sliding_window, softcap=softcap,
                     recipe=recipe)
    if implementation == "pallas_flash" and recipe != "fp32_logits":
        raise ValueError(f"{_OP}: implementation='pallas_flash' needs recipe='fp32_logits', got {recipe!r}: "
                         f"one pass cannot round normalised probabilities (use implementation='pallas')")
    if implementation == "mosaic_flash":
        from kernels.attention_mosaic import mosaic_attention  # GPU-only module, imported on demand

        return mosaic_attention(q, k, v, **call_opts)
    if implementation in ("pallas", "pallas_flash") or (implementation is None and q.dtype != jnp.float32):
        from kernels.attention_pallas import pallas_attention  # GPU-only module, imported on demand

        def pallas(q, k, v):
            return pallas_attention(q, k, v, **call_opts, flash=implementation == "pallas_flash")

        if implementation is not None:
            require_gpu(implementation, op=_OP, module="kernels.attention_pallas.pallas_attention")
            return pallas(q, k, v)
        # None: the fastest path of the platform. On a CUDA GPU bf16/f16 take the Pallas
        # kernels, each within the GPU budgets of tolerances.yaml. On an H100 (device time,
        # benchmarks/README.md) prefill runs ~5x the XLA path's speed, and a 7B decode step
        # 1.74x (33.2 against 57.9 us, 3 kernels against 12 fusions).
        # float32 keeps the XLA path's pair scores.
        return jax.lax.platform_dependent(q, k, v, cuda=pallas, default=lambda q, k, v: gqa_attention(
            q, k, v, **call_opts, q_chunk=q_chunk, implementation="xla"))
    if implementation == "cudnn":
        return _cudnn(q, k, v, scale=scale, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
                      kv_valid=kv_valid, segment_ids=segment_ids, sliding_window=sliding_window, softcap=softcap,
                      recipe=recipe, q_chunk=q_chunk)
    all_used = _all_keys_used(q_positions, kv_positions, kv_valid, segment_ids, sliding_window)
    q_positions, kv_positions, q_seg, kv_seg = _mask_vectors(b, t, s, q_positions, kv_positions, segment_ids)
    # Decided once for the whole problem, so that q_chunk does not change the numerics.
    pair = q.dtype == jnp.float32 and b * n * t * s * h <= _PAIR_SCORES
    opts = dict(scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap, recipe=recipe, pair=pair)
    if q_chunk is None or q_chunk >= t:
        return _attend(q, q_positions, q_seg, k, v, kv_positions, kv_seg, kv_valid, **opts, all_used=all_used)

    # Query-chunked path: pad T up to a multiple of C (padded rows are computed and dropped).
    c = q_chunk
    nc = -(-t // c)
    pad = nc * c - t
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))  # [B, nc*C, N, H]
    pos = jnp.pad(q_positions, ((0, 0), (0, pad)))  # [B, nc*C]
    qc = qp.reshape(b, nc, c, n, h).swapaxes(0, 1)  # [nc, B, C, N, H]
    posc = pos.reshape(b, nc, c).swapaxes(0, 1)  # [nc, B, C]
    if q_seg is not None:
        segc = jnp.pad(q_seg, ((0, 0), (0, pad))).reshape(b, nc, c).swapaxes(0, 1)  # [nc, B, C]
    else:
        segc = jnp.zeros((nc, b, c), jnp.int32)  # unused placeholder: lax.map needs arrays  # [nc, B, C]

    def block(args):
        qb, pb, sb = args
        return _attend(qb, pb, None if q_seg is None else sb, k, v, kv_positions, kv_seg, kv_valid, **opts)

    out = jax.lax.map(block, (qc, posc, segc))  # [nc, B, C, N, H]
    return out.swapaxes(0, 1).reshape(b, nc * c, n, h)[:, :t]  # [B, T, N, H]
