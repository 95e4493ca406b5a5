"""PyTorch oracles for the dense projections: ``linear`` and ``lm_head``.

Reproduce, for torch 2.13.0 and transformers 5.17.0 (the pinned versions):

``linear(x, w, b)``: ``torch.nn.Linear.forward`` = ``torch.nn.functional.linear``, as used
for Qwen2's ``q_proj``/``k_proj``/``v_proj`` (with bias), ``o_proj`` (no bias) and the MLP
projections (``transformers.models.qwen2.modeling_qwen2.Qwen2Attention`` / ``Qwen2MLP``):
    1. products and sums in float32 (oneDNN/MKL ``addmm``/``matmul``, bf16 and f16 too)
    2. the bias added to the float32 accumulator (fused ``addmm`` bias; 2-D and 3-D inputs)
    3. one rounding to x.dtype

``lm_head(h, w)``: ``Qwen2ForCausalLM.lm_head`` (an ``nn.Linear(D, V, bias=False)``),
steps 1 and 3. The head's weight is ``[V, D]`` in torch (with tied embeddings,
``tie_word_embeddings``, it IS ``model.embed_tokens.weight``); ``w_layout="VD"`` takes it
as it is, ``"DV"`` (the default) takes the kernels' ``[D, V]``.
``logits_dtype="float32"``: ``F.linear(h.float(), W.float())``: float32 products (exact
for bf16/f16 values) and sums, no rounding.

Weights are passed in the kernels' ``[in, out]`` layout and handed to torch as
``w.t().contiguous()``, the ``[out, in]`` contiguous weight an ``nn.Linear`` holds (an
lm_head weight given ``[V, D]``, ``w_layout="VD"``, is already that).

``exact=True``: the same maths in float64 with no intermediate rounding (the truth);
returns float64. ``tests/test_projection.py`` proves these oracles equal, bit for bit,
to ``nn.Linear`` and to a ``Qwen2ForCausalLM``'s own ``lm_head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RECIPES = ("linear", "lm_head", "lm_head_f32")


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, exact: bool = False) -> torch.Tensor:
    if exact:
        f64 = torch.float64  # the truth: float64, no rounding
        return F.linear(x.to(f64), w.to(f64).t(), None if b is None else b.to(f64))
    return F.linear(x, w.t().contiguous(), b)  # steps 1-3: nn.Linear's [out, in] weight


def lm_head(h: torch.Tensor, w: torch.Tensor, *, logits_dtype: str | None = None, w_layout: str = "DV",
            exact: bool = False) -> torch.Tensor:
    if w_layout not in ("DV", "VD"):
        raise ValueError(f"lm_head: w_layout must be 'DV' or 'VD', got {w_layout!r}")
    weight = w if w_layout == "VD" else w.t().contiguous()  # [V, D]: nn.Linear's layout
    if exact:
        return F.linear(h.to(torch.float64), weight.to(torch.float64))  # the truth
    if logits_dtype == "float32":
        return F.linear(h.float(), weight.float())  # f32 products and sums, no rounding
    if logits_dtype is not None:
        raise ValueError(f"lm_head: logits_dtype must be None or 'float32', got {logits_dtype!r}")
    return F.linear(h, weight)  # f32 accumulation, one rounding to h.dtype


# --- harness: how the registry, the tests and ``parity check`` drive this op ---------

def drive(x, w, b=None, *, recipe: str = "linear", w_layout: str = "DV", implementation: str | None = None):
    """The registry's kernel for ``projection``: one entry point over the JAX functions.

    ``recipe`` picks the function (``"linear"``: ``linear(x, w, b, implementation=...)``;
    ``"lm_head"`` / ``"lm_head_f32"``: ``lm_head(x, w, logits_dtype=None / "float32",
    w_layout=w_layout, implementation=...)``). Mutants (``oracles/mutants/projection.py``)
    replace this whole function.
    """
    from kernels.projection import linear as k_linear
    from kernels.projection import lm_head as k_lm_head

    if recipe == "linear":
        return k_linear(x, w, b, implementation=implementation)
    if b is not None:
        raise ValueError(f"projection: recipe {recipe!r} takes no bias")
    return k_lm_head(x, w, logits_dtype="float32" if recipe == "lm_head_f32" else None, w_layout=w_layout,
                     implementation=implementation)


# (lead, I, O) for linear: real q/k/v/o shapes of Qwen2.5 (q/o: D -> N*H, k/v: D -> K*H).
LINEAR_SHAPES = (((4,), 896, 896), ((2, 3), 896, 128), ((7,), 1536, 256), ((1,), 3584, 512),
                 ((3,), 2048, 256), ((4,), 64, 128), ((2, 5), 128, 64), ((1,), 5120, 1024))
# (lead, I, O) that implementation="mosaic" tiles (kernels.linear_mosaic: rows and O
# divisible by a 128 x 128, 128 x 256 or 256 x 128 block, I by 64): the 0.5B-7B q/k/v/o,
# MLP and down widths at 128-384 rows, 2-D and 3-D.
MOSAIC_SHAPES = (((128,), 896, 896), ((2, 128), 896, 128), ((256,), 1536, 256), ((128,), 3584, 512),
                 ((384,), 2048, 256), ((128,), 64, 1024), ((256,), 4864, 896), ((128,), 896, 4864))
# (lead, D, V) for lm_head: the real vocabularies (151936, 152064) with few rows and a small D.
HEAD_SHAPES = (((1,), 64, 152064), ((2,), 128, 151936), ((4,), 896, 4096), ((3,), 64, 32000),
               ((2, 2), 256, 1000))
# (lead, D, V) for lm_head that implementation="mosaic" tiles, one a tiling: 128 x 256 blocks (V = 11008,
# 32000), 256 x 128 (V = 4736, not a multiple of 256, as 151936 is not), 128 x 128 (too few blocks
# otherwise); a 3-D h. The real vocabularies have 20-39M logits at the 128 rows a block needs, too
# many for a property test's examples: benchmarks/probe_mosaic_gemm.py --head checks them (both
# Qwen2.5 heads, 4096 rows: bit-identical to the XLA path).
MOSAIC_HEAD_SHAPES = (((384,), 64, 11008), ((512,), 64, 4736), ((2, 128), 896, 4864), ((128,), 64, 32000))


def _cases():
    from hypothesis import strategies as st

    from oracles import strategies as S
    from oracles.registry import Case

    @st.composite
    def cases(draw, dtype=None, recipe=None, linear_shapes=LINEAR_SHAPES, head_shapes=HEAD_SHAPES):
        dt = dtype or draw(S.dtypes())
        rc = recipe or draw(st.sampled_from(RECIPES))
        xp = draw(S.activation_params(specials=False))
        xp["special"] = draw(st.sampled_from(["none"] * 8 + ["nan", "inf"]))
        if rc == "linear":
            lead, i, o = draw(st.sampled_from(linear_shapes))
            bias = draw(st.sampled_from([True, True, False]))
            w_layout = "DV"
            shapes = {"x": (*lead, i), "w": (i, o), **({"b": (o,)} if bias else {})}
        else:
            lead, i, o = draw(st.sampled_from(head_shapes))
            w_layout = draw(st.sampled_from(["DV", "VD"]))
            shapes = {"x": (*lead, i), "w": (o, i) if w_layout == "VD" else (i, o)}
        return Case(
            op="projection", dtype=dt, shapes=shapes,
            kwargs={"recipe": rc, "w_layout": w_layout},
            data={"x": xp, "w_std": draw(st.sampled_from(["init", "fan_in"])),
                  "b_scale": draw(st.sampled_from([0.1, 3.0, 50.0])),  # Qwen2's k bias reaches ~50
                  # float16: rows scaled so the truth's largest |y| is this fraction of 65504
                  # (2.0: some outputs overflow, the rest must not).
                  "fp16_headroom": draw(st.sampled_from([2.0, 0.9, 0.05]))},
        )

    return cases


def _inputs(case):
    import numpy as np

    from oracles import strategies as S

    rng = np.random.default_rng(case.data["x"]["seed"] + 1)
    vd = case.kwargs["w_layout"] == "VD"
    wshape = case.shapes["w"]
    fan_in = wshape[1] if vd else wshape[0]
    std = 0.02 if case.data["w_std"] == "init" else 1.0 / np.sqrt(fan_in)
    w = rng.standard_normal(wshape, dtype=np.float32) * np.float32(std)
    b = None
    if "b" in case.shapes:
        b = rng.standard_normal(case.shapes["b"]) * case.data["b_scale"]
    x = S.make_activations(case.shapes["x"], case.data["x"], "float32").astype(np.float64)
    if case.dtype == "float16":
        target = case.data["fp16_headroom"] * S.FP16_MAX
        x = np.clip(x, -S.FP16_MAX, S.FP16_MAX)
        wt = w.astype(np.float64).T if vd else w.astype(np.float64)  # [I, O]
        with np.errstate(over="ignore", invalid="ignore"):
            top = np.abs(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) @ wt).max(-1, keepdims=True)  # [..., 1]
        with np.errstate(divide="ignore"):
            s = np.minimum(1.0, target / top)
        x = x * np.where(np.isfinite(s), s, 1.0)
    out = {"x": S.round_to(x, case.dtype), "w": S.round_to(w, case.dtype)}
    if b is not None:
        out["b"] = S.round_to(b, case.dtype)
    return out


def _oracle(inp, recipe, w_layout, *, exact=False):
    from oracles.arrays import to_torch

    x, w = to_torch(inp["x"]), to_torch(inp["w"])
    if recipe == "linear":
        return linear(x, w, None if "b" not in inp else to_torch(inp["b"]), exact=exact)
    return lm_head(x, w, logits_dtype="float32" if recipe == "lm_head_f32" else None, w_layout=w_layout,
                   exact=exact)


def _grad_call(kernel, a, **kw):
    return kernel(a["x"], a["w"], a.get("b"), **kw)


def _gradient(case, kernel):
    from oracles.gradients import GradProblem

    kw = case.kwargs
    inp = _inputs(case)

    def oracle(t, exact):
        if kw["recipe"] == "linear":
            return linear(t["x"], t["w"], t.get("b"), exact=exact)
        return lm_head(t["x"], t["w"], logits_dtype="float32" if kw["recipe"] == "lm_head_f32" else None,
                       w_layout=kw["w_layout"], exact=exact)

    return GradProblem(inputs=inp, diff=tuple(n for n in ("x", "w", "b") if n in inp), call=_grad_call,
                       kernel=kernel, oracle=oracle, static=dict(kw))


def _evaluate(case, kernel):
    from oracles.compare import dtype_name, term_scale, to_f64
    from oracles.registry import Outcome, jitted

    inp = _inputs(case)
    kw = case.kwargs
    k = jitted(kernel, **kw)(inp["x"], inp["w"], inp.get("b"))
    o = _oracle(inp, kw["recipe"], kw["w_layout"])
    t = _oracle(inp, kw["recipe"], kw["w_layout"], exact=True)
    w = inp["w"].T if kw["w_layout"] == "VD" else inp["w"]  # [D, V] either way (a view)
    return Outcome(kernel=to_f64(k), oracle=to_f64(o), truth=to_f64(t), out_dtype=dtype_name(o.dtype),
                   inputs=inp, kernel_dtype=dtype_name(k.dtype), kernel_shape=tuple(k.shape),
                   term_scale=term_scale(inp["x"], w))


def _properties(case, outcome, budget):
    """lm_head: each row's argmax is the truth's argmax, except at near-ties."""
    import numpy as np

    from oracles.compare import Judgment, ulp

    if case.kwargs["recipe"] == "linear":
        return []
    k, t = outcome.kernel, outcome.truth
    k2, t2 = k.reshape(-1, k.shape[-1]), t.reshape(-1, t.shape[-1])  # [rows, V]
    # Rows where the kernel saturated (f16 logits beyond 65504 are all inf: a tie of infs)
    # or the truth is not finite have no argmax to compare.
    rows = np.isfinite(t2).all(-1) & np.isfinite(k2).all(-1)
    if not rows.any():
        return []
    k2, t2 = k2[rows], t2[rows]
    r = np.arange(len(t2))
    best = t2.max(-1)  # [rows]
    picked = t2[r, np.argmax(k2, -1)]  # the truth at the kernel's argmax
    gap_ulps = (best - picked) / ulp(best, outcome.out_dtype)
    worst = float(gap_ulps.max())
    lim = budget.properties["argmax_tie_ulps"]
    return [Judgment("argmax", worst <= lim, {"argmax_tie_ulps": worst}, {"argmax_tie_ulps": lim},
                     f"Kernel argmax short of the truth's best logit by {worst:.3g} ulps of {outcome.out_dtype} "
                     f"(a near-tie only if within {lim:g})")]


def mosaic(x, w, b=None, **kw):
    """``linear`` / ``lm_head`` with ``implementation="mosaic"``: one Hopper GEMM that adds the
    bias and rounds in its epilogue, or writes its float32 sum as it is (float32 logits)
    (kernels.linear_mosaic); on a Hopper GPU only (elsewhere ValueError)."""
    return drive(x, w, b, **kw, implementation="mosaic")


# What the mosaic GEMM takes: every recipe, bf16/f16, the shapes it tiles.
MOSAIC_CASES = {"linear_shapes": MOSAIC_SHAPES, "head_shapes": MOSAIC_HEAD_SHAPES}


def _strata(opts: dict) -> list[dict]:
    """A sweep's cells: each recipe with each shape it draws (linear: linear_shapes; the
    heads: head_shapes), so every reduction length D and every tiling is measured."""
    recipes = (opts["recipe"],) if opts.get("recipe") else RECIPES
    out = []
    for r in recipes:
        key = "linear_shapes" if r == "linear" else "head_shapes"
        out += [{"recipe": r, key: (s,)} for s in opts.get(key, LINEAR_SHAPES if r == "linear" else HEAD_SHAPES)]
    return out


def _make_harness():
    from oracles.registry import Harness, Implementation, not_hopper

    mosaic_impl = Implementation(kernel=mosaic, case_opts=MOSAIC_CASES, backends=("gpu",),
                                 dtypes=("bfloat16", "float16"), requires="a Hopper GPU",
                                 device_lacks=not_hopper)
    return Harness(cases=_cases(), evaluate=_evaluate, kernel=drive, properties=_properties, gradient=_gradient,
                   implementations={"mosaic": mosaic_impl}, strata=_strata)


HARNESS = _make_harness()
