"""Host-side float32 ``pow`` that rounds exactly as PyTorch's CPU kernel does (numpy only).

HuggingFace computes RoPE frequencies as ``base ** (arange(0, dim, 2).float() / dim)``
on float32 tensors. On x86 CPUs torch evaluates that float32 ``pow`` with SLEEF's
``Sleef_powf_u10`` (AVX2 and AVX-512 builds, both with FMA). That result is not the
correctly rounded power: about 1% of RoPE frequencies differ by one ulp from
``float32(float64 pow)``. A single ulp of ``inv_freq`` moves the angle at position
1e5 by ~5e-3 rad. So the kernels reproduce SLEEF's algorithm operation by operation
(``logkf``, ``expkf`` and the double-float helpers of ``df.h``, FMA variant) in numpy
float32 arithmetic, with an exact float32 FMA emulated through float64 and
round-to-odd.

Scope: torch runs SLEEF on whole blocks of 2 x (vector width) elements and a scalar
libm ``powf`` on the remainder (32-element blocks under AVX-512, 16 under AVX2). For
rotary widths whose ``dim / 2`` is a multiple of 32 (every full-rotary head dim of 64,
128 and 256) every element goes through SLEEF on both ISAs, and this module is bit-exact.
For other widths the remainder may differ by one ulp from torch. That is within the
2-ulp contract, and it is documented in ``kernels.rope.rope_frequencies``.
"""

from __future__ import annotations

import numpy as np

_F = np.float32


def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=_F)


def fma_f32(a, b, c) -> np.ndarray:
    """``round_f32(a * b + c)`` with a single rounding, like the hardware FMA.

    The product of two float32 values is exact in float64. The float64 sum is then
    rounded *to odd*, so the final rounding to float32 is correct with no double
    rounding (53 >= 24 + 2 bits).
    """
    # float64 holds the float32 product exactly; the sum's error is recovered with TwoSum.
    a64, b64, c64 = (_f(v).astype(np.float64) for v in (a, b, c))
    p = a64 * b64
    s = np.atleast_1d(p + c64)
    bb = s - p
    err = np.atleast_1d((p - (s - bb)) + (c64 - bb))
    bits = s.view(np.int64)
    inexact = err != 0
    toward_zero = inexact & (np.signbit(err) != np.signbit(s))
    bits = np.where(toward_zero, bits - 1, bits)  # truncate: one ulp toward zero (sign-magnitude)
    bits = np.where(inexact, bits | 1, bits)  # round to odd
    out = bits.view(np.float64).astype(_F)  # the one rounding to float32, now correct
    return out.reshape(np.broadcast(a64, b64, c64).shape)


def _mul(a, b):
    return _f(a) * _f(b)


def _add(a, b):
    return _f(a) + _f(b)


def _sub(a, b):
    return _f(a) - _f(b)


def _fmapn(x, y, z):  # x * y - z, one rounding
    return fma_f32(x, y, -_f(z))


def _fmanp(x, y, z):  # -x * y + z, one rounding
    return fma_f32(-_f(x), y, z)


# --- SLEEF df.h (FMA variant): double-float arithmetic on (hi, lo) pairs ------------

def _dfadd2_f_f(x, y):
    rx = _add(x, y)
    v = _sub(rx, x)
    return rx, _add(_sub(x, _sub(rx, v)), _sub(y, v))


def _dfadd2_f2_f(x, y):
    rx = _add(x[0], y)
    v = _sub(rx, x[0])
    ry = _add(_sub(x[0], _sub(rx, v)), _sub(y, v))
    return rx, _add(ry, x[1])


def _dfadd2_f2_f2(x, y):
    rx = _add(x[0], y[0])
    v = _sub(rx, x[0])
    ry = _add(_sub(x[0], _sub(rx, v)), _sub(y[0], v))
    return rx, _add(ry, _add(x[1], y[1]))


def _dfadd_f2_f2(x, y):
    rx = _add(x[0], y[0])
    return rx, _add(_add(_add(_sub(x[0], rx), y[0]), x[1]), y[1])


def _dfadd_f_f2(x, y):
    rx = _add(x, y[0])
    return rx, _add(_add(_sub(x, rx), y[0]), y[1])


def _dfdiv(n, d):
    t = _f(1) / d[0]
    qx = _mul(n[0], t)
    u = _fmapn(t, n[0], qx)
    qy = _fmanp(d[1], t, _fmanp(d[0], t, _f(1)))
    return qx, fma_f32(qx, qy, fma_f32(n[1], t, u))


def _dfsqu(x):
    rx = _mul(x[0], x[0])
    return rx, fma_f32(_add(x[0], x[0]), x[1], _fmapn(x[0], x[0], rx))


def _dfmul_f2_f(x, y):
    rx = _mul(x[0], y)
    return rx, fma_f32(x[1], y, _fmapn(x[0], y, rx))


def _dfmul_f2_f2(x, y):
    rx = _mul(x[0], y[0])
    return rx, fma_f32(x[0], y[1], fma_f32(x[1], y[0], _fmapn(x[0], y[0], rx)))


# --- SLEEF sleefsimdsp.c: logkf, expkf, xpowf (AVX-512 getexp/getmant path) ----------

def _logkf(d):
    d = _f(d)
    e = np.floor(np.log2(_mul(d, _F(1.0 / 0.75)).astype(np.float64))).astype(_F)  # vgetexp
    k = np.floor(np.log2(d.astype(np.float64) / 0.75))  # vgetmant, mantissa in [0.75, 1.5)
    m = (d.astype(np.float64) / 2.0**k).astype(_F)  # exact: a power-of-two scaling
    x = _dfdiv(_dfadd2_f_f(_F(-1), m), _dfadd2_f_f(_F(1), m))
    x2 = _dfsqu(x)
    t = _F(0.240320354700088500976562)
    t = fma_f32(t, x2[0], _F(0.285112679004669189453125))
    t = fma_f32(t, x2[0], _F(0.400007992982864379882812))
    c = (_F(0.66666662693023681640625), _F(3.69183861259614332084311e-09))
    s = _dfmul_f2_f((_F(0.69314718246459960938), _F(-1.904654323148236017e-09)), e)
    s = _dfadd_f2_f2(s, (_mul(x[0], 2), _mul(x[1], 2)))
    return _dfadd_f2_f2(s, _dfmul_f2_f2(_dfmul_f2_f2(x2, x), _dfadd2_f2_f2(_dfmul_f2_f(x2, t), c)))


_R_LN2F = _F(1.442695040888963407359924681001892137426645954152985934135449406931)
_L2UF = _F(0.693145751953125)
_L2LF = _F(1.428606765330187045e-06)
_EXP_POLY = (0.00836596917361021041870117, 0.0416710823774337768554688,
             0.166665524244308471679688, 0.499999850988388061523438)


def _expkf(d):
    u = _mul(_add(d[0], d[1]), _R_LN2F)
    q = np.rint(u).astype(_F)  # vrint: round half to even, as cvtps2dq
    s = _dfadd2_f2_f(d, _mul(q, -_L2UF))
    s = _dfadd2_f2_f(s, _mul(q, -_L2LF))
    sx = _add(s[0], s[1])  # dfnormalize
    s = (sx, _add(_sub(s[0], sx), s[1]))
    u = _F(0.00136324646882712841033936)
    for c in _EXP_POLY:
        u = fma_f32(u, s[0], _F(c))
    t = _dfadd_f2_f2(s, _dfmul_f2_f(_dfsqu(s), u))
    t = _dfadd_f_f2(_F(1), t)
    u = _add(t[0], t[1])
    out = np.ldexp(u.astype(np.float64), q.astype(np.int64)).astype(_F)  # exact scaling by 2**q
    return np.where(d[0] < -104, _F(0), out)


def torch_cpu_powf(base, exponent) -> np.ndarray:
    """``base ** exponent`` for float32 ``base > 0`` and finite exponents, rounded as
    torch's vectorised CPU kernel (SLEEF ``powf_u10``) rounds it. Returns float32."""
    b, e = np.broadcast_arrays(_f(base), _f(exponent))
    if not (np.all(b > 0) and np.all(np.isfinite(b)) and np.all(np.isfinite(e))):
        raise ValueError("torch_cpu_powf: expected a finite base > 0 and finite exponents, "
                         f"got base {b.ravel()[:4]} and exponents {e.ravel()[:4]}")
    r = _expkf(_dfmul_f2_f(_logkf(b), e))
    return np.where((e == 0) | (b == 1), _F(1), r).astype(_F)
