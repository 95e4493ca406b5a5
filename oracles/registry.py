"""The op registry: the one list of ops that the tests and the ``parity`` CLI both walk.

Each op has one name used in ``kernels/<op>.py``, ``oracles/<op>.py``,
``tests/test_<op>.py``, ``oracles/mutants/<op>.py`` and as a key of tolerances.yaml.
Its oracle module exports a ``HARNESS`` (how to draw a case, build inputs, and run the
kernel, the oracle and the float64 truth on it); its mutants module exports
``MUTANTS``, the bug classes the tests must kill.

``active_kernel(op)`` is what tests call: it returns the real kernel, or the mutant
named by ``$PARITY_MUTANT=op:name`` (set by ``parity mutants``).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from oracles import compare

# The ops, in the order reports list them. Adding an op: kernels/<op>.py,
# oracles/<op>.py (oracle + HARNESS), oracles/mutants/<op>.py, tests/test_<op>.py,
# a tolerances.yaml entry, and its name here.
OP_NAMES: tuple[str, ...] = ("rms_norm", "softmax", "attention", "swiglu", "projection", "embedding", "rope", "qwen2")
MUTANT_ENV = "PARITY_MUTANT"


@dataclass(frozen=True)
class Case:
    """One drawn example: everything needed to rebuild its inputs and rerun it."""

    op: str
    dtype: str
    shapes: dict
    kwargs: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    @property
    def recipe(self) -> str | None:
        return self.kwargs.get("recipe")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=list)

    @classmethod
    def from_json(cls, text: str) -> Case:
        d = json.loads(text)
        d["shapes"] = {k: tuple(v) for k, v in d["shapes"].items()}
        return cls(**d)

    def reproducer(self) -> str:
        return f"parity repro {shlex.quote(self.to_json())}"


@dataclass
class Outcome:
    """The three answers to one case, as float64-exact numpy arrays of the output dtype."""

    kernel: np.ndarray
    oracle: np.ndarray
    truth: np.ndarray
    out_dtype: str
    inputs: dict = field(default_factory=dict)
    kernel_dtype: str = ""
    kernel_shape: tuple = ()
    # The dtype whose ulps measure parity: the output dtype, unless the result is a
    # coarser value carried in a wider type (HF RMSNorm rounds to bf16, then a float32
    # weight promotes the product to float32: its precision is bf16's).
    ulp_dtype: str = ""
    # Optional per-element magnitude for parity's ulps (compare.term_scale): the largest
    # term of each output of a sum of products.
    term_scale: np.ndarray | None = None


@dataclass(frozen=True)
class Harness:
    """How the registry drives one op (defined at the bottom of ``oracles/<op>.py``).

    cases:      a hypothesis strategy of ``Case``.
    evaluate:   ``(case, kernel_fn) -> Outcome``: build inputs, run kernel / oracle / truth.
    properties: ``(case, outcome, budget) -> list[Judgment]``: the op's exact checks.
    kernel:     the real JAX kernel (what mutants replace).
    examples_scale: the share of a sweep's examples this op runs (a whole-model case
                costs a few seconds where an op's costs milliseconds).
    implementations: name -> ``Implementation``: kernels of the op with other roundings,
                judged against the same oracle under their own budgets
                (``implementations.<name>`` in tolerances.yaml).
    strata:     ``(case_opts) -> list[dict]``: the cells of the op's vocabulary that a sweep
                (``parity check / tighten / report``) covers evenly, each a dict of
                ``cases()`` keyword arguments pinning one choice of the axes that set the
                numerics (recipe, reduction length), given an implementation's ``case_opts``
                (:func:`strata_product`). None: one cell, hypothesis draws everything.
                Why: hypothesis generates to find bugs, not to sample; over 60 examples it
                drew 14 of the mosaic projection's 32 (recipe, shape) cells, 19 examples in one
                cell, and never the one whose float32 logits set the budget.
    gradient:   ``(case, kernel_fn) -> oracles.gradients.GradProblem`` for a case of any dtype:
                the kernel's vjp against torch autograd's and the float64 truth's (:func:`check_gradient`).
    """

    cases: Callable
    evaluate: Callable
    kernel: Callable
    properties: Callable | None = None
    examples_scale: float = 1.0
    implementations: dict = field(default_factory=dict)
    strata: Callable[[dict], list[dict]] | None = None
    gradient: Callable | None = None


def strata_product(opts: dict, *, scalars: dict | None = None, tuples: dict | None = None) -> list[dict]:
    """Cells for :attr:`Harness.strata`: the product of the axes, one value of each a cell.

    ``scalars``: ``cases()`` keyword -> its choices, passed as the value (``recipe="hf"``);
    ``tuples``: keyword -> its vocabulary, passed as a 1-tuple (``widths=(896,)``). An axis
    that ``opts`` (an implementation's ``case_opts``) already sets keeps that setting: a
    scalar is its one value, a tuple its elements.
    """
    axes = [(k, (opts[k],) if opts.get(k) is not None else tuple(v), False) for k, v in (scalars or {}).items()]
    axes += [(k, tuple(opts.get(k) or v), True) for k, v in (tuples or {}).items()]
    cells: list[dict] = [{}]
    for name, values, wrap in axes:
        cells = [{**c, name: (v,) if wrap else v} for c in cells for v in values]
    return cells


@dataclass(frozen=True)
class Implementation:
    """Another kernel of one op: ``kernel`` (called like the op's), the keyword arguments
    ``case_opts`` its cases are drawn with (e.g. the one recipe and the masks it
    implements), the share of a sweep's examples it runs, and where it runs at all:
    ``backends`` and ``dtypes`` (None: every dtype). Elsewhere it has no budget, and
    ``parity check`` shows its row as not run, with ``why_not``'s reason."""

    kernel: Callable
    case_opts: dict = field(default_factory=dict)
    examples_scale: float = 1.0
    backends: tuple[str, ...] = ("cpu", "gpu")
    dtypes: tuple[str, ...] | None = None
    requires: str = ""  # what it needs, in words, for the reason ("cuDNN")
    # What the device JAX runs on lacks, in words ("" when nothing), asked only when
    # ``be`` is the backend this process runs on: a GPU kernel for one architecture
    # (the Hopper GEMM) is "not run" on other GPUs rather than failing its budget.
    device_lacks: Callable[[], str] | None = None

    def why_not(self, be: str, dtype: str) -> str:
        """Why it cannot run on backend ``be`` in ``dtype`` ("" when it can)."""
        if be not in self.backends:
            return f"{'/'.join(self.backends)} only" + (f", needs {self.requires}" if self.requires else "")
        if self.dtypes is not None and dtype not in self.dtypes:
            return f"takes {'/'.join(self.dtypes)} only"
        if self.device_lacks is not None and be == backend():
            lacks = self.device_lacks()
            if lacks:
                return f"needs {lacks}"
        return ""


def harness(op: str) -> Harness:
    if op not in OP_NAMES:
        raise ValueError(f"unknown op {op!r} (known: {list(OP_NAMES)})")
    return importlib.import_module(f"oracles.{op}").HARNESS


def mutants(op: str) -> dict[str, Callable]:
    return importlib.import_module(f"oracles.mutants.{op}").MUTANTS


def active_kernel(op: str) -> Callable:
    """The kernel tests must call: the real one, or the mutant ``$PARITY_MUTANT`` names."""
    sel = os.environ.get(MUTANT_ENV, "")
    if sel:
        mop, _, name = sel.partition(":")
        if mop == op:
            table = mutants(op)
            if name not in table:
                raise ValueError(f"{MUTANT_ENV}={sel}: no mutant {name!r} for {op} (known: {sorted(table)})")
            return table[name]
    return harness(op).kernel


@functools.lru_cache(maxsize=None)
def _jit_cached(fn, static_items):
    import jax

    return jax.jit(functools.partial(fn, **dict(static_items)))


def jitted(fn: Callable, **static) -> Callable:
    """``jax.jit(partial(fn, **static))``, compiled once per (fn, options) per process.

    The options must be hashable (numbers, strings, tuples, None): they are part of the
    cache key, exactly as they would be for ``jax.jit(static_argnames=...)``.
    """
    return _jit_cached(fn, tuple(sorted(static.items())))


def backend() -> str:
    import jax

    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"


def not_hopper() -> str:
    """"" on a Hopper GPU, else what the Mosaic GPU kernels (wgmma, TMA) need: an
    ``Implementation.device_lacks`` (on other GPUs their rows are not run, not failed)."""
    from kernels.linear_mosaic import hopper

    return "" if hopper() else "a Hopper GPU (compute capability 9.x)"


def judge_case(case: Case, outcome: Outcome, budget) -> list[compare.Judgment]:
    """All judgments of one case: dtype/shape kept, parity, accuracy, finiteness, properties."""
    dt = outcome.out_dtype
    js: list[compare.Judgment] = []
    kept = outcome.kernel_dtype == dt and tuple(outcome.kernel_shape) == tuple(outcome.oracle.shape)
    js.append(compare.Judgment(
        "dtype_shape", kept, {}, {},
        f"kernel returned {outcome.kernel_dtype}{list(outcome.kernel_shape)}, "
        f"oracle {dt}{list(outcome.oracle.shape)}"))
    if not kept:
        return js
    udt = outcome.ulp_dtype or dt
    js.append(compare.judge_parity(outcome.kernel, outcome.oracle, dtype=udt, budget=budget.parity, truth=outcome.truth,
                                   term_scale=outcome.term_scale))
    js.append(compare.judge_accuracy(outcome.kernel, outcome.oracle, outcome.truth, dtype=udt, budget=budget.accuracy))
    js.append(compare.judge_finite(outcome.kernel, outcome.truth, dtype=dt))
    props = harness(case.op).properties
    if props is not None:
        js.extend(props(case, outcome, budget))
    return js


def run_case(case: Case, tolerances, *, kernel: Callable | None = None, be: str | None = None,
             measure_only: bool = False, implementation: str | None = None):
    """Evaluate and judge one case. Returns ``(outcome, budget, judgments)``.

    ``implementation``: run that registered implementation's kernel (unless ``kernel``
    is given) and judge it by its own budget.
    """
    h = harness(case.op)
    if kernel is None:
        kernel = h.implementations[implementation].kernel if implementation else active_kernel(case.op)
    outcome = h.evaluate(case, kernel)
    budget = tolerances.lookup(case.op, case.dtype, be or backend(), case.recipe, implementation=implementation,
                               measure_only=measure_only)
    return outcome, budget, judge_case(case, outcome, budget)


def check_gradient(case: Case, tolerances, *, kernel: Callable | None = None) -> list[compare.Judgment]:
    """The gradient of one case (``oracles.gradients``), judged against
    ``properties.grad_ratio``; raises ``NumericsError`` with the reproducer on a failure."""
    from oracles import gradients

    h = harness(case.op)
    budget = tolerances.lookup(case.op, case.dtype, backend(), case.recipe)
    js = gradients.judge(h.gradient(case, kernel or active_kernel(case.op)), budget)
    compare.require(js, header=f"{case.op} gradient [{case.dtype}, {budget.backend}, {case.kwargs}] "
                               f"({budget.key_path}.properties.grad_ratio): ",
                    reproducer=f"parity repro --gradient {shlex.quote(case.to_json())}")
    return js


def check_case(case: Case, tolerances, *, kernel: Callable | None = None,
               implementation: str | None = None) -> list[compare.Judgment]:
    """Run one case and raise ``NumericsError`` (an AssertionError) on any failed judgment."""
    _, budget, js = run_case(case, tolerances, kernel=kernel, implementation=implementation)
    header = f"{case.op} [{case.dtype}, {budget.backend}, {case.kwargs}] ({budget.key_path}): "
    compare.require(js, header=header, reproducer=case.reproducer())
    return js
