"""Can a TMA + wgmma GEMM that rounds in its own epilogue close kernels.linear's gap to cuBLAS?

    python3 benchmarks/probe_mosaic_gemm.py --ours --out $OUT/probe_mosaic_gemm_h100.json
    python3 benchmarks/probe_mosaic_gemm.py --head --head-all --out $OUT/probe_mosaic_gemm_head_h100.json

``kernels.linear`` keeps torch's recipe (a float32 sum, one rounding to bf16) as a float32
GEMM followed by a separate convert, because XLA compiles a bf16-output dot on small
shapes to paths without a float32 sum (``probe_gemm_round.py``). The convert costs a
float32 round trip: the 7B MLP's projections run at 0.80-0.95 of torch's ``F.linear``
(``probe_layout.py``). A kernel whose epilogue rounds its own float32 accumulator keeps
the recipe on every shape by construction. This probe asks whether such a kernel is fast
enough to be worth writing: JAX's Hopper example GEMM
(``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu``, Pallas on Mosaic GPU: TMA loads,
warp-specialised wgmma, f32 accumulator cast to the output dtype in the epilogue), used
as it is, over a few of its tilings, at the Qwen2.5 prefill projections (4096 rows, bf16).

Part 1 (``--example``): every tiling's device span (CUPTI, ``devtime.device_span``), then
the best tiling, ``kernels.linear``, torch ``F.linear`` (cuBLAS, weight ``[out, in]``) and
XLA's bf16-output dot timed in turns (``--rounds``). Bits: each output against
``kernels.linear``'s and torch's (fraction identical, largest difference in bf16 ulps).

Part 2 (``--ours``, after part 1 said yes): ``kernels.linear_mosaic``, the kernel written
here on the same plan with the bias added in its epilogue, in both of Mosaic GPU's
lowering semantics, against ``kernels.linear(implementation="xla")`` and torch
``F.linear`` (with the bias where the projection has one: q/k/v), timed in turns; bits
against both, also for float16 and a 3-D input.

Result (H100, 2026-11-22; part 1: results/probe_mosaic_gemm_example_h100.json, part 2:
results/probe_mosaic_gemm_h100.json): the example kernel, at its best tiling, reached
1.00-1.03x cuBLAS on the large 7B shapes and was bit-identical to ``kernels.linear`` and
to torch everywhere. Ours, in turns against torch ``F.linear``: 7B q_proj + bias 1.115x
(the XLA path 0.847x), k/v + bias 0.974x (0.758x), gate/up 1.024x (0.796x), down 0.965x
(0.952x); 0.5B q + bias 0.874x (0.458x), gate/up 1.351x (1.165x), down 0.992x (0.974x);
every output bit-identical to torch's, where the XLA path differs on 0.04-0.15% of
outputs with a bias. The two lowering semantics: the same bits and speed. (That run
compared the outputs converted to float32, so its ``max_ulps`` are null.) The re-run of
session 12 (results/probe_mosaic_gemm_rerun_h100.json), comparing in the model dtype:
ours 0 ulps from torch on every output of all eleven cases, the XLA path up to 18-30
ulps (on 0.04-0.15% of outputs, where the bias cancels the product); the ratios agree
within 0.03 except 7B k/v 0.936 and 0.5B gate/up 1.42 and down 0.918: the run-to-run
spread of these short GEMMs.

Part 3 (``--head``, session 15; ``--head-all`` adds the other tilings): ``lm_head`` at the
Qwen2.5 heads (h ``[4096, D]``, w ``[V, D]`` as the model holds it and ``[D, V]``) on the same
GEMM, generalised to read an ``[N, K]`` weight in place (wgmma takes the K-contiguous tile
transposed) and to write its float32 sum unrounded, against ``lm_head(implementation="xla")``
and torch's bf16 cuBLAS GEMM, in turns. Bits: identical to the XLA path on every logit, both
layouts, both dtypes of logits, every tiling. Time (x torch bf16; three runs on three
machines: results/probe_mosaic_gemm_head_run1_h100.json, ..._head_h100.json (run 2, every
tiling), ..._head_run3_h100.json):

| | 7B | 0.5B |
| --- | --- | --- |
| model-dtype logits, mosaic (the default now) | 1.011-1.013 | 0.992-1.001 |
| model-dtype logits, XLA (f32 GEMM, then a convert) | 0.839-0.846 | 0.550-0.559 |
| float32 logits, XLA `[V, D]` (the default) | 1.024-1.030 | 0.965-0.978 |
| float32 logits, mosaic, 128 x 256 blocks, 4 steps, 1 staging slot | 0.968-0.972 | 0.828-0.836 |
| the same, 3 steps and 2 slots / bands of 16 or 32 tiles | 0.966 / 0.944-0.959 | 0.786-0.796 / 0.836 |
| the same, other blocks (256 x 128; 128 x 128) | 0.911-0.918; 0.815-0.868 | 0.693 |
| the same, registers stored straight to global memory (run 3; not kept) | 0.923-0.926 | 0.803-0.810 |

A float32 tile is twice a bf16 one: with the pipeline's four steps it leaves one 64 x 64
staging slot a warpgroup, and the compute warpgroups' epilogue (which no K loop overlaps)
costs ~4% at 7B and ~17% at 0.5B (K = 896: 14 steps a block). So the default splits:
model-dtype logits on the mosaic GEMM (1.2x the XLA path at 7B, 1.8x at 0.5B), float32
logits on XLA's cuBLAS GEMM.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

# (name, rows, in, out); part 2 gives q/k/v their bias
SHAPES = (("7b q_proj/o_proj", 4096, 3584, 3584), ("7b k_proj/v_proj", 4096, 3584, 512),
          ("7b gate_proj/up_proj", 4096, 3584, 18944), ("7b down_proj", 4096, 18944, 3584),
          ("0.5b q_proj/o_proj", 4096, 896, 896), ("0.5b gate_proj/up_proj", 4096, 896, 4864),
          ("0.5b down_proj", 4096, 4864, 896))
# Part 2's extra bit checks: (name, x shape, out, dtype, bias)
BIT_CASES = (("f16 k_proj, bias", (4096, 896), 128, "float16", True), ("3-D x, bias", (2, 2048, 1536), 256, "bfloat16", True),
             ("f16 gate", (512, 2048), 11008, "float16", False), ("256 rows, bias", (256, 3584), 512, "bfloat16", True))
# Tilings tried (fields of the example's TuningConfig; cta tile = tile x 2 along wg_dimension).
CONFIGS = (
    dict(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4, grid_minor_dim="N", grid_tile_width=8,
         wg_dimension="N"),
    dict(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4, grid_minor_dim="M", grid_tile_width=8,
         wg_dimension="N"),
    dict(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4, grid_minor_dim="N", grid_tile_width=16,
         wg_dimension="M"),
    dict(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4, grid_minor_dim="N", grid_tile_width=4,
         wg_dimension="N", cluster_dimension="M"),
    dict(tile_m=128, tile_n=64, tile_k=64, max_concurrent_steps=5, grid_minor_dim="N", grid_tile_width=8,
         wg_dimension="N"),
    dict(tile_m=64, tile_n=128, tile_k=64, max_concurrent_steps=5, grid_minor_dim="N", grid_tile_width=8,
         wg_dimension="M"),
)


def ulps_16bit(np, a, b):
    """Largest |a - b| in ulps of their 16-bit float dtype (bf16 or f16, both arrays of it), via
    the order-preserving integer map of sign-magnitude bits."""
    def key(x):
        u = np.asarray(x).view(np.uint16).astype(np.int32)
        return np.where(u & 0x8000, -(u & 0x7FFF), u)
    return int(np.max(np.abs(key(a) - key(b))))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--example", action="store_true", help="part 1: JAX's example kernel, its tilings")
    ap.add_argument("--ours", action="store_true", help="part 2: kernels.linear_mosaic")
    ap.add_argument("--head", action="store_true", help="part 3: lm_head on kernels.linear_mosaic")
    ap.add_argument("--head-all", action="store_true", help="part 3 with every tiling of run 2")
    ap.add_argument("--only", default="", help="comma-separated shape names (default: all)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import kernels
    from devtime import device_span

    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "torch": torch.__version__}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: out_path.write_text(json.dumps(res, indent=1) + "\n")  # noqa: E731
    jsync = jax.block_until_ready
    tsync = lambda _: torch.cuda.synchronize()  # noqa: E731
    only = set(filter(None, args.only.split(",")))

    def turns(sides, flops, peer):
        spans = {s: [] for s in sides}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for s, (call, sync) in sides.items():
                    spans[s].append(device_span(torch, call, sync, 1, calls=args.calls).get("span_s", float("nan")))
        tp = statistics.median(spans[peer])
        out = {s: {"median_us": statistics.median(v) * 1e6, "spans_us": [t * 1e6 for t in v],
                   "tflops": flops / statistics.median(v) / 1e12, "vs_torch": tp / statistics.median(v)}
               for s, v in spans.items()}
        for s, v in out.items():
            print(f"    {s:34s} {v['median_us']:9.1f} us  {v['tflops']:6.1f} TFLOP/s  x{v['vs_torch']:.3f}", flush=True)
        return out

    def bits(a, b):
        """Both outputs in the model dtype: the fraction identical and the largest gap in its ulps."""
        a, b = np.asarray(a), np.asarray(b)
        return {"identical": float(np.mean(a == b)), "max_ulps": ulps_16bit(np, a, b)}

    key = jax.random.PRNGKey(0)

    def data(xshape, k, n, dt, bias):
        nonlocal key
        kx, kw, kb, key = jax.random.split(key, 4)
        x = jax.random.normal(kx, xshape, jnp.float32).astype(dt)
        w = (jax.random.normal(kw, (k, n), jnp.float32) * k ** -0.5).astype(dt)  # [in, out]
        b = (jax.random.normal(kb, (n,), jnp.float32) * 3.0).astype(dt) if bias else None
        return x, w, b

    def torch_linear(x, w, b):
        tx, twt = torch.from_dlpack(x), torch.from_dlpack(jnp.asarray(w.T))  # [out, in]: torch's layout
        tb = None if b is None else torch.from_dlpack(b)
        # torch's output back in x's dtype (exact: its values are x.dtype values), for bits().
        return (lambda i: F.linear(tx, twt, tb)), (
            lambda: F.linear(tx, twt, tb).cpu().float().numpy().astype(np.asarray(x[:1]).dtype))

    if args.example:
        res["example"] = part_example(args, res, save, only, jax, jnp, np, torch, F, kernels, device_span, turns)
    if args.ours:
        from kernels.linear_mosaic import mosaic_linear

        res["ours"] = {}
        variants = {"mosaic (warpgroup semantics)": "warpgroup", "mosaic (lane semantics)": "lane"}
        for name, m, k, n in SHAPES:
            if only and name not in only:
                continue
            bias = "q_proj" in name or "k_proj" in name
            x, w, b = data((m, k), k, n, jnp.bfloat16, bias)
            xla = jax.jit(lambda x, w, b: kernels.linear(x, w, b, implementation="xla"))
            ref = np.asarray(xla(x, w, b))
            tcall, tout = torch_linear(x, w, b)
            tref = tout()
            row = {"shape": [m, k, n], "bias": bias, "xla_vs_torch": bits(ref, tref), "variants": {}}
            print(f"{name} x[{m},{k}] @ w[{k},{n}]{' + b' if bias else ''}", flush=True)
            sides = {"kernels.linear(implementation=xla)": (lambda i: xla(x, w, b), jsync),
                     "torch F.linear [out,in]": (tcall, tsync)}
            for vname, sem in variants.items():
                try:
                    f = jax.jit(functools.partial(mosaic_linear, semantics=sem))
                    t0 = time.perf_counter()
                    o = np.asarray(jsync(f(x, w, b)))
                    row["variants"][vname] = {"compile_s": time.perf_counter() - t0, "vs_xla": bits(o, ref),
                                              "vs_torch": bits(o, tref)}
                    sides[vname] = (lambda i, f=f: f(x, w, b), jsync)
                except Exception as e:  # noqa: BLE001 - a semantics that does not lower is a result
                    row["variants"][vname] = {"error": f"{type(e).__name__}: {str(e)[-600:]}"}
                print("   ", vname, json.dumps(row["variants"][vname])[:700], flush=True)
            row["turns"] = turns(sides, 2 * m * k * n, "torch F.linear [out,in]")
            res["ours"][name] = row
            save()
            del x, w, b
        res["ours_bits"] = {}
        for name, xshape, n, dtn, bias in BIT_CASES:
            dt = jnp.dtype(dtn)
            k = xshape[-1]
            x, w, b = data(xshape, k, n, dt, bias)
            ref = np.asarray(kernels.linear(x, w, b, implementation="xla"))
            tref = torch_linear(x, w, b)[1]().reshape(ref.shape)
            row = {"x": list(xshape), "out": n, "dtype": dtn, "bias": bias, "xla_vs_torch": bits(ref, tref)}
            for vname, sem in variants.items():
                try:
                    o = np.asarray(mosaic_linear(x, w, b, semantics=sem))
                    row[vname] = {"vs_xla": bits(o, ref), "vs_torch": bits(o, tref)}
                except Exception as e:  # noqa: BLE001
                    row[vname] = {"error": f"{type(e).__name__}: {str(e)[-300:]}"}
            print(name, json.dumps(row)[:900], flush=True)
            res["ours_bits"][name] = row
            save()
    if args.head:
        res["head"] = part_head(args, save, only, jax, jnp, np, torch, F, kernels, turns, res)
    save()


# Part 3: (name, rows, D, V) of the Qwen2.5 lm_head at prefill
HEADS = (("7b lm_head", 4096, 3584, 152064), ("0.5b lm_head", 4096, 896, 151936))


def part_head(args, save, only, jax, jnp, np, torch, F, kernels, turns, res):
    """Part 3: ``lm_head`` (float32 and model-dtype logits) on the mosaic GEMM, both weight
    layouts and a few tilings, against its XLA path and torch's bf16 cuBLAS GEMM, in turns."""
    import dataclasses as dc

    import kernels.linear_mosaic as lm

    jsync = jax.block_until_ready
    tsync = lambda _: torch.cuda.synchronize()  # noqa: E731
    num_sms = jax.devices()[0].core_count
    out = {}
    key = jax.random.PRNGKey(1)
    for name, m, d, v in HEADS:
        if only and name not in only:
            continue
        kx, kw, key = jax.random.split(key, 3)
        h = jax.random.normal(kx, (m, d), jnp.float32).astype(jnp.bfloat16)
        w_vd = (jax.random.normal(kw, (v, d), jnp.float32) * 0.02).astype(jnp.bfloat16)  # [V, D]: HF's
        w_dv = jnp.asarray(w_vd.T)  # [D, V]: a real copy
        th, tvd, tdv = torch.from_dlpack(h), torch.from_dlpack(w_vd), torch.from_dlpack(w_dv)
        flops = 2 * m * d * v
        row = {"shape": [m, d, v], "variants": {}, "bits": {}}
        print(f"{name} h[{m},{d}] w[{v},{d}]", flush=True)

        def xla(layout, ld):
            return jax.jit(lambda h, w: kernels.lm_head(h, w, logits_dtype=ld, w_layout=layout, implementation="xla"))

        ref = {ld: np.asarray(xla("VD", ld)(h, w_vd)) for ld in ("float32", None)}
        t0 = lm.tiling(m, v, d, num_sms, out_itemsize=4)
        # (name: (tiling, semantics)); run 1 also timed bands of 16 and 32 tiles, run 3 an epilogue
        # storing registers straight to global memory: slower (see the docstring)
        tilings = {"default": (t0, "warpgroup")}
        if args.head_all:
            tilings["steps 3, slots 2"] = (dc.replace(t0, steps=3, slots=2), "warpgroup")
            # the other 2-warpgroup blocks; 128 x 128 blocks, whose float32 tile a warpgroup stages whole (2 slots)
            for other in (lm.Tiling(128, 128, "m" if t0.wg_dim == "n" else "n", 4, slots=1),
                          lm.Tiling(128, 64, "n", 5), lm.Tiling(64, 128, "m", 5)):
                if m % other.block[0] == 0 and v % other.block[1] == 0:
                    tilings[f"{other.tile_m}x{other.tile_n} wg_dim {other.wg_dim}"] = (other, "warpgroup")
        sides = {"torch.matmul bf16, w[D,V]": (lambda i: torch.matmul(th, tdv), tsync),
                 "F.linear bf16, w[V,D]": (lambda i: F.linear(th, tvd), tsync),
                 "lm_head f32 xla VD": (lambda i, f=xla("VD", "float32"): f(h, w_vd), jsync),
                 "lm_head f32 xla DV": (lambda i, f=xla("DV", "float32"): f(h, w_dv), jsync)}
        for tn, (t, sem) in tilings.items():
            for layout, w in (("NK", w_vd),) + ((("KN", w_dv),) if tn == "default" else ()):
                vname = f"mosaic f32 {layout} {tn}"
                try:
                    f = jax.jit(functools.partial(lm._call, b=None, t=t, num_sms=num_sms, semantics=sem,
                                                  w_layout=layout, out_dtype="float32"))
                    o = np.asarray(jsync(f(h, w)))
                    r = ref["float32"]
                    row["bits"][vname] = {"tiling": dc.asdict(t), "smem": lm.smem_bytes(t, 2, 4),
                                          "identical": float(np.mean(o == r)),
                                          "max_abs_over_max_ref": float(np.abs(o - r).max() / np.abs(r).max())}
                    sides[vname] = (lambda i, f=f, w=w: f(h, w), jsync)
                except Exception as e:  # noqa: BLE001 - a tiling that does not lower is a result
                    row["bits"][vname] = {"tiling": dc.asdict(t), "error": f"{type(e).__name__}: {str(e)[-600:]}"}
                print("   ", vname, json.dumps(row["bits"][vname])[:600], flush=True)
        # model-dtype logits: the public entry point both ways
        fb = jax.jit(lambda h, w: kernels.lm_head(h, w, w_layout="VD", implementation="mosaic"))
        row["bits"]["mosaic bf16 VD"] = bits(np, np.asarray(fb(h, w_vd)), ref[None])
        sides["lm_head bf16 xla VD"] = (lambda i, f=xla("VD", None): f(h, w_vd), jsync)
        sides["lm_head bf16 mosaic VD"] = (lambda i: fb(h, w_vd), jsync)
        # the public default (implementation=None) on this device: the mosaic GEMM for bf16 logits
        fpub = jax.jit(lambda h, w: kernels.lm_head(h, w, w_layout="VD"))
        row["bits"]["public default bf16 VD"] = {"identical_to_mosaic": float(np.mean(
            np.asarray(fpub(h, w_vd)) == np.asarray(fb(h, w_vd))))}
        print("    bits", json.dumps(row["bits"]["mosaic bf16 VD"]), json.dumps(row["bits"]["public default bf16 VD"]))
        row["turns"] = turns(sides, flops, "torch.matmul bf16, w[D,V]")
        out[name] = row
        res["head"] = out
        save()
        del h, w_vd, w_dv, th, tvd, tdv
    return out


def bits(np, a, b):
    """Two 16-bit outputs: the fraction identical and the largest gap in their ulps."""
    return {"identical": float(np.mean(a == b)), "max_ulps": ulps_16bit(np, a, b)}


def part_example(args, res, save, only, jax, jnp, np, torch, F, kernels, device_span, turns):
    """Part 1: JAX's example kernel over CONFIGS, against kernels.linear, cuBLAS and XLA's bf16-out dot."""
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    fields = {f.name for f in dataclasses.fields(hm.TuningConfig)}
    params = list(inspect.signature(hm.matmul).parameters)
    out = {"matmul_signature": params, "config_fields": sorted(fields), "shapes": {}}
    jsync = jax.block_until_ready
    tsync = lambda _: torch.cuda.synchronize()  # noqa: E731

    def make_cfg(c):
        kw = {k: (hm.MatmulDimension[v] if k in ("grid_minor_dim", "wg_dimension", "cluster_dimension") else v)
              for k, v in c.items() if k in fields}
        return hm.TuningConfig(**kw)

    def mosaic(cfg):
        if "c" in params:
            return lambda a, b: hm.matmul(a, b, None, config=cfg)
        return lambda a, b: hm.matmul(a, b, config=cfg)

    key = jax.random.PRNGKey(0)
    for name, m, k, n in SHAPES:
        if only and name not in only:
            continue
        kx, kw, key = jax.random.split(key, 3)
        x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
        w = (jax.random.normal(kw, (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)  # [in, out]
        wt = jnp.asarray(w.T)  # [out, in]: torch's layout, a real copy
        flops = 2 * m * k * n
        lin = jax.jit(kernels.linear)
        ref = np.asarray(lin(x, w))
        tx, twt = torch.from_dlpack(x), torch.from_dlpack(wt)
        with torch.inference_mode():
            tref = F.linear(tx, twt).float().cpu().numpy().astype(ref.dtype)
        row = {"shape": [m, k, n], "tilings": [],
               "linear_vs_torch": {"identical": float(np.mean(ref == tref)), "max_ulps": ulps_16bit(np, ref, tref)}}
        print(f"{name} x[{m},{k}] @ w[{k},{n}]", flush=True)
        best = None
        for c in CONFIGS:
            ent = {"config": c}
            try:
                f = jax.jit(mosaic(make_cfg(c)))
                t0 = time.perf_counter()
                o = np.asarray(jsync(f(x, w)))
                ent["compile_s"] = time.perf_counter() - t0
                ent["identical_vs_linear"] = float(np.mean(o == ref))
                ent["max_ulps_vs_linear"] = ulps_16bit(np, o, ref)
                ent["identical_vs_torch"] = float(np.mean(o == tref))
                ent["max_ulps_vs_torch"] = ulps_16bit(np, o, tref)
                d = device_span(torch, lambda i, f=f: f(x, w), jsync, 1, calls=args.calls)
                ent.update(us=d["span_s"] * 1e6, tflops=flops / d["span_s"] / 1e12, kernels=list(d["top_kernels_s"]))
                if best is None or ent["us"] < best[0]["us"]:
                    best = (ent, f)
            except Exception as e:  # noqa: BLE001 - a tiling this shape or this jax refuses is a result
                ent["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print("   ", json.dumps(ent), flush=True)
            row["tilings"].append(ent)
        dims = (((1,), (0,)), ((), ()))
        bf16_out = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.HIGHEST,
                                                            preferred_element_type=jnp.bfloat16))
        sides = {"kernels.linear": (lambda i: lin(x, w), jsync),
                 "torch F.linear [out,in]": (lambda i: F.linear(tx, twt), tsync),
                 "xla bf16-out dot": (lambda i: bf16_out(x, w), jsync)}
        if best is not None:
            sides["mosaic best tiling"] = (lambda i, f=best[1]: f(x, w), jsync)
            row["best_tiling"] = best[0]["config"]
        row["turns"] = turns(sides, flops, "torch F.linear [out,in]")
        out["shapes"][name] = row
        res["example"] = out
        save()
        del x, w, wt, tx, twt
    return out


if __name__ == "__main__":
    main()
