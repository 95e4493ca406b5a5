"""Sweeps: drive an op's hypothesis strategy outside pytest and aggregate the judgments.

``parity check`` (and later ``tighten`` / ``report``) measure with the very strategies
the tests use: a sweep runs the strategy under ``@given`` with a fixed seed and no
shrinking, and folds each case's judgments into one row per (op, dtype, recipe).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hyp_seed

from oracles import registry


@dataclass
class Row:
    """The worst of every measure over the cases of one (op, dtype, recipe)."""

    op: str
    dtype: str
    recipe: str | None
    examples: int = 0
    implementation: str | None = None  # a registered implementation's own budget (Harness.implementations)
    failures: int = 0
    measured: dict = field(default_factory=dict)  # measure -> worst value
    budget: dict = field(default_factory=dict)  # measure -> budget value
    ok: dict = field(default_factory=dict)  # judgment kind -> all passed
    first_failure: str = ""
    not_run: str = ""  # why an implementation did not run here (another backend or dtype); not a failure
    cells: int = 1  # the strata the sweep split its examples over (Harness.strata)

    @property
    def key(self) -> str:
        return (f"{self.op}/{self.dtype}" + (f"/{self.recipe}" if self.recipe else "")
                + (f"@{self.implementation}" if self.implementation else ""))

    @property
    def passed(self) -> bool:
        return self.failures == 0

    def fold(self, case, budget, judgments) -> None:
        self.examples += 1
        bad = [j for j in judgments if not j.ok]
        if bad:
            self.failures += 1
            if not self.first_failure:
                header = f"{case.op} [{case.dtype}, {budget.backend}, {case.kwargs}] ({budget.key_path}): "
                self.first_failure = "\n\n".join(j.message(header, case.reproducer()) for j in bad)
        for j in judgments:
            self.ok[j.kind] = self.ok.get(j.kind, True) and j.ok
            for k, v in j.measured.items():
                if k in ("kernel_err", "oracle_err"):
                    continue
                name = f"{j.kind}.{k}"
                v = float(v)
                prev = self.measured.get(name, -math.inf)
                self.measured[name] = v if (math.isnan(v) or v > prev) else prev
            for k, v in j.budget.items():
                self.budget[f"{j.kind}.{k}"] = v


def sweep(op: str, dtype: str, *, examples: int, seed: int, tolerances, backend: str | None = None,
          on_case: Callable | None = None, kernel: Callable | None = None,
          measure_only: bool = False, implementation: str | None = None) -> dict[str | None, Row]:
    """Run ``examples`` cases of ``op`` in ``dtype``; return one Row per recipe seen.

    Stratified: the examples are split evenly over the op's cells (``Harness.strata``: one
    choice of recipe and reduction length each), at least one a cell, so a budget rests on
    every cell of the vocabulary; hypothesis draws the rest of each case (values, masks,
    options) under a seed of its own per cell.
    ``implementation``: sweep that registered implementation of the op (its kernel, its
    cases, its own budget) instead of the op's kernel. Where it cannot run (another
    backend or dtype) the one row returned has no examples and says why in ``not_run``.
    ``on_case(case, outcome, budget, judgments)`` is called after each case (progress
    bars, reports). Deterministic for a given seed: ``parity tighten`` relies on it.
    """
    h = registry.harness(op)
    rows: dict[str | None, Row] = {}
    be = backend or registry.backend()
    impl = h.implementations.get(implementation) if implementation else None
    if implementation and impl is None:
        raise ValueError(f"{op}: no implementation {implementation!r} (known: {sorted(h.implementations)})")
    if impl is not None and (why := impl.why_not(be, dtype)):
        recipe = impl.case_opts.get("recipe")
        return {recipe: Row(op, dtype, recipe, implementation=implementation, not_run=why)}
    cells = plan(op, examples, implementation=implementation)
    for i, (opts, share) in enumerate(cells):
        # One cell keeps the sweep's own seed (the draws of an unstratified op are unchanged).
        _run_cell(h, dtype, opts, examples=share, seed=seed if len(cells) == 1 else seed * 1009 + i,
                  run=lambda case: _one(case, rows, tolerances, kernel=kernel, be=be, measure_only=measure_only,
                                        implementation=implementation, on_case=on_case))
    for r in rows.values():
        r.cells = len(cells)
    return rows


def plan(op: str, examples: int, *, implementation: str | None = None) -> list[tuple[dict, int]]:
    """The cells a sweep of ``examples`` runs: (``cases()`` keyword arguments, examples) pairs.

    ``examples`` is scaled by the op's and the implementation's ``examples_scale`` and split
    evenly over ``Harness.strata`` (one cell when the op has none), every cell at least once.
    """
    h = registry.harness(op)
    impl = h.implementations[implementation] if implementation else None
    opts = impl.case_opts if impl else {}
    cells = h.strata(opts) if h.strata else [{}]
    n = max(1, round(examples * h.examples_scale * (impl.examples_scale if impl else 1.0)))
    return [({**opts, **c}, max(1, n // len(cells) + (i < n % len(cells)))) for i, c in enumerate(cells)]


def _run_cell(h, dtype: str, opts: dict, *, examples: int, seed: int, run: Callable) -> None:
    """``examples`` hypothesis draws of ``h.cases(dtype, **opts)`` (seeded, no shrinking), each to ``run``."""

    @hyp_seed(seed)
    @settings(max_examples=examples, database=None, deadline=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=h.cases(dtype=dtype, **opts))
    def go(case):
        run(case)

    go()


def _one(case, rows: dict, tolerances, *, kernel, be, measure_only, implementation, on_case) -> None:
    """Run one case and fold its judgments into its recipe's Row."""
    outcome, budget, js = registry.run_case(case, tolerances, kernel=kernel, be=be, measure_only=measure_only,
                                            implementation=implementation)
    rows.setdefault(case.recipe, Row(case.op, case.dtype, case.recipe, implementation=implementation)).fold(
        case, budget, js)
    if on_case:
        on_case(case, outcome, budget, js)
