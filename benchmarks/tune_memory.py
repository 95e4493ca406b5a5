"""Block and launch parameters of the memory-bound Pallas kernels, side by side in one run.

    python3 benchmarks/tune_memory.py --out results/tune_memory_h100.json [--what apply_rope,decode,rms_norm]

* ``decode``: ``pallas_attention(decode=True)`` (the split-key kernel) for a Qwen2.5-7B
  decode step (q[1,1,28,128], a bf16 KV cache of S = 32768 keys, K = 4), both recipes,
  over ``num_splits`` x ``block_k`` x ``num_warps`` x ``num_stages``; beside it the XLA
  path, ``jax.nn.dot_product_attention`` (xla) and one XLA reduction that reads k and v.
  The compiled HLO of the default path is saved too (``decode_entry_hlo``).
* ``rms_norm``: ``pallas_rms_norm`` on x[4096, 3584] bf16 (7B), the chunked kernel and
  the whole-row kernel (``block_rows`` rows a program) over ``num_warps``, and the
  whole-row kernel on x[4096, 896] (0.5B); beside each the XLA path.
* ``apply_rope``: ``pallas_apply_rope`` on q and k (7B prefill) over ``block_t`` x
  ``num_warps`` x the L2 eviction hint; beside it the XLA path. (The apply_rope rows of
  results/tune_memory_h100.json come from a first, wider sweep: block_t and num_warps
  each over 1, 2, 4, 8. results/tune_rope_h100.json is this narrower one.)

results/tune_memory_h100.json is session 5's run; results/tune_memory_session6_h100.json
is ``--what decode,rms_norm`` after the decode kernel moved to one kv head a program
(whose "XLA path" decode peer still ran the GPU default, Pallas: the script now passes
``implementation="xla"``).

Every config is first checked against the XLA path on the same inputs (largest
difference, fraction of bit-identical outputs), then timed: one jitted program applies
the kernel to each of 4-5 input sets (more than the 50 MB L2 between two uses of a set).
On a CUDA device the time is its device span over ``--trials`` calls (CUPTI,
``devtime.device_span``), the median, per application; elsewhere the host clock over
``--reps`` pipelined calls. The copy ceiling (JAX ``x + 1`` over 1 GiB) is timed the
same way at the start and at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--what", default="apply_rope,decode,rms_norm")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels.attention import gqa_attention
    from kernels.attention_pallas import pallas_attention
    from kernels.rms_norm import rms_norm
    from kernels.rms_norm_pallas import pallas_rms_norm

    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "results": {}}
    key = jax.random.PRNGKey(0)

    def randn(shape, i):
        return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32).astype(jnp.bfloat16)

    try:
        import torch
        torch = torch if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        torch = None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from devtime import device_span

    def time_grouped(fn, sets):
        """Seconds per application: one jitted program over all sets. On a CUDA device its
        device span (CUPTI, ``devtime``); else the host clock over ``reps`` pipelined calls."""
        g = jax.jit(lambda ss: [fn(*s) for s in ss])
        jax.block_until_ready(g(sets))
        if torch is not None:
            d = device_span(torch, lambda i: g(sets), jax.block_until_ready, len(sets), calls=args.trials)
            if "span_s" in d:
                return d["span_s"]
            raise RuntimeError(d["error"])
        ts = []
        for _ in range(args.trials):
            t0 = time.perf_counter()
            out = [g(sets) for _ in range(args.reps)]
            jax.block_until_ready(out[-1])
            ts.append((time.perf_counter() - t0) / (args.reps * len(sets)))
            del out
        return statistics.median(ts)

    def copy_bw():
        x = jnp.ones((1 << 29,), jnp.bfloat16)  # 1 GiB
        t = time_grouped(lambda a: a + 1, [(x,)])
        return 2 * x.size * 2 / t / 1e9

    def flat(x):  # one f32 vector of every output (a tuple for q and k)
        return np.concatenate([np.asarray(a.astype(jnp.float32)).ravel() for a in jax.tree_util.tree_leaves(x)])

    def check(got, ref):
        got, ref = flat(got), flat(ref)
        return {"max_abs_diff": float(np.abs(got - ref).max()), "bit_identical": float(np.mean(got == ref)),
                "finite": bool(np.isfinite(got).all())}

    def sweep(name, nbytes, sets, configs, peers):
        rows = []
        ref = peers[0][1](*sets[0])
        for label, fn in peers:
            t = time_grouped(fn, sets)
            rows.append({"impl": label, "seconds": t, "gb_s": nbytes / t / 1e9, **check(fn(*sets[0]), ref)})
            print(name, rows[-1], flush=True)
        for cfg, fn in configs:
            row = {"impl": "pallas", **cfg}
            try:
                row.update(check(fn(*sets[0]), ref))
                t = time_grouped(fn, sets)
                row.update(seconds=t, gb_s=nbytes / t / 1e9)
            except Exception as e:  # a config Triton cannot compile: recorded, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(name, row, flush=True)
            rows.append(row)
        return rows

    bw0 = copy_bw()
    res["copy_gb_s_start"] = bw0
    print(f"copy {bw0:.0f} GB/s", flush=True)
    what = args.what.split(",")

    if "decode" in what:
        S, N, K, H = 32768, 28, 4, 128
        nbytes = 2 * S * K * H * 2
        sets = [(randn((1, 1, N, H), 3 * i), randn((1, S, K, H), 3 * i + 1), randn((1, S, K, H), 3 * i + 2))
                for i in range(4)]  # 4 x 64 MiB of cache
        for recipe in ("hf", "fp32_logits"):
            peers = [(f"gqa_attention({recipe}, xla)",
                      lambda q, k, v, r=recipe: gqa_attention(q, k, v, recipe=r, implementation="xla")),
                     ("jax.nn.dot_product_attention(xla)",
                      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))]
            if recipe == "fp32_logits":
                peers = peers[:1]
            else:  # the floor of any kernel: one XLA reduction reading k and v once
                peers.append(("read k and v once (XLA max)", lambda q, k, v: jnp.repeat(jnp.maximum(
                    jnp.max(k, axis=1), jnp.max(v, axis=1)), N // K, axis=1)[:, None]))  # [1, 1, N, H]
            configs = []
            for ns in (None, 32, 128):  # None: the default (64 for K = 4)
                for bk in (32, 64, 128):
                    for w, st in ((4, 2), (4, 3), (4, 4), (8, 3)):
                        if recipe == "fp32_logits" and (ns, bk) != (None, 64):
                            continue
                        cfg = dict(recipe=recipe, num_splits=ns, block_k=bk, num_warps=w, num_stages=st)
                        configs.append((cfg, lambda q, k, v, c=cfg: pallas_attention(q, k, v, decode=True, **c)))
            if recipe == "hf":  # what XLA runs around the two kernels (a copy costs a launch)
                hlo = jax.jit(lambda q, k, v: gqa_attention(q, k, v)).lower(*sets[0]).compile().as_text()
                ent = hlo[hlo.index("ENTRY"):]
                res["decode_entry_hlo"] = [ln.strip()[:240] for ln in ent.splitlines()[1:] if " = " in ln]
                print("\n".join(res["decode_entry_hlo"]), flush=True)
            res["results"][f"decode_{recipe}"] = sweep(f"decode {recipe}", nbytes, sets, configs, peers)

    if "rms_norm" in what:
        for name, D, chunked, sets_n in (("rms_norm", 3584, True, 5), ("rms_norm_0.5b", 896, False, 12)):
            T = 4096
            nbytes = 2 * T * D * 2 + D * 2
            sets = [(randn((T, D), 100 + i), randn((D,), 200 + i)) for i in range(sets_n)]
            peers = [("rms_norm(hf, xla)", lambda x, w: rms_norm(x, w, implementation="xla"))]
            configs = []
            for w in ((1, 4) if chunked else ()):
                cfg = dict(block_rows=0, num_warps=w)
                configs.append((cfg, lambda x, wt, c=cfg: pallas_rms_norm(x, wt, **c)))
            for br in (1, 2, 4):
                for w in (4, 8, 16):
                    cfg = dict(block_rows=br, num_warps=w)
                    configs.append((cfg, lambda x, wt, c=cfg: pallas_rms_norm(x, wt, **c)))
            res["results"][name] = sweep(name, nbytes, sets, configs, peers)

    if "apply_rope" in what:
        from kernels.rope import apply_rope_qk
        from kernels.rope_pallas import pallas_apply_rope

        T, N, K, H = 4096, 28, 4, 128
        nbytes = 2 * (T * N * H + T * K * H) * 2 + 2 * T * H * 2
        sets = [(randn((1, T, N, H), 300 + i), randn((1, T, K, H), 400 + i), randn((1, T, H), 500 + i),
                 randn((1, T, H), 600 + i)) for i in range(4)]
        peers = [("apply_rope_qk(xla)", lambda q, k, c, s_: apply_rope_qk(q, k, c, s_, implementation="xla"))]
        configs = []
        for bt, w, ev in ((1, 8, None), (2, 8, None), (2, 4, None), (1, 16, None), (2, 16, None), (4, 16, None),
                          (1, 8, "evict_first"), (2, 8, "evict_first"), (2, 16, "evict_first")):
            cfg = dict(block_t=bt, num_warps=w, eviction_policy=ev)
            configs.append((cfg, lambda q, k, c, s_, cf=cfg: pallas_apply_rope((q, k), c, s_, **cf)))
        res["results"]["apply_rope"] = sweep("apply_rope", nbytes, sets, configs, peers)

    res["copy_gb_s_end"] = copy_bw()
    for name, rows in res["results"].items():
        ok = [r for r in rows if r.get("impl") == "pallas" and "seconds" in r]
        if ok:
            best = min(ok, key=lambda r: r["seconds"])
            res.setdefault("best", {})[name] = dict(best, bw_frac=best["gb_s"] / bw0)
    print(json.dumps(res.get("best"), indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
