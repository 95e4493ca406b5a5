"""The gradient tests every op file runs (one definition each, collected per file)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oracles.registry import Harness, check_gradient


def float32_gradient_test(h: Harness, kernel: Callable) -> Callable:
    """``test_float32_gradient_within_budget`` for the op of ``h``: assign it to that name in
    the op's test file (pytest collects it there)."""

    @given(case=h.cases(dtype="float32"))
    def test_float32_gradient_within_budget(tolerances, case):
        """jax.vjp of the kernel in float32, for every differentiable input, against the float64
        truth: within ``grad_ratio`` of the error torch autograd makes through the oracle
        (oracles.gradients). Fails if the kernel cannot be differentiated at all."""
        check_gradient(case, tolerances, kernel=kernel)

    return test_float32_gradient_within_budget


def low_precision_gradient_test(h: Harness, kernel: Callable) -> Callable:
    """``test_low_precision_gradient_within_budget`` for the op of ``h``: assign it to that name
    in the op's test file (pytest collects it there)."""

    @pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
    @settings(max_examples=max(2, settings().max_examples // 3))
    @given(data=st.data())
    def test_low_precision_gradient_within_budget(tolerances, dtype, data):
        """The float32 test's contract in the model dtypes that mixed-precision training
        differentiates: torch's backward rounds after every op, JAX's reverse mode keeps the
        recipe's float32 steps; within ``grad_ratio`` of torch's error all the same."""
        case = data.draw(h.cases(dtype=dtype), label="case")
        check_gradient(case, tolerances, kernel=kernel)

    return test_low_precision_gradient_within_budget
