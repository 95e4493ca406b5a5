"""PyTorch oracle for softmax: transformers' eager recipe, plus a boolean mask.

Reproduces, for torch 2.13.0 and transformers 5.17.0, the softmax step of
``transformers.models.qwen2.modeling_qwen2.eager_attention_forward``:

    ``nn.functional.softmax(x, dim=-1, dtype=torch.float32).to(x.dtype)``
    1. upcast to float32 (inside softmax's ``dtype=`` argument)
    2. torch's CPU softmax: row max, exp(x - max), row sum, multiply by 1/sum (f32)
    3. round once to the input dtype

With ``where`` (True = visible), masked entries are set to ``-inf`` before the softmax
and forced to exactly 0 after, and a row with no visible entry is all zeros. On rows
with at least one visible entry this equals, bit for bit, HF's additive
``finfo(dtype).min`` mask followed by the recipe above (proven in
``tests/test_softmax.py``); on a fully masked row HF returns the uniform average
over masked keys, which this library deliberately does not.

``exact=True`` computes in float64 with no intermediate rounding and returns float64.
"""

from __future__ import annotations

import torch


def softmax(x: torch.Tensor, *, axis: int = -1, where: torch.Tensor | None = None, exact: bool = False) -> torch.Tensor:
    dtype = torch.float64 if exact else torch.float32  # f32 inside, as HF's dtype=float32
    if where is None:
        out = torch.nn.functional.softmax(x.to(dtype), dim=axis)
        return out if exact else out.to(x.dtype)  # one rounding to the input dtype
    where = torch.broadcast_to(where, x.shape)
    visible_row = where.any(dim=axis, keepdim=True)
    xm = x.to(dtype).masked_fill(~where, float("-inf"))
    # A fully masked row would be exp(-inf - -inf) = NaN: give it a harmless row of zeros.
    xm = torch.where(visible_row, xm, torch.zeros((), dtype=dtype))
    out = torch.nn.functional.softmax(xm, dim=axis)
    out = torch.where(where & visible_row, out, torch.zeros((), dtype=dtype))
    return out if exact else out.to(x.dtype)


# --- harness: how the registry, the tests and ``parity check`` drive this op ---------

MASK_KINDS = ("none", "random", "causal", "fully_masked_rows", "single_key", "padding_causal")


def make_mask(kind: str, shape: tuple, rng):
    """A boolean visibility mask [rows, S] of the given kind (True = visible), or None."""
    import numpy as np

    rows, s = shape
    if kind == "none":
        return None
    if kind == "random":
        return rng.random((rows, s)) < rng.uniform(0.05, 0.95)
    causal = np.arange(s)[None, :] <= (np.arange(rows)[:, None] * max(s // max(rows, 1), 1))
    if kind == "causal":
        return causal
    if kind == "padding_causal":
        pad = rng.integers(0, s)  # left padding: the first `pad` keys are invisible
        return causal & (np.arange(s)[None, :] >= pad)
    if kind == "fully_masked_rows":
        m = rng.random((rows, s)) < 0.5
        m[rng.integers(rows)] = False
        return m
    # single_key: every row sees exactly one key
    m = np.zeros((rows, s), dtype=bool)
    m[np.arange(rows), rng.integers(0, s, size=rows)] = True
    return m


LENGTHS = (1, 7, 128, 1024, 4096)  # the reduced axis' lengths


def _cases():
    from hypothesis import strategies as st

    from oracles import strategies as S
    from oracles.registry import Case

    @st.composite
    def cases(draw, dtype=None, lengths=LENGTHS):
        dt = dtype or draw(S.dtypes())
        rows = draw(st.sampled_from([1, 4, 16]))
        s = draw(st.sampled_from(lengths))
        lo = draw(st.integers(-2, 4))
        return Case(
            op="softmax",
            dtype=dt,
            shapes={"x": (rows, s)},
            kwargs={"axis": draw(st.sampled_from([-1, -1, -1, 0]))},
            data={"seed": draw(S.seeds()), "log10_scale": [lo, draw(st.integers(lo, 4))],
                  "mask": draw(st.sampled_from(MASK_KINDS)),
                  "special": draw(st.sampled_from(["none"] * 6 + ["nan", "inf", "-inf"]))},
        )

    return cases


def _inputs(case):
    import numpy as np

    from oracles import strategies as S

    rng = np.random.default_rng(case.data["seed"])
    rows, s = case.shapes["x"]
    lo, hi = case.data["log10_scale"]
    x = rng.standard_normal((rows, s)) * 10.0 ** rng.uniform(lo, hi, size=(rows, 1))  # scores up to ~1e4
    if case.dtype == "float16":
        x = np.clip(x, -S.FP16_MAX, S.FP16_MAX)
    if case.data["special"] != "none":
        x.flat[rng.integers(x.size)] = float(case.data["special"])
    mask = make_mask(case.data["mask"], (rows, s), rng)
    if case.kwargs["axis"] == 0:  # normalise over the leading axis: the same rows, transposed
        x = x.T  # [S, rows]
        mask = None if mask is None else mask.T  # [S, rows]
    return {"x": S.round_to(np.ascontiguousarray(x), case.dtype),
            "where": None if mask is None else np.ascontiguousarray(mask)}


def _evaluate(case, kernel):
    import torch

    from oracles.arrays import to_torch
    from oracles.compare import dtype_name, to_f64
    from oracles.registry import Outcome, jitted

    inp = _inputs(case)
    axis = case.kwargs["axis"]
    k = jitted(kernel, axis=axis)(inp["x"], where=inp["where"])
    xt = to_torch(inp["x"])
    wt = None if inp["where"] is None else torch.from_numpy(inp["where"])
    o = softmax(xt, axis=axis, where=wt)
    t = softmax(xt, axis=axis, where=wt, exact=True)
    return Outcome(kernel=to_f64(k), oracle=to_f64(o), truth=to_f64(t), out_dtype=dtype_name(o.dtype),
                   inputs=inp, kernel_dtype=dtype_name(k.dtype), kernel_shape=tuple(k.shape))


def _properties(case, outcome, budget):
    """Masked entries exactly 0; fully masked rows all 0; visible rows sum to 1 within budget."""
    import numpy as np

    from oracles.compare import Judgment

    axis = case.kwargs["axis"]
    k = outcome.kernel
    where = outcome.inputs["where"]
    js = []
    if where is not None:
        leaked = int(np.count_nonzero(k[~where] != 0))
        js.append(Judgment("masked_zero", leaked == 0, {"nonzero_masked": leaked}, {"nonzero_masked": 0},
                           f"Masked entries that are not exactly 0: {leaked} / {int((~where).sum())}"))
        visible = where.any(axis=axis)
    else:
        visible = np.ones(k.sum(axis=axis).shape, dtype=bool)
    sums = k.sum(axis=axis)
    ok_rows = visible & np.isfinite(sums)
    err = float(np.max(np.abs(sums[ok_rows] - 1.0))) if ok_rows.any() else 0.0
    lim = budget.properties["row_sum_err"]
    js.append(Judgment("row_sum", err <= lim, {"row_sum_err": err}, {"row_sum_err": lim},
                       f"Largest |row sum - 1| over rows with a visible entry: {err:.3g} [budget {lim:g}]"))
    return js


def _grad_call(kernel, a, **kw):
    return kernel(a["x"], where=a["where"], **kw)


def _gradient(case, kernel):
    import torch

    from oracles.gradients import GradProblem

    def oracle(t, exact):
        where = None if t["where"] is None else torch.from_numpy(t["where"])
        return softmax(t["x"], axis=case.kwargs["axis"], where=where, exact=exact)

    return GradProblem(inputs=_inputs(case), diff=("x",), call=_grad_call, kernel=kernel, oracle=oracle,
                       static={"axis": case.kwargs["axis"]})


def _make_harness():
    from kernels.softmax import softmax as kernel
    from oracles.registry import Harness, strata_product

    # A sweep's cells: each length of the reduced axis.
    return Harness(cases=_cases(), evaluate=_evaluate, kernel=kernel, properties=_properties, gradient=_gradient,
                   strata=lambda o: strata_product(o, tuples={"lengths": LENGTHS}))


HARNESS = _make_harness()
