"""RoPE bug classes the suite must kill. Each replaces the registry's composite
``oracles.rope.kernel_pipeline(x, positions, **options) -> (cos, sin, y)``."""

from __future__ import annotations

import jax.numpy as jnp

from kernels.rope import apply_rope, rope_cos_sin, rope_frequencies, sin_cos_f32
from oracles.rope import _split


def _pipeline(x, positions, *, freq_fn=rope_frequencies, tables_fn=rope_cos_sin, layout_map=None, **kw):
    freq, layout = _split(kw)
    inv, att = freq_fn(x.shape[-1], **freq)
    cos, sin = tables_fn(positions, inv, attention_scaling=att, dtype=x.dtype)
    return cos, sin, apply_rope(x, cos, sin, layout=(layout_map or {}).get(layout, layout))


def _bf16_tables(positions, inv_freq, *, attention_scaling, dtype, cast_inv, cast_pos, cast_angle):
    inv = jnp.asarray(inv_freq)
    if cast_inv:
        inv = inv.astype(jnp.bfloat16).astype(jnp.float32)
    pos = positions.astype(jnp.bfloat16 if cast_pos else jnp.float32).astype(jnp.float32)
    angle = pos[:, :, None] * inv[None, None, :]  # [B, T, R/2]
    if cast_angle:
        angle = angle.astype(jnp.bfloat16).astype(jnp.float32)
    sin, cos = sin_cos_f32(angle)
    cos, sin = cos * jnp.float32(attention_scaling), sin * jnp.float32(attention_scaling)
    cos, sin = jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)  # [B, T, R]
    return cos.astype(dtype), sin.astype(dtype)


def inv_freq_bf16(x, positions, **kw):
    """inv_freq rounded to bfloat16 (frequencies stored in the model dtype)."""
    def tables(p, inv, **k):
        return _bf16_tables(p, inv, **k, cast_inv=True, cast_pos=False, cast_angle=False)
    return _pipeline(x, positions, tables_fn=tables, **kw)


def angles_bf16(x, positions, **kw):
    """Angles position * inv_freq rounded to bfloat16 before cos/sin."""
    def tables(p, inv, **k):
        return _bf16_tables(p, inv, **k, cast_inv=False, cast_pos=False, cast_angle=True)
    return _pipeline(x, positions, tables_fn=tables, **kw)


def positions_bf16(x, positions, **kw):
    """Positions cast to bfloat16 before the angle (exact only up to 256)."""
    def tables(p, inv, **k):
        return _bf16_tables(p, inv, **k, cast_inv=False, cast_pos=True, cast_angle=False)
    return _pipeline(x, positions, tables_fn=tables, **kw)


def layouts_swapped(x, positions, **kw):
    """"half" applied as "interleaved" and vice versa."""
    return _pipeline(x, positions, layout_map={"half": "interleaved", "interleaved": "half"}, **kw)


def llama3_ignored(x, positions, **kw):
    """llama3 frequency bands ignored: plain default frequencies."""
    def freq(h, **f):
        if f["rope_type"] == "llama3":
            f = dict(f, rope_type="default", scaling=None)
        return rope_frequencies(h, **f)
    return _pipeline(x, positions, freq_fn=freq, **kw)


def yarn_attention_dropped(x, positions, **kw):
    """yarn's attention factor (mscale) not applied to cos/sin."""
    def freq(h, **f):
        inv, att = rope_frequencies(h, **f)
        return inv, (1.0 if f["rope_type"] == "yarn" else att)
    return _pipeline(x, positions, freq_fn=freq, **kw)


def partial_rotates_all(x, positions, **kw):
    """partial_rotary_factor ignored: every channel rotated."""
    def freq(h, **f):
        if f["rope_type"] != "proportional":
            f = dict(f, partial_rotary_factor=1.0)
        return rope_frequencies(h, **f)
    return _pipeline(x, positions, freq_fn=freq, **kw)


MUTANTS = {
    "inv_freq_bf16": inv_freq_bf16,
    "angles_bf16": angles_bf16,
    "positions_bf16": positions_bf16,
    "layouts_swapped": layouts_swapped,
    "llama3_ignored": llama3_ignored,
    "yarn_attention_dropped": yarn_attention_dropped,
    "partial_rotates_all": partial_rotates_all,
}
