"""The one comparison module: how a kernel is judged, used by the tests and the CLI alike.

Three judgments (DESIGN.md, "The numerics contract"):

1. **Parity** against the oracle in the same dtype: the distance of each element in
   ulps *of the output dtype*, where the ulp is taken at ``max(|oracle|, floor)`` and
   ``floor = floor_rel * max|oracle|`` so that elements near zero (whose ulp is tiny)
   do not explode. The budget bounds the largest distance and the fraction of elements
   that differ (by half an ulp or more at that floored magnitude). An op whose output
   is a sum of products (a matmul, attention's ``p @ v``) also passes its per-element
   **term scale**, the largest ``|a_k * b_k|`` of the sum: the ulp is then taken at
   ``max(|oracle|, floor, term scale)``. An upstream rounding that flips by one ulp
   (a bf16 ``h_k`` rounded up in one implementation and down in the other, from a
   different but equally valid float32 summation order) moves a cancelled output by
   about ``|w_k| * ulp(h_k)``: one ulp at the term scale, but hundreds at ``|y|`` when
   ``|y|`` is far below its terms. Differences in the recipe itself (a rounding
   skipped, added or done in another dtype) move every output by many term-scale ulps
   and still fail.
2. **Accuracy** against the float64 truth: ``err(kernel) <= ratio * err(oracle) + floor``
   with ``err`` the largest absolute error over elements whose truth is finite and
   ``floor = floor_ulps`` ulps of the output dtype at ``max|truth|`` (FlashAttention's
   test rule: it accepts honest reorderings and catches real bugs).
3. **Finiteness**: wherever the truth is finite and representable in the output dtype,
   the kernel's output is finite.

Each judgment returns a result object; ``.ok`` says pass or fail and ``.message()``
writes a failure report in the manner of ``torch.testing.assert_close``: the mismatch
count and percentage, the worst element with its index and the kernel / oracle / truth
values there, the budget that allowed less, and the reproducer line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

# Mantissa bits (explicit) and smallest subnormal exponent of each output dtype.
_FORMATS = {
    "float64": (52, -1074),
    "float32": (23, -149),
    "bfloat16": (7, -133),
    "float16": (10, -24),
}
_FINFO_MAX = {
    "float64": np.finfo(np.float64).max,
    "float32": float(np.finfo(np.float32).max),
    "bfloat16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),
    "float16": float(np.finfo(np.float16).max),
}


def dtype_name(dtype) -> str:
    """Canonical name of a numpy / ml_dtypes / jax / torch dtype (or of an array's)."""
    if hasattr(dtype, "dtype") and not isinstance(dtype, type):
        dtype = dtype.dtype
    s = str(dtype)
    s = s.removeprefix("torch.").removeprefix("dtype(").strip("')\"")
    if s not in _FORMATS:
        raise ValueError(f"unsupported dtype {dtype!r}: expected one of {sorted(_FORMATS)}")
    return s


def to_f64(a) -> np.ndarray:
    """Any array (numpy, jax, torch; bf16 included) as a float64 numpy array, exactly."""
    if hasattr(a, "detach"):  # torch: numpy() cannot take bfloat16, and f32 holds bf16 exactly
        import torch

        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.to(torch.float32)
        a = a.numpy()
    return np.asarray(a).astype(np.float64)


def ulp(magnitude: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of ``dtype`` at each ``|magnitude|`` (float64 in, float64 out)."""
    mant, min_exp = _FORMATS[dtype]
    mag = np.abs(np.asarray(magnitude, dtype=np.float64))
    with np.errstate(divide="ignore"):
        _, e = np.frexp(mag)  # mag = f * 2**e with f in [0.5, 1)
    return np.ldexp(1.0, np.maximum(e - 1 - mant, min_exp))


def ulp_distance(kernel, oracle, *, dtype: str, floor_rel: float, term_scale=None) -> np.ndarray:
    """Elementwise distance in ulps of ``dtype`` between two same-shape arrays.

    The ulp is taken at ``max(|oracle|, floor_rel * max|oracle|, term_scale)``
    (``term_scale``: optional, broadcastable to the arrays). Equal values (and
    NaN against NaN, same-signed infinities) are 0 ulps; NaN or inf against anything
    else is ``inf``.
    """
    k, o = to_f64(kernel), to_f64(oracle)
    if k.shape != o.shape:
        raise ValueError(f"shape mismatch: kernel {k.shape} vs oracle {o.shape}")
    finite_o = o[np.isfinite(o)]
    top = float(np.max(np.abs(finite_o))) if finite_o.size else 0.0
    mag = np.maximum(np.abs(o), floor_rel * top)
    if term_scale is not None:
        mag = np.maximum(mag, np.nan_to_num(np.asarray(term_scale, np.float64), nan=0.0, posinf=0.0))
    scale = ulp(mag, dtype)
    with np.errstate(invalid="ignore"):
        d = np.abs(k - o) / scale
    same = (k == o) | (np.isnan(k) & np.isnan(o))
    d = np.where(same, 0.0, d)
    return np.where(np.isnan(d), np.inf, d)


def _fmt_index(flat: int, shape: tuple) -> tuple:
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()


def _g(v: float) -> str:
    return f"{v:.9g}"


@dataclass
class ParityBudget:
    max_ulps: float
    mismatch_frac: float
    floor_rel: float


@dataclass
class AccuracyBudget:
    ratio: float
    floor_ulps: float


@dataclass
class Judgment:
    """One judgment's verdict and everything needed to explain it."""

    kind: str  # "parity" | "accuracy" | "finite" | a property's name
    ok: bool
    measured: dict
    budget: dict
    summary: str
    worst_index: tuple | None = None
    values: dict = field(default_factory=dict)  # kernel / oracle / truth at the worst index

    def message(self, header: str = "", reproducer: str = "") -> str:
        lines = [f"{header}{self.kind} {'passed' if self.ok else 'FAILED'}" if header else self.kind]
        lines.append(self.summary)
        if self.worst_index is not None:
            vals = ", ".join(f"{k} = {_g(v)}" for k, v in self.values.items())
            lines.append(f"Worst element at index {self.worst_index}: {vals}")
        if reproducer:
            lines.append(f"Reproduce: {reproducer}")
        return "\n".join(lines)


def judge_parity(kernel, oracle, *, dtype: str, budget: ParityBudget, truth=None, term_scale=None) -> Judgment:
    """Parity: ulps against the same-dtype oracle, within ``budget``."""
    d = ulp_distance(kernel, oracle, dtype=dtype, floor_rel=budget.floor_rel, term_scale=term_scale)
    n = d.size
    # A mismatch is a difference of at least half an ulp at the floored magnitude: two
    # distinct values above the floor are always that far apart, while differences far
    # below the floor (a subnormal flushed to zero by XLA's CPU backend, 1e-39 vs 0) are
    # exactly what the floor declares irrelevant.
    mism = int(np.count_nonzero(d >= 0.5))
    frac = mism / n if n else 0.0
    worst = float(np.max(d)) if n else 0.0
    ok = worst <= budget.max_ulps and frac <= budget.mismatch_frac
    lines = [
        f"Mismatched elements: {mism} / {n} ({100 * frac:.4g}%) "
        f"[budget: at most {100 * budget.mismatch_frac:.4g}% may differ]",
        f"Greatest distance: {_g(worst)} ulps of {dtype} [budget: {_g(budget.max_ulps)} ulps; "
        f"ulp floor at {budget.floor_rel:g} x max|oracle|"
        + (", and at each element's largest term" if term_scale is not None else "") + "]",
    ]
    j = Judgment(
        "parity",
        ok,
        {"max_ulps": worst, "mismatch_frac": frac},
        {"max_ulps": budget.max_ulps, "mismatch_frac": budget.mismatch_frac},
        "\n".join(lines),
    )
    if n and worst > 0:
        i = int(np.argmax(d))
        j.worst_index = _fmt_index(i, d.shape)
        j.values = {"kernel": to_f64(kernel).flat[i], "oracle": to_f64(oracle).flat[i]}
        if truth is not None:
            j.values["truth"] = to_f64(truth).flat[i]
        if term_scale is not None:
            j.values["term scale"] = float(np.broadcast_to(term_scale, d.shape).flat[i])
    return j


def term_scale(a, b) -> np.ndarray:
    """``max_k |a[..., k] * b[k, n]|`` in float64: the largest term of each output of ``a @ b``.

    Computed a row and a block of columns at a time (``[K, 4096]`` products at most).
    """
    a = np.abs(np.nan_to_num(to_f64(a), nan=0.0, posinf=0.0, neginf=0.0))
    b = np.abs(np.nan_to_num(to_f64(b), nan=0.0, posinf=0.0, neginf=0.0))
    lead, n = a.shape[:-1], b.shape[1]
    rows = a.reshape(-1, a.shape[-1])  # [R, K]
    out = np.zeros((rows.shape[0], n))  # [R, N]
    for c in range(0, n, 4096):
        bc = b[:, c:c + 4096]  # [K, <=4096]
        for i, r in enumerate(rows):
            out[i, c:c + 4096] = np.max(r[:, None] * bc, axis=0)
    return out.reshape(*lead, n)  # [..., N]


def judge_accuracy(kernel, oracle, truth, *, dtype: str, budget: AccuracyBudget) -> Judgment:
    """Accuracy: ``err(kernel) <= ratio * err(oracle) + floor`` against the float64 truth."""
    k, o, t = to_f64(kernel), to_f64(oracle), to_f64(truth)
    fin = np.isfinite(t)
    if not fin.any():
        return Judgment("accuracy", True, {"ratio": 0.0, "kernel_err": 0.0, "oracle_err": 0.0},
                        {"ratio": budget.ratio, "floor_ulps": budget.floor_ulps}, "truth has no finite element")
    with np.errstate(invalid="ignore"):
        ek = np.where(fin, np.abs(k - t), 0.0)
        eo = np.where(fin, np.abs(o - t), 0.0)
    ek = np.where(np.isnan(ek), np.inf, ek)
    eo = np.where(np.isnan(eo), np.inf, eo)
    err_k, err_o = float(ek.max()), float(eo.max())
    floor = budget.floor_ulps * float(ulp(np.max(np.abs(t[fin])), dtype))
    allowed = budget.ratio * err_o + floor
    ok = err_k <= allowed
    # The ratio this case needed: the smallest r with err_k <= r * err_o + floor.
    excess = max(0.0, err_k - floor)
    need = 0.0 if excess == 0 else (excess / err_o if err_o > 0 else math.inf)
    summary = (
        f"Kernel error {_g(err_k)} vs oracle error {_g(err_o)} against the float64 truth "
        f"(needs ratio {_g(need)}) [budget: ratio {_g(budget.ratio)} + floor {budget.floor_ulps:g} ulps "
        f"= {_g(allowed)}]"
    )
    j = Judgment("accuracy", ok, {"ratio": need, "kernel_err": err_k, "oracle_err": err_o},
                 {"ratio": budget.ratio, "floor_ulps": budget.floor_ulps}, summary)
    if err_k > 0:
        i = int(np.argmax(ek))
        j.worst_index = _fmt_index(i, ek.shape)
        j.values = {"kernel": k.flat[i], "oracle": o.flat[i], "truth": t.flat[i]}
    return j


def judge_finite(kernel, truth, *, dtype: str) -> Judgment:
    """Where the truth is finite and representable in ``dtype``, the kernel is finite."""
    k, t = to_f64(kernel), to_f64(truth)
    must = np.isfinite(t) & (np.abs(t) < _FINFO_MAX[dtype])
    bad = must & ~np.isfinite(k)
    nbad = int(bad.sum())
    j = Judgment("finite", nbad == 0, {"nonfinite": nbad}, {"nonfinite": 0},
                 f"Non-finite outputs where the truth is finite: {nbad} / {int(must.sum())}")
    if nbad:
        i = int(np.argmax(bad))
        j.worst_index = _fmt_index(i, k.shape)
        j.values = {"kernel": k.flat[i], "truth": t.flat[i]}
    return j


class NumericsError(AssertionError):
    """A failed judgment. An AssertionError, so pytest and hypothesis treat it as a failure."""


def require(judgments: list[Judgment], *, header: str, reproducer: str) -> None:
    """Raise one NumericsError listing every failed judgment, or return."""
    failed = [j for j in judgments if not j.ok]
    if failed:
        body = "\n\n".join(j.message(header, reproducer) for j in failed)
        raise NumericsError(body)
