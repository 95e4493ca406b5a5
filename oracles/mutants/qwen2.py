"""Whole-model bug classes from real ports (shared/seeds): each must be caught by tests/test_qwen2.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels.models.qwen2 import forward


def positions_from_one(params, input_ids, *, config, positions=None, kv_valid=None, logits_dtype=None, inject=()):
    """Position ids starting at 1 (an off-by-one in the cache offset): error grows with position."""
    b, t = input_ids.shape
    pos = jnp.broadcast_to(jnp.arange(1, t + 1, dtype=jnp.int32), (b, t))
    return forward(params, input_ids, config=config, positions=pos, kv_valid=kv_valid, logits_dtype=logits_dtype)


def rope_theta_1e4(params, input_ids, *, config, **kw):
    """rope_theta left at Llama's 10000 instead of the config's (Qwen2.5: 1e6)."""
    return forward(params, input_ids, config=dataclasses.replace(config, rope_theta=10000.0), **kw)


def qkv_bias_dropped(params, input_ids, *, config, **kw):
    """Qwen2's q/k/v biases never loaded (a Llama loader reused)."""
    layers = [{k: v for k, v in lp.items() if not k.endswith("_bias")} for lp in params["layers"]]
    return forward({**params, "layers": layers}, input_ids, config=config, **kw)


def residual_in_f32(params, input_ids, *, config, **kw):
    """Hidden states kept in float32 between layers (a 'harmless' upcast that changes every rounding)."""
    f32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    return forward(f32, input_ids, config=config, **kw).astype(params["embed"].dtype)


def tied_head_detached(params, input_ids, *, config, **kw):
    """A tied head ported as its own copy of the embedding table (HF's ``tie_weights`` not
    carried over): the same logits, to the bit, but the head's share of the gradient never
    reaches the table. Only the gradient test can see it."""
    if not config.tie_word_embeddings:
        return forward(params, input_ids, config=config, **kw)
    untied = dataclasses.replace(config, tie_word_embeddings=False)
    return forward({**params, "lm_head": jax.lax.stop_gradient(params["embed"])}, input_ids, config=untied, **kw)


MUTANTS = {
    "positions_from_one": positions_from_one,
    "rope_theta_1e4": rope_theta_1e4,
    "qkv_bias_dropped": qkv_bias_dropped,
    "residual_in_f32": residual_in_f32,
    "tied_head_detached": tied_head_detached,
}
