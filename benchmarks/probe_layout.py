"""Does the weight's layout ([in, out] or torch's [out, in]) change the GEMM's speed, next to cuBLAS?

    python3 benchmarks/probe_layout.py --out $OUT/probe_layout_h100.json
    .venv/bin/python benchmarks/probe_layout.py --smoke --out /tmp/probe_layout.json   # CPU: tiny, untimed

XLA picks each GEMM itself (autotuning cuBLAS's candidates and its own Triton tilings),
so what a kernel can choose is the weight's layout and the compiler's options. At the
Qwen2.5-7B prefill shapes (4096 rows, bf16), this probe times in turns (each round: every
side once, ``--calls`` calls under the CUPTI trace, devtime.in_turns; the result is
each side's median span):

lm_head, float32 logits (gpu.py's ``lm_head_vs_cublas``), h[4096, 3584], V = 152064:
* ``D,V``: ``kernels.lm_head`` on ``w[D, V]``;
* ``V,D``: ``kernels.lm_head(w_layout="VD")`` on the same weight stored ``[V, D]``
  (HF's ``lm_head.weight``);
* ``+lt``: each compiled with ``xla_gpu_enable_cublaslt`` (XLA autotunes over cuBLASLt's
  algorithm list); ``triton``: ``xla_gpu_cublas_fallback=False`` (XLA's own Triton GEMM);
* torch's bf16 GEMM both ways: ``torch.matmul`` on ``[D, V]`` (gpu.py's peer) and
  ``F.linear`` on ``[V, D]`` (HF's own call).

The layer projections, bf16 out (``kernels.linear``'s recipe: a float32 GEMM, one
rounding): q/o (3584 -> 3584), k/v (3584 -> 512), gate/up (3584 -> 18944), down
(18944 -> 3584), each with the weight ``[in, out]`` (``kernels.linear``) and ``[out, in]``
(the same float32 GEMM contracting the weight's axis 1, ``kernels._dot.dot_f32``), and
torch's ``F.linear`` on ``[out, in]``.

Every output is checked against the first form's (largest |difference|).

Result (H100, 2026-11-22, results/probe_layout_h100.json; tables in benchmarks/README.md):
the lm_head on ``[V, D]`` took 5.568 ms, 1.037x torch's bf16 GEMM, against 5.821 ms
(0.992x) on ``[D, V]``: XLA picks another cuBLAS kernel for it. The two compiler options
changed no kernel. For the layer projections the layout changed nothing (within 1.5%);
they run at 0.76-0.99 of torch's ``F.linear``, the gap being the separate bf16 convert.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# (name, in, out) of the 7B layer projections at prefill
PROJECTIONS = (("q_proj/o_proj", 3584, 3584), ("k_proj/v_proj", 3584, 512), ("gate_proj/up_proj", 3584, 18944),
               ("down_proj", 18944, 3584))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, no timing (any backend)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import kernels
    from devtime import in_turns
    from kernels._dot import dot_f32

    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "torch": torch.__version__,
           "rounds": args.rounds, "calls_a_turn": args.calls}
    key = [jax.random.PRNGKey(0)]

    def randn(shape, scale=1.0):
        key[0], k = jax.random.split(key[0])
        return (jax.random.normal(k, shape, jnp.float32) * scale).astype(jnp.bfloat16)

    def build(variants, args_of):
        """Compile each variant; returns {name: (call, sync)} and records diffs/errors in ``rec``."""
        rec, sides, ref = {}, {}, None
        for name, (fn, opts) in variants.items():
            a = args_of(name)
            try:
                t0 = time.perf_counter()
                c = jax.jit(fn).lower(*a).compile(compiler_options=opts or None)
                cs = time.perf_counter() - t0
                out = jax.block_until_ready(c(*a)).astype(jnp.float32)
                ref = out if ref is None else ref
                rec[name] = {"options": opts, "compile_s": cs, "max_abs_diff_vs_first": float(jnp.max(jnp.abs(out - ref)))}
                del out
                sides[name] = (lambda i, c=c, a=a: c(*a), jax.block_until_ready)
            except Exception as exc:  # an option this XLA does not take: recorded, not fatal
                rec[name] = {"options": opts, "error": f"{type(exc).__name__}: {exc}"[:400]}
            print(f"  {name}: {rec[name]}", flush=True)
        return rec, sides

    def timed(sides, flops, peer):
        with torch.inference_mode():
            spans, kern = in_turns(torch, sides, rounds=args.rounds, calls=args.calls)
        p = statistics.median(spans[peer])
        out = {k: {"median_s": statistics.median(v), "spans_s": v, "tflops": flops / statistics.median(v) / 1e12,
                   "vs_" + peer: p / statistics.median(v), "kernels": kern[k]} for k, v in spans.items()}
        for k, v in out.items():
            print(f"    {k:42s} {v['median_s'] * 1e6:9.1f} us  {v['tflops']:6.1f} TFLOP/s  x{p / v['median_s']:.4f}  "
                  f"{v['kernels'][:1]}", flush=True)
        return out

    tsync = lambda _: torch.cuda.synchronize()

    # --- lm_head, float32 logits ---
    T, D, V = (64, 128, 512) if args.smoke else (4096, 3584, 152064)
    h = randn((T, D))
    w = randn((D, V), D ** -0.5)  # [D, V]
    wt = jnp.asarray(w.T)  # [V, D]: HF's layout, a real copy (not a view)
    dv = lambda a, b: kernels.lm_head(a, b, logits_dtype="float32")
    vd = lambda a, b: kernels.lm_head(a, b, logits_dtype="float32", w_layout="VD")
    lt, tri = {"xla_gpu_enable_cublaslt": True}, {"xla_gpu_cublas_fallback": False}
    variants = {"jax D,V": (dv, {}), "jax V,D": (vd, {}), "jax D,V +lt": (dv, lt), "jax V,D +lt": (vd, lt),
                "jax D,V triton": (dv, tri), "jax V,D triton": (vd, tri)}
    print(f"lm_head h[{T},{D}] V={V} -> float32", flush=True)
    rec, sides = build(variants, lambda n: (h, wt if "V,D" in n else w))
    res["lm_head"] = {"shape": f"h[{T},{D}] bf16 @ w (V={V}) bf16 -> float32 logits", "variants": rec}
    if not args.smoke:
        th, tw, twt = (torch.from_dlpack(a) for a in (h, w, wt))
        sides["torch bf16 D,V (torch.matmul)"] = (lambda i: torch.matmul(th, tw), tsync)
        sides["torch bf16 V,D (F.linear)"] = (lambda i: F.linear(th, twt), tsync)
        res["lm_head"]["sides"] = timed(sides, 2 * T * D * V, "torch bf16 D,V (torch.matmul)")
        del th, tw, twt
    del h, w, wt, sides

    # --- the layer projections, bf16 out ---
    res["projections"] = {}
    io = lambda a, b: kernels.linear(a, b)  # w [in, out]
    oi = lambda a, b: dot_f32(a, b, w_contract=1).astype(a.dtype)  # w [out, in]: linear's recipe, the other axis
    for name, i, o in PROJECTIONS:
        if args.smoke:
            i, o = i // 28, o // 28
        x = randn((T, i))
        w = randn((i, o), i ** -0.5)  # [in, out]
        wt = jnp.asarray(w.T)  # [out, in]: torch's layout
        print(f"{name} x[{T},{i}] -> {o}", flush=True)
        rec, sides = build({"jax in,out": (io, {}), "jax out,in": (oi, {})}, lambda n: (x, wt if "out,in" in n else w))
        res["projections"][name] = {"shape": f"x[{T},{i}] bf16 -> [{T},{o}] bf16", "variants": rec}
        if not args.smoke:
            tx, twt = torch.from_dlpack(x), torch.from_dlpack(wt)
            sides["torch F.linear out,in"] = (lambda i, tx=tx, twt=twt: F.linear(tx, twt), tsync)
            res["projections"][name]["sides"] = timed(sides, 2 * T * i * o, "torch F.linear out,in")
            del tx, twt
        del x, w, wt, sides
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
