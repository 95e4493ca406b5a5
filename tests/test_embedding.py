"""embedding: the kernel is the table's rows bit for bit, and never hides an out-of-range id."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.embedding import embed as real_embed
from oracles.arrays import TORCH_DTYPES, to_torch
from oracles.embedding import _inputs
from oracles.embedding import embed as oracle
from oracles.registry import active_kernel, check_case, harness
from tests.gradients import float32_gradient_test, low_precision_gradient_test
from tests.strategies import DTYPES

H = harness("embedding")
kernel = active_kernel("embedding")


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_kernel_within_budget(tolerances, dtype, data):
    """Bit for bit the table's rows (parity budget 0), dtype and shape kept; V up to 152064."""
    case = data.draw(H.cases(dtype=dtype), label="case")
    check_case(case, tolerances, kernel=kernel)


@given(case=H.cases())
def test_oracle_equals_torch_nn_embedding_bit_for_bit(case):
    inp = _inputs(case)
    table = to_torch(inp["table"])
    m = torch.nn.Embedding(*table.shape, dtype=table.dtype)
    with torch.no_grad():
        m.weight.copy_(table)
        ref = m(torch.from_numpy(inp["ids"]).to(torch.int64))
    assert torch.equal(oracle(torch.from_numpy(inp["ids"]).to(torch.int64), table), ref), case.reproducer()


def _table(dtype, v=10, d=4):
    return jnp.asarray(np.arange(v * d, dtype=np.float32).reshape(v, d), dtype)  # row i holds 4i..4i+3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [10, 11, 200000, -1])
def test_concrete_out_of_range_id_raises(dtype, bad):
    """torch raises on an out-of-range id; so does the kernel when the ids are concrete."""
    ids = np.array([[1, 2], [bad, 3]], np.int32)
    with pytest.raises(ValueError, match=rf"ids must be in \[0, 10\).*got {bad} at index \(1, 0\)"):
        kernel(ids, _table(dtype))
    with pytest.raises(IndexError):
        oracle(torch.from_numpy(ids).to(torch.int64), to_torch(np.asarray(_table(dtype))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [10, 12345, -1, -10])
def test_traced_out_of_range_id_gives_nan_row_not_a_clamped_one(dtype, bad):
    """Under jit the kernel cannot raise: the checked default makes the bad row NaN; the
    good rows are untouched, bit for bit."""
    ids = jnp.asarray([[1, bad], [0, 9]], jnp.int32)
    out = np.asarray(jax.jit(kernel)(ids, _table(dtype)).astype(jnp.float32))
    assert np.isnan(out[0, 1]).all(), f"id {bad} gave row {out[0, 1]} instead of NaN"
    np.testing.assert_array_equal(out[[0, 1, 1], [0, 0, 1]], np.asarray(_table(dtype).astype(jnp.float32))[[1, 0, 9]])


def test_unchecked_mode_is_the_documented_clamp():
    """checked=False is JAX's clamping gather (documented fast path), and only that."""
    ids = jnp.asarray([12, -3, 4], jnp.int32)
    out = np.asarray(jax.jit(lambda i, t: real_embed(i, t, checked=False))(ids, _table(jnp.float32)))
    np.testing.assert_array_equal(out, np.asarray(_table(jnp.float32))[[9, 0, 4]])


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match=r"ids must have an integer dtype, got float32"):
        kernel(jnp.zeros((2,), jnp.float32), _table(jnp.float32))
    with pytest.raises(ValueError, match=r"table must have shape \[V, D\], got shape \(10,\)"):
        kernel(jnp.zeros((2,), jnp.int32), jnp.zeros((10,), jnp.float32))
    with pytest.raises(ValueError, match=r"table must have a floating dtype.*got int32"):
        kernel(jnp.zeros((2,), jnp.int32), jnp.zeros((10, 4), jnp.int32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_keep_the_table_dtype(dtype):
    out = kernel(np.array([3], np.int32), _table(dtype))
    assert out.dtype == jnp.dtype(dtype) and out.shape == (1, 4)
    assert TORCH_DTYPES[dtype] == oracle(torch.tensor([3]), to_torch(np.asarray(_table(dtype)))).dtype


test_float32_gradient_within_budget = float32_gradient_test(H, kernel)
test_low_precision_gradient_within_budget = low_precision_gradient_test(H, kernel)
