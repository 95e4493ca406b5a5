"""PyTorch oracle for grouped-query attention: transformers' eager numerics, step by step.

Reproduces, for torch 2.13.0 and transformers 5.17.0 (the pinned versions),
``transformers.models.qwen2.modeling_qwen2.eager_attention_forward`` (and, with
``softcap``, ``transformers.models.gemma2.modeling_gemma2.eager_attention_forward``)
fed with a 4-D additive mask from ``transformers.masking_utils.eager_mask``:

``recipe="hf"``, on tensors of dtype dt (torch's CPU kernels):
    1. ``repeat_kv``: query head n reads kv head n // G ([h0,h0,h1,h1])
    2. ``s = torch.matmul(q, k^T)``       f32 accumulation, round 1 to dt
    3. ``s = s * scaling``                computed in f32 (scaling as an f32 scalar), round 2 to dt
    4. softcap (Gemma 2): ``s / cap``, ``tanh``, ``* cap``, each rounded to dt
    5. mask, ``softmax(s, dtype=float32)`` then ``.to(dt)``: round 3
    6. ``torch.matmul(p, v)``             f32 accumulation, round 4 to dt
``recipe="fp32_logits"`` (jax.nn.dot_product_attention's recipe): steps 2-5 on
    ``q.float()`` and ``k.float()`` (scores and softmax in f32, no rounding), then
    ``p.to(dt)`` and step 6.

The mask is boolean (True = visible, the same rules as ``kernels.attention``):
masked scores are set to -inf inside the softmax (``oracles.softmax.softmax``) and
their probabilities are exactly 0. On every row with at least one visible key this is
bit for bit HF's additive ``finfo(dt).min`` mask (proven in tests/test_attention.py).
Deliberate differences from HF: a row with no visible key gives zeros (HF: the
uniform average over masked values); keys visible to no query of their batch row have
k and v zeroed, so NaN there cannot leak through ``0 * NaN``.

``exact=True`` runs the same maths in float64 with no intermediate rounding (the
truth, the same for both recipes) and returns float64.
"""

from __future__ import annotations

import torch

from oracles.softmax import softmax as _softmax

RECIPES = ("hf", "fp32_logits")


def visibility(b: int, t: int, s: int, *, causal: bool = True, q_positions=None, kv_positions=None,
               kv_valid=None, segment_ids=None, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean ``[B,T,S]``: True where query t of batch row b may see key s."""
    qp = (torch.arange(t) + (s - t)).expand(b, t) if q_positions is None else q_positions.long()
    kp = torch.arange(s).expand(b, s) if kv_positions is None else kv_positions.long()
    qp, kp = qp[:, :, None], kp[:, None, :]  # [B, T, 1], [B, 1, S]
    vis = torch.ones(b, t, s, dtype=torch.bool)
    if causal:
        vis &= kp <= qp
    if sliding_window is not None:
        vis &= (qp - kp) < sliding_window
    if kv_valid is not None:
        vis &= kv_valid[:, None, :]
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            qs, ks = segment_ids
        else:
            qs, ks = segment_ids[:, s - t:], segment_ids
        vis &= qs[:, :, None] == ks[:, None, :]
    return vis


def repeat_kv(x: torch.Tensor, g: int) -> torch.Tensor:
    """``[B,K,S,H] -> [B,K*G,S,H]``: each kv head repeated G times in place ([h0,h0,h1,h1])."""
    b, kh, s, h = x.shape
    return x[:, :, None].expand(b, kh, g, s, h).reshape(b, kh * g, s, h)


def gqa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_positions=None,
    kv_positions=None,
    kv_valid=None,
    segment_ids=None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    recipe: str = "hf",
    exact: bool = False,
    terms: bool = False,
) -> torch.Tensor:
    """Oracle of ``kernels.attention.gqa_attention`` on torch tensors ``[B,T,N,H]`` / ``[B,S,K,H]``.

    ``exact=True``: the float64 truth. ``terms=True`` (with ``exact``): instead of the
    output, each output element's largest term ``max_s p[s] |v[s, h]|`` of the ``p @ v``
    sum, in float64 ``[B,T,N,H]`` (parity's term scale, ``oracles.compare``).
    """
    if recipe not in RECIPES:
        raise ValueError(f"gqa_attention: recipe must be one of {list(RECIPES)}, got {recipe!r}")
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scaling = h ** -0.5 if scale is None else scale  # HF: self.scaling = head_dim**-0.5
    dt = q.dtype
    vis = visibility(b, t, s, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
                     kv_valid=kv_valid, segment_ids=segment_ids, sliding_window=sliding_window)
    used = vis.any(dim=1)[:, :, None, None]  # [B, S, 1, 1]: keys some query may see
    k = torch.where(used, k, torch.zeros((), dtype=dt))
    v = torch.where(used, v, torch.zeros((), dtype=dt))
    # HF's layout: q/k/v are [B, heads, len, H] views (transpose(1, 2) of [B, len, heads, H]).
    qh, kh_, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,N,T,H], [B,K,S,H], [B,K,S,H]
    where = vis[:, None]  # [B, 1, T, S]
    if exact:
        f64 = torch.float64  # the truth: every step in float64, no rounding
        sc = torch.matmul(qh.to(f64), repeat_kv(kh_.to(f64), g).transpose(2, 3)) * scaling  # [B, N, T, S]
        if softcap is not None:
            sc = torch.tanh(sc / softcap) * softcap
        p = _softmax(sc, axis=-1, where=where, exact=True)
        v64 = repeat_kv(vh.to(f64), g)  # [B, N, S, H]
        if terms:  # one query row at a time: [B, N, S, H] products, not [B, N, T, S, H]
            va = v64.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs()
            rows = [(p[:, :, i, :, None] * va).amax(dim=2) for i in range(t)]  # T x [B, N, H]
            return torch.stack(rows, dim=1)  # [B, T, N, H]
        return torch.matmul(p, v64).transpose(1, 2)  # [B, T, N, H]
    ks, vs = repeat_kv(kh_, g), repeat_kv(vh, g)  # [B, N, S, H]
    if recipe == "hf":
        sc = torch.matmul(qh, ks.transpose(2, 3)) * scaling  # rounds 1 and 2, in dt  # [B, N, T, S]
    else:
        sc = torch.matmul(qh.float(), ks.float().transpose(2, 3)) * scaling  # f32, no rounding  # [B, N, T, S]
    if softcap is not None:
        sc = sc / softcap
        sc = torch.tanh(sc)
        sc = sc * softcap
    p = _softmax(sc, axis=-1, where=where)  # f32 inside, returned in sc's dtype
    p = p.to(dt)  # probabilities in the input dtype (a no-op for "hf", where sc is dt)
    return torch.matmul(p, vs).transpose(1, 2)  # round 4  # [B, T, N, H]


# --- harness: how the registry, the tests and ``parity check`` drive this op ---------

# (T, S) pairs: prefill (T == S), decode (T == 1), chunked prefill onto a cache (T < S).
TS_PAIRS = ((1, 1), (5, 5), (16, 16), (33, 33), (1, 7), (1, 40), (4, 19), (12, 48))
MASK_KINDS = ("causal", "none", "left_pad", "right_pad", "random_pad", "packed", "positions")
WINDOWS = (None, None, 1, 3, 8)


def _cases():
    from hypothesis import strategies as st

    from oracles import strategies as S
    from oracles.registry import Case

    @st.composite
    def cases(draw, dtype=None, recipe=None, layouts=S.HEAD_LAYOUTS, ts_pairs=TS_PAIRS, q_chunk=None,
              masks=MASK_KINDS, softcaps=(None, None, None, 50.0), square_causal=False):
        # masks, softcaps, square_causal (a causal case gets T = S): what an implementation
        # that cannot take every mask draws (cuDNN).
        dt = dtype or draw(S.dtypes())
        n, kh, h = draw(st.sampled_from(layouts))
        t, s = draw(st.sampled_from(ts_pairs))
        b = draw(st.sampled_from([1, 2]))
        mask = draw(st.sampled_from(masks))
        causal = mask != "none"
        if square_causal and causal:
            t = s  # [B, S, N, H] queries: jax.nn aligns a causal mask top-left, this op bottom-right
        window = draw(st.sampled_from(WINDOWS)) if causal else None
        # Scores up to ~1e4 (bf16/f32); float16 scores stay below ~1e3 so that q.k before
        # scaling (sqrt(H) times larger) fits under 65504, as it must in HF too.
        top = 3 if dt == "float16" else 4
        lo = draw(st.integers(-2, top))
        kwargs = {
            "causal": causal,
            "sliding_window": window,
            "softcap": draw(st.sampled_from(softcaps)),
            "scale": draw(st.sampled_from([None, None, None, 0.0625])),
            "recipe": recipe or draw(st.sampled_from(RECIPES)),
            # q_chunk: None draws it (mostly the direct path), 0 forces the direct path.
            "q_chunk": draw(st.sampled_from([None, None, None, 4])) if q_chunk is None else (q_chunk or None),
        }
        return Case(
            op="attention",
            dtype=dt,
            shapes={"q": (b, t, n, h), "k": (b, s, kh, h), "v": (b, s, kh, h)},
            kwargs=kwargs,
            data={"seed": draw(S.seeds()), "log10_score": [lo, draw(st.integers(lo, top))],
                  "outliers": draw(st.integers(0, 2)), "mask": mask,
                  "segment_pair": draw(st.booleans())},
        )

    return cases


def _positions(rng, b: int, n: int, base: int):
    import numpy as np

    # Increasing positions with gaps, from a base in the mixture <=256, ~2^8, ~2^11, ~2^16.
    steps = rng.integers(1, 3, size=(b, n))
    return (base + np.cumsum(steps, axis=1) - steps[:, :1]).astype(np.int32)


def _inputs(case):
    """Arrays of a case: q, k, v and the mask arrays (None where the case has none)."""
    import numpy as np

    from oracles import strategies as S

    rng = np.random.default_rng(case.data["seed"])
    b, t, n, h = case.shapes["q"]
    s, kh = case.shapes["k"][1], case.shapes["k"][2]
    lo, hi = case.data["log10_score"]
    # Per-row magnitudes m_q, m_k with m_q * m_k ~ 10**uniform(lo, hi): q.k * H**-0.5 ~ m_q m_k.
    mag = 10.0 ** rng.uniform(lo, hi, size=(b, 1, 1, 1))
    sq = np.sqrt(mag) * 10.0 ** rng.uniform(-0.3, 0.3, size=(b, t, n, 1))
    sk = np.sqrt(mag) * 10.0 ** rng.uniform(-0.3, 0.3, size=(b, s, kh, 1))
    q = rng.standard_normal((b, t, n, h)) * sq
    k = rng.standard_normal((b, s, kh, h)) * sk
    if case.data["outliers"]:  # massive-activation channels shared by every token
        ch = rng.choice(h, size=case.data["outliers"], replace=False)
        k[..., ch] *= 4.0
    if case.dtype == "float16":
        # q.k before scaling must fit float16 (HF overflows to inf there too): keep it under 65504 / 2.
        top = np.abs(np.einsum("btkgh,bskh->bkgts", q.reshape(b, t, kh, n // kh, h), k)).max()  # [B,K,G,T,S]
        q = q * min(1.0, 32752.0 / max(top, 1e-30))
    v = rng.standard_normal((b, s, kh, h)) * 10.0 ** rng.uniform(-2, 2, size=(b, s, kh, 1))
    arrays = {"q": S.round_to(q, case.dtype), "k": S.round_to(k, case.dtype), "v": S.round_to(v, case.dtype),
              "q_positions": None, "kv_positions": None, "kv_valid": None, "segment_ids": None}
    kind = case.data["mask"]
    if kind == "left_pad":  # left padding: the first `pad` keys of each row are invisible
        pad = rng.integers(0, s + 1, size=(b, 1))
        arrays["kv_valid"] = np.arange(s)[None, :] >= pad
    elif kind == "right_pad":  # unfilled cache slots / right padding at the end
        fill = rng.integers(0, s + 1, size=(b, 1))
        arrays["kv_valid"] = np.arange(s)[None, :] < fill
    elif kind == "random_pad":
        arrays["kv_valid"] = rng.random((b, s)) < rng.uniform(0.2, 0.9)
    elif kind == "packed":
        cuts = np.sort(rng.integers(0, s + 1, size=(b, 3)), axis=1)
        seg = (np.arange(s)[None, None, :] >= cuts[:, :, None]).sum(axis=1).astype(np.int32)  # [B, S]
        if case.data["segment_pair"]:
            arrays["segment_ids"] = (np.ascontiguousarray(seg[:, s - t:]), seg)  # the pair form
        else:
            arrays["segment_ids"] = seg
    elif kind == "positions":
        base = int(rng.choice([0, 200, 255, 2047, 65530, int(10 ** rng.uniform(3, 5.1))]))
        kvp = _positions(rng, b, s, base)
        arrays["kv_positions"] = kvp
        # queries: the last T key positions (a cache step), sometimes shifted by one
        arrays["q_positions"] = np.ascontiguousarray(kvp[:, s - t:] + rng.integers(0, 2))
    return arrays


def _torch_masks(a):
    """The mask arrays of ``_inputs`` as torch tensors (for the oracle)."""
    import numpy as np
    import torch

    def tt(x):
        return None if x is None else torch.from_numpy(np.asarray(x))

    seg = a["segment_ids"]
    seg = tuple(tt(x) for x in seg) if isinstance(seg, tuple) else tt(seg)
    return {"q_positions": tt(a["q_positions"]), "kv_positions": tt(a["kv_positions"]),
            "kv_valid": tt(a["kv_valid"]), "segment_ids": seg}


def _evaluate(case, kernel):
    from oracles.arrays import jax_to_numpy, to_torch
    from oracles.compare import dtype_name, to_f64
    from oracles.registry import Outcome, jitted

    a = _inputs(case)
    kw = dict(case.kwargs)
    masks = {m: a[m] for m in ("q_positions", "kv_positions", "kv_valid", "segment_ids")}
    out = jitted(kernel, **kw)(a["q"], a["k"], a["v"], **masks)
    kw.pop("q_chunk")  # a memory option of the kernel only: the numerics are the same
    qt, kt, vt = to_torch(a["q"]), to_torch(a["k"]), to_torch(a["v"])
    tm = _torch_masks(a)
    o = gqa_attention(qt, kt, vt, **kw, **tm)
    t = gqa_attention(qt, kt, vt, **kw, **tm, exact=True)
    terms = gqa_attention(qt, kt, vt, **kw, **tm, exact=True, terms=True)
    return Outcome(kernel=to_f64(jax_to_numpy(out)), oracle=to_f64(o), truth=to_f64(t), out_dtype=dtype_name(o.dtype),
                   inputs=a, kernel_dtype=dtype_name(out.dtype), kernel_shape=tuple(out.shape),
                   term_scale=terms.numpy())


_MASKS = ("q_positions", "kv_positions", "kv_valid", "segment_ids")


def _grad_call(kernel, a, **kw):
    return kernel(a["q"], a["k"], a["v"], **{m: a[m] for m in _MASKS}, **kw)


def _gradient(case, kernel):
    from oracles.gradients import GradProblem

    kw = {k: v for k, v in case.kwargs.items() if k != "q_chunk"}  # q_chunk: the kernel's memory option only

    def oracle(t, exact):
        return gqa_attention(t["q"], t["k"], t["v"], **kw, **_torch_masks(t), exact=exact)

    return GradProblem(inputs=_inputs(case), diff=("q", "k", "v"), call=_grad_call, kernel=kernel, oracle=oracle,
                       static=dict(case.kwargs))


def _properties(case, outcome, budget):
    """A query row with no visible key is exactly 0 (not NaN, not HF's uniform average)."""
    import numpy as np

    from oracles.compare import Judgment

    b, t = case.shapes["q"][:2]
    s = case.shapes["k"][1]
    tm = _torch_masks(outcome.inputs)
    kw = {k: case.kwargs[k] for k in ("causal", "sliding_window")}
    vis = visibility(b, t, s, **kw, **tm).numpy()  # [B, T, S]
    empty = ~vis.any(axis=-1)  # [B, T]
    rows = outcome.kernel[empty]  # [rows, N, H]
    bad = int(np.count_nonzero(rows != 0))
    return [Judgment("empty_rows_zero", bad == 0, {"nonzero_in_empty_rows": bad}, {"nonzero_in_empty_rows": 0},
                     f"Non-zero outputs in query rows with no visible key: {bad} / {rows.size} "
                     f"({int(empty.sum())} such rows)")]


# Small blocks off the GPU, so that the tiny cases of the suite span several key blocks
# and splits (the running-max rescaling and the split combine are what can go wrong).
_INTERPRET_BLOCKS = dict(block_q=16, block_k=16, num_splits=2)


def pallas_flash(q, k, v, *, q_chunk=None, **kw):
    """``gqa_attention(implementation="pallas_flash")`` on a GPU; elsewhere the same Pallas
    kernels through Pallas's interpreter (``pallas_attention(flash=True, interpret=True)``),
    with 16-key blocks and 2 splits. ``q_chunk`` does not apply (the kernels' memory is
    O(block)), as for ``implementation="pallas"``."""
    from kernels.attention import gqa_attention as kernel
    from kernels.attention_pallas import pallas_attention
    from oracles.registry import backend

    if backend() == "gpu":
        return kernel(q, k, v, **kw, implementation="pallas_flash")
    return pallas_attention(q, k, v, **kw, flash=True, interpret=True, **_INTERPRET_BLOCKS)


def cudnn(q, k, v, **kw):
    """``gqa_attention(implementation="cudnn")``: ``jax.nn.dot_product_attention``'s cuDNN
    flash kernel, on a CUDA GPU only (elsewhere the kernel raises ValueError)."""
    from kernels.attention import gqa_attention as kernel

    return kernel(q, k, v, **kw, implementation="cudnn")


def mosaic_flash(q, k, v, *, q_chunk=None, **kw):
    """``gqa_attention(implementation="mosaic_flash")``: a decode step as one Hopper kernel
    (kernels.attention_mosaic), flash numerics; on a Hopper GPU only (elsewhere ValueError).
    ``q_chunk`` does not apply (one query)."""
    from kernels.attention import gqa_attention as kernel

    return kernel(q, k, v, **kw, implementation="mosaic_flash")


# What the Mosaic decode kernel takes: recipe fp32_logits, one query; cache lengths that
# are not whole key blocks (7, 40, 200, 1000) and several splits (1000: 8 on an H100).
MOSAIC_FLASH_CASES = {"recipe": "fp32_logits", "ts_pairs": ((1, 1), (1, 7), (1, 40), (1, 64), (1, 200), (1, 1000)),
                      "q_chunk": 0}


# What cuDNN honours (kernels.attention._cudnn): recipe fp32_logits, bf16/f16, no mask
# arrays, no softcap, no q_chunk, causal only with T == S (a sliding window is fine).
CUDNN_CASES = {"recipe": "fp32_logits", "masks": ("causal", "none"), "softcaps": (None,), "square_causal": True,
               "q_chunk": 0}


def _make_harness():
    from kernels.attention import gqa_attention as kernel
    from oracles.registry import Harness, Implementation, not_hopper, strata_product

    # pallas_flash implements the fp32_logits recipe with flash numerics (normalised after
    # the PV matmul): judged against that recipe's oracle, under its own budgets. Half the
    # examples: each case compiles an interpreted Pallas kernel off the GPU.
    flash = Implementation(kernel=pallas_flash, case_opts={"recipe": "fp32_logits"}, examples_scale=0.5)
    # cuDNN has the same flash numerics, with its own blocking: its own budgets, GPU only.
    cudnn_impl = Implementation(kernel=cudnn, case_opts=CUDNN_CASES, backends=("gpu",),
                                dtypes=("bfloat16", "float16"), requires="cuDNN")
    # The Mosaic decode kernel: the same flash numerics with its own blocking, Hopper only.
    mosaic_impl = Implementation(kernel=mosaic_flash, case_opts=MOSAIC_FLASH_CASES, backends=("gpu",),
                                 dtypes=("bfloat16", "float16"), requires="a Hopper GPU", device_lacks=not_hopper)
    # A sweep's cells: each recipe at each (T, S) (S: the length of softmax's sum and of p @ v).
    return Harness(cases=_cases(), evaluate=_evaluate, kernel=kernel, properties=_properties, gradient=_gradient,
                   implementations={"pallas_flash": flash, "cudnn": cudnn_impl, "mosaic_flash": mosaic_impl},
                   strata=lambda o: strata_product(o, scalars={"recipe": RECIPES}, tuples={"ts_pairs": TS_PAIRS}))


HARNESS = _make_harness()
