"""The comparison module itself: ulps, the floor, the ratio rule, the failure message."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oracles import compare
from oracles.compare import AccuracyBudget, ParityBudget, judge_accuracy, judge_finite, judge_parity, ulp, ulp_distance

NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@given(v=st.floats(1e-3, 6e4))
def test_ulp_is_the_spacing_of_the_dtype(dtype, v):
    x = np.asarray(v).astype(NP[dtype])
    nxt = np.nextafter(x.astype(np.float32), np.float32(np.inf)) if dtype == "float32" else None
    expected = float(nxt) - float(x) if nxt is not None else float(ml_dtypes.finfo(NP[dtype]).eps) * 2.0 ** np.floor(np.log2(float(x)))
    assert ulp(float(x), dtype) == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_adjacent_values_are_one_ulp_apart(dtype):
    ones = np.ones(4, NP[dtype])
    bumped = (ones.astype(np.float64) + ulp(1.0, dtype)).astype(NP[dtype])
    d = ulp_distance(bumped, ones, dtype=dtype, floor_rel=0.0)
    np.testing.assert_array_equal(d, np.ones(4))


def test_floor_keeps_near_zero_elements_from_exploding():
    oracle = np.array([1.0, 1e-30], np.float32)
    kernel = np.array([1.0, 2e-30], np.float32)
    assert ulp_distance(kernel, oracle, dtype="float32", floor_rel=0.0)[1] > 1e6
    assert ulp_distance(kernel, oracle, dtype="float32", floor_rel=1e-3)[1] < 1e-20


def test_nan_and_inf_handling():
    o = np.array([np.nan, np.inf, 1.0, 1.0], np.float32)
    k = np.array([np.nan, np.inf, np.nan, np.inf], np.float32)
    np.testing.assert_array_equal(ulp_distance(k, o, dtype="float32", floor_rel=0.0), [0, 0, np.inf, np.inf])


def test_bfloat16_torch_tensors_are_read_exactly():
    t = torch.tensor([1.0078125, -3.0], dtype=torch.bfloat16)  # 1 + 2^-7 is a bf16 value
    np.testing.assert_array_equal(compare.to_f64(t), [1.0078125, -3.0])


def test_parity_failure_message_names_counts_worst_index_and_budget():
    o = np.ones((2, 3), np.float32)
    k = o.copy()
    k[1, 2] = np.nextafter(np.nextafter(np.float32(1), np.float32(2)), np.float32(2))  # 2 ulps up
    j = judge_parity(k, o, dtype="float32", budget=ParityBudget(max_ulps=1, mismatch_frac=0.5, floor_rel=0.0))
    assert not j.ok
    msg = j.message("op: ", "parity repro '{}'")
    assert "Mismatched elements: 1 / 6 (16.67%)" in msg
    assert "Greatest distance: 2 ulps of float32 [budget: 1 ulps" in msg
    assert "index (1, 2)" in msg and "kernel = 1.00000024" in msg and "oracle = 1" in msg
    assert "Reproduce: parity repro" in msg


def test_parity_mismatch_fraction_is_enforced():
    o = np.ones(10, np.float32)
    k = o.copy()
    k[:3] = np.nextafter(np.float32(1), np.float32(2))
    assert not judge_parity(k, o, dtype="float32", budget=ParityBudget(1, 0.2, 0.0)).ok
    assert judge_parity(k, o, dtype="float32", budget=ParityBudget(1, 0.3, 0.0)).ok


def test_accuracy_ratio_rule():
    t = np.array([1.0, 2.0])
    o = t + np.array([1e-6, 0.0])
    budget = AccuracyBudget(ratio=2.0, floor_ulps=0.0)
    assert judge_accuracy(t + 1.9e-6, o, t, dtype="float32", budget=budget).ok
    bad = judge_accuracy(t + 2.1e-6, o, t, dtype="float32", budget=budget)
    assert not bad.ok and "needs ratio 2.1" in bad.summary


def test_accuracy_ignores_elements_whose_truth_is_not_finite():
    t = np.array([1.0, np.nan])
    assert judge_accuracy(np.array([1.0, 5.0]), np.array([1.0, 7.0]), t, dtype="float32",
                          budget=AccuracyBudget(1.0, 0.0)).ok


def test_finite_judgment_catches_overflow_where_truth_is_finite():
    t = np.array([1.0, 7e4, 100.0])  # 7e4 is above float16's max: inf is honest there
    assert judge_finite(np.array([1.0, np.inf, 100.0]), t, dtype="float16").ok
    assert not judge_finite(np.array([1.0, np.inf, np.inf]), t, dtype="float16").ok


def test_differences_far_below_the_floor_are_not_mismatches():
    o = np.array([1.0, 6e-39, 1e-3], np.float32)
    k = np.array([1.0, 0.0, np.nextafter(np.float32(1e-3), np.float32(1))], np.float32)  # FTZ; 1 ulp at the floor
    j = judge_parity(k, o, dtype="float32", budget=ParityBudget(max_ulps=1, mismatch_frac=0.0, floor_rel=1e-3))
    assert j.measured["mismatch_frac"] == pytest.approx(1 / 3)  # only the 1-ulp difference at 1e-3 counts
