"""``apply_rope_qk``'s Pallas kernel under each work schedule, timed in turns (issue 8: RoPE at 0.93 of copy).

    python3 benchmarks/probe_rope.py --sweep 3 --out $OUT/probe_rope_sweep3_h100.json
    .venv/bin/python benchmarks/probe_rope.py --smoke --out /tmp/p.json   # interpret mode, CPU

Session 9's kernel (``schedule="per_tensor"``, 2 positions, 8 warps) gave each program
``block_t`` positions of q and of k, and loaded, rotated and stored q, then k: its k loads
waited for its q stores. ``"loads_first"`` issues both tensors' loads first;
``"program_per_tensor"`` gives each program one tensor only (k in proportionally longer
runs of positions). Each side is checked bit for bit against the XLA path, then timed on
the device's clock (CUPTI, ``devtime.in_turns``: one program applying the op to 4 (7B) or
12 (0.5B) input sets, more than the L2 apart, every side once a round) beside ``x + 1``
over the same q and k. Sweeps (``--sweep``): 1, the schedules (7B); 2, the neighbours of
the winner at both sizes; 3, the chosen default beside its rivals.

Shapes: q [1, 4096, N, H], k [1, 4096, K, H], tables [1, 4096, H], bf16; Qwen2.5-7B
(N 28, K 4, H 128) and 0.5B (N 14, K 2, H 64).

Result (H100, 2026-11-22, results/probe_rope_sweep{1,2,3}_h100.json, every side
bit-identical): 7B, session 9's kernel 25.46 / 24.75 / 25.46 us in the three sweeps,
loads_first with 1 position 25.01 / 24.22 / 25.06 (8 and 4 warps tie);
program_per_tensor 25.7 at best, the L2 hints slower. 0.5B: 8.09 / 8.18 against 7.91 /
8.02 with 4 warps, 8.80 / 8.85 with 8. The default is now loads_first, 1 position, 4 warps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sweep", type=int, default=3, choices=(1, 2, 3),
                    help="1: the schedules; 2: the winner's neighbours; 3: the default beside its rivals")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from devtime import copy_gb_s, in_turns

    from kernels.rope import apply_rope_qk
    from kernels.rope_pallas import pallas_apply_rope

    smoke = args.smoke
    bf16 = jnp.bfloat16
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "smoke": smoke, "sweep": args.sweep, "models": {}}
    torch = None
    if not smoke:
        import torch

        res["copy_gb_s"] = copy_gb_s(torch)
    for model, cfgs in _configs(args.sweep).items():
        t, n, kh, h = (8, 6, 2, 64) if smoke else MODELS[model]
        # Sets rotated so that more than the 50 MB L2 passes between two uses of one (as gpu.py).
        n_sets = 1 if smoke else (4 if model == "7b" else 12)
        keys = jax.random.split(jax.random.PRNGKey(0), 4 * n_sets)

        def randn(shape, i, keys=keys):
            return jax.random.normal(keys[i], shape, jnp.float32).astype(bf16)

        sets = [(randn((1, t, n, h), 4 * i), randn((1, t, kh, h), 4 * i + 1), randn((1, t, h), 4 * i + 2),
                 randn((1, t, h), 4 * i + 3)) for i in range(n_sets)]
        nbytes = 2 * (t * n * h + t * kh * h) * 2 + 2 * t * h * 2  # q, k read and written; the tables read
        out = res["models"][model] = {"shape": [t, n, kh, h], "bytes": nbytes, "n_sets": n_sets, "sides": {}}
        ref = apply_rope_qk(*sets[0], implementation="xla")
        sides = {}
        for name, cfg in cfgs.items():
            def fn(q, k, c, s, cfg=cfg):
                return pallas_apply_rope((q, k), c, s, interpret=smoke, **cfg)

            got = fn(*sets[0])
            same = all(bool(jnp.array_equal(g, r)) for g, r in zip(got, ref))
            out["sides"][name] = {"config": cfg, "bit_identical": same}
            print(model, name, "bit-identical" if same else "DIFFERS", flush=True)
            sides[name] = fn
        sides["x + 1 over q and k (size-matched copy)"] = lambda q, k, c, s: (q + 1, k + 1)
        out["sides"]["x + 1 over q and k (size-matched copy)"] = {"config": {}}
        if smoke:
            continue
        progs = {}
        for name, fn in sides.items():
            g = jax.jit(lambda ss, fn=fn: [fn(*s) for s in ss])
            jax.block_until_ready(g(sets))
            progs[name] = (lambda i, g=g, sets=sets: g(sets), jax.block_until_ready)
        spans, kernels = in_turns(torch, progs, rounds=args.rounds)
        for name, sp in spans.items():
            us = [x / n_sets * 1e6 for x in sp]
            med = statistics.median(us)
            out["sides"][name].update(us_rounds=us, us=med, frac=nbytes / (med * 1e-6) / 1e9 / res["copy_gb_s"],
                                      kernels=kernels[name])
            print(f"{model:4s} {name:45s} {med:7.2f} us  {out['sides'][name]['frac']:.3f} of copy  "
                  f"rounds {[round(u, 2) for u in us]}", flush=True)
    if not smoke:
        res["copy_gb_s_end"] = copy_gb_s(torch)
    Path(args.out).write_text(json.dumps(res, indent=1))


MODELS = {"7b": (4096, 28, 4, 128), "0.5b": (4096, 14, 2, 64)}  # T, N, K, H


def _configs(sweep: int) -> dict:
    """model -> side name -> pallas_apply_rope options (the defaults now: loads_first, block_t 1, 4 warps)."""
    if sweep == 1:  # the schedules (session 10, when per_tensor 2/8 was the default)
        return {"7b": {
            "shipped (per_tensor, block_t 2, 8 warps)": dict(schedule="per_tensor", block_t=2, num_warps=8),
            "loads_first 2/8": dict(block_t=2, num_warps=8),
            "loads_first 1/8": dict(num_warps=8),
            "program_per_tensor 2/8": dict(schedule="program_per_tensor", block_t=2, num_warps=8),
            "program_per_tensor 1/8": dict(schedule="program_per_tensor", num_warps=8),
            "program_per_tensor 1/4": dict(schedule="program_per_tensor", num_warps=4),
            "program_per_tensor 4/16": dict(schedule="program_per_tensor", block_t=4, num_warps=16),
            "program_per_tensor 2/8 evict_first": dict(schedule="program_per_tensor", block_t=2, num_warps=8,
                                                       eviction_policy="evict_first"),
        }}
    w8 = dict(num_warps=8)
    old = {"per_tensor 2/8 (session 9's default)": dict(schedule="per_tensor", block_t=2, num_warps=8)}
    if sweep == 3:  # the default chosen from sweep 2 (loads_first 1/4) beside its rivals, both sizes
        rivals = {**old, "loads_first 1/4 (the default)": dict(), "loads_first 1/8": dict(num_warps=8),
                  "loads_first 2/4": dict(block_t=2)}
        return {"7b": rivals, "0.5b": rivals}
    return {  # the neighbours of the first sweep's winner, loads_first 1/8 (the default then), at both sizes
        "7b": {**old, "loads_first 1/8 (the default)": w8, "loads_first 1/4": dict(num_warps=4),
               "loads_first 1/16": dict(num_warps=16), "loads_first 2/16": dict(block_t=2, num_warps=16),
               "loads_first 1/8 evict_first": dict(w8, eviction_policy="evict_first"),
               "loads_first 1/8 evict_last": dict(w8, eviction_policy="evict_last")},
        "0.5b": {**old, "loads_first 1/8 (the default)": w8, "loads_first 2/8": dict(w8, block_t=2),
                 "loads_first 4/8": dict(w8, block_t=4), "loads_first 2/4": dict(block_t=2, num_warps=4),
                 "loads_first 4/4": dict(block_t=4, num_warps=4), "loads_first 1/4": dict(num_warps=4)},
    }


if __name__ == "__main__":
    main()
