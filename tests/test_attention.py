"""gqa_attention: parity, accuracy and exact properties; the oracle against transformers' eager attention."""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import masking_utils as mu
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward as qwen2_eager

from oracles.arrays import to_torch
from oracles.attention import RECIPES, _inputs, _torch_masks, pallas_flash, visibility
from oracles.attention import gqa_attention as oracle
from oracles.compare import judge_parity, require
from oracles.registry import Case, active_kernel, backend, check_case, check_gradient, harness, jitted, not_hopper
from tests.gradients import float32_gradient_test, low_precision_gradient_test
from tests.strategies import DTYPES, HEAD_LAYOUTS, NP_DTYPES, round_to

H = harness("attention")
kernel = active_kernel("attention")
MASK_ARGS = ("q_positions", "kv_positions", "kv_valid", "segment_ids")
# The property tests compile two kernels per example: they take half the profile's examples.
PROPERTY = settings(max_examples=max(1, settings.default.max_examples // 2))


def _run(case, arrays=None, **override):
    """The kernel on a case's arrays (optionally replaced), as float32 numpy."""
    a = dict(_inputs(case) if arrays is None else arrays)
    kw = dict(case.kwargs, **override)
    out = jitted(kernel, **kw)(a["q"], a["k"], a["v"], **{m: a[m] for m in MASK_ARGS})
    return np.asarray(out.astype(jnp.float32))


def _vis(case, a):
    b, t = case.shapes["q"][:2]
    s = case.shapes["k"][1]
    kw = {k: case.kwargs[k] for k in ("causal", "sliding_window")}
    return visibility(b, t, s, **kw, **_torch_masks(a)).numpy()  # [B, T, S]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_kernel_within_budget(tolerances, dtype, recipe, data):
    """Parity vs the oracle, accuracy vs the float64 truth, finiteness, empty rows exactly 0."""
    case = data.draw(H.cases(dtype=dtype, recipe=recipe), label="case")
    check_case(case, tolerances, kernel=kernel)


# pallas_flash: interpreted Pallas kernels off the GPU (a compile of each case's kernels):
# a quarter of the profile's examples per dtype.
FLASH = settings(max_examples=max(1, settings.default.max_examples // 4))


@FLASH
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_pallas_flash_within_budget(tolerances, dtype, data):
    """implementation="pallas_flash" (flash numerics) against the fp32_logits oracle and the
    float64 truth, under its own budget (implementations.pallas_flash): every mask kind."""
    case = data.draw(H.cases(dtype=dtype, recipe="fp32_logits"), label="case")
    check_case(case, tolerances, implementation="pallas_flash")


CUDNN = H.implementations["cudnn"]
MOSAIC_FLASH = H.implementations["mosaic_flash"]


@pytest.mark.parametrize("dtype", CUDNN.dtypes)
@FLASH
@given(data=st.data())
def test_cudnn_within_budget(tolerances, dtype, data):
    """implementation="cudnn" (jax.nn's cuDNN flash kernel) against the fp32_logits oracle
    and the float64 truth under its own budget (implementations.cudnn), on the masks it
    honours. Off a GPU the same cases must be refused for the GPU alone: cuDNN's case
    strategy draws nothing else that it cannot honour."""
    case = data.draw(H.cases(dtype=dtype, **CUDNN.case_opts), label="case")
    if backend() == "gpu":
        check_case(case, tolerances, implementation="cudnn")
        return
    a = _inputs(case)
    with pytest.raises(ValueError, match=r"cannot honour: a CUDA GPU with cuDNN \(JAX's default backend is 'cpu'\)\."):
        CUDNN.kernel(a["q"], a["k"], a["v"], **case.kwargs, **{m: a[m] for m in MASK_ARGS})


def test_pallas_flash_budget_catches_a_missing_rescale(tolerances, monkeypatch):
    """The budget above can fail: a flash step that forgets to rescale the running PV sum
    when the row max grows (a classic flash-attention bug) breaches it."""
    import kernels.attention_pallas as kp

    def no_rescale(m, l, acc, s, v, dt, *, exact):
        m_new, l_new, acc_new = real(m, l, acc, s, v, dt, exact=exact)
        alpha = jnp.exp(m - jnp.where(m_new == -jnp.inf, 0.0, m_new))
        return m_new, l_new, acc_new - acc * alpha[:, None] + acc  # acc not rescaled by alpha

    real = kp._flash_step
    # G * T = 160 rows a kv head: the query-tiled kernel, 200 keys in 4 blocks (GPU) or 13 (CPU).
    case = Case(op="attention", dtype="bfloat16", shapes={"q": (1, 80, 4, 32), "k": (1, 200, 2, 32),
                                                          "v": (1, 200, 2, 32)},
                kwargs={"causal": True, "sliding_window": None, "softcap": None, "scale": None,
                        "recipe": "fp32_logits", "q_chunk": None},
                data={"seed": 3, "log10_score": [1, 1], "outliers": 0, "mask": "none", "segment_pair": False})
    check_case(case, tolerances, implementation="pallas_flash")  # the real kernel passes
    jax.clear_caches()  # the mutant must be traced anew, not served from the jit caches
    monkeypatch.setattr(kp, "_flash_step", no_rescale)
    try:
        with pytest.raises(AssertionError, match="parity"):
            check_case(case, tolerances, implementation="pallas_flash", kernel=functools.partial(pallas_flash))
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def _hf_mask_function(case, a, s, t):
    """The case's visibility as transformers' own mask functions (masking_utils)."""
    kw = case.kwargs
    fns = []
    if a["q_positions"] is not None or a["kv_positions"] is not None:
        tm = _torch_masks(a)
        qp = tm["q_positions"].long() if tm["q_positions"] is not None else None
        kp = tm["kv_positions"].long() if tm["kv_positions"] is not None else torch.arange(s).expand(qp.shape[0], s)
        # Explicit positions: index-based mask functions over the position tables
        # (q_idx runs over S - T + t, transformers' q_offset convention).
        if kw["causal"]:
            fns.append(lambda b, h, qi, ki: kp[b, ki] <= qp[b, qi - (s - t)])
        if kw["sliding_window"] is not None:
            w = kw["sliding_window"]
            fns.append(lambda b, h, qi, ki: kp[b, ki] > qp[b, qi - (s - t)] - w)
    elif kw["sliding_window"] is not None:
        fns.append(mu.sliding_window_causal_mask_function(kw["sliding_window"]))
    elif kw["causal"]:
        fns.append(mu.causal_mask_function)
    else:
        fns.append(mu.bidirectional_mask_function)
    seg = a["segment_ids"]
    if seg is not None:
        fns.append(mu.packed_sequence_mask_function(torch.from_numpy(seg[1] if isinstance(seg, tuple) else seg)))
    return fns[0] if len(fns) == 1 else mu.and_masks(*fns)


@given(case=H.cases(recipe="hf"))
def test_oracle_equals_transformers_eager_bit_for_bit(case):
    """Qwen2's (Gemma 2's with softcap) eager_attention_forward with an eager_mask from
    masking_utils equals the oracle bit for bit on every row with a visible key."""
    a = _inputs(case)
    q, k, v = to_torch(a["q"]), to_torch(a["k"]), to_torch(a["v"])
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    kw = dict(case.kwargs)
    kw.pop("q_chunk")
    kv_valid = None if a["kv_valid"] is None else torch.from_numpy(a["kv_valid"])
    mask = mu.eager_mask(batch_size=b, q_length=t, kv_length=s, q_offset=s - t,
                         mask_function=_hf_mask_function(case, a, s, t), attention_mask=kv_valid, dtype=q.dtype)
    module = types.SimpleNamespace(num_key_value_groups=n // kh, training=False, head_dim=h)
    scaling = h ** -0.5 if kw["scale"] is None else kw["scale"]
    qh, kh_, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, len, H], HF's layout
    if kw["softcap"] is None:
        ref, _ = qwen2_eager(module, qh, kh_, vh, mask, scaling)
    else:
        ref, _ = gemma2_eager(module, qh, kh_, vh, mask, scaling=scaling, softcap=kw["softcap"])
    got = oracle(q, k, v, **kw, **_torch_masks(a))
    rows = torch.from_numpy(_vis(case, a).any(-1))  # [B, T]: rows with a visible key
    assert torch.equal(mask[:, 0] == 0, torch.from_numpy(_vis(case, a))), "mask differs from transformers' " + case.reproducer()
    assert torch.equal(ref[rows], got[rows]), case.reproducer()


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_gqa_mapping_exact(layout):
    """Query head n reads kv head n // G: each kv head's values hold its own id.

    q = 0 and no causal mask make every probability exactly 1/S (S = 4), so the output
    is exactly the id of the kv head the query head reads, in every dtype.
    """
    n, kh, h = layout
    dt = DTYPES[HEAD_LAYOUTS.index(layout) % len(DTYPES)]
    rng = np.random.default_rng(0)
    b, s = 2, 4
    q = round_to(np.zeros((b, 3, n, h)), dt)
    k = round_to(rng.standard_normal((b, s, kh, h)), dt)
    ids = np.arange(1, kh + 1, dtype=np.float32)[None, None, :, None]  # [1, 1, K, 1]
    v = round_to(np.broadcast_to(ids, (b, s, kh, h)), dt)
    out = np.asarray(jitted(kernel, causal=False)(q, k, v).astype(jnp.float32))  # [B, T, N, H]
    want = np.broadcast_to((np.arange(n) // (n // kh) + 1)[None, None, :, None], out.shape)  # [B, T, N, H]
    np.testing.assert_array_equal(out, want, err_msg=f"layout {layout} {dt}")


@PROPERTY
@given(data=st.data())
def test_equals_mha_with_kv_repeated(tolerances, data):
    """GQA equals MHA on kv heads repeated [h0,h0,h1,h1], within the op's parity budget
    (XLA's dot may sum in another order for the [B,N,...] shape of MHA)."""
    case = data.draw(H.cases(), label="case")
    a = _inputs(case)
    g = case.shapes["q"][2] // case.shapes["k"][2]
    rep = dict(a, k=np.repeat(a["k"], g, axis=2), v=np.repeat(a["v"], g, axis=2))
    _require_same(tolerances, case, _run(case, a), _run(case, rep), what="GQA vs MHA", terms=_terms(case, a))


def _terms(case, a):
    """The parity term scale of the case's outputs (``max_s p_s |v_s|``, float64 truth)."""
    kw = {k: v for k, v in case.kwargs.items() if k != "q_chunk"}
    return oracle(to_torch(a["q"]), to_torch(a["k"]), to_torch(a["v"]), **kw, **_torch_masks(a), exact=True,
                  terms=True).numpy()


def _require_same(tolerances, case, got, want, *, what: str, terms=None):
    """Two kernel runs that must agree: bit for bit in bfloat16 on CPU; within the op's
    parity budget in float32/float16, where XLA's CPU dot may sum in another order for
    another shape (a T=1 matrix-vector product, a query block, MHA's [B,N,...] layout),
    and in every dtype on a GPU, where cuBLAS picks its kernel (and its summation
    order: split-K or not) by shape."""
    budget = tolerances.lookup("attention", case.dtype, backend(), case.recipe)
    if case.dtype == "bfloat16" and backend() == "cpu":
        np.testing.assert_array_equal(got, want, err_msg=f"{what}: {case.reproducer()}")
        return
    parity = budget.parity
    if backend() != "cpu":
        # Each layout agrees with the oracle within the op's budget (test_kernel_within_budget);
        # against each other only the distance is bounded: XLA GPU picks the score matmul's
        # algorithm per layout, and in bf16 "hf" a 1-ulp f32 difference flips score roundings
        # (an H100 decode draw: 27% of outputs 1 ulp apart).
        parity = dataclasses.replace(parity, mismatch_frac=1.0)
    j = judge_parity(got, want, dtype=case.dtype, budget=parity, term_scale=terms)
    require([j], header=f"{what} [{case.dtype}, {case.kwargs}] ({budget.key_path}): ", reproducer=case.reproducer())


@PROPERTY
@pytest.mark.parametrize("implementation", [None, "mosaic_flash"])
@given(data=st.data())
def test_masked_keys_cannot_influence_output(implementation, data):
    """NaN, inf or 1e30 in k and v of keys no query may see changes nothing (bit for bit):
    the default kernel, and the Mosaic decode kernel on a Hopper GPU (elsewhere its cases
    are refused, naming the GPU)."""
    if implementation is None:
        case = data.draw(H.cases(), label="case")
    else:
        dtype = data.draw(st.sampled_from(MOSAIC_FLASH.dtypes), label="dtype")
        case = data.draw(H.cases(dtype=dtype, **MOSAIC_FLASH.case_opts), label="case")
    a = _inputs(case)
    impl = {} if implementation is None else {"implementation": implementation}  # the default: the active kernel's own
    if impl and not_hopper():
        with pytest.raises(ValueError, match=r"implementation='mosaic_flash' needs a Hopper GPU"):
            _run(case, a, **impl)
        return
    hidden = ~_vis(case, a).any(axis=1)  # [B, S]: keys visible to no query
    if not hidden.any():  # a mask with no hidden key: hide the last keys with kv_valid padding
        kv_valid = np.ones(hidden.shape, bool) if a["kv_valid"] is None else a["kv_valid"].copy()
        kv_valid[:, -1] = False
        a = dict(a, kv_valid=kv_valid)
        hidden = ~_vis(case, a).any(axis=1)
    poison = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]), label="poison")
    bad = dict(a)
    for name in ("k", "v"):
        x = a[name].astype(np.float32)
        x[hidden] = poison
        with np.errstate(over="ignore"):  # 1e30 overflows to inf in float16: still poison
            bad[name] = x.astype(a[name].dtype)
    np.testing.assert_array_equal(_run(case, a, **impl), _run(case, bad, **impl), err_msg=case.reproducer())


@PROPERTY
@given(data=st.data())
def test_last_prefill_query_equals_decode_step(tolerances, data):
    """The last query of a causal prefill equals a T=1 decode step over the same keys."""
    case = data.draw(H.cases(ts_pairs=((5, 5), (16, 16), (33, 33)), q_chunk=0), label="case")
    a = _inputs(case)
    if not case.kwargs["causal"]:
        case = type(case)(case.op, case.dtype, case.shapes, dict(case.kwargs, causal=True), case.data)
    full = _run(case, a)[:, -1:]
    one = dict(a, q=np.ascontiguousarray(a["q"][:, -1:]))
    if a["q_positions"] is not None:
        one["q_positions"] = np.ascontiguousarray(a["q_positions"][:, -1:])
    seg = a["segment_ids"]
    if isinstance(seg, tuple):
        one["segment_ids"] = (np.ascontiguousarray(seg[0][:, -1:]), seg[1])
    _require_same(tolerances, case, _run(case, one), full, what="decode step vs last prefill query")


@PROPERTY
@given(case=H.cases(ts_pairs=((5, 5), (16, 16), (33, 33), (12, 48)), q_chunk=0), q_chunk=st.sampled_from([1, 3, 8]))
def test_query_chunked_equals_direct(tolerances, case, q_chunk):
    """The query-chunked path computes every row as the direct path does."""
    a = _inputs(case)
    _require_same(tolerances, case, _run(case, a, q_chunk=q_chunk), _run(case, a, q_chunk=None),
                  what=f"q_chunk={q_chunk} vs direct")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_visible_key_are_zero(dtype):
    """Padding-only rows and rows before their segment starts: zeros, not NaN, not HF's average."""
    rng = np.random.default_rng(1)
    b, t, n, kh, h = 2, 6, 4, 2, 16
    q = round_to(rng.standard_normal((b, t, n, h)) * 30, dtype)
    k = round_to(rng.standard_normal((b, t, kh, h)) * 30, dtype)
    v = round_to(rng.standard_normal((b, t, kh, h)) + 5.0, dtype)  # the uniform average would be ~5
    kv_valid = np.ones((b, t), bool)
    kv_valid[0] = False  # batch row 0: nothing visible at all
    kv_valid[1, :3] = False  # batch row 1: left padding, queries 0-2 see nothing (causal)
    out = np.asarray(kernel(q, k, v, kv_valid=kv_valid).astype(jnp.float32))
    assert np.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1, :3] == 0).all()
    assert (np.abs(out[1, 3:]) > 0).any()


# float32 cases where summing the scores in float32 (torch's order or XLA's) left the
# kernel at 20.3x, 18.8x and 5.2x the oracle's error against the truth (1000-case sweep,
# seed 0): the output error is a few score roundings amplified by |s| in the softmax.
F32_SCORE_CASES = (
    {"shapes": {"q": (2, 4, 12, 128), "k": (2, 19, 2, 128), "v": (2, 19, 2, 128)},
     "kwargs": {"causal": True, "q_chunk": 4, "recipe": "hf", "scale": None, "sliding_window": 8, "softcap": None},
     "data": {"log10_score": [1, 4], "mask": "random_pad", "outliers": 0, "seed": 1401295764,
              "segment_pair": False}},
    {"shapes": {"q": (2, 1, 64, 128), "k": (2, 7, 8, 128), "v": (2, 7, 8, 128)},
     "kwargs": {"causal": True, "q_chunk": None, "recipe": "hf", "scale": None, "sliding_window": None,
                "softcap": None},
     "data": {"log10_score": [2, 2], "mask": "packed", "outliers": 2, "seed": 1, "segment_pair": False}},
    {"shapes": {"q": (1, 1, 16, 128), "k": (1, 40, 2, 128), "v": (1, 40, 2, 128)},
     "kwargs": {"causal": True, "q_chunk": None, "recipe": "fp32_logits", "scale": None, "sliding_window": 8,
                "softcap": None},
     "data": {"log10_score": [1, 1], "mask": "positions", "outliers": 0, "seed": 0, "segment_pair": True}},
    # Softcap 50 (session 17): 2.96x, because XLA had folded the pair tanh's `1 - u` TwoSum with
    # a literal 1 and dropped u's low part (scores ~50 carried 1e-6 into the exponent); 0.16x since.
    {"shapes": {"q": (1, 5, 12, 128), "k": (1, 5, 2, 128), "v": (1, 5, 2, 128)},
     "kwargs": {"causal": True, "q_chunk": None, "recipe": "hf", "scale": None, "sliding_window": 8,
                "softcap": 50.0},
     "data": {"log10_score": [2, 3], "mask": "causal", "outliers": 0, "seed": 27968, "segment_pair": True}},
)


@pytest.mark.parametrize("spec", F32_SCORE_CASES, ids=("prefill-chunk", "decode-packed", "decode-window",
                                                        "prefill-softcap"))
def test_float32_scores_sensitive_cases_within_budget(tolerances, spec):
    """Large float32 scores: the kernel's error stays within the accuracy budget of the oracle's."""
    check_case(Case(op="attention", dtype="float32", **spec), tolerances, kernel=kernel)


def _tanh_small_part(x: np.ndarray) -> np.ndarray:
    """float64 ``tanh(x) - x`` for ``|x| < 0.625``, ``sign(x) (1 - |tanh(x)|)`` above: the part of
    tanh a float32 pair carries below its head, computed without cancellation."""
    ax, x2 = np.abs(x), x * x
    series = x * x2 * (-1 / 3 + x2 * (2 / 15 + x2 * (-17 / 315 + x2 * 62 / 2835)))  # |x| < 1e-2: < 1e-18 off
    tail = np.where(ax < 1e-2, series, np.tanh(x) - x)
    return np.where(ax < 0.625, tail, np.sign(x) * 2.0 / (np.exp(2.0 * ax) + 1.0))


def test_softcap_tanh_is_accurate(tolerances):
    """The softcap's tanh, on a dense grid of float32 arguments (|x| < 20, and 1e-8..20), against
    the float64 tanh: ``tanh_f32`` (the float32 scores of bf16/f16 "fp32_logits" and the Pallas
    kernels) within ``tanh_max_ulps``; the pair tanh of the float32 path (``_tanh_pair``, on
    ``hi + lo`` with ``|lo| <= 2**-26 |hi|``) within ``tanh_pair_ulps`` float32 ulps of the part
    below its head (``tanh - x`` under 0.625, ``1 - |tanh|`` above) or of ``lo``, the larger."""
    from kernels.attention import _tanh_pair, tanh_f32

    prop = tolerances.lookup("attention", "float32", backend()).properties
    grid = np.concatenate([np.linspace(-20.0, 20.0, 1 << 20), 10.0 ** np.linspace(-8.0, 1.3, 1 << 16)])
    hi = grid.astype(np.float32)
    x = hi.astype(np.float64)
    ulp = np.spacing(np.abs(np.tanh(x)).astype(np.float32)).astype(np.float64)
    y = np.asarray(jax.jit(tanh_f32)(jnp.asarray(hi)), np.float64)
    worst = float(np.max(np.abs(y - np.tanh(x)) / ulp))
    assert worst <= prop["tanh_max_ulps"], f"tanh_f32: {worst:.3f} ulps > {prop['tanh_max_ulps']}"
    lo = (hi * np.random.default_rng(0).uniform(-1.0, 1.0, hi.size) * 2.0 ** -26).astype(np.float32)
    pair = jax.jit(_tanh_pair)  # one compile for both lo arrays (same shape)
    for name, l in (("lo = 0", np.zeros_like(lo)), ("lo != 0", lo)):
        th, tl = (np.asarray(r, np.float64) for r in pair(jnp.asarray(hi), jnp.asarray(l)))
        xl = l.astype(np.float64)
        small = _tanh_small_part(x + xl)
        # The pair's error against x + small (below 0.625) or sign (1 - |small|), each side's
        # head subtracted first (exact) so the error is not lost under an ulp of tanh.
        err = np.where(np.abs(x + xl) < 0.625, (th - x) + tl - xl - small, (th - np.sign(x + xl)) + tl + small)
        scale = np.maximum(np.maximum(np.abs(small), np.abs(xl)), np.finfo(np.float32).tiny)
        worst = float(np.max(np.abs(err) / np.spacing(scale.astype(np.float32)).astype(np.float64)))
        assert worst <= prop["tanh_pair_ulps"], (
            f"_tanh_pair ({name}): {worst:.3g} float32 ulps of the small part > {prop['tanh_pair_ulps']}")


def test_single_visible_key_returns_its_value():
    """sliding_window=1: each query sees only itself, probability exactly 1."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 5, 4, 8)).astype(np.float32) * 100
    k = rng.standard_normal((1, 5, 2, 8)).astype(np.float32) * 100
    v = rng.standard_normal((1, 5, 2, 8)).astype(np.float32)
    out = np.asarray(kernel(q, k, v, sliding_window=1))
    np.testing.assert_array_equal(out, np.repeat(v, 2, axis=2))


def test_query_chunked_path_bounds_memory():
    """A 32k-token prefill (Qwen2.5-0.5B heads) with q_chunk=512 needs far less than the
    [B,N,T,S] f32 score matrix (56 GiB); compiled, not run."""
    b, t, n, kh, h = 1, 32768, 14, 2, 64
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, kh, h), jnp.bfloat16)
    scores_bytes = b * n * t * t * 4
    mem = jax.jit(lambda q, k, v: kernel(q, k, v, q_chunk=512)).lower(q, kv, kv).compile().memory_analysis()
    assert mem.temp_size_in_bytes < scores_bytes / 16, (mem.temp_size_in_bytes, scores_bytes)


def test_bad_input_raises_value_error():
    f32 = np.float32
    q, k = np.zeros((2, 4, 6, 8), f32), np.zeros((2, 4, 4, 8), f32)
    with pytest.raises(ValueError, match=r"N=6 .*\(2, 4, 6, 8\).* multiple of kv heads K=4 .*\(2, 4, 4, 8\)"):
        kernel(q, k, k)
    q = np.zeros((2, 4, 8, 8), f32)
    with pytest.raises(ValueError, match=r"head dim of k/v \(2, 4, 4, 16\) \(H=16\) does not match q \(2, 4, 8, 8\)"):
        kernel(q, np.zeros((2, 4, 4, 16), f32), np.zeros((2, 4, 4, 16), f32))
    with pytest.raises(ValueError, match=r"batch of k/v \(3, 4, 4, 8\) \(B=3\) does not match q \(2, 4, 8, 8\)"):
        kernel(q, np.zeros((3, 4, 4, 8), f32), np.zeros((3, 4, 4, 8), f32))
    with pytest.raises(ValueError, match=r"k and v must have the same shape"):
        kernel(q, k, np.zeros((2, 5, 4, 8), f32))
    with pytest.raises(ValueError, match=r"kv_valid must be a boolean array \[B,S\] = \(2, 4\), got bool with shape \(2, 5\)"):
        kernel(q, k, k, kv_valid=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match=r"q_positions must have shape \[B,T\] = \(2, 4\), got \(4,\)"):
        kernel(q, k, k, q_positions=np.arange(4))
    with pytest.raises(ValueError, match=r"kv_positions must have shape \[B,S\] = \(2, 4\), got \(2, 3\)"):
        kernel(q, k, k, kv_positions=np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"T=4 queries \(q \(2, 4, 8, 8\)\) but only S=2 keys \(k \(2, 2, 4, 8\)\)"):
        kernel(q, np.zeros((2, 2, 4, 8), f32), np.zeros((2, 2, 4, 8), f32))
    with pytest.raises(ValueError, match=r"q, k, v must share one dtype, got q float32, k bfloat16"):
        kernel(q, k.astype(NP_DTYPES["bfloat16"]), k)
    with pytest.raises(ValueError, match=r"sliding_window=4 needs causal=True"):
        kernel(q, k, k, causal=False, sliding_window=4)
    with pytest.raises(ValueError, match=r"recipe must be one of \['hf', 'fp32_logits'\], got 'bf16'"):
        kernel(q, k, k, recipe="bf16")
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[B,S\] = \(2, 4\), got \(2, 3\)"):
        kernel(q, k, k, segment_ids=np.zeros((2, 3), np.int32))


@pytest.mark.parametrize("kwargs, named", [
    (dict(recipe="hf"), "recipe='hf'"),
    (dict(recipe="fp32_logits", softcap=30.0), "softcap"),
    (dict(recipe="fp32_logits", q_chunk=2), "q_chunk"),
])
def test_cudnn_path_refuses_what_it_cannot_honour(kwargs, named):
    """implementation='cudnn' never falls back silently: each unsupported option is named."""
    q = jnp.zeros((1, 4, 4, 64), jnp.bfloat16)
    k = v = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
    from kernels.attention import gqa_attention  # the real kernel: an API check, not a numerics one

    with pytest.raises(ValueError, match=f"implementation='cudnn' cannot honour: .*{named.replace('(', '.')}"):
        gqa_attention(q, k, v, implementation="cudnn", **kwargs)
    with pytest.raises(ValueError, match="implementation must be one of"):
        gqa_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("dtype", MOSAIC_FLASH.dtypes)
@FLASH
@given(data=st.data())
def test_mosaic_flash_within_budget(tolerances, dtype, data):
    """implementation="mosaic_flash" (the Hopper decode kernel) against the fp32_logits
    oracle and the float64 truth under its own budget (implementations.mosaic_flash):
    every mask kind, cache lengths that are not whole key blocks. Off a Hopper GPU the
    same cases must be refused naming the GPU alone: its case strategy draws nothing
    else that it cannot take."""
    case = data.draw(H.cases(dtype=dtype, **MOSAIC_FLASH.case_opts), label="case")
    if not not_hopper():
        check_case(case, tolerances, implementation="mosaic_flash")
        return
    a = _inputs(case)
    with pytest.raises(ValueError, match=r"implementation='mosaic_flash' needs a Hopper GPU \(compute capability "
                                         r"9\.x; JAX's default device is '[^']*'\)\. Use"):
        MOSAIC_FLASH.kernel(a["q"], a["k"], a["v"], **case.kwargs, **{m: a[m] for m in MASK_ARGS})


def _no_rescale(acc, alpha, pv):
    """A mutant of kernels.attention_mosaic._flash_update: the running PV sum not rescaled
    when the row max grows (a classic flash-attention bug)."""
    return acc + pv


def test_mosaic_flash_budget_catches_a_missing_rescale(tolerances, monkeypatch):
    """The mosaic_flash budget can fail: on a Hopper GPU, the kernel with its running sum
    not rescaled breaches it (1000 keys: 8 splits of 2 key blocks, scores ~10 so that the
    max grows from one block to the next). Elsewhere, where the kernel cannot run, the
    mutant is checked to be a real change of the update on such a step."""
    import kernels.attention_mosaic as am

    case = Case(op="attention", dtype="bfloat16", shapes={"q": (1, 1, 14, 64), "k": (1, 1000, 2, 64),
                                                          "v": (1, 1000, 2, 64)},
                kwargs={"causal": True, "sliding_window": None, "softcap": None, "scale": None,
                        "recipe": "fp32_logits", "q_chunk": None},
                data={"seed": 3, "log10_score": [1, 1], "outliers": 0, "mask": "none", "segment_pair": False})
    if not not_hopper():
        check_case(case, tolerances, implementation="mosaic_flash")  # the real kernel passes
        jax.clear_caches()  # the mutant must be traced anew, not served from the jit caches
        monkeypatch.setattr(am, "_flash_update", _no_rescale)
        try:
            with pytest.raises(AssertionError, match="parity"):
                check_case(case, tolerances, implementation="mosaic_flash")
        finally:
            monkeypatch.undo()
            jax.clear_caches()
        return
    acc, pv = jnp.ones((64, 64), jnp.float32), jnp.full((64, 64), 0.5, jnp.float32)
    alpha = jnp.full((64,), 0.25, jnp.float32)  # the max grew: the old sum weighs a quarter
    assert float(jnp.abs(_no_rescale(acc, alpha, pv) - am._flash_update(acc, alpha, pv)).max()) == 0.75


@pytest.mark.parametrize("implementation, recipe", [("pallas", "hf"), ("pallas_flash", "fp32_logits")])
def test_pallas_off_a_gpu_is_a_valueerror_naming_the_way_out(implementation, recipe):
    """The Pallas kernels asked for by name: on a GPU they run; elsewhere our ValueError naming
    the GPU, 'xla' and interpret=True (before, Pallas's own "Only interpret mode is supported
    on CPU backend"). The default (None) takes the XLA path there."""
    from kernels.attention import gqa_attention  # the real kernel: an API check, not a numerics one

    q, k = jnp.zeros((1, 4, 8, 64), jnp.bfloat16), jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
    assert gqa_attention(q, k, k, recipe=recipe).shape == (1, 4, 8, 64)
    if jax.default_backend() == "gpu":
        assert gqa_attention(q, k, k, recipe=recipe, implementation=implementation).shape == (1, 4, 8, 64)
        return
    with pytest.raises(ValueError, match=f"gqa_attention: implementation='{implementation}' needs a CUDA GPU "
                                         r"\(JAX's default backend is 'cpu'\).*interpret=True"):
        gqa_attention(q, k, k, recipe=recipe, implementation=implementation)


def test_mosaic_flash_refuses_what_it_cannot_take():
    """implementation='mosaic_flash' never falls back silently: a call it cannot take is a
    ValueError naming every reason (here: the recipe, dtype, T, H, and off a Hopper GPU the GPU)."""
    from kernels.attention import gqa_attention  # the real kernel: an API check, not a numerics one

    q, k = jnp.zeros((1, 2, 4, 32), jnp.float32), jnp.zeros((1, 8, 2, 32), jnp.float32)
    named = [r"recipe='fp32_logits' \(got 'hf'", r"bfloat16/float16 inputs \(got float32\)",
             r"one query a batch row, a decode step \(got T = 2\)", r"a multiple of 64 \(got H = 32\)"]
    with pytest.raises(ValueError, match="implementation='mosaic_flash' needs " + ".*".join(named)):
        gqa_attention(q, k, k, implementation="mosaic_flash")
    q, k = jnp.zeros((1, 1, 130, 64), jnp.bfloat16), jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"at most 64 query heads per kv head \(got 65\)"):
        gqa_attention(q, k, k, implementation="mosaic_flash", recipe="fp32_logits")


test_float32_gradient_within_budget = float32_gradient_test(H, kernel)
test_low_precision_gradient_within_budget = low_precision_gradient_test(H, kernel)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_saturated_rows_gradient_in_the_model_dtypes(tolerances, dtype):
    """Scores of 1e4-1e5 saturate every row (one probability 1): the true gradient of q and k
    is ~1e-18 and torch's autograd gives 0. Under jit, XLA's CPU backend fused the scale
    product into exp(s - m) as an FMA, so the top entry's e was exp(its rounding error), and
    the softmax differentiated through e and 1 / s gave 0.0024 (1.8e17 x torch's error; parity
    gradients, session 19). Fixed in kernels/softmax.py (_shifted, _probabilities)."""
    case = Case.from_json(
        '{"data": {"log10_score": [2, 4], "mask": "causal", "outliers": 1, "seed": 68, "segment_pair": true}, '
        f'"dtype": "{dtype}", "kwargs": {{"causal": true, "q_chunk": null, "recipe": "fp32_logits", "scale": null, '
        '"sliding_window": null, "softcap": null}, "op": "attention", '
        '"shapes": {"k": [2, 7, 4, 128], "q": [2, 1, 28, 128], "v": [2, 7, 4, 128]}}')
    check_gradient(case, tolerances, kernel=kernel)


def test_mosaic_flash_gradient_is_the_xla_paths():
    """On a Hopper GPU: jax.vjp through implementation="mosaic_flash" (a decode step, a padding
    mask) is the fp32_logits XLA path's, to the bit (kernels._grad). Elsewhere it is refused,
    naming the Hopper GPU."""
    from kernels.attention import gqa_attention  # the real paths (not a mutant: this compares two kernels)
    from oracles.gradients import seeded_vjp

    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.standard_normal((2, 1, 8, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, 200, 2, 64)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((2, 200, 2, 64)), jnp.bfloat16)
    kv_valid = jnp.asarray(np.arange(200)[None, :] < np.array([[150], [200]]))  # [B, S]

    def run(implementation):
        return lambda q, k, v: gqa_attention(q, k, v, kv_valid=kv_valid, recipe="fp32_logits",
                                             implementation=implementation)

    if not_hopper():
        with pytest.raises(ValueError, match=r"implementation='mosaic_flash' needs a Hopper GPU"):
            run("mosaic_flash")(q, k, v)
        return
    got, want = seeded_vjp(run("mosaic_flash"), q, k, v), seeded_vjp(run("xla"), q, k, v)
    for name, g, r in zip("qkv", got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32), err_msg=f"d{name}")


# A decode cache of 640 slots (10 key blocks of 64) filled to 300 keys in batch row 0 (5
# blocks, the last one partly) and to none in row 1, NaN in the unfilled slots.
MOSAIC_FILL, MOSAIC_SLOTS = 300, 640


def _mosaic_cache(slots):
    """q ``[2, 1, 8, 64]``, the cache's first ``slots`` slots ``[2, slots, 2, 64]`` and the keys
    the query sees, ``vis [2, slots]``, all bf16."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s).astype(NP_DTYPES["bfloat16"]) for s in
               [(2, 1, 8, 64), (2, MOSAIC_SLOTS, 2, 64), (2, MOSAIC_SLOTS, 2, 64)])
    k[:, MOSAIC_FILL:], v[:, MOSAIC_FILL:] = np.nan, np.nan  # the unfilled slots
    vis = np.zeros((2, slots), bool)
    vis[0, :MOSAIC_FILL] = True  # row 1: nothing filled
    return q, k[:, :slots], v[:, :slots], vis


def test_mosaic_flash_reads_only_the_visible_span():
    """On a Hopper GPU the Mosaic decode kernel deals out only each batch row's span of key
    blocks with a visible key over its splits (``attention_pallas.block_span``,
    ``deal_blocks``), as the Pallas split-key kernels do: the 640-slot cache filled to 300
    keys gives the bits of the same cache cut at 320 slots, though its unfilled slots hold
    NaN, and the row with nothing filled gives zeros. Reading all 10 blocks in the static
    splits (5 a split) would put the 5 visible ones in one split, where the span deals
    them 3 + 2: flash numerics round p against each split's running max, so the bits
    differ (the mutant below). Elsewhere the kernel is refused, naming the GPU."""
    from kernels.attention_mosaic import mosaic_decode  # the real kernel: num_splits fixed, so both caches split alike

    q, k, v, vis = _mosaic_cache(MOSAIC_SLOTS)
    run = functools.partial(mosaic_decode, scale=0.125, num_splits=2)
    if not_hopper():
        with pytest.raises(ValueError, match=r"mosaic_decode needs a Hopper GPU"):
            run(q, k, v, jnp.asarray(vis))
        return
    full = np.asarray(run(q, k, v, jnp.asarray(vis)).astype(jnp.float32))
    qc, kc, vc, vis_c = _mosaic_cache(320)
    short = np.asarray(run(qc, kc, vc, jnp.asarray(vis_c)).astype(jnp.float32))
    assert np.isfinite(full).all() and np.all(full[1] == 0.0)
    np.testing.assert_array_equal(full, short)


def test_mosaic_visible_span_test_catches_a_kernel_that_reads_every_block(monkeypatch):
    """The mutant: every batch row's span the whole cache (the kernel as it was: every block
    read, in the static splits). On a Hopper GPU its bits differ from the cut cache's, so
    ``test_mosaic_flash_reads_only_the_visible_span`` fails it. Elsewhere, where the kernel
    cannot run, the mutant's span is checked to differ from the real one for that cache."""
    import kernels.attention_pallas as kp

    real = kp.block_span

    def every_block(ok, *, block_k):
        b, s = ok.shape
        return jnp.broadcast_to(jnp.array([0, -(-s // block_k)], jnp.int32), (b, 2))  # [B, 2]: every block

    vis = jnp.asarray(_mosaic_cache(MOSAIC_SLOTS)[3])
    if not_hopper():
        assert real(vis, block_k=64).tolist() == [[0, 5], [10, 0]]  # row 1: no block
        assert every_block(vis, block_k=64).tolist() == [[0, 10], [0, 10]]
        return
    monkeypatch.setattr(kp, "block_span", every_block)
    jax.clear_caches()  # the kernel is traced again with the mutant
    try:
        with pytest.raises(AssertionError, match="not equal"):
            test_mosaic_flash_reads_only_the_visible_span()
    finally:
        monkeypatch.undo()
        jax.clear_caches()
