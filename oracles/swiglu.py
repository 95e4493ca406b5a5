"""PyTorch oracle for the SwiGLU MLP: transformers' numerics, rounding step by rounding step.

Reproduces, for torch 2.13.0 and transformers 5.17.0 (the pinned versions):

``recipe="hf"``: ``transformers.models.qwen2.modeling_qwen2.Qwen2MLP.forward``,
``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with ``act_fn = ACT2FN["silu"]``
(``transformers.activations.SiLUActivation`` -> ``torch.nn.functional.silu``) and three
bias-free ``torch.nn.Linear``:
    1. ``g = F.linear(x, Wg)``      f32 accumulation (oneDNN/MKL), round 1 to x.dtype
    2. ``u = F.linear(x, Wu)``      round 2
    3. ``a = F.silu(g)``            torch's CPU kernel: f32 ``g / (1 + exp(-g))``, round 3
    4. ``h = a * u``                exact in f32 for bf16/f16 operands, round 4
    5. ``y = F.linear(h, Wd)``      f32 accumulation, round 5
``recipe="fp32_act"`` (this library's recipe; no transformers module rounds this way):
    1-2. ``g, u = F.linear(x.float(), Wg.float()), F.linear(x.float(), Wu.float())``  f32, unrounded
    3-4. ``h = (F.silu(g) * u).to(x.dtype)``  silu and product in f32, one rounding
    5.   ``y = F.linear(h, Wd)``              f32 accumulation, one rounding

Weights are passed in the kernels' ``[in, out]`` layout; the oracle hands torch
``w.t().contiguous()``, the ``[out, in]`` contiguous weight an ``nn.Linear`` holds (so
oneDNN sees the same memory layout as in the model).

``exact=True`` runs the same maths in float64 with no intermediate rounding (the truth
both sides are measured against) and returns float64. ``tests/test_swiglu.py`` proves
the ``"hf"`` oracle equal, bit for bit, to transformers' ``Qwen2MLP``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RECIPES = ("hf", "fp32_act")


def _lin(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w.t().contiguous())  # w [in, out] -> nn.Linear's [out, in]


def swiglu(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *, recipe: str = "hf",
    exact: bool = False,
) -> torch.Tensor:
    if recipe not in RECIPES:
        raise ValueError(f"swiglu: recipe must be one of {list(RECIPES)}, got {recipe!r}")
    if exact:
        f64 = torch.float64  # the truth: float64 throughout, no rounding
        g, u = _lin(x.to(f64), w_gate.to(f64)), _lin(x.to(f64), w_up.to(f64))
        return _lin(F.silu(g) * u, w_down.to(f64))
    if recipe == "hf":
        g = _lin(x, w_gate)  # step 1
        u = _lin(x, w_up)  # step 2
        h = F.silu(g) * u  # steps 3-4
        return _lin(h, w_down)  # step 5
    f32 = torch.float32  # fp32_act: the projections' f32 accumulators are kept, not rounded
    g, u = _lin(x.to(f32), w_gate.to(f32)), _lin(x.to(f32), w_up.to(f32))
    h = (F.silu(g) * u).to(x.dtype)  # one rounding of the activation
    return _lin(h, w_down)


# --- harness: how the registry, the tests and ``parity check`` drive this op ---------

# (D, F) pairs: small D with every real Qwen2.5 F (the down projection's reduction length
# and the gate/up widths), real D with small F, and the real 0.5B pair. Weights stay under
# ~2M elements so that a case costs well under a second.
BIG_SHAPES = tuple((64, f) for f in (4864, 8960, 11008, 18944, 27648, 29568))
SMALL_SHAPES = ((64, 128), (128, 256), (896, 256), (1536, 128), (3584, 64), (896, 4864))
LEADS_SMALL = ((1,), (4,), (2, 3))
LEADS_BIG = ((1,), (3,))


def _cases():
    from hypothesis import strategies as st

    from oracles import strategies as S
    from oracles.registry import Case

    @st.composite
    def cases(draw, dtype=None, recipe=None, big=None, shapes=None):
        # shapes: the (D, F) to draw from (a sweep's cell); None: small ones, a third of the time big ones
        dt = dtype or draw(S.dtypes())
        if shapes is None:
            use_big = draw(st.sampled_from([False, False, True])) if big is None else big
            d, f = draw(st.sampled_from(BIG_SHAPES if use_big else SMALL_SHAPES))
        else:
            d, f = draw(st.sampled_from(shapes))
            use_big = (d, f) in BIG_SHAPES
        lead = draw(st.sampled_from(LEADS_BIG if use_big else LEADS_SMALL))
        xp = draw(S.activation_params(specials=False))
        xp["special"] = draw(st.sampled_from(["none"] * 8 + ["nan", "inf"]))
        return Case(
            op="swiglu",
            dtype=dt,
            shapes={"x": (*lead, d), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)},
            kwargs={"recipe": recipe or draw(st.sampled_from(RECIPES))},
            data={"x": xp, "w_std": draw(st.sampled_from(["init", "fan_in"])),
                  # float16: each row is scaled so its largest intermediate (truth) is at
                  # most this fraction of 65504: near the top of the range, not beyond it.
                  "fp16_headroom": draw(st.sampled_from([0.9, 0.3, 0.01]))},
        )

    return cases


def _inputs(case):
    import numpy as np

    from oracles import strategies as S

    d, f = case.shapes["w_gate"]
    rng = np.random.default_rng(case.data["x"]["seed"] + 1)
    ws = {}
    for name, (i, o) in (("w_gate", (d, f)), ("w_up", (d, f)), ("w_down", (f, d))):
        std = 0.02 if case.data["w_std"] == "init" else 1.0 / np.sqrt(i)
        ws[name] = S.round_to(rng.standard_normal((i, o), dtype=np.float32) * np.float32(std), case.dtype)
    x = S.make_activations(case.shapes["x"], case.data["x"], "float32").astype(np.float64)
    if case.dtype == "float16":
        x = _fp16_rescale(x, ws, case.data["fp16_headroom"])
    return {"x": S.round_to(x, case.dtype), **ws}


def _fp16_rescale(x, ws, headroom):
    """Scale each row of x so the truth's largest |g|, |u|, |h|, |y| stays <= headroom * 65504."""
    import numpy as np

    from oracles import strategies as S

    target = headroom * S.FP16_MAX
    x = np.clip(x, -target, target)
    wg, wu, wd = (ws[k].astype(np.float64) for k in ("w_gate", "w_up", "w_down"))
    xs = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        g, u = xs @ wg, xs @ wu  # [..., F] f64
        h = g / (1.0 + np.exp(-g)) * u
        y = h @ wd  # [..., D]
    lin = np.maximum(np.abs(g).max(-1), np.abs(u).max(-1))[..., None]
    quad = np.maximum(np.abs(h).max(-1), np.abs(y).max(-1))[..., None]
    with np.errstate(divide="ignore"):
        s = np.minimum(1.0, np.minimum(target / lin, np.sqrt(target / quad)))
    return x * np.where(np.isfinite(s), s, 1.0)


def _evaluate(case, kernel):
    import numpy as np

    from oracles.arrays import to_torch
    from oracles.compare import dtype_name, term_scale, to_f64
    from oracles.registry import Outcome, jitted

    inp = _inputs(case)
    names = ("x", "w_gate", "w_up", "w_down")
    kw = case.kwargs
    k = jitted(kernel, **kw)(*(inp[n] for n in names))
    ts = [to_torch(inp[n]) for n in names]
    o = swiglu(*ts, **kw)
    t = swiglu(*ts, **kw, exact=True)
    # The down projection's terms h_k * w_down[k, j], with h from the float64 truth.
    x64 = np.nan_to_num(to_f64(inp["x"]), nan=0.0, posinf=0.0, neginf=0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        g, u = x64 @ to_f64(inp["w_gate"]), x64 @ to_f64(inp["w_up"])  # [..., F] f64
        h = g / (1.0 + np.exp(-g)) * u
    return Outcome(kernel=to_f64(k), oracle=to_f64(o), truth=to_f64(t), out_dtype=dtype_name(o.dtype),
                   inputs=inp, kernel_dtype=dtype_name(k.dtype), kernel_shape=tuple(k.shape),
                   term_scale=term_scale(h, inp["w_down"]))


_NAMES = ("x", "w_gate", "w_up", "w_down")


def _grad_call(kernel, a, **kw):
    return kernel(*(a[n] for n in _NAMES), **kw)


def _gradient(case, kernel):
    from oracles.gradients import GradProblem

    return GradProblem(inputs=_inputs(case), diff=_NAMES, call=_grad_call, kernel=kernel,
                       oracle=lambda t, exact: swiglu(*(t[n] for n in _NAMES), **case.kwargs, exact=exact),
                       static=dict(case.kwargs))


def _make_harness():
    from kernels.swiglu import swiglu as kernel
    from oracles.registry import Harness, strata_product

    # A sweep's cells: each recipe at each (D, F) (the two reduction lengths).
    return Harness(cases=_cases(), evaluate=_evaluate, kernel=kernel, gradient=_gradient,
                   strata=lambda o: strata_product(o, scalars={"recipe": RECIPES},
                                                   tuples={"shapes": SMALL_SHAPES + BIG_SHAPES}))


HARNESS = _make_harness()
