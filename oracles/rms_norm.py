"""PyTorch oracle for RMSNorm: transformers' numerics, rounding step by rounding step.

Reproduces, for torch 2.13.0 and transformers 5.17.0 (the pinned versions):

``recipe="hf"``: ``transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm.forward``
(the same code as Llama's, Mistral's and Qwen3's RMSNorm):
    1. ``h = x.to(float32)``                         upcast
    2. ``var = h.pow(2).mean(-1, keepdim=True)``     f32 square, f32 mean
    3. ``h = h * torch.rsqrt(var + eps)``            f32 add, f32 rsqrt, f32 multiply
    4. ``h.to(x.dtype)``                             round 1: to the input dtype
    5. ``weight * h``                                round 2: torch promotion of (w, x) dtypes
``recipe="gemma"``: ``transformers.models.gemma.modeling_gemma.GemmaRMSNorm.forward``
    steps 1-3, then ``h * (1.0 + weight.float())`` in f32, then ``.type_as(x)`` (one rounding).
``recipe="fp32_weight"``: ``transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm.forward``
    steps 1-3, then ``(weight * h)`` promoted to f32, then ``.to(x.dtype)`` (one rounding).

``exact=True`` runs the same maths in float64 with no intermediate rounding (the
truth both sides are measured against); it returns float64.
``tests/test_rms_norm.py`` proves this oracle equal, bit for bit, to the three
transformers modules.
"""

from __future__ import annotations

import torch

RECIPES = ("hf", "gemma", "fp32_weight")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6, recipe: str = "hf", exact: bool = False
) -> torch.Tensor:
    if recipe not in RECIPES:
        raise ValueError(f"rms_norm: recipe must be one of {list(RECIPES)}, got {recipe!r}")
    if exact:
        h = x.to(torch.float64)  # the truth: float64 throughout, no rounding
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        w = weight.to(torch.float64)
        return h * (1.0 + w) if recipe == "gemma" else h * w
    h = x.to(torch.float32)  # step 1: upcast
    var = h.pow(2).mean(-1, keepdim=True)  # step 2
    h = h * torch.rsqrt(var + eps)  # step 3
    if recipe == "hf":
        return weight * h.to(x.dtype)  # steps 4-5: round, then promote with the weight
    if recipe == "gemma":
        return (h * (1.0 + weight.float())).type_as(x)  # (1 + w) in f32, one rounding
    return (weight * h).to(x.dtype)  # fp32_weight: promotion lifts w to f32, one rounding


# --- harness: how the registry, the tests and ``parity check`` drive this op ---------

def _cases():
    from hypothesis import strategies as st

    from oracles import strategies as S
    from oracles.registry import Case

    @st.composite
    def cases(draw, dtype=None, recipe=None, widths=S.MODEL_WIDTHS + S.SMALL_WIDTHS):
        dt = dtype or draw(S.dtypes())
        d = draw(st.sampled_from(widths))
        lead = draw(st.sampled_from([(1,), (4,), (2, 3)]))
        weight_dtype = draw(st.sampled_from([dt, dt, "float32"]))  # HF keeps w in the model dtype, or f32
        return Case(
            op="rms_norm",
            dtype=dt,
            shapes={"x": (*lead, d), "weight": (d,)},
            kwargs={"eps": draw(st.sampled_from([1e-6, 1e-5])), "recipe": recipe or draw(st.sampled_from(RECIPES))},
            data={"x": draw(S.activation_params()), "weight_dtype": weight_dtype,
                  "weight_spread": draw(st.sampled_from([0.05, 0.5, 2.0]))},
        )

    return cases


def _inputs(case):
    import numpy as np

    from oracles import strategies as S

    x = S.make_activations(case.shapes["x"], case.data["x"], case.dtype)
    rng = np.random.default_rng(case.data["x"]["seed"] + 1)
    # Gemma stores the weight as an offset from 1, so draw it around 0 for that recipe.
    mean = 0.0 if case.kwargs["recipe"] == "gemma" else 1.0
    w = S.make_weight(case.shapes["weight"], case.data["weight_dtype"], rng=rng, mean=mean, spread=case.data["weight_spread"])
    return {"x": x, "weight": w}


def _evaluate(case, kernel):
    from oracles.arrays import jax_to_numpy, to_torch
    from oracles.compare import dtype_name, to_f64
    from oracles.registry import Outcome, jitted

    inp = _inputs(case)
    kw = case.kwargs
    k = jitted(kernel, **kw)(inp["x"], inp["weight"])
    xt, wt = to_torch(inp["x"]), to_torch(inp["weight"])
    o = rms_norm(xt, wt, **kw)
    t = rms_norm(xt, wt, **kw, exact=True)
    return Outcome(kernel=to_f64(jax_to_numpy(k)), oracle=to_f64(o), truth=to_f64(t), out_dtype=dtype_name(o.dtype),
                   inputs=inp, kernel_dtype=dtype_name(k.dtype), kernel_shape=tuple(k.shape),
                   ulp_dtype=case.dtype)  # "hf" rounds to x.dtype before a wider weight may promote


def _grad_call(kernel, a, **kw):
    return kernel(a["x"], a["weight"], **kw)


def _gradient(case, kernel):
    from oracles.gradients import GradProblem

    return GradProblem(inputs=_inputs(case), diff=("x", "weight"), call=_grad_call, kernel=kernel,
                       oracle=lambda t, exact: rms_norm(t["x"], t["weight"], **case.kwargs, exact=exact),
                       static=dict(case.kwargs))


def _make_harness():
    from kernels.rms_norm import rms_norm as kernel
    from oracles import strategies as S
    from oracles.registry import Harness, strata_product

    # A sweep's cells: each recipe at each width (the length of the sum of squares).
    return Harness(cases=_cases(), evaluate=_evaluate, kernel=kernel, gradient=_gradient,
                   strata=lambda o: strata_product(o, scalars={"recipe": RECIPES},
                                                   tuples={"widths": S.MODEL_WIDTHS + S.SMALL_WIDTHS}))


HARNESS = _make_harness()
