"""A decode step's bf16 projections: what ``precision=HIGHEST`` on bf16 operands costs XLA's GEMV.

    python3 benchmarks/probe_dot_precision.py --out $OUT/probe_dot_precision_h100.json   # on the GPU

Session 25's step census (probe_step_census.py) found XLA compiling a 0.5B decode step's
one-row q/k/v/o projections (``kernels._dot.dot_f32`` on bf16 operands, precision HIGHEST)
as three kernels: a loop fusion that writes every float32 product ``x[k] * w[k, n]`` to
memory (``f32[896, 896]``, twice the weight's bytes), a column reduction that reads them
back, and the bias and rounding. bf16 products are exact in float32, so the precision
setting changes nothing numerically for bf16 operands with a float32 result; it only
changes which path XLA takes.

One row, bf16, each Qwen2.5 decode-step projection (``probe_gemv.SHAPES``), in turns
(``devtime.in_turns``, each call over enough weight sets to pass the L2):

* ``xla``: ``kernels.projection.linear`` / ``lm_head`` with ``implementation="xla"`` (HIGHEST);
* ``xla_default``: the same recipe with ``precision=DEFAULT`` on the bf16 dot (float32
  result, bias added in float32, one rounding);
* ``gemv``: the Pallas GEMV at its default tiling (``kernels.linear_pallas``).

Each side's outputs against ``xla``'s (share of outputs that differ, most ulps) and the
float64 truth. ``--step``: the whole decode step (S = 32768 slots half filled) as the code
is and with ``dot_f32``'s bf16 dots at DEFAULT, in turns.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-7b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--set-bytes", type=float, default=200e6)
    ap.add_argument("--step", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from devtime import copy_gb_s, in_turns
    from probe_gemv import SHAPES

    from kernels import projection as P
    from kernels.linear_pallas import pallas_linear

    bf16 = jnp.bfloat16
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": [], "steps": []}
    res["copy_gb_s"] = copy = copy_gb_s(torch)

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    def default_prec(x, w, b, lay):
        dims = (((x.ndim - 1,), (0 if lay == "KN" else 1,)), ((), ()))
        y = jax.lax.dot_general(x, w, dimension_numbers=dims, precision=jax.lax.Precision.DEFAULT,
                                preferred_element_type=jnp.float32)  # [1, 1, N]: exact products, f32 sums
        if b is not None:
            y = y + b.astype(jnp.float32)  # the bias in f32, as the recipe
        return y.astype(x.dtype)  # one rounding

    for model in args.models.split(","):
        for name, k, n, lay, has_bias in SHAPES[model]:
            wbytes = k * n * 2
            sets = max(1, min(256, math.ceil(args.set_bytes / wbytes)))
            key = jax.random.PRNGKey(hash((k, n)) % 2**31)
            ins = []
            for i in range(sets):
                kx, kw, kb = jax.random.split(jax.random.fold_in(key, i), 3)
                x = jax.random.normal(kx, (1, 1, k), bf16)  # [B, T, K]: one token
                w = (jax.random.normal(kw, (k, n) if lay == "KN" else (n, k), jnp.float32) * k ** -0.5).astype(bf16)
                ins.append((x, w, jax.random.normal(kb, (n,), bf16) if has_bias else None))
            op = "linear" if lay == "KN" else "lm_head"
            if lay == "KN":
                xla = lambda x, w, b: P.linear(x, w, b, implementation="xla")  # noqa: E731
            else:
                xla = lambda x, w, b: P.lm_head(x, w, w_layout="VD", implementation="xla")  # noqa: E731
            fns = {"xla": xla,
                   "xla_default": lambda x, w, b, lay=lay: default_prec(x, w, b, lay),
                   "gemv": lambda x, w, b, lay=lay, op=op: pallas_linear(x, w, b, w_layout=lay, op=op)}
            progs = {lab: jax.jit(lambda ss, f=f: [f(*s) for s in ss]) for lab, f in fns.items()}
            outs = {lab: np.asarray(jax.block_until_ready(g(ins[:1]))[0], np.float32).reshape(n)
                    for lab, g in progs.items()}
            x0, w0, b0 = ins[0]
            wf = np.asarray(w0, np.float64) if lay == "KN" else np.asarray(w0, np.float64).T
            truth = (np.asarray(x0, np.float64).reshape(1, k) @ wf).reshape(n) + (
                0 if b0 is None else np.asarray(b0, np.float64))
            ref = outs["xla"].astype(np.float64)
            ulp = np.maximum(2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - 7), 2.0 ** -133)
            row = {"model": model, "op": name, "k": k, "n": n, "w_layout": lay, "weight_bytes": wbytes,
                   "sets": sets, "sides": {}}
            for lab, o in outs.items():
                d = np.abs(o - ref)
                row["sides"][lab] = {"diff_frac": float((d > 0).mean()), "max_ulps": float((d / ulp).max()),
                                     "err": float(np.abs(o - truth).max() / np.abs(truth).max())}
            sides = {lab: (lambda i, g=g: g(ins), jax.block_until_ready) for lab, g in progs.items()}
            spans, kernels = in_turns(torch, sides, rounds=args.rounds, calls=args.trials)
            for lab in progs:
                us = statistics.median(s / sets * 1e6 for s in spans[lab])
                row["sides"][lab].update(us=us, of_copy=wbytes / us / 1e3 / copy, kernels=kernels[lab])
            s = row["sides"]
            print(f"{model} {name} [{k}x{n}] xla {s['xla']['us']:.2f} us, xla_default {s['xla_default']['us']:.2f} "
                  f"(diff {s['xla_default']['diff_frac']:.4f}, err {s['xla_default']['err']:.2e} vs "
                  f"{s['xla']['err']:.2e}), gemv {s['gemv']['us']:.2f}; kernels {kernels}", flush=True)
            res["rows"].append(row)
            save()
            del ins, progs
    if args.step:
        for model in args.models.split(","):
            res["steps"].append(_step(model, args, torch, in_turns))
            save()


def _step(model, args, torch, in_turns):
    """The whole decode step as the code is, and with dot_f32's bf16 dots at DEFAULT precision."""
    import jax
    import jax.numpy as jnp

    import kernels._dot as D
    from kernels.models import qwen2 as M
    from probe_model_decode import step_inputs

    S = 32768
    cfg, params, kv = step_inputs(model, S)
    ids = jnp.ones((1, 1), jnp.int32)  # [B, T]
    real = D._plain

    def default_plain(x, w, dims):
        prec = jax.lax.Precision.DEFAULT if x.dtype != jnp.float32 else jax.lax.Precision.HIGHEST
        return jax.lax.dot_general(x, w, dimension_numbers=(dims, ((), ())), precision=prec,
                                   preferred_element_type=jnp.float32)

    steps, logits, sides = {}, {}, {}
    for v, plain in (("highest", real), ("default", default_plain)):
        st = {"k": [jnp.copy(x) for x in kv["k"]], "v": [jnp.copy(x) for x in kv["v"]], "length": jnp.int32(S // 2)}
        D._plain = plain
        jax.clear_caches()
        try:
            steps[v] = jax.jit(M._step, static_argnames=("cfg", "logits_dtype"), donate_argnums=(1,)).lower(
                params, st, ids, cfg=cfg, logits_dtype=None).compile()
        finally:
            D._plain = real
            jax.clear_caches()

        def call(i, st=st, step=steps[v]):
            out, new = step(params, {key: st[key] for key in ("k", "v", "length")}, ids)
            st.update(new)
            return out

        logits[v] = jax.block_until_ready(call(0))
        sides[v] = (call, jax.block_until_ready)
    del kv
    spans, _ = in_turns(torch, sides, rounds=3, calls=args.trials)
    from devtime import device_span

    out = {"model": model, "fill": S // 2, "slots": S}
    for v in steps:
        d = device_span(torch, sides[v][0], jax.block_until_ready, calls=2, top=6)
        out[v] = {"us_rounds": [s * 1e6 for s in spans[v]], "us": statistics.median(spans[v]) * 1e6,
                  "kernels": d.get("kernels_per_app"), "top_kernels_s": d.get("top_kernels_s"),
                  "logits_diff_frac": float(jnp.mean(logits[v].astype(jnp.float32)
                                                     != logits["highest"].astype(jnp.float32))),
                  "argmax_same": bool(jnp.argmax(logits[v]) == jnp.argmax(logits["highest"]))}
        print(model, v, f"{out[v]['us']:.1f} us, {out[v]['kernels']} kernels, logits diff "
              f"{out[v]['logits_diff_frac']:.4f}", flush=True)
    out["highest_over_default"] = out["highest"]["us"] / out["default"]["us"]
    return out


if __name__ == "__main__":
    main()
