"""projection (linear, o_proj, lm_head): parity, accuracy, argmax; the oracles against torch's
nn.Linear and a Qwen2ForCausalLM's own lm_head; exact linearity; bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.linear_mosaic import mosaic_linear
from kernels.projection import linear as k_linear
from kernels.projection import lm_head as k_lm_head
from oracles.arrays import TORCH_DTYPES, to_torch
from oracles.compare import judge_parity, require
from oracles.projection import RECIPES, _inputs
from oracles.projection import linear as o_linear
from oracles.projection import lm_head as o_lm_head
from oracles.registry import Case, active_kernel, backend, check_case, check_gradient, harness, jitted
from tests.gradients import float32_gradient_test, low_precision_gradient_test
from tests.strategies import DTYPES

H = harness("projection")
kernel = active_kernel("projection")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_kernel_within_budget(tolerances, dtype, recipe, data):
    """Parity, accuracy, finiteness (f16 outputs up to 2 x 65504), dtype and shape; lm_head argmax."""
    case = data.draw(H.cases(dtype=dtype, recipe=recipe), label="case")
    check_case(case, tolerances, kernel=kernel)


MOSAIC = H.implementations["mosaic"]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", MOSAIC.dtypes)
@given(data=st.data())
def test_mosaic_within_budget(tolerances, dtype, recipe, data):
    """implementation="mosaic" (the Hopper GEMM rounding in its epilogue, or writing its
    float32 sum for float32 logits) against the oracle and the float64 truth under its own
    budget (implementations.mosaic), on the shapes it tiles, for linear and lm_head (both
    weight layouts). Off a GPU the same cases must be refused, naming the Hopper GPU: its
    case strategy draws nothing else it cannot take."""
    case = data.draw(H.cases(dtype=dtype, recipe=recipe, **MOSAIC.case_opts), label="case")
    if backend() == "gpu":
        check_case(case, tolerances, implementation="mosaic")
        return
    inp = _inputs(case)
    with pytest.raises(ValueError, match=r"implementation='mosaic' needs a Hopper GPU \(compute capability 9\.x; "):
        MOSAIC.kernel(inp["x"], inp["w"], inp.get("b"), **case.kwargs)


def _bias_after_rounding(acc, bias, dt):
    """A mutant of kernels.linear_mosaic._epilogue: the bias added after a first rounding
    (torch's order is the other way round; it moves ~25% of bf16 outputs by an ulp)."""
    r = acc.astype(dt).astype(jnp.float32)  # the extra rounding
    return (r if bias is None else r + bias).astype(dt)


def _logits_through_bf16(acc, bias, dt):
    """A mutant of kernels.linear_mosaic._epilogue: float32 logits that went through bf16 on
    the way out (a model-dtype staging tile in a float32 head)."""
    r = acc.astype(jnp.bfloat16).astype(jnp.float32)  # the extra rounding
    return (r if bias is None else r + bias).astype(dt)


def _real_passes_mutant_fails(case, tolerances, monkeypatch, mutant):
    """On a GPU: the mosaic kernel passes ``case`` under its budget, and fails parity with its
    epilogue replaced by ``mutant``."""
    import kernels.linear_mosaic as lm

    check_case(case, tolerances, implementation="mosaic")  # the real kernel passes
    jax.clear_caches()  # the mutant must be traced anew, not served from the jit caches
    monkeypatch.setattr(lm, "_epilogue", mutant)
    with pytest.raises(AssertionError, match="parity"):
        check_case(case, tolerances, implementation="mosaic")
    jax.clear_caches()


def _head_case():
    """A float32-logits lm_head case that the mosaic GEMM tiles (V = 4864: 128 x 128 blocks)."""
    return Case(op="projection", dtype="bfloat16", shapes={"x": (256, 896), "w": (4864, 896)},
                kwargs={"recipe": "lm_head_f32", "w_layout": "VD"},
                data={"x": {"seed": 6, "log10_scale": [0, 0], "outliers": 0, "outlier_mult": 20.0,
                            "tiny_rows": False, "special": "none"}, "w_std": "init", "b_scale": 0.1,
                      "fp16_headroom": 0.9})


def test_mosaic_budget_catches_float32_logits_through_bf16(tolerances, monkeypatch):
    """The mosaic budget for float32 logits can fail: the epilogue mutated to round the sum
    to bf16 before writing it as float32 breaches it on a GPU. Off a GPU, the mutant is
    checked to move this case's exact float32 sums far past that budget."""
    import kernels.linear_mosaic as lm

    case = _head_case()
    if backend() == "gpu":
        _real_passes_mutant_fails(case, tolerances, monkeypatch, _logits_through_bf16)
        return
    inp = _inputs(case)
    h, w = (np.asarray(inp[k], np.float64) for k in ("x", "w"))
    acc = jnp.asarray(h @ w.T, jnp.float32)  # [rows, V]: the float32 sums, to 1 rounding
    real = np.asarray(lm._epilogue(acc, None, jnp.float32), np.float64)
    mutant = np.asarray(_logits_through_bf16(acc, None, jnp.float32), np.float64)
    budget = tolerances.lookup("projection", "bfloat16", "gpu", "lm_head_f32", implementation="mosaic")
    ulp = np.spacing(np.abs(np.asarray(acc, np.float32))).astype(np.float64)  # [rows, V] one f32 ulp each
    assert np.array_equal(real, np.asarray(acc, np.float64)), "float32 logits are the sum itself, unrounded"
    assert np.max(np.abs(mutant - real) / ulp) > 100 * budget.parity.max_ulps, "the mutant must breach the budget"


def test_mosaic_budget_catches_the_bias_added_after_rounding(tolerances, monkeypatch):
    """The mosaic budget can fail: the kernel with its epilogue mutated (the bias added after
    a first rounding) breaches it on a GPU. Off a GPU, where the kernel cannot run, the
    mutant is checked to be a real change of the epilogue: on this case's exact float32
    accumulator it moves outputs that the real epilogue leaves on the oracle's bits."""
    import kernels.linear_mosaic as lm

    case = Case(op="projection", dtype="bfloat16", shapes={"x": (128, 896), "w": (896, 896), "b": (896,)},
                kwargs={"recipe": "linear", "w_layout": "DV"},
                data={"x": {"seed": 5, "log10_scale": [0, 0], "outliers": 0, "outlier_mult": 20.0, "tiny_rows": False,
                            "special": "none"}, "w_std": "fan_in",
                      "b_scale": 3.0, "fp16_headroom": 0.9})
    if backend() == "gpu":
        _real_passes_mutant_fails(case, tolerances, monkeypatch, _bias_after_rounding)
        return
    inp = _inputs(case)
    x, w, b = (np.asarray(inp[k], np.float64) for k in ("x", "w", "b"))
    acc = jnp.asarray(x @ w, jnp.float32)  # the sum a float32 accumulator holds, to 1 f32 rounding
    bias = jnp.broadcast_to(jnp.asarray(b, jnp.float32), acc.shape)
    oracle = o_linear(to_torch(inp["x"]), to_torch(inp["w"]), to_torch(inp["b"])).float().numpy()
    real = np.asarray(lm._epilogue(acc, bias, jnp.bfloat16).astype(jnp.float32))
    mutant = np.asarray(_bias_after_rounding(acc, bias, jnp.bfloat16).astype(jnp.float32))
    assert np.mean(real != oracle) < 0.01, "the real epilogue on an exact accumulator is the oracle's recipe"
    assert np.mean(mutant != oracle) > 0.1, "the mutant must move a budget-visible share of outputs"


@given(case=H.cases(recipe="linear"))
def test_linear_oracle_equals_torch_nn_linear_bit_for_bit(case):
    """The oracle is torch.nn.Linear (bias fused before the rounding), 2-D and 3-D inputs."""
    inp = _inputs(case)
    x, w = to_torch(inp["x"]), to_torch(inp["w"])
    b = to_torch(inp["b"]) if "b" in inp else None
    i, o = w.shape
    m = torch.nn.Linear(i, o, bias=b is not None, dtype=x.dtype)
    with torch.no_grad():
        m.weight.copy_(w.t())  # nn.Linear holds [out, in]
        if b is not None:
            m.bias.copy_(b)
        ref = m(x)
    got = o_linear(x, w, b)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got.nan_to_num(7.0), ref.nan_to_num(7.0)), case.reproducer()


@pytest.mark.parametrize("w_layout", ["VD", "DV"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lm_head_and_embedding_oracles_equal_qwen2_model_bit_for_bit(dtype, tied, w_layout):
    """A real Qwen2ForCausalLM's lm_head (and embed_tokens): the oracle reproduces its logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(cfg).to(TORCH_DTYPES[dtype]).eval()
    head = model.get_output_embeddings().weight  # [V, D]
    table = model.get_input_embeddings().weight  # [V, D]
    assert (head.data_ptr() == table.data_ptr()) == tied
    h = torch.randn(2, 5, 64).mul(3).to(TORCH_DTYPES[dtype])
    ids = torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        ref = model.lm_head(h)
        emb = model.model.embed_tokens(ids)
    w = head if w_layout == "VD" else head.t()  # [V, D] as torch holds it; or the kernels' [D, V]
    got = o_lm_head(h, w.detach(), w_layout=w_layout)
    assert got.dtype == ref.dtype and torch.equal(got, ref)
    assert torch.equal(emb, torch.nn.functional.embedding(ids, table.detach()))


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_linear_is_exactly_homogeneous_in_powers_of_two(dtype, data):
    """linear(2^k x, w, 2^k b) == 2^k linear(x, w, b) bit for bit: scaling by a power of two
    commutes with every float32 product, sum and the rounding (away from overflow/subnormals)."""
    case = data.draw(H.cases(dtype=dtype, recipe="linear"), label="case")
    k = data.draw(st.sampled_from([-1, 1, 3]), label="k")
    inp = _inputs(case)
    inp["x"] = np.nan_to_num(inp["x"], nan=0.0, posinf=0.0, neginf=0.0)  # specials: no element to compare
    s = np.float32(2.0 ** k)
    with np.errstate(over="ignore"):  # float16 x * 8 may overflow: those rows are left out below
        x2 = (inp["x"].astype(np.float32) * s).astype(inp["x"].dtype)
    b2 = None if "b" not in inp else (inp["b"].astype(np.float32) * s).astype(inp["b"].dtype)
    f = jitted(kernel, **case.kwargs)
    a = np.asarray(f(x2, inp["w"], b2).astype(jnp.float32)).astype(np.float64)
    ref = np.asarray(f(inp["x"], inp["w"], inp.get("b")).astype(jnp.float32)).astype(np.float64) * s
    tiny = 4 * float(jnp.finfo(jnp.dtype(dtype)).tiny) * max(1.0, float(s))
    x64 = inp["x"].astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf * s - inf * s
        row_exact = ((x2.astype(np.float64) == x64 * s) | np.isnan(x64)).all(-1, keepdims=True)  # [..., 1]
    comparable = row_exact & np.isfinite(a) & np.isfinite(ref) & (np.abs(ref) >= tiny)
    assert comparable.any() or dtype == "float16", "no comparable element: the property checked nothing"
    np.testing.assert_array_equal(a[comparable], ref[comparable], err_msg=case.reproducer())


def test_lm_head_vd_contracts_the_weight_in_place():
    """A [V, D] head (w_layout="VD": HF's layout, a tied table) is read as it is: no transpose
    in the traced program, and the model-dtype logits equal the [D, V] head on the
    transposed copy bit for bit. (Float32
    logits are summed in chunks on CPU, in a form per layout -- kernels/_dot.py -- so the
    two agree to float32 rounding only; each is held to the oracle by the budget test.)"""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
    table = jnp.asarray(rng.standard_normal((1000, 64)) * 0.05, jnp.bfloat16)  # [V, D]
    jaxpr = jax.make_jaxpr(lambda a, t: k_lm_head(a, t, w_layout="VD"))(h, table)
    prims = [e.primitive.name for e in _all_eqns(jaxpr.jaxpr)]  # the CPU and GPU branches alike
    assert "transpose" not in prims and "dot_general" in prims, prims
    vd = jitted(kernel, recipe="lm_head", w_layout="VD")(h, table)
    dv = k_lm_head(h, table.T)
    np.testing.assert_array_equal(np.asarray(vd.astype(jnp.float32)), np.asarray(dv.astype(jnp.float32)))


@pytest.mark.parametrize("k, n", [(64, 4864), (896, 2048), (1152, 256), (4864, 896), (18944, 64)])
@pytest.mark.parametrize("layout", ["row", "row-table", "rows"], ids=["1-row-w[K,N]", "1-row-table[N,K]", "6-rows"])
def test_float16_rows_sum_in_torch_order(k, n, layout):
    """Few float16 rows: kernels/_dot.py's CPU branches for them equal torch's nn.Linear bit
    for bit (one row: 64 lanes; 2-8 rows: blocks of 512 or 1024 terms on a host with a
    native float16 ISA, the lanes elsewhere, kernels._dot.host_has_avx512_fp16; XLA's own matmul
    differs on up to 0.7% of these outputs). The branches are called directly, so the
    property is the same on any backend."""
    from kernels._dot import _f16_row, _f16_rows

    rng = np.random.default_rng(k + n)
    x = rng.standard_normal((6 if layout == "rows" else 1, k)).astype(np.float16)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float16)  # [K, N]
    ref = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w).t().contiguous()).numpy()
    if layout == "rows":
        got = jax.jit(lambda a, b: _f16_rows(a, b).astype(jnp.float16))(x, w)
    else:
        tied = layout == "row-table"
        wk = np.ascontiguousarray(w.T) if tied else w  # [N, K] or [K, N]
        got = jax.jit(lambda a, b: _f16_row(a, b, w_contract=int(tied)).astype(jnp.float16))(x, wk)
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_float32_matmuls_ask_for_full_precision():
    """Every float32 dot is traced with precision HIGHEST: never TF32 on a GPU (2.9e-4 relative
    error on an H100, against torch's 5.7e-7)."""
    x, w = jnp.zeros((2, 64), jnp.float32), jnp.zeros((64, 32), jnp.float32)
    for fn in (lambda: k_linear(x, w), lambda: k_lm_head(x, w), lambda: k_lm_head(x, w, logits_dtype="float32")):
        # Both branches of the platform switch (the CPU's chunked sum and the plain matmul).
        dots = [e for e in _all_eqns(jax.make_jaxpr(fn)().jaxpr) if e.primitive.name == "dot_general"]
        assert len(dots) >= 2 and all(e.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for e in dots)


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (cond branches, pjit) included."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def test_lm_head_f32_logits_are_float32_and_unrounded():
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((64, 500)) * 0.1, jnp.bfloat16)
    out = jitted(kernel, recipe="lm_head_f32", w_layout="DV")(h, w)
    assert out.dtype == jnp.float32
    f32 = np.asarray(out)
    assert np.any(f32 != f32.astype(jnp.bfloat16).astype(np.float32)), "f32 logits that are all bf16 values"


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda: k_linear(jnp.zeros((2, 64)), jnp.zeros((32, 8))), r"w must have shape \[I, O\] with I = 64.*got \(32, 8\)"),
        (lambda: k_linear(jnp.zeros((2, 64)), jnp.zeros((64, 8)), jnp.zeros((9,))), r"b must have shape \[O\] = \(8,\), got \(9,\)"),
        (lambda: k_linear(jnp.zeros((2, 64), jnp.bfloat16), jnp.zeros((64, 8))), r"w must have the dtype of x \(bfloat16\), got float32"),
        (lambda: k_linear(jnp.zeros((2, 64)), jnp.zeros((64, 8)), jnp.zeros((8,), jnp.float16)), r"b must have the dtype of x \(float32\), got float16"),
        (lambda: k_linear(jnp.zeros((2, 64), jnp.int32), jnp.zeros((64, 8))), r"x must have a floating dtype.*got int32"),
        (lambda: k_linear(jnp.zeros((2, 64)), jnp.zeros((64, 8)), precision="tf32"), r"precision must be one of"),
        (lambda: mosaic_linear(jnp.zeros((128, 64), jnp.bfloat16), jnp.zeros((64, 128), jnp.bfloat16), semantics="thread"), r"linear: semantics must be one of \['warpgroup', 'lane'\], got 'thread'"),
        (lambda: k_linear(jnp.zeros((2, 64)), jnp.zeros((64, 8)), implementation="cublas"), r"implementation must be one of \[None, 'xla', 'mosaic', 'pallas'\], got 'cublas'"),
        (lambda: k_linear(jnp.zeros((128, 64), jnp.bfloat16), jnp.zeros((64, 128), jnp.bfloat16), precision="default", implementation="mosaic"), r"precision='default' applies to implementation='xla'"),
        (lambda: k_lm_head(jnp.zeros((2, 64)), jnp.zeros((100, 64))), r"w must have shape \[D, V\] \(w_layout='DV'\) with D = 64.*got \(100, 64\)"),
        (lambda: k_lm_head(jnp.zeros((2, 64)), jnp.zeros((64, 100)), w_layout="VD"), r"w must have shape \[V, D\] \(w_layout='VD'\) with D = 64.*got \(64, 100\)"),
        (lambda: k_lm_head(jnp.zeros((2, 64)), jnp.zeros((64, 100)), w_layout="vd"), r"w_layout must be one of \['DV', 'VD'\], got 'vd'"),
        (lambda: k_lm_head(jnp.zeros((2, 64)), jnp.zeros((64, 100)), logits_dtype="bfloat16"), r"logits_dtype must be one of \[None, 'float32'\], got 'bfloat16'"),
        (lambda: k_lm_head(jnp.zeros((2, 64)), jnp.zeros((64, 100)), implementation="cublas"), r"lm_head: implementation must be one of \[None, 'xla', 'mosaic', 'pallas'\], got 'cublas'"),
    ],
)
def test_bad_input_raises_value_error(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


@pytest.mark.parametrize("x_shape, w_shape, dtype, named", [
    ((128, 64), (64, 128), jnp.float32, r"bfloat16/float16 inputs \(got float32; float32 stays on XLA"),
    ((100, 64), (64, 128), jnp.bfloat16, r"K % 64 == 0 and \[rows, N\] divisible by one of the blocks .* \(got rows = 100, K = 64, N = 128\)"),
    ((2, 64, 96), (96, 256), jnp.float16, r"K % 64 == 0 .* \(got rows = 128, K = 96, N = 256\)"),
])
def test_mosaic_refuses_what_it_cannot_take(x_shape, w_shape, dtype, named):
    """implementation='mosaic' never falls back silently: off a Hopper GPU it names the GPU;
    on one, the dtype or the shape it cannot tile."""
    x, w = jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, dtype)
    if backend() != "gpu":
        named = r"a Hopper GPU \(compute capability 9\.x; JAX's default device is 'cpu'\)"
    with pytest.raises(ValueError, match=r"linear: implementation='mosaic' needs " + named):
        k_linear(x, w, implementation="mosaic")


@pytest.mark.parametrize("h_shape, w_shape, w_layout, logits, dtype, named", [
    ((128, 64), (4864, 64), "VD", "float32", jnp.float32, r"bfloat16/float16 inputs \(got float32"),
    ((100, 64), (64, 4864), "DV", None, jnp.bfloat16, r"K % 64 == 0 .* \(got rows = 100, K = 64, N = 4864\)"),
    ((128, 96), (1000, 96), "VD", "float32", jnp.float16, r"K % 64 == 0 .* \(got rows = 128, K = 96, N = 1000\)"),
])
def test_mosaic_lm_head_refuses_what_it_cannot_take(h_shape, w_shape, w_layout, logits, dtype, named):
    """lm_head(implementation='mosaic') names what it lacks, with lm_head's name, and never
    falls back; off a Hopper GPU it names the GPU."""
    h, w = jnp.zeros(h_shape, dtype), jnp.zeros(w_shape, dtype)
    if backend() != "gpu":
        named = r"a Hopper GPU \(compute capability 9\.x; JAX's default device is 'cpu'\)"
    with pytest.raises(ValueError, match=r"lm_head: implementation='mosaic' needs " + named):
        k_lm_head(h, w, logits_dtype=logits, w_layout=w_layout, implementation="mosaic")


@pytest.mark.parametrize("logits_dtype, w_layout, takes_mosaic", [
    (None, "VD", "NK"), (None, "DV", "KN"), ("float32", "VD", None), ("float32", "DV", None)])
def test_lm_head_default_implementation(monkeypatch, logits_dtype, w_layout, takes_mosaic):
    """implementation=None on a Hopper GPU: model-dtype logits go to the mosaic GEMM (with the
    weight's layout named as the GEMM names it), float32 logits stay on XLA's GEMM, the faster
    there (kernels.projection.lm_head says why). Checked here with the GPU's answer stubbed."""
    import kernels.linear_mosaic as lm

    calls = []
    monkeypatch.setattr(lm, "why_not", lambda *a, **k: "")  # as on a Hopper GPU, for a shape that tiles
    monkeypatch.setattr(lm, "mosaic_linear", lambda h, w, **kw: calls.append(kw) or "mosaic")
    h = jnp.ones((128, 64), jnp.bfloat16)
    w = jnp.ones((256, 64) if w_layout == "VD" else (64, 256), jnp.bfloat16)
    out = k_lm_head(h, w, logits_dtype=logits_dtype, w_layout=w_layout)
    if takes_mosaic is None:
        assert calls == [] and out.shape == (128, 256) and out.dtype == jnp.float32
    else:
        assert out == "mosaic" and calls == [{"w_layout": takes_mosaic, "out_dtype": None, "op": "lm_head"}]


def test_mosaic_is_not_run_on_a_gpu_that_is_not_hopper(tolerances, monkeypatch):
    """On a GPU without wgmma (an A100, say) the mosaic GEMM's budget rows say "not run"
    and name the Hopper GPU, rather than running a kernel that cannot compile there and
    failing; on a Hopper GPU the same question has no answer ("")."""
    import kernels.linear_mosaic as lm
    import oracles.registry as registry
    from oracles.sweep import sweep

    monkeypatch.setattr(registry, "backend", lambda: "gpu")  # as if JAX ran on a GPU ...
    monkeypatch.setattr(lm, "hopper", lambda: False)  # ... that is not a Hopper
    why = MOSAIC.why_not("gpu", "bfloat16")
    assert why == "needs a Hopper GPU (compute capability 9.x)"
    (row,) = sweep("projection", "bfloat16", examples=3, seed=0, tolerances=tolerances, backend="gpu",
                   implementation="mosaic").values()
    assert row.not_run == why and row.examples == 0
    assert MOSAIC.why_not("cpu", "bfloat16") == "gpu only, needs a Hopper GPU"  # not asked off its backend
    monkeypatch.setattr(lm, "hopper", lambda: True)
    assert MOSAIC.why_not("gpu", "bfloat16") == ""


test_float32_gradient_within_budget = float32_gradient_test(H, kernel)
test_low_precision_gradient_within_budget = low_precision_gradient_test(H, kernel)

# A 4-row lm_head over V = 4096: reverse mode's grad(x) = c @ w sums over all V outputs.
FEW_ROW_HEAD = Case.from_json(
    '{"data": {"b_scale": 3.0, "fp16_headroom": 0.9, "w_std": "fan_in", "x": {"log10_scale": [-1, 4], '
    '"outlier_mult": 74.57143482542259, "outliers": 3, "seed": 8105, "special": "none", "tiny_rows": true}}, '
    '"dtype": "float32", "kwargs": {"recipe": "lm_head", "w_layout": "VD"}, "op": "projection", '
    '"shapes": {"w": [4096, 896], "x": [4, 896]}}')


def test_few_row_gradient_sums_the_outputs_in_chunks(tolerances):
    """grad(x) of a few-row float32 projection is a sum over its N outputs, which XLA's CPU
    backend, under jit, adds sequentially when left to transpose the forward's split matmul:
    12.3x torch's error here on an AVX2 host (session 20; budget 15 then). kernels._dot's
    derivative splits that sum into chunks as the forward splits K: 0.40x. (On an AVX-512
    host the old derivative stays under the budget on this case; the property test's draws
    kill it there, ``parity mutants``: projection:grad_summed_sequentially.)"""
    check_gradient(FEW_ROW_HEAD, tolerances, kernel=kernel)


@pytest.mark.parametrize("w_layout", ["DV", "VD"])
def test_forward_mode_through_the_split_matmul(tolerances, w_layout):
    """jax.jvp through a few-row float32 projection (on the CPU, the split path with its own
    derivative in kernels._dot): the tangent, the map applied to the tangent, is within the
    op's accuracy budget of the float64 truth beside torch's float32 product. On the CPU the
    value is also the plain call's, bit for bit, and so is the tangent for a [V, D] head
    (whose forward takes the same fused form; a [D, V] weight's forward is a batched matmul,
    ordered by XLA). Not on a GPU: XLA may merge the value's and the tangent's matmuls into
    one GEMM there, which cuBLAS may sum in another order."""
    from oracles.compare import judge_accuracy

    rng = np.random.default_rng(3)
    x, t = (rng.standard_normal((3, 896)).astype(np.float32) for _ in range(2))
    w = (rng.standard_normal((896, 1024) if w_layout == "DV" else (1024, 896)) * 0.03).astype(np.float32)
    f = jax.jit(lambda x: k_lm_head(x, w, logits_dtype="float32", w_layout=w_layout))
    y, ty = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, t)
    wd = w if w_layout == "DV" else w.T  # [D, V]
    truth = t.astype(np.float64) @ wd.astype(np.float64)
    ref = (torch.from_numpy(t) @ torch.from_numpy(np.ascontiguousarray(wd))).double().numpy()
    budget = tolerances.lookup("projection", "float32", backend(), "lm_head_f32").accuracy
    judgment = judge_accuracy(np.asarray(ty, np.float64), ref, truth, dtype="float32", budget=budget)
    assert judgment.ok, judgment
    if backend() == "cpu":
        np.testing.assert_array_equal(np.asarray(y), np.asarray(f(x)))
        if w_layout == "VD":
            np.testing.assert_array_equal(np.asarray(ty), np.asarray(f(t)))


def _gradient_is_the_xla_paths(recipe, implementation, args, refused):
    """jax.vjp through ``implementation`` equals the XLA path's, to the bit, for x, w and the
    bias, on the GPU; elsewhere the call raises ValueError matching ``refused``."""
    from oracles.gradients import seeded_vjp
    from oracles.projection import drive

    layout = "DV" if recipe == "linear" else "VD"

    def run(impl):
        return lambda x, w, b=None: drive(x, w, b, recipe=recipe, w_layout=layout, implementation=impl)

    if backend() != "gpu":
        with pytest.raises(ValueError, match=refused):
            run(implementation)(*args)
        return
    got, want = seeded_vjp(run(implementation), *args), seeded_vjp(run("xla"), *args)
    for name, g, r in zip(("x", "w", "b"), got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32), err_msg=f"{recipe}: d{name}")


@pytest.mark.parametrize("recipe", RECIPES)
def test_mosaic_gradient_is_the_xla_paths(recipe):
    """On a Hopper GPU, where the mosaic GEMM is the default for bf16/f16 projections: jax.vjp
    through it is the XLA path's, to the bit, for x, w and the bias (kernels._grad; a pallas_call
    has no transpose rule). Elsewhere the call is refused, naming the Hopper GPU."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((256, 896)), jnp.bfloat16)
    layout = "DV" if recipe == "linear" else "VD"
    w = jnp.asarray(rng.standard_normal((896, 1024) if layout == "DV" else (1024, 896)) * 0.03, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(1024), jnp.bfloat16) if recipe == "linear" else None
    args = (x, w) if b is None else (x, w, b)
    _gradient_is_the_xla_paths(recipe, "mosaic", args, r"implementation='mosaic' needs a Hopper GPU")


def test_logits_dtype_takes_any_dtype_like():
    """logits_dtype=jnp.float32 / np.float32 / np.dtype mean "float32"; anything else is refused by name."""
    from kernels.projection import lm_head as k_lm_head

    rng = np.random.default_rng(7)
    h = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((64, 10)), jnp.bfloat16)
    want = np.asarray(k_lm_head(h, w, logits_dtype="float32", implementation="xla"))
    for spelling in (jnp.float32, np.float32, np.dtype("float32")):
        got = k_lm_head(h, w, logits_dtype=spelling, implementation="xla")
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match=r"logits_dtype must be one of \[None, 'float32'\], got 'bfloat16'"):
        k_lm_head(h, w, logits_dtype=jnp.bfloat16)


# --- the Pallas GEMV (kernels.linear_pallas): a decode step's few rows -------------------------

# (rows, K, N, w_layout, bias, out_dtype, splits): both layouts, 1 / 3 / 8 rows, K and N not multiples
# of the blocks (masked tails), K split in 3 (float32 partials added after the kernel), float32 logits.
GEMV_CASES = [(1, 3584, 512, "KN", True, None, None), (3, 200, 72, "KN", True, None, 3), (8, 96, 130, "KN", False, None, 1),
              (1, 896, 300, "NK", False, None, None), (2, 130, 96, "NK", False, "float32", 2),
              (1, 100, 1000, "NK", False, "float32", None)]


def _gemv_inputs(rows, k, n, w_layout, bias, dtype, seed=7):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((rows, k)) * 10.0 ** rng.uniform(-1, 1, (rows, 1)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n) if w_layout == "KN" else (n, k)) / np.sqrt(k), dtype)
    b = jnp.asarray(rng.standard_normal(n) * 3, dtype) if bias else None
    return x, w, b


def _gemv_vs_xla(tolerances, dtype, case, **kw):
    """The Pallas GEMV (compiled on a GPU, interpret mode elsewhere: the same kernel program)
    against the XLA path of its op, held to that op's budget on the GPU, where the GEMV runs:
    parity with the XLA path's outputs, and accuracy against the float64 truth beside the XLA
    path's own error. (The CPU budgets hold the XLA path to torch's CPU summation order, bit
    for bit in float16, which a GPU kernel's order has no reason to meet.)"""
    from kernels.linear_pallas import pallas_linear
    from oracles.compare import judge_accuracy

    rows, k, n, layout, bias, out_dtype, splits = case
    x, w, b = _gemv_inputs(rows, k, n, layout, bias, dtype)
    if layout == "KN":
        recipe, ref = "linear", k_linear(x, w, b, implementation="xla")
    else:
        recipe = "lm_head_f32" if out_dtype else "lm_head"
        ref = k_lm_head(x, w, w_layout="VD", logits_dtype=out_dtype, implementation="xla")
    got = pallas_linear(x, w, b, w_layout=layout, out_dtype=out_dtype, splits=splits,
                        interpret=backend() != "gpu", op="linear" if layout == "KN" else "lm_head", **kw)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    wk = np.asarray(w, np.float64) if layout == "KN" else np.asarray(w, np.float64).T  # [K, N]
    truth = np.asarray(x, np.float64) @ wk + (0.0 if b is None else np.asarray(b, np.float64))
    budget = tolerances.lookup("projection", dtype, "gpu", recipe)
    out_dt = jnp.dtype(ref.dtype).name
    g, r = np.asarray(got.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
    # Float32 outputs are two float32 sums in different orders: they part by many ulps where
    # terms cancel (measured in interpret mode, whose lane sum is XLA's sequential reduce: 768
    # ulps on one output of a 1 x 896 x 300 float32 head), so they are held to accuracy alone.
    js = [judge_accuracy(g, r, truth, dtype=out_dt, budget=budget.accuracy)]
    if out_dt != "float32":
        js.append(judge_parity(g, r, dtype=out_dt, budget=budget.parity))
    require(js,
            header=f"pallas GEMV vs xla {recipe} [{dtype}, {case}] ({budget.key_path}): ", reproducer="")


@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_pallas_gemv_within_budget_of_xla_path(tolerances, dtype, case):
    """kernels.linear_pallas (the GPU default for a decode step's long-K, narrow-N projections)
    against the XLA path, held to the op's own GPU budget: the recipe is the same (float32
    products and sums, the bias in float32, one rounding), only the float32 summation order
    differs (block_k lanes, then splits)."""
    _gemv_vs_xla(tolerances, dtype, case)


@pytest.mark.parametrize("mutant", ["bias_dropped", "last_k_step_dropped"])
def test_pallas_gemv_budget_catches_a_mutant(tolerances, monkeypatch, mutant):
    """The test above can fail: with the epilogue's bias left out, or with each split's last K
    step dropped, the kernel is outside the budget."""
    import kernels.linear_pallas as lp

    if mutant == "bias_dropped":
        monkeypatch.setattr(lp, "_epilogue", lambda y, bias, dt: y.astype(dt))
    else:
        real = lp._kernel
        monkeypatch.setattr(lp, "_kernel", lambda *refs, k_steps, **kw: real(*refs, k_steps=k_steps - 1, **kw))
    jax.clear_caches()  # the jitted _call must trace the mutant
    try:
        with pytest.raises(AssertionError, match="pallas GEMV vs xla linear"):
            _gemv_vs_xla(tolerances, "bfloat16", GEMV_CASES[1])
    finally:
        jax.clear_caches()


def test_pallas_preferred_takes_long_k_narrow_n():
    """linear's GPU default takes the GEMV where XLA's one-pass column reduction was measured
    slow (the 7B q/k/v/o of a decode step), not where XLA was as fast (wide N, a K XLA splits
    itself, the 0.5B's short K), not beyond 8 rows, and never for float32."""
    from kernels.projection import pallas_preferred

    bf16 = jnp.bfloat16
    assert pallas_preferred((1, 1, 3584), (3584, 3584), bf16)  # 7B q/o
    assert pallas_preferred((8, 3584), (3584, 512), jnp.float16)  # 7B k/v, a batch of 8
    assert not pallas_preferred((9, 3584), (3584, 512), bf16)  # a GEMM's rows
    assert not pallas_preferred((1, 3584), (3584, 18944), bf16)  # 7B gate/up: XLA as fast
    assert not pallas_preferred((1, 18944), (18944, 3584), bf16)  # 7B down: XLA splits K itself
    assert not pallas_preferred((1, 4864), (4864, 896), bf16)  # 0.5B down: likewise
    assert not pallas_preferred((1, 896), (896, 896), bf16)  # 0.5B: launch-bound either way
    assert not pallas_preferred((1, 3584), (3584, 512), jnp.float32)  # float32 stays on XLA


def test_linear_default_traces_the_gemv_for_the_gpu_only():
    """implementation=None on a preferred shape: the GEMV is the CUDA branch of a
    platform_dependent (a pallas_call in the traced program), and off a GPU the XLA path runs,
    with its bits; a shape it does not prefer has no pallas_call at all."""
    x, w, b = _gemv_inputs(1, 2048, 256, "KN", True, jnp.bfloat16)
    assert "pallas_call" in str(jax.make_jaxpr(lambda x, w, b: k_linear(x, w, b))(x, w, b))
    x2, w2, _ = _gemv_inputs(1, 896, 256, "KN", False, jnp.bfloat16)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x, w: k_linear(x, w))(x2, w2))
    if backend() != "gpu":
        np.testing.assert_array_equal(np.asarray(k_linear(x, w, b), np.float32),
                                      np.asarray(k_linear(x, w, b, implementation="xla"), np.float32))


@pytest.mark.parametrize("recipe", ["linear", "lm_head"])
def test_pallas_gemv_gradient_is_the_xla_paths(recipe):
    """On a GPU: jax.vjp through implementation="pallas" is the XLA path's, to the bit
    (kernels._grad). Elsewhere the call is refused, naming the GPU and the way out."""
    x, w, b = _gemv_inputs(2, 2048, 384, "KN" if recipe == "linear" else "NK", recipe == "linear", jnp.bfloat16)
    args = (x, w) if b is None else (x, w, b)
    _gradient_is_the_xla_paths(recipe, "pallas", args,
                               rf"{recipe}: implementation='pallas' needs a CUDA GPU .*interpret=True")


def test_pallas_gemv_refuses_what_it_cannot_take():
    """Named ValueErrors, never a silent fallback: more than 8 rows, a tiling that is not a
    power of two, a weight that does not contract with x, a bias or weight of the wrong shape
    or dtype, a layout it does not know."""
    from kernels.linear_pallas import pallas_linear

    x, w, _ = _gemv_inputs(1, 64, 32, "KN", False, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"lm_head: implementation='pallas' needs at most 8 rows, a decode step's \(got 9"):
        pallas_linear(jnp.zeros((3, 3, 64), jnp.bfloat16), w, interpret=True, op="lm_head")
    with pytest.raises(ValueError, match=r"linear: block_n must be a power of two, got 48"):
        pallas_linear(x, w, block_n=48, interpret=True)
    with pytest.raises(ValueError, match=r"linear: splits must be an int >= 1, got 0"):
        pallas_linear(x, w, splits=0, interpret=True)
    with pytest.raises(ValueError, match=r"linear: w \(32, 64\) \(KN\) does not contract with x \(1, 64\)"):
        pallas_linear(x, w.T, interpret=True)
    with pytest.raises(ValueError, match=r"linear: b must be bfloat16 \(32,\) \(x's dtype\), got bfloat16 \(31,\)"):
        pallas_linear(x, w, jnp.zeros((31,), jnp.bfloat16), interpret=True)
    with pytest.raises(ValueError, match=r"linear: w must be bfloat16 \(64, 32\) \(x's dtype\), got float32"):
        pallas_linear(x, w.astype(jnp.float32), interpret=True)
    with pytest.raises(ValueError, match=r"linear: w_layout must be one of \['KN', 'NK'\], got 'DV'"):
        pallas_linear(x, w, w_layout="DV", interpret=True)
    with pytest.raises(ValueError, match=r"linear: precision='default' applies to implementation='xla' \(the pallas"):
        k_linear(x, w, precision="default", implementation="pallas")
