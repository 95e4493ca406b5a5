"""tolerances.yaml: the committed file validates, and malformed files fail with the key path."""

from __future__ import annotations

import re

import pytest

from oracles import budgets
from oracles.registry import OP_NAMES
from oracles.strategies import DTYPES

GOOD = """\
rms_norm:
  float32:
    cpu:
      parity: {max_ulps: 8, mismatch_frac: 1.0, floor_rel: 0.001}
      accuracy: {ratio: 2.0, floor_ulps: 1}
      recipes:
        gemma: {parity: {max_ulps: 2}}
      provenance: {measured: {}, examples: 1, seed: 0, date: '2026-11-22', versions: {}}
"""


def _load(tmp_path, text):
    p = tmp_path / "tolerances.yaml"
    p.write_text(text)
    return budgets.load(p)


def test_committed_file_is_valid_and_covers_every_registered_op_and_dtype():
    tol = budgets.load()
    for op in OP_NAMES:
        for dt in DTYPES:
            b = tol.lookup(op, dt, "cpu")
            assert b.parity.max_ulps >= 0 and b.accuracy.ratio >= 1.0


def test_recipe_override_merges_onto_the_entry(tmp_path):
    tol = _load(tmp_path, GOOD)
    assert tol.lookup("rms_norm", "float32", "cpu", "gemma").parity.max_ulps == 2
    assert tol.lookup("rms_norm", "float32", "cpu", "gemma").parity.floor_rel == 0.001
    assert tol.lookup("rms_norm", "float32", "cpu", "hf").parity.max_ulps == 8


IMPL = GOOD + """\
      implementations:
        fast:
          parity: {max_ulps: 40, mismatch_frac: 0.5, floor_rel: 0.001}
          accuracy: {ratio: 3.0, floor_ulps: 1}
          provenance: {measured: {}, examples: 1, seed: 0, date: '2026-11-23', versions: {}}
"""


def test_an_implementation_has_its_own_entry(tmp_path):
    """implementations.<name> replaces the op's budget for that implementation (its own
    sample), and never leaks into the op's own lookup."""
    tol = _load(tmp_path, IMPL)
    fast = tol.lookup("rms_norm", "float32", "cpu", implementation="fast")
    assert fast.parity.max_ulps == 40 and fast.accuracy.ratio == 3.0
    assert fast.key_path == "rms_norm.float32.cpu.implementations.fast"
    assert tol.lookup("rms_norm", "float32", "cpu").parity.max_ulps == 8
    with pytest.raises(budgets.BudgetError, match=r"no budget for rms_norm\.float32\.cpu\.implementations\.slow"):
        tol.lookup("rms_norm", "float32", "cpu", implementation="slow")
    assert tol.lookup("rms_norm", "float32", "cpu", implementation="slow", measure_only=True).parity.max_ulps == float("inf")
    with pytest.raises(budgets.BudgetError, match=r"implementations\.fast\.provenance\.seed: missing"):
        _load(tmp_path, IMPL.replace("seed: 0, date: '2026-11-23'", "date: '2026-11-23'"))


def test_committed_implementations_cover_every_dtype_and_backend_they_run_on():
    """Each registered implementation has a budget wherever it runs (pallas_flash: every
    dtype on both backends; cudnn: bf16/f16 on the GPU), and a sweep where it cannot run
    returns a row that says why instead of running or passing silently."""
    from oracles.registry import harness
    from oracles.sweep import sweep

    tol = budgets.load()
    seen = set()
    for op in OP_NAMES:
        for name, impl in harness(op).implementations.items():
            for dt in DTYPES:
                for be in ("cpu", "gpu"):
                    why = impl.why_not(be, dt)
                    if not why:
                        seen.add((name, be, dt))
                        assert tol.lookup(op, dt, be, impl.case_opts.get("recipe"), implementation=name)
                        continue
                    (row,) = sweep(op, dt, examples=3, seed=0, tolerances=tol, backend=be,
                                   implementation=name).values()
                    assert row.not_run == why and row.examples == 0 and row.passed, (name, be, dt, row)
    assert {("pallas_flash", be, dt) for be in ("cpu", "gpu") for dt in DTYPES} <= seen
    assert {(n, be, dt) for n, be, dt in seen if n == "cudnn"} == {("cudnn", "gpu", "bfloat16"),
                                                                  ("cudnn", "gpu", "float16")}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.replace("rms_norm:", "rms_nrom:"), r"rms_nrom \(line 1\): unknown op \(known: \["),
        (lambda s: s.replace("float32:", "float64:"), r"rms_norm\.float64 \(line 2\): unknown dtype"),
        (lambda s: s.replace("cpu:", "tpu:"), r"rms_norm\.float32\.tpu \(line 3\): unknown backend"),
        (lambda s: s.replace("max_ulps: 8", "max_ulps: -8"),
         r"rms_norm\.float32\.cpu\.parity\.max_ulps \(line 4\): must be a non-negative number, got -8"),
        (lambda s: s.replace("ratio: 2.0, ", ""), r"rms_norm\.float32\.cpu\.accuracy\.ratio: missing number"),
        (lambda s: s.replace("floor_ulps: 1", "floor_ulps: lots"), r"accuracy\.floor_ulps \(line 5\): expected a number, got 'lots'"),
        (lambda s: s.replace("seed: 0, ", ""), r"rms_norm\.float32\.cpu\.provenance\.seed: missing"),
        (lambda s: s.replace("      provenance", "      provenanse"), r"provenanse \(line 8\): unknown key"),
        (lambda s: s + "  bad: [unclosed\n", r"malformed YAML"),
    ],
)
def test_malformed_file_names_file_key_path_and_problem(tmp_path, mutate, message):
    with pytest.raises(budgets.BudgetError) as e:
        _load(tmp_path, mutate(GOOD))
    assert str(tmp_path / "tolerances.yaml") in str(e.value)
    assert re.search(message, str(e.value)), str(e.value)


def test_missing_budget_is_an_error_not_a_default(tmp_path):
    tol = _load(tmp_path, GOOD)
    with pytest.raises(budgets.BudgetError, match=r"no budget for rms_norm\.bfloat16\.cpu"):
        tol.lookup("rms_norm", "bfloat16", "cpu")
