"""Is gpu.py's grouped timing bound by the host? Three clocks on the same kernels, one run.

    python3 benchmarks/probe_timing.py --out $OUT/probe_timing.json

For each memory-bound case (a size-matched ``x + 1`` copy, rms_norm, apply_rope on q and
k, the decode step and its peers; Qwen2.5-7B and 0.5B shapes, bf16) the time per kernel
application by:

* ``grouped``: gpu.py's method. One jitted program applies the kernel to each of
  ``n_sets`` input sets; calls are enqueued back to back, at most 8 in flight; host
  clock over the loop / (calls * n_sets).
* ``enqueue``: the host's own rate at the same loop (the time to *dispatch* a call,
  GPU work still queued): when it is close to ``grouped``, the GPU waited on the host.
* ``chained``: one jitted program makes ``rounds`` passes over the sets, each pass's
  inputs tied to the previous pass's outputs by ``lax.optimization_barrier`` (so XLA
  can neither merge the passes nor drop one), every output returned; ~2 ms of GPU work a
  call, so a dispatch of tens of microseconds hides under the queue.
* ``device``: the kernels' own device durations from CUPTI (``devtime.device_span``:
  torch.profiler records every kernel in the process, JAX's included): ``busy`` = sum
  of kernel durations an application, ``span`` = first kernel start to last kernel end
  of a call, an application (the gaps between kernels inside the program count).

Reading: the memory floor is bytes / copy rate; ``chained`` and ``span`` are what the
GPU does when the host keeps up. ``--what lm_head`` adds the 7B lm_head timed three
ways interleaved (A B C A B C ...), so that clock drift lands on every side alike.

Result (H100, 2026-11-22, benchmarks/results/probe_timing_h100.json, written by this
script before its device clock moved to ``devtime``, which splits calls by a 1 ms gap
instead of 50 us; the same spans): the 7B rms_norm kernel reads 24.7 us a kernel
grouped, 21.2 chained and 21.0 on the device; at 0.5B, 11.1 / 9.1 / 6.3 us. The host
spends about as long dispatching a call as the grouped clock reads (``enqueue``), so
gpu.py times on the device since.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--what", default="copy,rms_norm,apply_rope,decode,lm_head")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from jax import lax

    import kernels

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from devtime import device_span

    torch = None
    try:
        import torch as _torch
        if _torch.cuda.is_available():
            torch = _torch
    except Exception:  # noqa: BLE001
        pass

    key = jax.random.PRNGKey(0)
    counter = [0]

    def randn(shape, scale=1.0):
        counter[0] += 1
        return (jax.random.normal(jax.random.fold_in(key, counter[0]), shape, jnp.float32) * scale).astype(jnp.bfloat16)

    def n_sets(nbytes):
        return max(1, min(12, math.ceil(max(256 << 20, 5 * (50 << 20)) / nbytes)))

    def per_app_loop(g, sets, apps, calls, depth=8):
        ts, te = [], []
        for _ in range(args.trials):
            jax.block_until_ready(g(sets))
            pending = []
            t0 = time.perf_counter()
            host = 0.0
            for _i in range(calls):
                if len(pending) >= depth:
                    h0 = time.perf_counter()
                    jax.block_until_ready(pending.pop(0))
                    host -= time.perf_counter() - h0  # time spent waiting is not dispatch
                pending.append(g(sets))
            host += time.perf_counter() - t0
            jax.block_until_ready(pending[-1])
            ts.append((time.perf_counter() - t0) / (calls * apps))
            te.append(host / (calls * apps))
            del pending
        return statistics.median(ts), statistics.median(te)

    def device_times(g, sets, apps, calls=4):
        if torch is None:
            return None
        d = device_span(torch, lambda i: g(sets), jax.block_until_ready, apps, calls=calls)
        us = lambda v: {n: t * 1e6 for n, t in v.items()} if isinstance(v, dict) else v * 1e6  # noqa: E731
        return {(k[:-2] + "_us" if k.endswith("_s") else k): (us(v) if k.endswith("_s") else v)
                for k, v in d.items() if k != "spans_s"}

    def chained_fn(fn, rounds):
        def g(ss):
            outs_all, prev = [], None
            for _ in range(rounds):
                if prev is not None:
                    ss, prev = lax.optimization_barrier((ss, prev))
                prev = tuple(fn(*s) for s in ss)
                outs_all.append(prev)
            return outs_all
        return jax.jit(g)

    results = {}

    def case(name, fn, sets, nbytes, copy_gbps):
        sets = tuple(tuple(s) for s in sets)
        n = len(sets)
        g = jax.jit(lambda ss: tuple(fn(*s) for s in ss))
        jax.block_until_ready(g(sets))
        probe = time.perf_counter()
        jax.block_until_ready(g(sets))
        one = time.perf_counter() - probe
        calls = max(8, min(400, int(0.05 / max(one, 1e-6))))
        grouped, enqueue = per_app_loop(g, sets, n, calls)
        rounds = max(2, min(40, math.ceil(2e-3 / max(grouped * n, 1e-7))))
        gc = chained_fn(fn, rounds)
        jax.block_until_ready(gc(sets))
        chained, chained_enq = per_app_loop(gc, sets, n * rounds, max(8, min(100, int(0.05 / (grouped * n * rounds)))))
        dev = device_times(g, sets, n)
        dev_c = device_times(gc, sets, n * rounds, calls=2)
        r = {"n_sets": n, "bytes": nbytes, "rounds": rounds, "floor_us": nbytes / copy_gbps / 1e3 if copy_gbps else None,
             "grouped_us": grouped * 1e6, "enqueue_us": enqueue * 1e6, "chained_us": chained * 1e6,
             "chained_enqueue_us": chained_enq * 1e6, "device_grouped": dev, "device_chained": dev_c}
        if copy_gbps:
            for k in ("grouped_us", "chained_us"):
                r[k.replace("_us", "_frac")] = nbytes / (r[k] * 1e3) / copy_gbps
            for k, d in (("span_frac", dev), ("span_frac_chained", dev_c)):
                if d and d.get("span_us"):
                    r[k] = nbytes / (d["span_us"] * 1e3) / copy_gbps
        results[name] = r
        print(name, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                                if not k.startswith("device")}), flush=True)
        print("   device grouped:", dev, "\n   device chained:", dev_c, flush=True)
        json.dump(results, open(args.out, "w"), indent=1)

    # the copy ceiling, gpu.py's way (1 GiB, x + 1)
    big = randn((1 << 29,))
    gb = jax.jit(lambda a: a + 1)
    jax.block_until_ready(gb(big))
    t0 = time.perf_counter()
    for _ in range(20):
        o = gb(big)
    jax.block_until_ready(o)
    copy_gbps = 2 * big.size * 2 / ((time.perf_counter() - t0) / 20) / 1e9
    del big, o
    results["copy_1GiB_gbps"] = copy_gbps
    print("copy 1 GiB:", copy_gbps, "GB/s", flush=True)

    what = args.what.split(",")
    for mname, T, N, K, H, D in (("7b", 4096, 28, 4, 128, 3584), ("0.5b", 4096, 14, 2, 64, 896)):
        if "copy" in what:
            nb = 2 * T * D * 2
            xs = [(randn((T, D)),) for _ in range(n_sets(nb))]
            case(f"{mname}/copy x[T,D]+1", lambda x: x + 1, xs, nb, copy_gbps)
        if "rms_norm" in what:
            nb = 2 * T * D * 2 + 2 * D
            w = randn((D,), 0.1) + 1
            xs = [(randn((T, D)), w.astype(jnp.bfloat16)) for _ in range(n_sets(nb))]
            for impl in (None, "xla"):
                case(f"{mname}/rms_norm impl={impl}", lambda x, w, impl=impl: kernels.rms_norm(
                    x, w, eps=1e-6, implementation=impl), xs, nb, copy_gbps)
        if "apply_rope" in what:
            nb = 2 * (T * N * H + T * K * H) * 2 + 2 * T * H * 2
            c, s = randn((1, T, H)), randn((1, T, H))
            sets = [(randn((1, T, N, H)), randn((1, T, K, H)), c, s) for _ in range(n_sets(nb))]
            case(f"{mname}/apply_rope q,k", lambda q, k, c, s: (kernels.apply_rope(q, c, s), kernels.apply_rope(k, c, s)),
                 sets, nb, copy_gbps)
        if "decode" in what:
            S = 32768
            nb = 2 * S * K * H * 2
            sets = [(randn((1, 1, N, H)), randn((1, S, K, H)), randn((1, S, K, H))) for _ in range(n_sets(nb))]
            case(f"{mname}/decode gqa_attention(hf)", lambda q, k, v: kernels.gqa_attention(q, k, v), sets, nb, copy_gbps)
            case(f"{mname}/decode jax.nn xla", lambda q, k, v: jax.nn.dot_product_attention(q, k, v), sets, nb, copy_gbps)
            case(f"{mname}/decode read k,v once", lambda q, k, v: jnp.maximum(jnp.max(k, axis=1), jnp.max(v, axis=1)),
                 sets, nb, copy_gbps)
    if "lm_head" in what and torch is not None:
        lm_head_interleaved(results, jax, jnp, torch, randn, kernels, args.trials)
        json.dump(results, open(args.out, "w"), indent=1)
    print("\n| case | floor us | grouped us | enqueue us | chained us | device span us | device busy us | "
          "grouped frac | chained frac | span frac |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if not isinstance(r, dict) or "floor_us" not in r:  # the copy rate, the lm_head rows
            continue
        d = r.get("device_grouped") or {}
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {name} | {f(r['floor_us'])} | {f(r['grouped_us'])} | {f(r['enqueue_us'])} | {f(r['chained_us'])} | "
              f"{f(d.get('span_us'))} | {f(d.get('busy_us'))} | {f(r.get('grouped_frac'))} | "
              f"{f(r.get('chained_frac'))} | {f(r.get('span_frac'))} |")


def lm_head_interleaved(results, jax, jnp, torch, randn, kernels, trials):
    """lm_head (7B: h[4096,3584] @ w[3584,152064]) three ways, their timings interleaved
    (A B C A B C ...), so that clock drift over the run lands on every side alike."""
    T, D, V = 4096, 3584, 152064
    h, w = randn((T, D)), randn((D, V), D ** -0.5)
    th, tw = torch.from_dlpack(h), torch.from_dlpack(w)
    jl = jax.jit(lambda h, w: kernels.lm_head(h, w, logits_dtype="float32"))
    jm = jax.jit(lambda h, w: jnp.matmul(h, w, preferred_element_type=jnp.float32))
    hlo = jl.lower(h, w).compile().as_text()
    results["lm_head_gemm_targets"] = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))
                                            | set(re.findall(r"kind=k(\w+)", hlo)))
    calls = 16

    def tj(f):
        jax.block_until_ready(f(h, w))
        t0 = time.perf_counter()
        for _ in range(calls):
            o = f(h, w)
        jax.block_until_ready(o)
        return (time.perf_counter() - t0) / calls

    def tt(f):
        f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / calls

    sides = {"kernels.lm_head f32": lambda: tj(jl), "jnp.matmul f32 out": lambda: tj(jm),
             "torch.matmul bf16": lambda: tt(lambda: torch.matmul(th, tw)),
             "torch.mm out_dtype f32": lambda: tt(lambda: torch.mm(th, tw, out_dtype=torch.float32))}
    times = {k: [] for k in sides}
    for _ in range(max(5, trials + 2)):
        for k, f in sides.items():
            times[k].append(f())
    flops = 2 * T * D * V
    r = {k: {"median_ms": statistics.median(v) * 1e3, "tflops": flops / statistics.median(v) / 1e12,
             "times_ms": [x * 1e3 for x in v]} for k, v in times.items()}
    ref = r["torch.matmul bf16"]["tflops"]
    for k in r:
        r[k]["vs_torch_bf16"] = r[k]["tflops"] / ref
    results["lm_head_interleaved"] = r
    print("lm_head interleaved:", json.dumps({k: (round(v["tflops"], 1), round(v["vs_torch_bf16"], 3))
                                              for k, v in r.items()}), results["lm_head_gemm_targets"], flush=True)


if __name__ == "__main__":
    main()
