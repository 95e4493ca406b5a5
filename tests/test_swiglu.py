"""swiglu: parity, accuracy and finiteness of the kernel; the oracle against transformers' Qwen2MLP."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.swiglu import swiglu_fused
from oracles.arrays import to_torch
from oracles.registry import active_kernel, check_case, harness, jitted
from oracles.swiglu import RECIPES, _inputs
from oracles.swiglu import swiglu as oracle
from tests.gradients import float32_gradient_test, low_precision_gradient_test
from tests.strategies import DTYPES

H = harness("swiglu")
kernel = active_kernel("swiglu")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_kernel_within_budget(tolerances, dtype, recipe, data):
    """Parity (ulps vs the oracle), accuracy (vs the float64 truth), finiteness, dtype and shape.

    The cases carry outlier channels at 20-100x the row rms (so an MLP that under-amplifies
    massive activations fails accuracy) and, in float16, intermediates up to 0.9 x 65504.
    """
    case = data.draw(H.cases(dtype=dtype, recipe=recipe), label="case")
    check_case(case, tolerances, kernel=kernel)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_kernel_within_budget_real_mlp_widths(tolerances, dtype, data):
    """Every real Qwen2.5 MLP width F (4864 ... 29568) as the down projection's reduction."""
    case = data.draw(H.cases(dtype=dtype, recipe="hf", big=True), label="case")
    check_case(case, tolerances, kernel=kernel)


def _qwen2_mlp(inp, dtype):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    d, f = inp["w_gate"].shape
    m = Qwen2MLP(Qwen2Config(hidden_size=d, intermediate_size=f, hidden_act="silu")).to(dtype)
    with torch.no_grad():  # nn.Linear holds [out, in]: the transpose of our [in, out]
        m.gate_proj.weight.copy_(to_torch(inp["w_gate"]).t())
        m.up_proj.weight.copy_(to_torch(inp["w_up"]).t())
        m.down_proj.weight.copy_(to_torch(inp["w_down"]).t())
    return m


@given(case=H.cases(recipe="hf"))
def test_oracle_equals_transformers_qwen2mlp_bit_for_bit(case):
    """The "hf" oracle is transformers' own Qwen2MLP, to the bit (2-D and 3-D inputs)."""
    inp = _inputs(case)
    ts = [to_torch(inp[n]) for n in ("x", "w_gate", "w_up", "w_down")]
    with torch.no_grad():
        ref = _qwen2_mlp(inp, ts[0].dtype)(ts[0])
    got = oracle(*ts, recipe="hf")
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got.nan_to_num(7.0), ref.nan_to_num(7.0)), case.reproducer()
    assert torch.equal(got.isnan(), ref.isnan())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_oracle_fp32_act_rounds_fewer_times_than_hf(dtype):
    """The two recipes are different computations in bf16/f16 (and fp32_act is closer to the truth)."""
    rng = np.random.default_rng(3)
    d, f = 128, 512
    x = torch.tensor(rng.standard_normal((8, d)), dtype=getattr(torch, dtype))
    ws = [torch.tensor(rng.standard_normal(s) / np.sqrt(s[0]), dtype=getattr(torch, dtype))
          for s in ((d, f), (d, f), (f, d))]
    hf, f32 = oracle(x, *ws, recipe="hf"), oracle(x, *ws, recipe="fp32_act")
    truth = oracle(x, *ws, exact=True)
    assert not torch.equal(hf, f32)
    assert (f32.double() - truth).abs().max() < (hf.double() - truth).abs().max()


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_gate_up_weight_gives_the_same_bits(dtype, recipe):
    """swiglu_fused(x, [w_gate | w_up], w_down) == swiglu(x, w_gate, w_up, w_down), bit for bit."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 64)), dtype)
    wg, wu = (jnp.asarray(rng.standard_normal((64, 256)) * 0.1, dtype) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((256, 64)) * 0.1, dtype)
    fused = jnp.concatenate([wg, wu], axis=1)  # [D, 2F]
    a = np.asarray(jitted(swiglu_fused, recipe=recipe)(x, fused, wd).astype(jnp.float32))
    b = np.asarray(jitted(kernel, recipe=recipe)(x, wg, wu, wd).astype(jnp.float32))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_gate_not_up(dtype):
    """A negative gate closes its channel (silu(-20) ~ 0) whatever the up projection says;
    a negative up with a positive gate does not. Catches gate/up swapped and a wrong activation."""
    d, f = 8, 16
    x = jnp.ones((1, d), dtype)
    wg = jnp.full((d, f), -2.5, dtype)  # gate = -20 on every channel
    wu = jnp.full((d, f), 0.5, dtype)  # up = 4
    wd = jnp.full((f, d), 1.0, dtype)
    closed = np.asarray(kernel(x, wg, wu, wd).astype(jnp.float32))  # silu(-20) * 4 ~ -8e-8 per channel
    opened = np.asarray(kernel(x, wu, wg, wd).astype(jnp.float32))  # gate = 4, up = -20: silu(4) * -20 < 0
    assert np.all(opened < 0) and np.all(closed <= 0)
    assert np.all(np.abs(closed) * 1e6 < np.abs(opened)), (closed, opened)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 64), (32, 128), (32, 128), (128, 64)), r"w_gate must have shape \[D, F\] with D = 64.*got \(32, 128\)"),
        (((2, 64), (64, 128), (64, 96), (128, 64)), r"w_up must have shape \[D, F\] = \(64, 128\).*got \(64, 96\)"),
        (((2, 64), (64, 128), (64, 128), (64, 128)), r"w_down must have shape \[F, D\] = \(128, 64\).*got \(64, 128\)"),
        (((2, 64), (64,), (64, 128), (128, 64)), r"w_gate must be 2-D, got shape \(64,\)"),
    ],
)
def test_bad_shapes_raise_value_error(shapes, match):
    arrs = [jnp.zeros(s, jnp.float32) for s in shapes]
    with pytest.raises(ValueError, match=match):
        kernel(*arrs)


def test_bad_dtypes_and_options_raise_value_error():
    x = jnp.zeros((2, 8), jnp.bfloat16)
    w, wd = jnp.zeros((8, 16), jnp.bfloat16), jnp.zeros((16, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"w_up must have the dtype of x \(bfloat16\), got float32"):
        kernel(x, w, w.astype(jnp.float32), wd)
    with pytest.raises(ValueError, match=r"x must have a floating dtype.*got int32"):
        kernel(x.astype(jnp.int32), w, w, wd)
    with pytest.raises(ValueError, match=r"recipe must be one of \['hf', 'fp32_act'\], got 'fp16'"):
        kernel(x, w, w, wd, recipe="fp16")
    with pytest.raises(ValueError, match=r"w_gate_up must have shape \[D, 2F\].*got \(8, 15\)"):
        swiglu_fused(x, jnp.zeros((8, 15), jnp.bfloat16), wd)


test_float32_gradient_within_budget = float32_gradient_test(H, kernel)
test_low_precision_gradient_within_budget = low_precision_gradient_test(H, kernel)


def test_rounding_to_the_model_dtype_passes_the_gradient_of_small_values():
    """The recipes' roundings (kernels._round.round_to) differentiate as torch's cast does: the
    identity, the gradient put on the dtype's grid, below float16's smallest normal too. Their
    subnormal branch (jnp.round) has no derivative, and differentiated as written it zeroed
    every gradient through a float16 value under 6.1e-5: swiglu's float16 weight gradients were
    1046x torch's error (parity gradients, session 19)."""
    import jax

    from kernels._round import round_to

    x = np.asarray([3e-8, 1e-6, 5e-5, -2e-7, 1.0, 7e4], np.float32)  # f16: subnormals, a normal, overflow
    c = np.asarray([1.0, -0.5, 2.0, 0.25, 3.0, 1.5], np.float32)  # exact in bf16 and f16
    for dt, tdt in ((jnp.float16, torch.float16), (jnp.bfloat16, torch.bfloat16)):
        xt = torch.from_numpy(x).requires_grad_(True)
        xt.to(tdt).to(torch.float32).backward(torch.from_numpy(c))  # torch: the cast's backward
        (g,) = jax.vjp(lambda v, dt=dt: round_to(v, dt), jnp.asarray(x))[1](jnp.asarray(c))
        np.testing.assert_array_equal(np.asarray(g), xt.grad.numpy(), err_msg=f"vjp {dt.__name__}")
        _, t = jax.jvp(lambda v, dt=dt: round_to(v, dt), (jnp.asarray(x),), (jnp.asarray(c),))
        np.testing.assert_array_equal(np.asarray(t), c, err_msg=f"jvp {dt.__name__}")
