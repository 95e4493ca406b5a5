"""Pallas attention block sizes against torch SDPA (flash), side by side in one run.

    python3 benchmarks/tune_pallas.py --out results/pallas_tune_h100.json

Causal GQA prefill, Qwen2.5-7B heads (N28 K4 H128), T = S = 4096, bf16, recipe "hf":
each config is timed pipelined (``--reps`` calls enqueued back to back, one block at
the end; the median of ``--trials`` such groups), SDPA with CUDA events the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from kernels.attention_pallas import pallas_attention

    B, T, N, K, H = 1, 4096, 28, 4, 128
    flops = 4 * B * N * T * T * H / 2  # causal: half of QK^T and PV
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.bfloat16)

    def time_jax(fn):
        fn(q, k, v).block_until_ready()  # compile and warm up
        ts = []
        for _ in range(args.trials):
            t0 = time.perf_counter()
            outs = [fn(q, k, v) for _ in range(args.reps)]
            outs[-1].block_until_ready()
            ts.append((time.perf_counter() - t0) / args.reps)
        return statistics.median(ts)

    tq = torch.from_numpy(np.asarray(q.astype(jnp.float32))).cuda().bfloat16().transpose(1, 2)  # [B, N, T, H]
    tk = torch.from_numpy(np.asarray(k.astype(jnp.float32))).cuda().bfloat16().transpose(1, 2)  # [B, K, S, H]
    tv = torch.from_numpy(np.asarray(v.astype(jnp.float32))).cuda().bfloat16().transpose(1, 2)

    def time_sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            f = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)  # noqa: E731
            f()
            torch.cuda.synchronize()
            ts = []
            for _ in range(args.trials):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(args.reps):
                    f()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b) / 1e3 / args.reps)
            return statistics.median(ts)

    res = {"shape": f"q[{B},{T},{N},{H}] k,v[{B},{T},{K},{H}] bf16 causal", "device": str(jax.devices()[0]),
           "configs": []}
    sdpa = time_sdpa()
    res["sdpa_flash_s"] = sdpa
    res["sdpa_flash_tflops"] = flops / sdpa / 1e12
    print(f"sdpa flash: {sdpa * 1e3:.3f} ms  {flops / sdpa / 1e12:.1f} TFLOP/s", flush=True)
    configs = [(64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 8, 3),
               (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2), (64, 32, 4, 4), (32, 64, 4, 3)]
    for bq, bk, w, st in configs:
        entry = {"block_q": bq, "block_k": bk, "num_warps": w, "num_stages": st}
        try:
            fn = jax.jit(lambda q, k, v, bq=bq, bk=bk, w=w, st=st: pallas_attention(
                q, k, v, recipe="hf", block_q=bq, block_k=bk, num_warps=w, num_stages=st))
            t = time_jax(fn)
            entry.update(seconds=t, tflops=flops / t / 1e12, vs_sdpa=sdpa / t)
            print(f"{entry}", flush=True)
        except Exception as e:  # a config Triton cannot compile (shared memory): recorded, not fatal
            entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(entry, flush=True)
        res["configs"].append(entry)
    ok = [c for c in res["configs"] if "seconds" in c]
    res["best"] = min(ok, key=lambda c: c["seconds"]) if ok else None
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
