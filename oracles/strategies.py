"""Hypothesis strategies shared by the tests and by ``parity check`` (one source of inputs).

A strategy draws a small *spec* (shapes from a bounded vocabulary, a dtype, the
kernel's options and a handful of value-generation parameters including a seed);
numpy then builds the arrays from the spec. So every example is reproducible from
its spec alone (``parity repro``), hypothesis shrinks the parameters rather than
megabytes of floats, and the number of distinct shapes, hence of JAX compiles
(about 0.3 s each on a 2-core machine), stays bounded.

Value families (the inputs that exposed real bugs, DESIGN.md):
- row scales log-uniform between 10**lo and 10**hi, lo..hi within [-4, 4];
- 1-4 outlier channels at 20-100x the row rms (late-layer massive activations);
- rows whose mean(x**2) goes down to 1e-8, where the choice of eps shows;
- float16 values clipped near 65504; special values (nan, +-inf) on request.

Hypothesis has no bfloat16: values are drawn as float32 and rounded with ml_dtypes.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

DTYPES = ("float32", "bfloat16", "float16")
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float64": np.float64}
# Real Qwen2.5 model widths (0.5B, 1.5B, 3B, 7B, 14B, 72B) plus two small ones.
MODEL_WIDTHS = (896, 1536, 2048, 3584, 5120, 8192)
SMALL_WIDTHS = (64, 128)
# Real Qwen2.5 MLP widths F.
MLP_WIDTHS = (4864, 8960, 11008, 18944, 27648, 29568)
# Real Qwen2.5 attention head layouts (N query heads, K kv heads, H head dim).
HEAD_LAYOUTS = ((14, 2, 64), (12, 2, 128), (16, 2, 128), (28, 4, 128), (40, 8, 128), (64, 8, 128))
FP16_MAX = 65504.0


def dtypes() -> st.SearchStrategy[str]:
    return st.sampled_from(DTYPES)


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**32 - 1)


@st.composite
def activation_params(draw, *, specials: bool = True) -> dict:
    """Value-generation parameters for an activation tensor (see module docstring)."""
    lo = draw(st.integers(-4, 4))
    hi = draw(st.integers(lo, 4))
    return {
        "seed": draw(seeds()),
        "log10_scale": [lo, hi],
        "outliers": draw(st.integers(0, 4)),
        "outlier_mult": draw(st.floats(20.0, 100.0)),
        "tiny_rows": draw(st.booleans()),
        "special": draw(st.sampled_from(["none", "nan", "inf", "-inf"]) if specials else st.just("none")),
    }


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32/64 values to ``dtype`` (numpy, or ml_dtypes for bfloat16)."""
    return np.asarray(x).astype(NP_DTYPES[dtype])


def make_activations(shape: tuple, params: dict, dtype: str, *, rng: np.random.Generator | None = None) -> np.ndarray:
    """Build an activation tensor ``shape`` (rows along the last axis) from ``params``."""
    rng = rng if rng is not None else np.random.default_rng(params["seed"])
    shape = tuple(shape)
    d = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    lo, hi = params["log10_scale"]
    scale = 10.0 ** rng.uniform(lo, hi, size=(rows, 1))
    x = rng.standard_normal((rows, d)) * scale
    k = min(params["outliers"], d)
    if k:
        ch = rng.choice(d, size=k, replace=False)  # the same channels in every row, as in real models
        sign = rng.choice([-1.0, 1.0], size=(1, k))
        x[:, ch] = sign * params["outlier_mult"] * scale
    if params["tiny_rows"] and rows:
        r = rng.integers(rows)
        # mean(x^2) between 1e-8 and 1e-5: where eps (1e-6 vs 1e-5) changes the output.
        x[r] = rng.standard_normal(d) * 10.0 ** rng.uniform(-4, -2.5)
    if dtype == "float16":
        x = np.clip(x, -FP16_MAX, FP16_MAX)  # values near 65504, not overflowed at the cast
    special = params.get("special", "none")
    if special != "none":
        x.flat[rng.integers(x.size)] = float(special)
    return round_to(x.reshape(shape), dtype)


def make_weight(shape: tuple, dtype: str, *, rng: np.random.Generator, mean: float = 1.0, spread: float = 0.5) -> np.ndarray:
    """A norm-like weight: ``mean`` plus a log-normal-ish spread, never all ones."""
    w = mean + spread * rng.standard_normal(shape)
    return round_to(w, dtype)
