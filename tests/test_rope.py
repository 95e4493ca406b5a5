"""rope: parity, accuracy and exact properties of the composite kernel; the oracles
against transformers, bit for bit; relative-position invariance; bad input."""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import rope as K
from oracles import rope as O
from oracles.arrays import to_torch, torch_to_numpy
from oracles.compare import ulp_distance
from oracles.registry import active_kernel, check_case, harness, jitted
from tests.gradients import float32_gradient_test, low_precision_gradient_test
from tests.strategies import DTYPES

H = harness("rope")
kernel = active_kernel("rope")
FEW = max(2, settings.default.max_examples // 4)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_kernel_within_budget(tolerances, dtype, data):
    """Tables and rotated x: parity, accuracy, tables vs float64, position 0, norm, pass-through."""
    case = data.draw(H.cases(dtype=dtype), label="case")
    check_case(case, tolerances, kernel=kernel)


@pytest.mark.parametrize("config", O.CONFIG_NAMES)
@given(data=st.data())
@settings(max_examples=FEW)
def test_every_rope_type_within_budget(tolerances, config, data):
    """Each named configuration (llama3, yarn, longrope, partial...) gets its own examples."""
    dtype = data.draw(st.sampled_from(["float32", "bfloat16"]), label="dtype")
    case = data.draw(H.cases(dtype=dtype, config=config), label="case")
    check_case(case, tolerances, kernel=kernel)


# --- the oracles against transformers, bit for bit ------------------------------------

def _hf_config(head_dim: int, config: dict, theta: float):
    from transformers import Qwen2Config

    rp = {"rope_type": config["rope_type"], "rope_theta": theta}
    for k, v in config.get("scaling") or ():
        rp[k] = list(v) if isinstance(v, tuple) else v
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        rp["partial_rotary_factor"] = config["partial_rotary_factor"]
    c = Qwen2Config(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=4,
                    max_position_embeddings=config.get("max_position_embeddings") or 131072, rope_parameters=rp)
    c.head_dim = head_dim
    return c


def _hf_frequencies(head_dim, config, theta):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    c = _hf_config(head_dim, config, theta)
    if config["rope_type"] == "default":
        if config.get("partial_rotary_factor", 1.0) != 1.0:  # Qwen2's default ignores partial rotary
            c.head_dim = int(head_dim * config["partial_rotary_factor"])
        return Qwen2RotaryEmbedding.compute_default_rope_parameters(c)
    return ROPE_INIT_FUNCTIONS[config["rope_type"]](c, None, seq_len=config.get("seq_len"))


def _freq_kwargs(config, theta):
    return dict(theta=theta, rope_type=config["rope_type"],
                partial_rotary_factor=config.get("partial_rotary_factor", 1.0),
                scaling={k: (list(v) if isinstance(v, tuple) else v) for k, v in (config.get("scaling") or ())},
                max_position_embeddings=config.get("max_position_embeddings"), seq_len=config.get("seq_len"))


ALL_CONFIGS = [(h, name, theta) for h in (64, 128, 256) for name in sorted(O.rope_configs(h))
               for theta in (1e4, 5e5, 1e6)]


@pytest.mark.parametrize("head_dim, name, theta", ALL_CONFIGS)
def test_frequencies_equal_transformers_bit_for_bit(head_dim, name, theta):
    """Oracle and kernel inv_freq equal ROPE_INIT_FUNCTIONS' (or Qwen2's default) to the bit;
    attention scaling equal exactly."""
    config = O.rope_configs(head_dim)[name]
    ref, ref_att = _hf_frequencies(head_dim, config, theta)
    got, att = O.rope_frequencies(head_dim, **_freq_kwargs(config, theta))
    assert got.dtype == ref.dtype == torch.float32 and torch.equal(got, ref), (name, got - ref)
    assert att == ref_att
    kin, katt = K.rope_frequencies(head_dim, **_freq_kwargs(config, theta))
    np.testing.assert_array_equal(kin, ref.numpy(), err_msg=name)
    assert kin.dtype == np.float32 and katt == ref_att


@pytest.mark.parametrize("head_dim, prf", [(64, 0.5), (96, 1.0), (80, 1.0)])
def test_frequencies_off_block_sizes_within_one_ulp(head_dim, prf):
    """Rotary widths whose half is not a multiple of 32: torch's libm tail, within 1 ulp."""
    config = dict(rope_type="default", partial_rotary_factor=prf)
    ref, _ = _hf_frequencies(head_dim, config, 1e6)
    kin, _ = K.rope_frequencies(head_dim, **_freq_kwargs(config, 1e6))
    assert ulp_distance(kin, ref.numpy(), dtype="float32", floor_rel=0.0).max() <= 1


def test_powf_equals_torch_pow_on_random_inputs():
    """The SLEEF emulation equals torch's vectorised float32 pow (4096 = 128 blocks of 32)."""
    rng = np.random.default_rng(0)
    x = (10 ** rng.uniform(-3, 8, 4096)).astype(np.float32)
    y = rng.uniform(-2, 2, 4096).astype(np.float32)
    from kernels._powf import torch_cpu_powf

    np.testing.assert_array_equal(torch_cpu_powf(x, y), torch.pow(torch.from_numpy(x), torch.from_numpy(y)).numpy())


@pytest.mark.parametrize("name", ["default", "yarn", "dynamic", "llama3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tables_oracle_equals_hf_rotary_module(name, dtype):
    """rope_cos_sin oracle == Qwen2RotaryEmbedding.forward, positions to 2**17, per-row offsets."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    config = O.rope_configs(128)[name]
    if name == "dynamic":  # the module grows inv_freq from the positions: stay below its cache
        config = dict(config, seq_len=None)
    rng = np.random.default_rng(1)
    pos = torch.from_numpy(O.make_positions("log_uniform", (2, 33), rng).astype(np.int64))
    module = Qwen2RotaryEmbedding(_hf_config(128, config, 1e6))
    if name == "dynamic":
        pos = pos.clamp(max=4095)
    x = torch.zeros(1, dtype=getattr(torch, dtype))
    ref_c, ref_s = module(x, pos)
    inv, att = O.rope_frequencies(128, **_freq_kwargs(config, 1e6))
    got_c, got_s = O.rope_cos_sin(pos, inv, attention_scaling=att, dtype=x.dtype)
    assert torch.equal(got_c, ref_c) and torch.equal(got_s, ref_s)


def _hf_apply(layout, partial):
    from transformers.models.bamba.modeling_bamba import apply_rotary_pos_emb as bamba
    from transformers.models.glm.modeling_glm import apply_rotary_pos_emb as glm
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb as qwen2

    if layout == "interleaved":
        return glm
    return bamba if partial else qwen2


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_oracle_and_kernel_equal_transformers_bit_for_bit(dtype, layout, partial):
    """apply_rope oracle and kernel == Qwen2 / Bamba (partial) / GLM (interleaved) apply_rotary_pos_emb."""
    rng = np.random.default_rng(2)
    h, r = 128, (64 if partial else 128)
    x = rng.standard_normal((2, 5, 3, h)) * 10.0 ** rng.uniform(-2, 2, (2, 5, 3, 1))
    xn = x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))
    pos = torch.from_numpy(O.make_positions("log_uniform", (2, 5), rng).astype(np.int64))
    inv, _ = O.rope_frequencies(h, theta=1e6, partial_rotary_factor=r / h)
    xt = to_torch(xn)
    cos, sin = O.rope_cos_sin(pos, inv, dtype=xt.dtype)
    ref, _ = _hf_apply(layout, partial)(xt, xt, cos, sin, unsqueeze_dim=2)
    got = O.apply_rope(xt, cos, sin, layout=layout)
    assert torch.equal(got, ref)
    k = K.apply_rope(jnp.asarray(xn), jnp.asarray(torch_to_numpy(cos)), jnp.asarray(torch_to_numpy(sin)), layout=layout)
    np.testing.assert_array_equal(np.asarray(k.astype(jnp.float32)), ref.float().numpy())


# --- exact properties driven through the registry's (possibly mutated) kernel ----------

def _run(x, positions, **kw):
    return jitted(kernel, **O.hashable_kwargs(kw))(x, positions)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_interleaved_equals_half_on_deinterleaved_channels(dtype, data):
    case = data.draw(H.cases(dtype=dtype), label="case")
    inp = O.inputs(case)
    kw = dict(case.kwargs)
    cos, _, y_int = _run(inp["x"], inp["positions"], **{**kw, "layout": "interleaved"})
    h, r = inp["x"].shape[-1], cos.shape[-1]
    perm = np.r_[np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, h)]
    _, _, y_half = _run(np.ascontiguousarray(inp["x"][..., perm]), inp["positions"], **{**kw, "layout": "half"})
    np.testing.assert_array_equal(np.asarray(y_half, np.float32), np.asarray(y_int, np.float32)[..., perm],
                                  err_msg=case.reproducer())


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_relative_position_invariance(tolerances, dtype, data):
    """<R_m q, R_n k> == <R_(m+d) q, R_(n+d) k> within budget, shifts d up to 1e5."""
    case = data.draw(H.cases(dtype=dtype), label="case")
    shift = data.draw(st.one_of(st.integers(0, 256), st.integers(1, 10**5)), label="d")
    m, n = data.draw(st.integers(0, 2048), label="m"), data.draw(st.integers(0, 2048), label="n")
    rng = np.random.default_rng(case.data["seed"])
    h = case.shapes["x"][-1]
    x = (rng.standard_normal((1, 2, 1, h))).astype(np.float32).astype(ml_dtypes.bfloat16 if dtype == "bfloat16"
                                                                      else np.dtype(dtype))
    kw = dict(case.kwargs)
    _, _, y0 = _run(x, np.array([[m, n]], np.int32), **kw)
    _, _, y1 = _run(x, np.array([[m + shift, n + shift]], np.int32), **kw)
    y0, y1 = np.asarray(y0, np.float64), np.asarray(y1, np.float64)
    d0, d1 = float(y0[0, 0, 0] @ y0[0, 1, 0]), float(y1[0, 0, 0] @ y1[0, 1, 0])
    scale = float(np.linalg.norm(y0[0, 0, 0]) * np.linalg.norm(y0[0, 1, 0]))
    err = abs(d0 - d1) / scale
    lim = tolerances.lookup("rope", dtype).properties["relpos_err"]
    assert err <= lim, f"relative-position error {err:.3g} > budget {lim:g} (m={m}, n={n}, d={shift}) " \
                       f"{case.reproducer()}"


# --- the reduction's constants and accuracy --------------------------------------------

def test_pi_over_2_constant_and_chunks():
    import mpmath

    mpmath.mp.prec = 300
    assert int(K._PIO2_HEX, 16) == int(mpmath.floor(mpmath.pi / 2 * mpmath.mpf(16) ** (len(K._PIO2_HEX) - 1)))
    assert all(float(np.float32(c)) == c for c in K._CHUNKS)
    assert abs(sum(map(mpmath.mpf, K._CHUNKS)) - mpmath.pi / 2) < mpmath.mpf(2) ** -79


def test_sin_cos_f32_within_one_ulp_of_float64_up_to_2_20():
    """cos/sin of float32 angles to 2**20 rad (positions 2**17 at inv_freq up to 1, and beyond)."""
    rng = np.random.default_rng(3)
    a = np.concatenate([rng.uniform(0, 8, 20000), 2.0 ** rng.uniform(-10, 20, 40000)]).astype(np.float32)
    s, c = (np.asarray(v, np.float64) for v in jitted(K.sin_cos_f32)(a))
    a64 = a.astype(np.float64)
    assert ulp_distance(s, np.sin(a64), dtype="float32", floor_rel=0.0).max() <= 1.0
    assert ulp_distance(c, np.cos(a64), dtype="float32", floor_rel=0.0).max() <= 1.0


# --- the Pallas kernel (interpret mode: the same kernel program, lowered by XLA) ---------

# (B, T, heads of each tensor, H, R): Qwen2.5's head counts (28 and 4: padded and not),
# T not a multiple of block_t (the last program masked), partial rotary (channels R..H
# copied through, H - R = R).
PALLAS_SHAPES = [(1, 7, (28, 4), 128, 128), (2, 3, (14, 2), 64, 64), (1, 5, (3,), 128, 64), (1, 4, (2, 1), 64, 32)]


def _shape_id(s):
    return f"B{s[0]}T{s[1]}N{'-'.join(map(str, s[2]))}H{s[3]}R{s[4]}"


@pytest.mark.parametrize("shape", PALLAS_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_pallas_kernel_equals_xla_path_bit_for_bit(dtype, shape):
    """kernels.rope_pallas == the XLA path, every element: each step is one correctly rounded
    operation, so the kernel has no freedom (no sum order) and any difference is a bug.
    Magnitudes over four decades, so that dropping either rounding of a product shows."""
    from kernels.rope_pallas import pallas_apply_rope

    b, t, heads, h, r = shape
    rng = np.random.default_rng(11)
    xs = [jnp.asarray(rng.standard_normal((b, t, n, h)) * 10.0 ** rng.uniform(-2, 2, (b, t, n, 1)), dtype)
          for n in heads]
    # Tables whose halves differ (HF's repeat its frequencies; the recipe reads both halves).
    ang = rng.uniform(0, 100, (b, t, r))
    cos, sin = jnp.asarray(np.cos(ang), dtype), jnp.asarray(np.sin(ang), dtype)
    for block_t, schedule in ((1, "loads_first"), (4, "loads_first"), (2, "per_tensor"), (1, "program_per_tensor")):
        got = pallas_apply_rope(xs, cos, sin, block_t=block_t, schedule=schedule, interpret=True)
        for x, g in zip(xs, got):
            ref = K.apply_rope(x, cos, sin, implementation="xla")
            assert g.dtype == ref.dtype and g.shape == ref.shape
            np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32)),
                                          err_msg=f"pallas vs xla apply_rope [{dtype}, x {x.shape}, R {r}, "
                                                  f"block_t {block_t}, {schedule}]")


def test_pallas_kernel_gradient_is_the_xla_paths():
    """jax.vjp through the Pallas kernel (the GPU default for bf16/f16), q and k in one launch,
    is the XLA path's, to the bit (kernels._grad): before, jax.grad stopped there with an
    AssertionError."""
    from kernels.rope_pallas import pallas_apply_rope
    from oracles.gradients import seeded_vjp

    rng = np.random.default_rng(13)
    q = jnp.asarray(rng.standard_normal((2, 3, 6, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, 3, 2, 64)), jnp.bfloat16)
    ang = rng.uniform(0, 100, (2, 3, 64))
    cos, sin = jnp.asarray(np.cos(ang), jnp.bfloat16), jnp.asarray(np.sin(ang), jnp.bfloat16)
    got = seeded_vjp(lambda q, k: pallas_apply_rope((q, k), cos, sin, interpret=True), q, k)
    want = seeded_vjp(lambda q, k: tuple(K.apply_rope(x, cos, sin, implementation="xla") for x in (q, k)), q, k)
    for name, g, w in zip("qk", got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=f"d{name}")


def test_apply_rope_qk_equals_two_apply_rope_calls():
    rng = np.random.default_rng(12)
    q = jnp.asarray(rng.standard_normal((2, 3, 6, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, 3, 2, 64)), jnp.bfloat16)
    pos = jnp.asarray(rng.integers(0, 5000, (2, 3)), jnp.int32)
    inv, _ = K.rope_frequencies(64, theta=1e6)
    cos, sin = K.rope_cos_sin(pos, inv, dtype=jnp.bfloat16)
    for layout in ("half", "interleaved"):
        qo, ko = K.apply_rope_qk(q, k, cos, sin, layout=layout)
        for got, x in ((qo, q), (ko, k)):
            want = K.apply_rope(x, cos, sin, layout=layout)
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_pallas_path_refuses_what_it_does_not_compute():
    from kernels.rope_pallas import pallas_apply_rope

    x16 = jnp.ones((1, 2, 3, 64), jnp.bfloat16)
    t16 = jnp.ones((1, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"implementation='pallas' takes bfloat16/float16 x .* got x float32"):
        K.apply_rope(x16.astype(jnp.float32), t16.astype(jnp.float32), t16.astype(jnp.float32), implementation="pallas")
    with pytest.raises(ValueError, match=r"tables float32"):  # promoted to f32: XLA's path
        K.apply_rope(x16, t16.astype(jnp.float32), t16.astype(jnp.float32), implementation="pallas")
    with pytest.raises(ValueError, match=r"layout 'interleaved'"):
        K.apply_rope(x16, t16, t16, layout="interleaved", implementation="pallas")
    with pytest.raises(ValueError, match=r"implementation must be one of \[None, 'xla', 'pallas'\], got 'triton'"):
        K.apply_rope(x16, t16, t16, implementation="triton")
    with pytest.raises(ValueError, match=r"H = 80, R = 80"):  # R/2 = 40: the XLA path's
        K.apply_rope(jnp.ones((1, 2, 3, 80), jnp.bfloat16), jnp.ones((1, 2, 80), jnp.bfloat16),
                     jnp.ones((1, 2, 80), jnp.bfloat16), implementation="pallas")
    with pytest.raises(ValueError, match=r"block_t must be a power of two >= 1, got 3"):
        pallas_apply_rope((x16,), t16, t16, block_t=3, interpret=True)
    with pytest.raises(ValueError, match=r"schedule must be one of \['per_tensor', 'loads_first', 'program_per_tensor'\], "
                                         r"got 'fused'"):
        pallas_apply_rope((x16,), t16, t16, schedule="fused", interpret=True)
    with pytest.raises(ValueError, match=r"q and k must share B, T, H and dtype"):
        K.apply_rope_qk(x16, jnp.ones((1, 2, 3, 32), jnp.bfloat16), t16, t16)


# --- bad input ---------------------------------------------------------------------------

def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match=r"head_dim must be a positive even int, got 63"):
        K.rope_frequencies(63, theta=1e4)
    with pytest.raises(ValueError, match=r"rotary dim .* = 19 must be even"):
        K.rope_frequencies(64, theta=1e4, partial_rotary_factor=0.3)
    with pytest.raises(ValueError, match=r"rope_type must be one of \['default', 'linear', 'dynamic', 'yarn', "
                                         r"'longrope', 'llama3', 'proportional'\], got 'ntk'"):
        K.rope_frequencies(64, theta=1e4, rope_type="ntk")
    with pytest.raises(ValueError, match=r"missing \['low_freq_factor'\]"):
        K.rope_frequencies(64, theta=1e4, rope_type="llama3", scaling={
            "factor": 8.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    with pytest.raises(ValueError, match=r"positions must have an integer dtype, got float32"):
        K.rope_cos_sin(jnp.zeros((1, 4), jnp.float32), np.ones(32, np.float32))
    with pytest.raises(ValueError, match=r"positions must have shape \[B,T\]"):
        K.rope_cos_sin(jnp.zeros((4,), jnp.int32), np.ones(32, np.float32))
    with pytest.raises(ValueError, match=r"rotary dim R = cos.shape\[-1\] must be even and in \(0, H = 64\], got 7"):
        K.apply_rope(jnp.zeros((1, 2, 1, 64)), jnp.zeros((1, 2, 7)), jnp.zeros((1, 2, 7)))
    with pytest.raises(ValueError, match=r"layout must be one of \['half', 'interleaved'\], got 'gptj'"):
        K.apply_rope(jnp.zeros((1, 2, 1, 64)), jnp.zeros((1, 2, 64)), jnp.zeros((1, 2, 64)), layout="gptj")
    with pytest.raises(ValueError, match=r"scaling says rope_type 'yarn' but rope_type='default'"):
        K.rope_frequencies(64, theta=1e4, scaling={"rope_type": "yarn"})
    assert math.isfinite(K.rope_frequencies(64, theta=1e4)[1])


test_float32_gradient_within_budget = float32_gradient_test(H, kernel)
test_low_precision_gradient_within_budget = low_precision_gradient_test(H, kernel)


def test_pallas_off_a_gpu_is_a_valueerror_naming_the_way_out():
    """implementation='pallas' asked for by name: on a GPU it runs (bit-identical to the XLA
    path); elsewhere our ValueError naming the GPU, 'xla' and interpret=True."""
    import jax

    x, t = jnp.ones((1, 2, 3, 64), jnp.bfloat16), jnp.ones((1, 2, 64), jnp.bfloat16)
    want = np.asarray(K.apply_rope(x, t, t, implementation="xla"))
    np.testing.assert_array_equal(np.asarray(K.apply_rope(x, t, t)), want)  # None: never refused
    if jax.default_backend() == "gpu":
        np.testing.assert_array_equal(np.asarray(K.apply_rope(x, t, t, implementation="pallas")), want)
        return
    with pytest.raises(ValueError, match=r"apply_rope: implementation='pallas' needs a CUDA GPU .*interpret=True"):
        K.apply_rope(x, t, t, implementation="pallas")
