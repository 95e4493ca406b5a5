"""GQA attention bug classes the suite must kill (each one a real porting bug)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.attention import _scaled_scores, _visible
from kernels.attention import gqa_attention as _real
from kernels.softmax import softmax


def tiled_kv_heads(q, k, v, **kw):
    """Query head n reads kv head n % K ([h0,h1,h0,h1]: tile instead of repeat_kv)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    # Feed the real kernel q with head g*K + j moved to slot j*G + g; it then reads kv head j.
    perm = jnp.arange(n).reshape(g, kh).T.reshape(n)  # slot j*G+g holds head g*K+j
    out = _real(q[:, :, perm], k, v, **kw)
    return out[:, :, jnp.argsort(perm)]


def scale_model_dim(q, k, v, *, scale=None, **kw):
    """Default scale 1/sqrt(N*H) (the model width) instead of 1/sqrt(H)."""
    n, h = q.shape[2], q.shape[3]
    return _real(q, k, v, scale=(n * h) ** -0.5 if scale is None else scale, **kw)


def no_scale(q, k, v, *, scale=None, **kw):
    """The score scale forgotten."""
    return _real(q, k, v, scale=1.0 if scale is None else scale, **kw)


def causal_top_left(q, k, v, *, q_positions=None, causal=True, **kw):
    """Decode step aligned top-left: query t at position t instead of S - T + t."""
    if q_positions is None and causal:
        b, t = q.shape[:2]
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return _real(q, k, v, q_positions=q_positions, causal=causal, **kw)


def window_plus_one(q, k, v, *, sliding_window=None, **kw):
    """The sliding window shows W + 1 keys (kv_pos >= q_pos - W)."""
    return _real(q, k, v, sliding_window=None if sliding_window is None else sliding_window + 1, **kw)


def hf_scores_not_rounded(q, k, v, *, recipe="hf", **kw):
    """Under "hf", scores kept in f32 (jax.nn's recipe): HF's two roundings to bf16/f16 lost."""
    return _real(q, k, v, recipe="fp32_logits", **kw)


def softcap_one_folded(q, k, v, **kw):
    """The float32 path's pair tanh with a literal 1 in ``two_sum(1, -u)``: XLA folds
    ``(1 - u) - 1`` to ``-u`` and the pair loses u's low part (session 17: a softcap-50 case at
    2.96x the oracle's error; kernels._twofloat's module docstring)."""
    from unittest import mock

    from kernels import _twofloat

    with mock.patch.object(_twofloat, "opaque", lambda x: x):  # traced under jit: the patch holds
        return _real(q, k, v, **kw)


def _broken(q, k, v, *, mode, scale=None, causal=True, q_positions=None, kv_positions=None, kv_valid=None,
            segment_ids=None, sliding_window=None, softcap=None, recipe="hf", q_chunk=None):
    """A direct-path attention with one deliberate bug ``mode`` (no chunking, no checks)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    dt = q.dtype
    scale = h ** -0.5 if scale is None else scale
    qp = jnp.broadcast_to(jnp.arange(t) + (s - t), (b, t)) if q_positions is None else q_positions
    kp = jnp.broadcast_to(jnp.arange(s), (b, s)) if kv_positions is None else kv_positions
    qs = ks = None
    if segment_ids is not None:
        qs, ks = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids[:, s - t:], segment_ids)
    vis = _visible(qp, kp, qs, ks, kv_valid, causal=causal, sliding_window=sliding_window)[:, None, None]
    if mode != "nan_leak":
        used = jnp.any(vis, axis=(1, 2, 3))[:, :, None, None]  # [B, S, 1, 1]
        k, v = jnp.where(used, k, 0).astype(dt), jnp.where(used, v, 0).astype(dt)
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
    sc = _scaled_scores(qg, k, scale=scale, softcap=softcap, recipe=recipe)  # [B, K, G, T, S]
    if mode == "low_precision_softmax":
        sc = sc.astype(dt)  # scores kept in the input dtype, even under "fp32_logits"
    if mode == "low_precision_softmax":
        # max, exp and sum in bf16/f16: the f32 upcast forgotten
        m = jnp.max(jnp.where(vis, sc, -jnp.inf), axis=-1, keepdims=True)
        e = jnp.where(vis, jnp.exp(sc - jnp.where(jnp.isfinite(m), m, 0)), 0).astype(dt)
        p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(dt).tiny)
    elif mode == "empty_row_nan":  # -inf mask and a plain softmax: exp(-inf - -inf) = NaN
        p = jax.nn.softmax(jnp.where(vis, sc.astype(jnp.float32), -jnp.inf), axis=-1)
    elif mode == "empty_row_uniform":  # HF's additive finfo.min mask: uniform average on empty rows
        p = jax.nn.softmax(sc.astype(jnp.float32) + jnp.where(vis, 0.0, jnp.finfo(jnp.float32).min), axis=-1)
    elif mode == "mask_after_softmax":  # softmax over every key, masked probabilities zeroed afterwards
        p = jnp.where(vis, jax.nn.softmax(sc.astype(jnp.float32), axis=-1), 0.0)
    else:  # nan_leak: the real masked softmax; only the zeroing of hidden keys is missing
        p = softmax(sc, axis=-1, where=vis)
    o = jnp.einsum("bkgts,bskh->btkgh", p.astype(dt), v, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)  # [B, T, K, G, H]
    return o.astype(dt).reshape(b, t, n, h)  # [B, T, N, H]


def _mode(name):
    def mutant(q, k, v, **kw):
        return _broken(q, k, v, mode=name, **kw)

    mutant.__name__ = name
    return mutant


MUTANTS = {
    "tiled_kv_heads": tiled_kv_heads,
    "scale_model_dim": scale_model_dim,
    "no_scale": no_scale,
    "causal_top_left": causal_top_left,
    "window_plus_one": window_plus_one,
    "hf_scores_not_rounded": hf_scores_not_rounded,
    "softcap_one_folded": softcap_one_folded,
    "low_precision_softmax": _mode("low_precision_softmax"),
    "empty_row_nan": _mode("empty_row_nan"),
    "empty_row_uniform": _mode("empty_row_uniform"),
    "mask_after_softmax": _mode("mask_after_softmax"),
    "nan_leak": _mode("nan_leak"),
}
