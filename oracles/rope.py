"""PyTorch oracles for RoPE: transformers' numerics, rounding step by rounding step.

Reproduces, for torch 2.13.0 and transformers 5.17.0 (the pinned versions):

``rope_frequencies``: ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]``
(``_compute_linear_scaling_rope_parameters``, ``_compute_dynamic_ntk_parameters`` called
with an int ``seq_len``, ``_compute_yarn_parameters``, ``_compute_longrope_parameters``,
``_compute_llama3_parameters``, ``_compute_proportional_rope_parameters``) and, for
``"default"``, ``Qwen2RotaryEmbedding.compute_default_rope_parameters``. Rounding steps:
    1. ``e = arange(0, dim, 2).float() / dim``            float32 division
    2. ``float32(base) ** e``                              torch's float32 CPU pow
    3. ``1.0 / p``                                         float32 reciprocal
    4. type-specific float32 tensor steps (``/ factor``, yarn's ramp blend, llama3's
       wavelength bands, longrope's ``ext_factors * p``), each one float32 rounding,
       with Python scalars rounded to float32 at each op; scalar-only steps in float64.
``rope_cos_sin``: ``Qwen2RotaryEmbedding.forward``:
    1. ``freqs = inv_freq[None, :, None] @ position_ids[:, None, :].float()``  one rounding
    2. ``emb = cat(freqs, freqs)``; ``emb.cos()``, ``emb.sin()``               float32
    3. ``* attention_scaling``                                                  float32
    4. ``.to(dtype)``                                                           one rounding
``apply_rope``: ``modeling_qwen2.apply_rotary_pos_emb`` (layout "half", full rotary),
``modeling_bamba.apply_rotary_pos_emb`` (half, partial rotary) and
``modeling_glm.apply_rotary_pos_emb`` (layout "interleaved"):
``q_rot * cos + rotate(q_rot) * sin`` in the promoted dtype (each product and the sum
rounded), then ``cat([q_embed, q_pass])``.

``exact=True`` runs the same maths in float64 with no intermediate rounding (the
truth). ``tests/test_rope.py`` proves each oracle equal, bit for bit, to those
transformers functions.
"""

from __future__ import annotations

import math

import torch

from kernels.rope import LAYOUTS, ROPE_TYPES  # plain data (no JAX call)


def _exps(n_pairs: int, denom: int, dt) -> torch.Tensor:
    return torch.arange(0, 2 * n_pairs, 2, dtype=torch.int64).to(dt) / denom


def rope_frequencies(head_dim: int, *, theta: float, rope_type: str = "default", partial_rotary_factor: float = 1.0,
                     scaling: dict | None = None, max_position_embeddings: int | None = None,
                     seq_len: int | None = None, exact: bool = False) -> tuple[torch.Tensor, float]:
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_frequencies: rope_type must be one of {list(ROPE_TYPES)}, got {rope_type!r}")
    p = dict(scaling or {})
    dt = torch.float64 if exact else torch.float32  # the truth: float64, no float32 rounding
    base = float(theta)
    dim = int(head_dim * partial_rotary_factor)
    n = dim // 2
    attention = 1.0
    if rope_type in ("default", "linear", "llama3"):
        inv = 1.0 / (base ** _exps(n, dim, dt))
        if rope_type == "linear":
            inv = inv / p["factor"]
        elif rope_type == "llama3":
            factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
            old = p["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            llama = torch.where(wavelen > old / low, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * llama / factor + smooth * llama
            medium = ~(wavelen < old / high) * ~(wavelen > old / low)
            inv = torch.where(medium, smoothed, llama)
    elif rope_type == "dynamic":
        s = max_position_embeddings if seq_len is None else max(seq_len, max_position_embeddings)
        factor = p["factor"]
        new_base = base * ((factor * s / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        inv = 1.0 / (new_base ** _exps(n, dim, dt))
    elif rope_type == "yarn":
        factor = p["factor"]
        orig = p["original_max_position_embeddings"]
        if factor is None:
            factor = max_position_embeddings / orig
        attention = p.get("attention_factor")
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")

        def mscale(scale, m=1):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attention is None:
            attention = float(mscale(factor, ms) / mscale(factor, ms_all)) if (ms and ms_all) else mscale(factor)
        fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def corr(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr(fast), corr(slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        pos_freqs = base ** _exps(n, dim, dt)
        ramp = torch.clamp((torch.arange(n, dtype=dt) - low) / (high - low), 0, 1)
        extra = 1 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    elif rope_type == "longrope":
        orig = p["original_max_position_embeddings"]
        factor = p.get("factor")
        if factor is None:
            factor = max_position_embeddings / orig
        attention = p.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = p["long_factor"] if (seq_len and seq_len > orig) else p["short_factor"]
        # float32 factors as HF builds them; the truth keeps the config's decimals in float64
        ext = torch.tensor(ext, dtype=dt)
        inv = 1.0 / (ext * base ** _exps(n, dim, dt))
    else:  # proportional
        rope_angles = int(partial_rotary_factor * head_dim // 2)
        rot = 1.0 / (base ** _exps(rope_angles, head_dim, dt))
        inv = torch.cat([rot, torch.zeros(head_dim // 2 - rope_angles, dtype=dt)]) / p.get("factor", 1.0)
    return inv, float(attention)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, *, attention_scaling: float = 1.0,
                 dtype=torch.float32, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    b = positions.shape[0]
    dt = torch.float64 if exact else torch.float32  # HF forces float32 (autocast disabled)
    inv = inv_freq[None, :, None].to(dt).expand(b, -1, 1)  # [B, R/2, 1]
    freqs = (inv @ positions[:, None, :].to(dt)).transpose(1, 2)  # [B, T, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, R]
    cos, sin = emb.cos() * attention_scaling, emb.sin() * attention_scaling
    if exact:
        return cos, sin
    return cos.to(dtype), sin.to(dtype)  # one rounding to the model dtype


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: str = "half",
               exact: bool = False) -> torch.Tensor:
    if layout not in LAYOUTS:
        raise ValueError(f"apply_rope: layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if exact:  # the truth: float64 throughout
        x, cos, sin = x.to(torch.float64), cos.to(torch.float64), sin.to(torch.float64)
    r = cos.shape[-1]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, R]
    xr, xp = x[..., :r], x[..., r:]
    if layout == "half":
        rot = torch.cat((-xr[..., r // 2:], xr[..., : r // 2]), dim=-1)
    else:
        c = c[..., : r // 2].repeat_interleave(2, dim=-1)
        s = s[..., : r // 2].repeat_interleave(2, dim=-1)
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    y = (xr * c) + (rot * s)  # torch promotion of (x, tables); each op rounds
    return torch.cat([y, xp.to(y.dtype)], dim=-1)


# --- harness: how the registry, the tests and ``parity check`` drive this op ---------

# Bounded vocabulary of rope configurations: (rope_type, partial_rotary_factor,
# scaling items, max_position_embeddings, seq_len). Longrope factors are fixed per width.
def _longrope_factors(n: int, long: bool) -> tuple:
    import numpy as np

    rng = np.random.default_rng(n + (1000 if long else 0))
    lo, hi = (1.0, 40.0) if long else (1.0, 1.5)
    return tuple(float(round(v, 6)) for v in np.sort(rng.uniform(lo, hi, n)))


def rope_configs(head_dim: int) -> dict[str, dict]:
    """Named rope configurations valid for ``head_dim`` (the strategy's vocabulary)."""
    n = head_dim // 2
    cfg = {
        "default": dict(rope_type="default"),
        "linear": dict(rope_type="linear", scaling=(("factor", 4.0),)),
        "dynamic": dict(rope_type="dynamic", scaling=(("factor", 2.0),), max_position_embeddings=4096, seq_len=65536),
        "yarn": dict(rope_type="yarn", scaling=(("factor", 4.0), ("original_max_position_embeddings", 32768))),
        "yarn_mscale": dict(rope_type="yarn", max_position_embeddings=163840, scaling=(
            ("factor", 40.0), ("original_max_position_embeddings", 4096), ("mscale", 1.0), ("mscale_all_dim", 0.707),
            ("beta_fast", 32), ("beta_slow", 1), ("truncate", False))),
        "longrope": dict(rope_type="longrope", max_position_embeddings=131072, seq_len=131072, scaling=(
            ("short_factor", _longrope_factors(n, False)), ("long_factor", _longrope_factors(n, True)),
            ("original_max_position_embeddings", 4096))),
        "llama3": dict(rope_type="llama3", scaling=(("factor", 8.0), ("low_freq_factor", 1.0),
                                                    ("high_freq_factor", 4.0),
                                                    ("original_max_position_embeddings", 8192))),
    }
    if head_dim >= 128:  # the rotated frequencies stay a multiple of 32 (see kernels._powf)
        cfg["partial"] = dict(rope_type="default", partial_rotary_factor=0.5)
        cfg["proportional"] = dict(rope_type="proportional", partial_rotary_factor=0.5)
    return cfg


CONFIG_NAMES = ("default", "linear", "dynamic", "yarn", "yarn_mscale", "longrope", "llama3", "proportional", "partial")
POSITION_KINDS = ("short", "near_2_8", "near_2_11", "log_uniform", "near_65536", "decode", "packed")


def make_positions(kind: str, shape: tuple, rng):
    """Integer positions ``[B, T]`` (int32), arbitrary per row, from one of POSITION_KINDS."""
    import numpy as np

    b, t = shape
    if kind == "short":
        return rng.integers(0, 257, size=(b, t)).astype(np.int32)
    if kind in ("near_2_8", "near_2_11", "near_65536"):
        centre = {"near_2_8": 256, "near_2_11": 2048, "near_65536": 65536}[kind]
        return np.clip(centre + rng.integers(-64, 65, size=(b, t)), 0, None).astype(np.int32)
    if kind == "log_uniform":
        return np.floor(2.0 ** rng.uniform(0, 17, size=(b, t))).astype(np.int32)
    if kind == "decode":  # each row a contiguous run from its own cache offset
        start = np.floor(2.0 ** rng.uniform(0, 17, size=(b, 1))).astype(np.int64)
        return (start + np.arange(t)[None, :]).astype(np.int32)
    # packed: several sequences per row, each restarting at 0
    out = np.zeros((b, t), np.int32)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(1, max(t, 2)), size=min(2, max(t - 1, 0)), replace=False)) if t > 1 else []
        starts = [0, *cuts]
        for j, s0 in enumerate(starts):
            e0 = starts[j + 1] if j + 1 < len(starts) else t
            out[i, s0:e0] = np.arange(e0 - s0)
    return out


def _cases():
    from hypothesis import strategies as st

    from oracles import strategies as S
    from oracles.registry import Case

    @st.composite
    def cases(draw, dtype=None, config=None):
        dt = dtype or draw(S.dtypes())
        h = draw(st.sampled_from((64, 128, 256)))
        if config is not None and config not in rope_configs(h):
            h = 128
        name = config or draw(st.sampled_from(sorted(rope_configs(h))))
        cfg = rope_configs(h)[name]
        b, t = draw(st.sampled_from([(1, 1), (2, 7), (1, 32)]))
        lo = draw(st.integers(-2, 2))
        kwargs = dict(theta=draw(st.sampled_from([1e4, 5e5, 1e6])), rope_type=cfg["rope_type"],
                      partial_rotary_factor=cfg.get("partial_rotary_factor", 1.0), scaling=cfg.get("scaling"),
                      max_position_embeddings=cfg.get("max_position_embeddings"), seq_len=cfg.get("seq_len"),
                      layout=draw(st.sampled_from(LAYOUTS)))
        return Case(op="rope", dtype=dt, shapes={"x": (b, t, 2, h), "positions": (b, t)}, kwargs=kwargs,
                    data={"seed": draw(S.seeds()), "config": name, "log10_scale": [lo, draw(st.integers(lo, 2))],
                          "positions": draw(st.sampled_from(POSITION_KINDS))})

    return cases


def hashable_kwargs(kwargs: dict) -> dict:
    """Case kwargs with JSON lists turned back into tuples (jit options must be hashable)."""
    def fix(v):
        return tuple(fix(u) for u in v) if isinstance(v, (list, tuple)) else v

    return {k: fix(v) for k, v in kwargs.items()}


def inputs(case):
    import numpy as np

    from oracles import strategies as S

    rng = np.random.default_rng(case.data["seed"])
    lo, hi = case.data["log10_scale"]
    shape = case.shapes["x"]
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(lo, hi, size=(*shape[:-1], 1))
    pos = make_positions(case.data["positions"], case.shapes["positions"], rng)
    return {"x": S.round_to(x, case.dtype), "positions": pos}


def _split(kwargs: dict):
    kw = hashable_kwargs(kwargs)
    freq = {k: kw[k] for k in ("theta", "rope_type", "partial_rotary_factor", "max_position_embeddings", "seq_len")}
    freq["scaling"] = None if kw["scaling"] is None else {k: (list(v) if isinstance(v, tuple) else v)
                                                         for k, v in kw["scaling"]}
    return freq, kw["layout"]


def oracle_pipeline(x: torch.Tensor, positions: torch.Tensor, *, exact: bool = False, **kwargs):
    """Frequencies, tables and rotation through the oracles; returns (cos, sin, y)."""
    freq, layout = _split(kwargs)
    inv, att = rope_frequencies(x.shape[-1], **freq, exact=exact)
    cos, sin = rope_cos_sin(positions, inv, attention_scaling=att, dtype=x.dtype, exact=exact)
    return cos, sin, apply_rope(x, cos, sin, layout=layout, exact=exact)


def kernel_pipeline(x, positions, *, theta, rope_type, partial_rotary_factor, scaling, max_position_embeddings,
                    seq_len, layout):
    """The composite the registry drives (and mutants replace): the three JAX kernels in a row.

    ``scaling`` is a tuple of (key, value) items so that it can be a jit option.
    Returns ``(cos, sin, y)``.
    """
    from kernels.rope import apply_rope as k_apply
    from kernels.rope import rope_cos_sin as k_tables
    from kernels.rope import rope_frequencies as k_freq

    freq, _ = _split(dict(theta=theta, rope_type=rope_type, partial_rotary_factor=partial_rotary_factor,
                          scaling=scaling, max_position_embeddings=max_position_embeddings, seq_len=seq_len,
                          layout=layout))
    inv, att = k_freq(x.shape[-1], **freq)
    cos, sin = k_tables(positions, inv, attention_scaling=att, dtype=x.dtype)
    return cos, sin, k_apply(x, cos, sin, layout=layout)


def _grad_call(kernel, a, **kw):
    return kernel(a["x"], a["positions"], **kw)[2]  # y: the tables have no input to differentiate


def _gradient(case, kernel):
    import numpy as np

    from oracles.gradients import GradProblem

    def oracle(t, exact):
        return oracle_pipeline(t["x"], torch.from_numpy(t["positions"].astype(np.int64)), **case.kwargs,
                               exact=exact)[2]

    return GradProblem(inputs=inputs(case), diff=("x",), call=_grad_call, kernel=kernel, oracle=oracle,
                       static=hashable_kwargs(case.kwargs))


def _evaluate(case, kernel):
    import numpy as np

    from oracles.arrays import to_torch
    from oracles.compare import dtype_name, to_f64
    from oracles.registry import Outcome, jitted

    inp = inputs(case)
    kw = hashable_kwargs(case.kwargs)
    kc, ks, ky = jitted(kernel, **kw)(inp["x"], inp["positions"])
    xt, pt = to_torch(inp["x"]), torch.from_numpy(inp["positions"].astype(np.int64))
    oc, os_, oy = oracle_pipeline(xt, pt, **kw)
    tc, ts, ty = oracle_pipeline(xt, pt, **kw, exact=True)

    def flat(*arrs):
        return np.concatenate([to_f64(a).ravel() for a in arrs])

    kernel_dtype = dtype_name(ky.dtype) if ky.dtype == kc.dtype == ks.dtype else f"mixed {ky.dtype}/{kc.dtype}"
    k = flat(kc, ks, ky)
    return Outcome(kernel=k, oracle=flat(oc, os_, oy), truth=flat(tc, ts, ty), out_dtype=dtype_name(oy.dtype),
                   inputs={**inp, "n_table": int(np.prod(oc.shape)), "table_shape": tuple(oc.shape)},
                   kernel_dtype=kernel_dtype, kernel_shape=k.shape)


def _properties(case, outcome, budget):
    """Tables against float64 cos/sin of the kernel's own float32 angles; position 0;
    rotation preserves each head's norm (times the attention scaling)."""
    import numpy as np

    from kernels.rope import rope_frequencies as k_freq
    from oracles.compare import Judgment, ulp_distance
    from oracles.strategies import NP_DTYPES

    freq, _ = _split(case.kwargs)
    x, pos = outcome.inputs["x"], outcome.inputs["positions"]
    n = outcome.inputs["n_table"]
    shape = outcome.inputs["table_shape"]
    cos = outcome.kernel[:n].reshape(shape)
    sin = outcome.kernel[n:2 * n].reshape(shape)
    y = outcome.kernel[2 * n:].reshape(x.shape)
    inv, att = k_freq(x.shape[-1], **freq)
    angle = (pos.astype(np.float32)[:, :, None] * inv[None, None, :]).astype(np.float64)  # HF's rounded angle
    scale = float(np.float32(att))
    want_c = np.concatenate([np.cos(angle), np.cos(angle)], -1) * scale
    want_s = np.concatenate([np.sin(angle), np.sin(angle)], -1) * scale
    js = []
    lim = budget.properties["table_ulps"]
    d = max(float(np.max(ulp_distance(cos, want_c, dtype=case.dtype, floor_rel=budget.parity.floor_rel))),
            float(np.max(ulp_distance(sin, want_s, dtype=case.dtype, floor_rel=budget.parity.floor_rel))))
    js.append(Judgment("table_vs_f64", d <= lim, {"table_ulps": d}, {"table_ulps": lim},
                       f"cos/sin tables vs float64 cos/sin of the float32 angles: {d:.3g} ulps [budget {lim:g}]"))
    at0 = pos == 0
    one = float(np.float32(att).astype(NP_DTYPES[case.dtype]))
    bad0 = int(np.count_nonzero(sin[at0] != 0) + np.count_nonzero(cos[at0] != one))
    if att == 1.0:
        bad0 += int(np.count_nonzero(y[at0] != x.astype(np.float64)[at0]))
    js.append(Judgment("position_zero", bad0 == 0, {"position_zero_bad": bad0}, {"position_zero_bad": 0},
                       f"Entries at position 0 that are not cos = {one}, sin = 0, y = x: {bad0}"))
    r = shape[-1]
    x64 = x.astype(np.float64)
    nx = np.linalg.norm(x64[..., :r], axis=-1) * att
    ny = np.linalg.norm(y[..., :r], axis=-1)
    ok_rows = np.isfinite(nx) & (nx > 0)
    err = float(np.max(np.abs(ny[ok_rows] - nx[ok_rows]) / nx[ok_rows])) if ok_rows.any() else 0.0
    lim = budget.properties["norm_rel_err"]
    js.append(Judgment("norm", err <= lim, {"norm_rel_err": err}, {"norm_rel_err": lim},
                       f"Largest relative change of a head's rotary norm (times attention scaling): {err:.3g} "
                       f"[budget {lim:g}]"))
    passthrough = int(np.count_nonzero(y[..., r:] != x64[..., r:]))
    js.append(Judgment("passthrough", passthrough == 0, {"passthrough_changed": passthrough},
                       {"passthrough_changed": 0}, f"Pass-through channels (>= R = {r}) changed: {passthrough}"))
    return js


def _make_harness():
    from oracles.registry import Harness

    return Harness(cases=_cases(), evaluate=_evaluate, kernel=kernel_pipeline, properties=_properties,
                   gradient=_gradient)


HARNESS = _make_harness()
