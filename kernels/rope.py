"""Rotary position embeddings (RoPE), rounded as HuggingFace transformers rounds them.

Three functions, split the way a model uses them:

``rope_frequencies(head_dim, *, theta, rope_type, ...) -> (inv_freq, attention_scaling)``
    Host-side setup, numpy only (call it once, outside jit). It covers every rope type
    of transformers 5.17: default, linear, dynamic, yarn, longrope, llama3 and
    proportional. ``inv_freq`` is float32 and reproduces torch's float32 arithmetic
    step by step, including torch's CPU ``pow`` (see ``kernels._powf``).
``rope_cos_sin(positions[B,T], inv_freq, *, attention_scaling, dtype) -> (cos, sin)``
    The tables, ``[B, T, R]`` with R = 2 * len(inv_freq), in HF's layout
    ``cat(freqs, freqs)``:
      1. ``angle = float32(inv_freq * float32(position))``: one rounding, as HF's
         ``inv_freq @ position_ids.float()`` (a matmul with inner size 1).
      2. ``cos(angle)``, ``sin(angle)`` of that *rounded* float32 angle, to about half an
         ulp. Angles reach 1e5 rad at long context, where XLA's own float32 cos/sin are
         thousands of ulps from torch's. So the kernel reduces the argument exactly: a
         Cody-Waite split of pi/2 into 4-bit chunks (every ``k * chunk`` is exact for
         ``|k| < 2**20``) and compensated (TwoSum) summation. Then it evaluates
         minimax polynomials on ``[-pi/4, pi/4]`` with a first-order correction for
         the reduced argument's low part.
      3. ``* float32(attention_scaling)`` in float32 (skipped when it is 1.0).
      4. one rounding to ``dtype``.
``apply_rope(x[B,T,N,H], cos, sin, *, layout="half", implementation=None) -> x rotated``
(and ``apply_rope_qk(q, k, cos, sin)``, both at once: one launch on a GPU)
    ``x_rot * cos + rotate(x_rot) * sin`` in the promoted dtype of (x, cos). In bf16
    and f16, each product and the sum are rounded to that dtype, as torch does
    elementwise. The first R channels are rotated and the rest pass through
    (partial rotary). ``"half"`` pairs channel i with i + R/2 (HF ``rotate_half``).
    ``"interleaved"`` pairs 2i with 2i+1 (GPT-J / Meta / GLM), reading frequency i
    from ``cos[..., i]``: both layouts take the same tables. On a CUDA GPU, bf16/f16 with
    layout "half" run as one Pallas kernel (``kernels.rope_pallas``), bit-identical.

Positions must be integers below 2**24, so that their float32 value is exact. The
argument reduction is exact for angles below about 1.6e6 rad.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from kernels._checks import require_choice, require_float, require_gpu, require_ndim
from kernels._round import round_to
from kernels._twofloat import two_sum
from kernels._powf import torch_cpu_powf

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
LAYOUTS = ("half", "interleaved")
IMPLEMENTATIONS = ("xla", "pallas")

# Keys of HF's rope_parameters that each rope type requires / may use (besides the
# generic rope_type / type / rope_theta / partial_rotary_factor).
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "proportional": (),
}
_OPTIONAL = {
    "default": (),
    "linear": (),
    "dynamic": (),
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "longrope": ("attention_factor", "factor"),
    "llama3": (),
    "proportional": ("factor",),
}
_GENERIC = ("rope_type", "type", "rope_theta", "partial_rotary_factor")

_F32 = np.float32


# ---------------------------------------------------------------------------------
# rope_frequencies: host-side, numpy float32 arithmetic mirroring torch's.
# ---------------------------------------------------------------------------------

def _check_scaling(rope_type: str, scaling: dict, *, theta: float, partial_rotary_factor: float) -> dict:
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_frequencies: scaling must be a dict of HF rope_parameters, got {type(scaling).__name__}")
    given_type = scaling.get("rope_type", scaling.get("type", rope_type))
    if given_type != rope_type:
        raise ValueError(f"rope_frequencies: scaling says rope_type {given_type!r} but rope_type={rope_type!r} was passed")
    if "rope_theta" in scaling and float(scaling["rope_theta"]) != float(theta):
        raise ValueError(f"rope_frequencies: scaling says rope_theta {scaling['rope_theta']!r} but theta={theta!r} was passed")
    if "partial_rotary_factor" in scaling and float(scaling["partial_rotary_factor"]) != float(partial_rotary_factor):
        raise ValueError(
            f"rope_frequencies: scaling says partial_rotary_factor {scaling['partial_rotary_factor']!r} "
            f"but partial_rotary_factor={partial_rotary_factor!r} was passed")
    missing = [k for k in _REQUIRED[rope_type] if k not in scaling]
    if missing:
        raise ValueError(f"rope_frequencies: rope_type {rope_type!r} needs scaling keys {list(_REQUIRED[rope_type])}; "
                         f"missing {missing}")
    allowed = set(_REQUIRED[rope_type]) | set(_OPTIONAL[rope_type]) | set(_GENERIC)
    unknown = sorted(set(scaling) - allowed)
    if unknown:
        raise ValueError(f"rope_frequencies: unknown scaling keys {unknown} for rope_type {rope_type!r} "
                         f"(expected some of {sorted(allowed)})")
    return scaling


def _exponents(n_pairs: int, denom: int) -> np.ndarray:
    """float32(arange(0, 2 * n_pairs, 2)) / float32(denom), as torch's float32 division."""
    return np.arange(0, 2 * n_pairs, 2).astype(_F32) / _F32(denom)


def _recip(x: np.ndarray) -> np.ndarray:
    """torch's ``scalar / tensor`` is ``tensor.reciprocal() * scalar``; 1/x is one float32 rounding."""
    return _F32(1.0) / x


def _need(value, name: str, rope_type: str):
    if value is None:
        raise ValueError(f"rope_frequencies: rope_type {rope_type!r} needs {name}, got None")
    return value


def rope_frequencies(head_dim: int, *, theta: float, rope_type: str = "default", partial_rotary_factor: float = 1.0,
                     scaling: dict | None = None, max_position_embeddings: int | None = None,
                     seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """RoPE inverse frequencies ``[R/2]`` (float32 numpy) and the cos/sin scale factor.

    Reproduces ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]``
    (and, for ``"default"``, the models' ``compute_default_rope_parameters``) of
    transformers 5.17 on torch 2.13 CPU. The dtype recipe is that of HF:
      1. exponents ``float32(arange(0, dim, 2)) / dim`` in float32 (dim = rotary dim);
      2. ``float32(base) ** exponents`` with torch's CPU float32 pow;
      3. every later tensor step in float32, with Python scalars rounded to float32 at
         each operation (``scalar / t`` is ``reciprocal(t) * scalar``, as in torch);
      4. scalar-only steps (dynamic's new base, yarn's correction range and attention
         factor, longrope's attention factor) in Python float64.

    Args:
      head_dim: the attention head dim H (even).
      theta: ``rope_theta``, the base wavelength.
      rope_type: one of ``ROPE_TYPES``.
      partial_rotary_factor: the rotary dim is ``int(head_dim * partial_rotary_factor)``
        (for ``"proportional"``: the rotated share of ``head_dim``; the rest of the
        ``head_dim // 2`` frequencies are 0).
      scaling: HF's ``rope_parameters`` dict (``factor``, ``original_max_position_embeddings``,
        ``low_freq_factor``, ``beta_fast``, ``short_factor``, ...). A model config's dict can
        be passed straight through; its ``rope_type`` / ``rope_theta`` /
        ``partial_rotary_factor``, if present, must agree with the arguments.
      max_position_embeddings: the config's value; needed by ``"dynamic"``, and by
        ``"yarn"`` / ``"longrope"`` when ``factor`` is absent or None.
      seq_len: the current sequence length (``max(position) + 1``). ``"dynamic"`` uses
        ``max(seq_len, max_position_embeddings)``, as the init function called with an
        int. ``"longrope"`` uses the long factors when ``seq_len >
        original_max_position_embeddings``. Other types ignore it.

    Returns:
      ``(inv_freq, attention_scaling)``: float32 ``[R/2]`` and a Python float. R is the
      rotary dim, or ``head_dim`` for ``"proportional"``.

    Bit-exact to HF on torch's CPU kernels when ``R/2`` is a multiple of 32. Otherwise
    torch computes the last ``R/2 mod 32`` powers with libm's ``powf``, which may differ
    by one ulp (see ``kernels._powf``).
    """
    require_choice("rope_type", rope_type, ROPE_TYPES, op="rope_frequencies")
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_frequencies: head_dim must be a positive even int, got {head_dim!r}")
    if not (isinstance(theta, (int, float)) and theta > 0 and math.isfinite(theta)):
        raise ValueError(f"rope_frequencies: theta must be a finite number > 0, got {theta!r}")
    if not 0.0 < partial_rotary_factor <= 1.0:
        raise ValueError(f"rope_frequencies: partial_rotary_factor must be in (0, 1], got {partial_rotary_factor!r}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer))):
        raise ValueError(f"rope_frequencies: seq_len must be an int or None, got {seq_len!r}")
    p = _check_scaling(rope_type, dict(scaling or {}), theta=theta, partial_rotary_factor=partial_rotary_factor)
    base = float(theta)
    dim = int(head_dim * partial_rotary_factor)
    if rope_type != "proportional" and (dim % 2 or dim <= 0):
        raise ValueError(f"rope_frequencies: the rotary dim int(head_dim * partial_rotary_factor) = "
                         f"int({head_dim} * {partial_rotary_factor}) = {dim} must be even and > 0")
    n = dim // 2
    attention = 1.0

    if rope_type in ("default", "linear", "llama3"):
        inv = _recip(torch_cpu_powf(_F32(base), _exponents(n, dim)))
        if rope_type == "linear":
            inv = inv / _F32(p["factor"])  # in-place `inv_freq /= factor`, float32
        elif rope_type == "llama3":
            inv = _llama3(inv, p)
    elif rope_type == "dynamic":
        mpe = _need(max_position_embeddings, "max_position_embeddings", rope_type)
        s = mpe if seq_len is None else max(seq_len, mpe)
        factor = p["factor"]
        # Python float64 scalar maths, exactly as HF's int path; the new base is rounded
        # to float32 only where it meets the float32 exponents inside pow.
        new_base = base * ((factor * s / mpe) - (factor - 1)) ** (dim / (dim - 2))
        inv = _recip(torch_cpu_powf(_F32(new_base), _exponents(n, dim)))
    elif rope_type == "yarn":
        inv, attention = _yarn(base, dim, n, p, max_position_embeddings)
    elif rope_type == "longrope":
        inv, attention = _longrope(base, dim, n, p, max_position_embeddings, seq_len)
    else:  # proportional
        rope_angles = int(partial_rotary_factor * head_dim // 2)
        rot = _recip(torch_cpu_powf(_F32(base), _exponents(rope_angles, head_dim)))
        inv = np.concatenate([rot, np.zeros(head_dim // 2 - rope_angles, _F32)])
        inv = inv / _F32(p.get("factor", 1.0))
    return np.asarray(inv, _F32), float(attention)


def _llama3(inv: np.ndarray, p: dict) -> np.ndarray:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high  # Python floats
    wavelen = _recip(inv) * _F32(2 * math.pi)  # `2 * math.pi / inv_freq`, float32
    # Comparisons against Python floats happen in float32, as torch casts the scalar.
    llama = np.where(wavelen > _F32(low_wavelen), inv / _F32(factor), inv)
    smooth = (_recip(wavelen) * _F32(old) - _F32(low)) / _F32(high - low)
    smoothed = (_F32(1) - smooth) * llama / _F32(factor) + smooth * llama
    medium = ~(wavelen < _F32(high_wavelen)) & ~(wavelen > _F32(low_wavelen))
    return np.where(medium, smoothed, llama)


def _yarn(base: float, dim: int, n: int, p: dict, mpe: int | None) -> tuple[np.ndarray, float]:
    factor = p["factor"]
    orig = p["original_max_position_embeddings"]
    if factor is None:
        factor = _need(mpe, "max_position_embeddings (yarn with factor None)", "yarn") / orig
    attention = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")

    def get_mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention is None:
        if mscale and mscale_all_dim:
            attention = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp

    pos_freqs = torch_cpu_powf(_F32(base), _exponents(n, dim))
    extrapolation = _recip(pos_freqs)
    interpolation = _recip(_F32(factor) * pos_freqs)
    ramp = np.clip((np.arange(n, dtype=_F32) - _F32(low)) / _F32(high - low), _F32(0), _F32(1))
    extra_factor = _F32(1) - ramp
    inv = interpolation * (_F32(1) - extra_factor) + extrapolation * extra_factor
    return inv, attention


def _longrope(base, dim, n, p, mpe, seq_len) -> tuple[np.ndarray, float]:
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor")
    if factor is None:
        factor = _need(mpe, "max_position_embeddings (longrope without factor)", "longrope") / orig
    attention = p.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = p["long_factor"] if (seq_len and seq_len > orig) else p["short_factor"]
    ext = np.asarray(ext, dtype=np.float64).astype(_F32)  # torch.tensor(list, dtype=float32)
    if ext.shape != (n,):
        raise ValueError(f"rope_frequencies: longrope factors must have length rotary_dim/2 = {n}, got {ext.shape[0]}")
    return _recip(ext * torch_cpu_powf(_F32(base), _exponents(n, dim))), attention


# ---------------------------------------------------------------------------------
# rope_cos_sin: exact float32 argument reduction, then minimax polynomials.
# ---------------------------------------------------------------------------------

# pi/2 to 250 bits: its hex digits 1.921FB54442D1... (checked against mpmath in the tests).
_PIO2_HEX = "1921FB54442D18469898CC51701B839A252049C1114CF98E804177D4C7627364"
_PIO2 = Fraction(int(_PIO2_HEX, 16), 16 ** (len(_PIO2_HEX) - 1))
_CHUNK_BITS = 4  # k < 2**20 (20 bits) times a 4-bit chunk fits float32's 24-bit significand
_N_CHUNKS = 20  # 80 bits of pi/2: k * (pi/2 - sum of chunks) < 2**-59


def _pio2_chunks() -> tuple[float, ...]:
    out, acc = [], Fraction(0)
    for j in range(1, _N_CHUNKS + 1):
        scale = 2 ** (_CHUNK_BITS * j - 1)  # chunk j holds the bits of weight 2**-(4j-4) .. 2**-(4j-1)
        c = Fraction(math.floor(_PIO2 * scale), scale) - acc
        acc += c
        out.append(float(c))  # exact: at most 4 significant bits
    return tuple(out)


_CHUNKS = _pio2_chunks()
_TWO_OVER_PI = float(np.float32(2 / math.pi))
_PIO2_HI = float(np.float32(float(_PIO2)))
_PIO2_LO = float(np.float32(float(_PIO2 - Fraction(_PIO2_HI))))
# Minimax polynomials on [-pi/4, pi/4] (Cephes sinf / cosf), evaluated in float32.
_S1, _S2, _S3 = -1.6666654611e-1, 8.3321608736e-3, -1.9515295891e-4
_C1, _C2, _C3 = 4.166664568298827e-2, -1.388731625493765e-3, 2.443315711809948e-5


def _reduce(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``a = k * pi/2 + (hi + lo)`` with ``|hi + lo| <~ pi/4``; all float32, k as int32.

    Chunks 1-6 are subtracted in plain float32: each partial remainder
    ``r + k * tail`` is a multiple of the chunk's last bit and fits 24 bits, so every
    step is exact. Chunks 7-20 are added with TwoSum into a (hi, lo) pair. A last
    one-quadrant correction brings ``|hi|`` within pi/4.
    """
    k = jnp.round(a * jnp.float32(_TWO_OVER_PI))  # round half to even; any nearby k works
    hi = a
    for c in _CHUNKS[:6]:
        hi = hi - k * jnp.float32(c)  # exact: k * c has <= 24 bits, the difference fits
    lo = jnp.zeros_like(hi)
    for c in _CHUNKS[6:]:
        hi, e = two_sum(hi, -(k * jnp.float32(c)))
        lo = lo + e
    hi, lo = two_sum(hi, lo)
    # k came from float32(2/pi) * a, off by one near quadrant boundaries at large a
    # (|hi| up to ~pi/4 + 0.1): move those by one quadrant so |hi| <= pi/4 (+ 1 ulp).
    k1 = jnp.round(hi * jnp.float32(_TWO_OVER_PI))  # -1, 0 or 1
    hi = hi - k1 * jnp.float32(_PIO2_HI)  # exact: |hi| and pi/2 are within a factor 2 (Sterbenz)
    hi, lo = two_sum(hi, lo - k1 * jnp.float32(_PIO2_LO))
    return hi, lo, (k + k1).astype(jnp.int32)


def _sin_cos_reduced(r, r_lo):
    """sin and cos of ``r + r_lo`` for ``|r| <~ pi/4`` (float32, ~0.5-1 ulp)."""
    z = r * r
    hz = 0.5 * z
    w = 1.0 - hz  # cos(r) to first order: enough to carry the tiny r_lo
    s = r + (r * z * ((_S3 * z + _S2) * z + _S1) + r_lo * w)  # sin(r) + cos(r) * r_lo
    # cos(r) = w + ((1 - w) - hz) + z^2 Q(z), minus sin(r) * r_lo (musl's error recovery)
    c = w + (((1.0 - w) - hz) + (z * z * ((_C3 * z + _C2) * z + _C1) - r * r_lo))
    return s, c


def sin_cos_f32(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin(a), cos(a) of float32 ``a`` (|a| < ~1.6e6) to about half an ulp each."""
    hi, lo, k = _reduce(a)
    s, c = _sin_cos_reduced(hi, lo)
    q = jnp.bitwise_and(k, 3)  # quadrant
    sin = jnp.where(q == 0, s, jnp.where(q == 1, c, jnp.where(q == 2, -s, -c)))
    cos = jnp.where(q == 0, c, jnp.where(q == 1, -s, jnp.where(q == 2, -c, s)))
    return sin, cos


def rope_cos_sin(positions: jax.Array, inv_freq, *, attention_scaling: float = 1.0,
                 dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """cos / sin tables ``[B, T, R]`` (R = 2 * len(inv_freq)) for integer ``positions[B, T]``.

    Recipe (HF ``Qwen2RotaryEmbedding.forward``): angle = float32(inv_freq * float32(pos));
    cos/sin of that float32 angle, evaluated accurately in float32; times
    float32(attention_scaling); one rounding to ``dtype``. Positions are arbitrary per
    row (decode offsets, packed sequences restarting at 0) and must be below 2**24.
    """
    positions = jnp.asarray(positions)
    require_ndim("positions", positions, 2, op="rope_cos_sin", letters="BT")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"rope_cos_sin: positions must have an integer dtype, got {positions.dtype} "
                         f"with shape {tuple(positions.shape)}")
    inv_freq = jnp.asarray(inv_freq)
    if inv_freq.ndim != 1 or inv_freq.dtype != jnp.float32:
        raise ValueError(f"rope_cos_sin: inv_freq must be float32 with shape [R/2], got {inv_freq.dtype} "
                         f"with shape {tuple(inv_freq.shape)}")
    out_dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"rope_cos_sin: dtype must be a float dtype (float32, bfloat16, float16), got {out_dtype}")
    # float32 positions are exact below 2**24: HF's position_ids.float().
    pos = positions.astype(jnp.float32)
    angle = pos[:, :, None] * inv_freq[None, None, :]  # [B, T, R/2], one float32 rounding
    # Keep the rounded angle: a fused multiply-add into the reduction would skip this
    # rounding and evaluate cos of a different angle from HF's.
    angle = jax.lax.optimization_barrier(angle)
    sin, cos = sin_cos_f32(angle)
    if attention_scaling != 1.0:
        scale = jnp.float32(attention_scaling)  # torch multiplies by the float32-rounded scalar
        cos, sin = cos * scale, sin * scale
    cos = jnp.concatenate([cos, cos], axis=-1)  # [B, T, R]: HF's cat(freqs, freqs)
    sin = jnp.concatenate([sin, sin], axis=-1)  # [B, T, R]
    # One rounding, at the end, as HF's `.to(dtype=x.dtype)`.
    return cos.astype(out_dtype), sin.astype(out_dtype)


# ---------------------------------------------------------------------------------
# apply_rope
# ---------------------------------------------------------------------------------

def _sum_of_rounded_products(a, b, c, d, dt):
    """``round(round(a*b) + round(c*d))`` in ``dt``, as torch's elementwise ops compute it.

    Under jit, XLA's CPU backend contracts ``a*b + c*d`` into ``fma(a, b, round(c*d))``
    (openxla/xla#41579; measured: 25% of float32 results differ from torch), and neither an
    optimisation barrier (expanded before fusion) nor bitcasts prevent it. So:
    - float32/float64: each product gets ``+ z``, a zero XLA cannot prove is zero
      (``min(|a|, 0)``); a contraction can then only form ``fma(a, b, z) = round(a*b)``.
    - bfloat16/float16: the product of two such values is exact in float32 (at most 22
      significant bits), so it is formed there and rounded to ``dt``'s mantissa with
      ``reduce_precision``, then summed in float32 and rounded once more to ``dt``, as
      torch's CPU kernels do. A convert pair (``.astype(dt).astype(f32)``) does not work:
      XLA drops it as "excess precision" (measured: float16 parity unchanged with it).
    """
    if jnp.dtype(dt) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        # The opaque zero comes from the data (a), never from the tables: tables closed over
        # as constants would let XLA fold it to 0 and contract again (measured in the localizer).
        z = jnp.minimum(jnp.abs(a), 0.0)  # NaN only where a is NaN, and a*b is NaN there anyway
        return (a * b + z) + (c * d + z)

    def rounded(u, v):  # the exact f32 product, rounded to dt, kept in f32
        p = u.astype(jnp.float32) * v.astype(jnp.float32)  # exact: bf16/f16 products fit in f32
        return round_to(p, dt)

    return (rounded(a, b) + rounded(c, d)).astype(dt)  # f32 sum, one rounding to dt


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, layout: str = "half",
               implementation: str | None = None) -> jax.Array:
    """Rotate the first R channels of ``x[B, T, N, H]`` by the tables ``cos``/``sin[B, T, R]``.

    Recipe (HF ``apply_rotary_pos_emb``, with GLM's interleaved variant):
      1. out dtype = promote(x.dtype, cos.dtype), torch's rule (bf16 x with bf16 tables stays bf16);
      2. ``x_rot * cos`` and ``rotate(x_rot) * sin``, each rounded to that dtype;
      3. their sum, rounded to that dtype;
      4. the channels R..H pass through unchanged.
    ``layout="half"`` rotates (i, i + R/2) with frequency i (``rotate_half``);
    ``layout="interleaved"`` rotates (2i, 2i + 1) with frequency i, using ``cos[..., :R/2]``.

    ``implementation``: ``"xla"`` (XLA ops, any backend), ``"pallas"`` (one Triton kernel,
    ``kernels.rope_pallas``; GPU; bf16/f16 x with tables of its dtype, layout "half", R/2
    a power of two and H - R zero or one; a ValueError otherwise) or ``None``: "pallas"
    on a CUDA GPU where it applies, else "xla" (chosen at trace time from the platform
    and the static shapes). Both give the same bits: every step is one correctly
    rounded operation.
    """
    return _dispatch((x,), cos, sin, layout=layout, implementation=implementation)[0]


def apply_rope_qk(q: jax.Array, k: jax.Array, cos: jax.Array, sin: jax.Array, *, layout: str = "half",
                  implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(apply_rope(q, cos, sin), apply_rope(k, cos, sin))``, as HF's ``apply_rotary_pos_emb(q, k, cos, sin)``.

    The same recipe and the same bits as two ``apply_rope`` calls; on a GPU the Pallas
    path rotates q and k in one launch that reads each position's cos/sin once.
    ``q[B, T, N, H]`` and ``k[B, T, K, H]`` (any head counts, one head dim, one dtype).
    """
    require_float("q", q, op="apply_rope_qk")
    require_float("k", k, op="apply_rope_qk")
    require_ndim("q", q, 4, op="apply_rope_qk", letters="BTNH")
    require_ndim("k", k, 4, op="apply_rope_qk", letters="BTKH")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or q.dtype != k.dtype:
        raise ValueError(f"apply_rope_qk: q and k must share B, T, H and dtype, got q {q.dtype}{list(q.shape)} "
                         f"and k {k.dtype}{list(k.shape)}")
    qo, ko = _dispatch((q, k), cos, sin, layout=layout, implementation=implementation)
    return qo, ko


def _dispatch(xs, cos, sin, *, layout, implementation):
    """Check every x against the tables, then rotate them all by the chosen implementation."""
    require_choice("layout", layout, LAYOUTS, op="apply_rope")
    require_choice("implementation", implementation, (None, *IMPLEMENTATIONS), op="apply_rope")
    for x in xs:
        _check_apply(x, cos, sin)
    if implementation != "xla":
        from kernels.rope_pallas import pallas_apply_rope, supports

        h, r = xs[0].shape[-1], cos.shape[-1]
        ok = supports(xs[0].dtype, cos.dtype, layout=layout, h=h, r=r)
        if implementation == "pallas":
            if not ok:
                raise ValueError(f"apply_rope: implementation='pallas' takes bfloat16/float16 x with cos/sin of "
                                 f"its dtype, layout 'half', R/2 a power of two and H - R zero or one; got x "
                                 f"{xs[0].dtype}, tables {cos.dtype}, layout {layout!r}, H = {h}, R = {r}; use "
                                 f"implementation='xla' or None")
            require_gpu("pallas", op="apply_rope", module="kernels.rope_pallas.pallas_apply_rope")
            return pallas_apply_rope(xs, cos, sin)
        if ok:  # None: the fastest path of the platform, chosen at trace time
            return jax.lax.platform_dependent(
                xs, cos, sin, cuda=lambda xs, c, s: pallas_apply_rope(xs, c, s),
                default=lambda xs, c, s: tuple(_xla(x, c, s, layout=layout) for x in xs))
    return tuple(_xla(x, cos, sin, layout=layout) for x in xs)


def _check_apply(x, cos, sin):
    require_float("x", x, op="apply_rope")
    require_float("cos", cos, op="apply_rope")
    require_float("sin", sin, op="apply_rope")
    require_ndim("x", x, 4, op="apply_rope", letters="BTNH")
    b, t, _, h = x.shape
    r = cos.shape[-1] if cos.ndim == 3 else -1
    if cos.ndim != 3 or cos.shape != sin.shape or cos.shape[:2] != (b, t) or cos.dtype != sin.dtype:
        raise ValueError(f"apply_rope: cos and sin must both have shape [B, T, R] = [{b}, {t}, R] and one dtype, "
                         f"got cos {cos.dtype}{list(cos.shape)} and sin {sin.dtype}{list(sin.shape)}")
    if r % 2 or r <= 0 or r > h:
        raise ValueError(f"apply_rope: the rotary dim R = cos.shape[-1] must be even and in (0, H = {h}], got {r}")


def _xla(x, cos, sin, *, layout):
    """The recipe in XLA ops (any backend); arguments checked."""
    h = x.shape[-1]
    r = cos.shape[-1]
    dt = jnp.promote_types(x.dtype, cos.dtype)
    # torch promotes (x, table) before the products, e.g. bf16 x with f32 tables gives f32.
    xr = x[..., :r].astype(dt)  # [B, T, N, R]
    c = cos[:, :, None, :].astype(dt)  # [B, T, 1, R]
    s = sin[:, :, None, :].astype(dt)  # [B, T, 1, R]
    if layout == "half":
        x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
        rotated = jnp.concatenate([-x2, x1], axis=-1)  # [B, T, N, R]
    else:
        c = jnp.repeat(c[..., : r // 2], 2, axis=-1)  # [B, T, 1, R]: c0 c0 c1 c1 ...
        s = jnp.repeat(s[..., : r // 2], 2, axis=-1)  # [B, T, 1, R]
        pairs = xr.reshape(*xr.shape[:-1], r // 2, 2)  # [B, T, N, R/2, 2]
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xr.shape)  # [B, T, N, R]
    y = _sum_of_rounded_products(xr, c, rotated, s, dt)  # [B, T, N, R]
    if r == h:
        return y
    return jnp.concatenate([y, x[..., r:].astype(dt)], axis=-1)  # [B, T, N, H]
