"""A decode step's projections: XLA's GEMV against the Pallas GEMV (kernels.linear_pallas).

    python3 benchmarks/probe_gemv.py --out $OUT/probe_gemv_h100.json            # on the GPU
    .venv/bin/python benchmarks/probe_gemv.py --smoke --out /tmp/p.json          # interpret mode, CPU

A decode step multiplies one row by every weight of the model: each projection is bound
by reading its weight. Session 23's whole-step probe (probe_model_decode.py) found a
0.5B step at 1.5 ms where its 1 GB of weights take 0.33 ms at copy bandwidth, its largest
kernel an XLA reduce fusion of 387 us a step.

* ``sweep``: every projection of a Qwen2.5-0.5B and -7B decode step (one row, bf16: q/k/o
  with their biases, gate, down, and the lm_head ``[V, D]`` as the model holds it,
  model-dtype logits), as XLA compiles it (``implementation="xla"``, the default for one
  row) and as the Pallas GEMV in several tilings, in turns (``devtime.in_turns``). A call
  applies the op to enough weight sets (distinct arrays) that they pass the L2 cache
  (``--set-bytes``), as a model's layers do. Each row holds the bytes read, the GB/s
  (fractions of the copy), and the outputs' agreement: the share of outputs the Pallas
  GEMV rounds differently from XLA, the most ulps, and both paths' error against the
  float64 truth.
* ``step`` (``--step``): the whole ``decode_step`` (random weights, S = 32768 slots half
  filled) with every projection on XLA, and as the code is (``linear``'s GPU default takes
  the GEMV where ``kernels.projection.pallas_preferred`` says), compiled ahead of time each,
  in turns.

Result (H100, 2026-11-23, results/probe_gemv_h100.json, copy 3005 GB/s): 7B q/o 23.2 / 22.0 us on
XLA (0.37-0.39 of copy) against 12.6 / 12.5 on the GEMV, k/v 10.8 against 5.5; gate, down and
the lm_head faster on XLA (0.93, 0.87, 1.06 of copy). The 7B step 6537.7 us against 7474.9
(1.143x); 0.5B 1640.1 against 1644.9. Reading: benchmarks/README.md (session 24).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from pathlib import Path

# (name, K, N, w_layout, bias): one row of a Qwen2.5 decode step (k and v share a shape; up, gate's)
SHAPES = {
    "qwen2.5-0.5b": [("q_proj", 896, 896, "KN", True), ("k_proj", 896, 128, "KN", True), ("o_proj", 896, 896, "KN", False),
                     ("gate_proj", 896, 4864, "KN", False), ("down_proj", 4864, 896, "KN", False),
                     ("lm_head", 896, 151936, "NK", False)],
    "qwen2.5-7b": [("q_proj", 3584, 3584, "KN", True), ("k_proj", 3584, 512, "KN", True), ("o_proj", 3584, 3584, "KN", False),
                   ("gate_proj", 3584, 18944, "KN", False), ("down_proj", 18944, 3584, "KN", False),
                   ("lm_head", 3584, 152064, "NK", False)],
}
SMOKE = {"tiny": [("q_proj", 64, 48, "KN", True), ("lm_head", 32, 200, "NK", False)]}

# (block_n, block_k, num_warps, num_stages) per layout; each also with K split to fill the
# GPU when its column blocks are fewer than 2 a SM
CONFIGS = {
    "KN": [(128, 32, 4, 3), (64, 64, 4, 3), (256, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (32, 64, 4, 3)],
    "NK": [(64, 64, 4, 3), (32, 128, 4, 3), (16, 256, 4, 3), (64, 128, 8, 3), (32, 256, 8, 3)],
}


def _splits(k, n, bn, bk, sms):
    """K splits that give at least 2 programs a SM, each split at least 4 K steps; 1 if none needed."""
    blocks = -(-n // bn)
    if blocks >= 2 * sms:
        return 1
    want = -(-2 * sms // blocks)
    return max(1, min(want, (-(-k // bk)) // 4))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-7b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--set-bytes", type=float, default=200e6, help="bytes of weights a timed call reads, at least")
    ap.add_argument("--step", action="store_true", help="also time the whole decode step")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from kernels import projection as P
    from kernels.linear_pallas import pallas_linear

    bf16 = jnp.bfloat16
    interpret = args.smoke
    sms = 4 if args.smoke else jax.devices()[0].core_count
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "sms": sms, "rows": [], "steps": []}
    if not args.smoke:
        import torch

        from devtime import copy_gb_s, in_turns
        res["copy_gb_s"] = copy = copy_gb_s(torch)
        print(f"copy {copy:.0f} GB/s", flush=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    faster = []  # the (K, N, layout) where the GEMV beat XLA
    shapes = SMOKE if args.smoke else {m: SHAPES[m] for m in args.models.split(",")}
    for model, rows in shapes.items():
        for name, k, n, lay, has_bias in rows:
            wbytes = k * n * 2
            sets = 1 if args.smoke else max(1, min(256, math.ceil(args.set_bytes / wbytes)))
            key = jax.random.PRNGKey(hash((k, n)) % 2**31)
            wshape = (k, n) if lay == "KN" else (n, k)
            ins = []
            for i in range(sets):
                kx, kw, kb = jax.random.split(jax.random.fold_in(key, i), 3)
                x = jax.random.normal(kx, (1, 1, k), bf16)  # [B, T, K]: one token
                w = (jax.random.normal(kw, wshape, jnp.float32) * k ** -0.5).astype(bf16)
                b = jax.random.normal(kb, (n,), bf16) if has_bias else None
                ins.append((x, w, b))

            if lay == "KN":
                xla = lambda x, w, b: P.linear(x, w, b, implementation="xla")  # noqa: E731
            else:
                xla = lambda x, w, b: P.lm_head(x, w, w_layout="VD", implementation="xla")  # noqa: E731
            fns = {"xla": xla}
            for bn, bk, nw, ns in CONFIGS[lay]:
                sp = _splits(k, n, bn, bk, sms)
                for s in sorted({1, sp}):
                    cfg = dict(block_n=bn, block_k=bk, splits=s, num_warps=nw, num_stages=ns)
                    label = f"pallas {bn}x{bk} s{s} w{nw} st{ns}"
                    fns[label] = functools.partial(
                        lambda x, w, b, cfg: pallas_linear(x, w, b, w_layout=lay, interpret=interpret,
                                                           op="lm_head" if lay == "NK" else "linear", **cfg),
                        cfg=cfg)
            progs = {lab: jax.jit(lambda ss, f=f: [f(*s) for s in ss]) for lab, f in fns.items()}

            outs = {}
            for lab, g in progs.items():
                try:
                    outs[lab] = jax.block_until_ready(g(ins[:1]))[0]
                except Exception as e:  # a tiling Triton cannot compile: recorded, not timed
                    outs[lab] = f"{type(e).__name__}: {str(e)[:300]}"
            x0, w0, b0 = ins[0]
            wf = np.asarray(w0, np.float64) if lay == "KN" else np.asarray(w0, np.float64).T
            truth = np.asarray(x0, np.float64).reshape(1, k) @ wf + (0 if b0 is None else np.asarray(b0, np.float64))
            scale = np.abs(truth).max()
            ref = np.asarray(outs["xla"], np.float32).reshape(1, n)
            ulp = np.maximum(2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - 7), 2.0 ** -133)
            row = {"model": model, "op": name, "k": k, "n": n, "w_layout": lay, "bias": has_bias,
                   "weight_bytes": wbytes, "sets": sets, "sides": {}}
            good = {}
            for lab, o in outs.items():
                side = {}
                if isinstance(o, str):
                    side["error"] = o
                else:
                    o = np.asarray(o, np.float32).reshape(1, n)
                    d = np.abs(o.astype(np.float64) - ref)
                    side.update(diff_frac=float((d > 0).mean()), max_ulps=float((d / ulp).max()),
                                err=float(np.abs(o - truth).max() / scale))
                    good[lab] = progs[lab]
                row["sides"][lab] = side
            if not args.smoke:
                sides = {lab: (lambda i, g=g: g(ins), jax.block_until_ready) for lab, g in good.items()}
                spans, _ = in_turns(torch, sides, rounds=args.rounds, calls=args.trials)
                for lab in good:
                    per = [s / sets * 1e6 for s in spans[lab]]
                    us = statistics.median(per)
                    row["sides"][lab].update(us_rounds=per, us=us, gb_s=wbytes / us / 1e3,
                                             of_copy=wbytes / us / 1e3 / copy)
                fast = min((lab for lab in good if lab != "xla"), key=lambda lab: row["sides"][lab]["us"])
                row["fastest_pallas"] = fast
                row["xla_over_pallas"] = row["sides"]["xla"]["us"] / row["sides"][fast]["us"]
                if row["xla_over_pallas"] > 1:
                    faster.append([k, n, lay])
                print(f"{model} {name} [{k}x{n} {lay}] xla {row['sides']['xla']['us']:.2f} us "
                      f"({row['sides']['xla']['of_copy']:.3f}); {fast} {row['sides'][fast]['us']:.2f} us "
                      f"({row['sides'][fast]['of_copy']:.3f}): {row['xla_over_pallas']:.3f}x; "
                      f"diff {row['sides'][fast]['diff_frac']:.4f}, {row['sides'][fast]['max_ulps']:.1f} ulps", flush=True)
            else:
                print(model, name, json.dumps(row["sides"])[:400], flush=True)
            res["rows"].append(row)
            save()
            del ins, progs, outs
    if args.step and not args.smoke:
        for model in shapes:
            res["steps"].append(_step(model, faster, args, torch, in_turns))
            save()
    save()


def _step(model, faster, args, torch, in_turns):
    """The whole decode step with every projection on XLA, and as the code is (the GEMV where
    linear's GPU default takes it), in turns."""
    import jax
    import jax.numpy as jnp

    from kernels import projection as P
    from kernels.models import qwen2 as M
    from probe_model_decode import step_inputs

    S = 32768
    cfg, params, kv = step_inputs(model, S)
    ids = jnp.ones((1, 1), jnp.int32)  # [B, T]

    def xla_linear(x, w, b=None, **kw):
        return P.linear(x, w, b, **{**kw, "implementation": "xla"})

    def xla_head(h, w, **kw):
        return P.lm_head(h, w, **{**kw, "implementation": "xla"})

    # "xla": every projection on XLA (the default before session 24); "default": the code as
    # it is (linear's GPU default takes the GEMV where kernels.projection.pallas_preferred says).
    variants = {"xla": (xla_linear, xla_head), "default": (P.linear, P.lm_head)}
    steps, logits, sides = {}, {}, {}
    for v, (lf, hf) in variants.items():
        st = {"k": [jnp.copy(x) for x in kv["k"]], "v": [jnp.copy(x) for x in kv["v"]], "length": jnp.int32(S // 2)}
        M.linear, M.lm_head = lf, hf
        jax.clear_caches()  # no trace of another variant reused
        try:
            steps[v] = jax.jit(M._step, static_argnames=("cfg", "logits_dtype"), donate_argnums=(1,)).lower(
                params, st, ids, cfg=cfg, logits_dtype=None).compile()
        finally:
            M.linear, M.lm_head = P.linear, P.lm_head
            jax.clear_caches()

        def call(i, st=st, step=steps[v]):  # each side threads its own cache (donated: written in place)
            out, new = step(params, {key: st[key] for key in ("k", "v", "length")}, ids)
            st.update(new)
            return out

        logits[v] = jax.block_until_ready(call(0))  # at S // 2 filled slots, every variant alike
        sides[v] = (call, jax.block_until_ready)
    del kv
    spans, _ = in_turns(torch, sides, rounds=3, calls=args.trials)
    from devtime import device_span

    out = {"model": model, "fill": S // 2, "slots": S}
    ref = logits["xla"].astype(jnp.float32)
    for v in steps:
        per = [s * 1e6 for s in spans[v]]
        d = device_span(torch, sides[v][0], jax.block_until_ready, calls=2, top=6)
        out[v] = {"us_rounds": per, "us": statistics.median(per), "kernels": d.get("kernels_per_app"),
                  "top_kernels_s": d.get("top_kernels_s"),
                  "logits_diff_frac": float(jnp.mean(logits[v].astype(jnp.float32) != ref)),
                  "argmax_same": bool(jnp.argmax(logits[v]) == jnp.argmax(logits["xla"]))}
        print(model, v, f"{out[v]['us']:.1f} us, {out[v]['kernels']} kernels, logits diff "
              f"{out[v]['logits_diff_frac']:.4f}", flush=True)
    out["faster_shapes"] = faster
    out["default_hlo_linear_pallas_mentions"] = steps["default"].as_text().count("linear_pallas")
    hlo = steps["xla"].as_text()
    out["xla_top_fusions"] = {}
    for name in out["xla"]["top_kernels_s"] or {}:  # the HLO of the largest kernels: which op each is
        stem, _, num = name.rpartition("_")
        at = hlo.find(f"%{stem}.{num} = ")
        out["xla_top_fusions"][name] = hlo[at:at + 400].split("\n")[0] if at >= 0 else None
    out["xla_over_default"] = out["xla"]["us"] / out["default"]["us"]
    return out


if __name__ == "__main__":
    main()
