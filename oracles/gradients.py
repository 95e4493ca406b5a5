"""Gradients: ``jax.vjp`` of a kernel against the float64 truth, beside torch autograd's.

Users train with these kernels, so each must be differentiable on every path (the fused
GPU kernels take their XLA twin's derivative: ``kernels._grad``) and its gradient must be
as accurate as the one a PyTorch training run gets from autograd through the oracle.
One case (a :class:`GradProblem`, built by the op's ``Harness.gradient``), in any of
float32, bfloat16 and float16 (mixed-precision training differentiates the model dtype):

    1. a cotangent ``c`` of the output's shape: standard normal, seeded, rounded to the
       output's dtype (so that all three sides pull back the same values);
    2. the kernel's ``c^T J`` for each differentiated input (``jax.vjp``, jit-compiled);
    3. torch autograd's ``c^T J`` through the oracle on leaves of the inputs' dtypes, and
       through the oracle's ``exact=True`` on float64 leaves (the truth: no rounding anywhere);
    4. per input, :func:`oracles.compare.judge_accuracy`: ``err(kernel) <= grad_ratio *
       err(torch) + floor``, the floor being the op's accuracy ``floor_ulps`` ulps (of the
       input's dtype) of ``max |truth|``; elements whose truth is not finite are not judged,
       nor is a gradient whose largest truth is below 2^-100: float32 ulps there approach the
       subnormals, which XLA flushes to zero (CPU and GPU) and torch keeps (a softmax saturated
       by scores of 1e4 has gradients of ~1e-38, and the flushes decide them).

A ratio, not parity: torch's backward rounds where its autograd formulas round (in bf16/f16
after every op), which no recipe here claims to reproduce; JAX's reverse mode keeps the
recipes' float32 steps in float32, so in bf16/f16 the kernels' gradients are mostly *more*
accurate than torch's (ratios 0-1 for every op, 1.3-1.8 for the whole model). Budget:
``<op>.<dtype>.<backend>.properties.grad_ratio``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from oracles import compare


@dataclass
class GradProblem:
    """One case's gradient: ``call(kernel, arrays, **static)`` runs the kernel (a module-level
    function, so that the compiled vjp is reused across cases of one shape), ``oracle(tensors,
    exact)`` the oracle on torch tensors; both get every input of ``inputs`` (numpy arrays,
    or None), ``diff`` names the differentiated ones (float32, bfloat16 or float16)."""

    inputs: dict
    diff: tuple
    call: Callable
    kernel: Callable
    oracle: Callable
    static: dict = field(default_factory=dict)


_SMALLEST_JUDGED = 2.0**-100  # see the module docstring, step 4
GRAD_DTYPES = ("float32", "bfloat16", "float16")


@functools.lru_cache(maxsize=None)
def _vjp(call, kernel, static_items: tuple, diff: tuple):
    import jax

    static = dict(static_items)

    def grads(arrays, c):
        fixed = {n: a for n, a in arrays.items() if n not in diff}
        out, pull = jax.vjp(lambda d: call(kernel, {**fixed, **d}, **static), {n: arrays[n] for n in diff})
        return pull(c.astype(out.dtype))[0]

    return jax.jit(grads)


def _torch_grads(p: GradProblem, *, exact: bool, c: np.ndarray | None = None, seed: int = 0):
    """torch autograd's ``c^T J`` through the oracle, and ``c`` (drawn from ``seed`` in the
    output's shape when not given, then rounded to the output's dtype, so that every side
    pulls back the same values; held as float32): ``({input name: float64 grad}, c)``."""
    import torch

    from oracles.arrays import to_torch
    from oracles.strategies import round_to

    # The truth's leaves are float64 (no rounding of its grads); torch's keep each input's dtype.
    leaves = {n: to_torch(p.inputs[n]).requires_grad_(True) for n in p.diff}
    if exact:
        leaves = {n: t.detach().to(torch.float64).requires_grad_(True) for n, t in leaves.items()}
    out = p.oracle({**{n: p.inputs[n] for n in p.inputs if n not in p.diff}, **leaves}, exact)
    if c is None:
        c = np.random.default_rng(seed).standard_normal(tuple(out.shape)).astype(np.float32)
        c = round_to(c, compare.dtype_name(out.dtype)).astype(np.float32)  # exact: bf16/f16 values fit f32
    out.backward(torch.from_numpy(c).to(out.dtype))
    return {n: t.grad.to(torch.float64).numpy() for n, t in leaves.items()}, c


def measure(p: GradProblem, *, seed: int = 0) -> dict:
    """``{input name: (kernel grad, torch grad, float64 truth grad)}`` as float64 arrays."""
    for n in p.diff:
        if compare.dtype_name(np.asarray(p.inputs[n]).dtype) not in GRAD_DTYPES:
            raise ValueError(f"gradients: {n} must be one of {list(GRAD_DTYPES)}, got {np.asarray(p.inputs[n]).dtype}")
    go, c = _torch_grads(p, exact=False, seed=seed)  # c: the one cotangent all three pull back
    gt, _ = _torch_grads(p, exact=True, c=c)
    gk = _vjp(p.call, p.kernel, tuple(sorted(p.static.items())), tuple(p.diff))(p.inputs, c)
    return {n: (compare.to_f64(np.asarray(gk[n])), go[n], gt[n]) for n in p.diff}


def judge(p: GradProblem, budget) -> list[compare.Judgment]:
    """One ``grad(<input>)`` judgment per differentiated input (see the module docstring)."""
    acc = compare.AccuracyBudget(ratio=budget.properties["grad_ratio"], floor_ulps=budget.accuracy.floor_ulps)
    js = []
    for name, (k, o, t) in measure(p).items():
        fin = np.isfinite(t)
        if fin.any() and np.max(np.abs(t[fin])) < _SMALLEST_JUDGED:
            js.append(compare.Judgment(f"grad({name})", True, {"ratio": 0.0}, {},
                                       f"max |truth| {np.max(np.abs(t[fin])):.3g} < 2^-100: not judged"))
            continue
        if k.shape != t.shape:
            js.append(compare.Judgment(f"grad({name})", False, {}, {}, f"gradient shape {k.shape}, truth {t.shape}"))
            continue
        j = compare.judge_accuracy(k, o, t, dtype=compare.dtype_name(np.asarray(p.inputs[name]).dtype), budget=acc)
        j.kind = f"grad({name})"
        js.append(j)
    return js


def sweep(op: str, *, examples: int, seed: int, tolerances, dtype: str = "float32",
          on_case: Callable | None = None) -> dict:
    """The worst gradient accuracy ratio of ``op`` in ``dtype`` on this backend over ``examples``
    cases, drawn as ``parity tighten`` draws them (stratified over the op's cells, seeded):
    ``{input name: {"ratio": worst, "case": its case's JSON}}``. The ratio judged is the one
    measured (the budget's ratio is not applied: this is what sets it)."""
    from oracles import registry
    from oracles import sweep as sw

    h = registry.harness(op)
    if h.gradient is None:
        raise ValueError(f"{op}: no gradient problem (Harness.gradient)")
    worst: dict = {}

    def one(case):
        budget = tolerances.lookup(op, dtype, registry.backend(), case.recipe)
        budget.properties["grad_ratio"] = math.inf  # measure only
        for j in judge(h.gradient(case, registry.active_kernel(op)), budget):
            r = float(j.measured.get("ratio", math.nan))
            name = j.kind[len("grad("):-1]
            if name not in worst or not r <= worst[name]["ratio"]:  # NaN (not differentiable) sticks
                worst[name] = {"ratio": r, "case": case.to_json()}
        if on_case:
            on_case(case)

    for i, (opts, share) in enumerate(cells := sw.plan(op, examples)):
        sw._run_cell(h, dtype, opts, examples=share, seed=seed if len(cells) == 1 else seed * 1009 + i, run=one)
    return worst


def seeded_vjp(f: Callable, *args, seed: int = 0) -> tuple:
    """``jax.vjp(f, *args)`` pulled back from one standard normal cotangent (seeded, in the
    output's dtype; ``f`` returns one array or a tuple of them): the gradients of every arg."""
    import jax
    import jax.numpy as jnp

    out, pull = jax.vjp(f, *args)
    rng = np.random.default_rng(seed)
    ct = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), out)
    return pull(ct)
