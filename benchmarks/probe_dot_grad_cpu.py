"""What the split derivative of ``kernels._dot.dot_f32`` costs and buys on this CPU.

    .venv/bin/python benchmarks/probe_dot_grad_cpu.py --out benchmarks/results/probe_dot_grad_cpu_avx2.json

For few-row float32 projections (the CPU split path), ``grad(x) = c @ w^T`` sums over the N
outputs. Two sides, each ``jax.jit(jax.vjp(...))`` of ``kernels.projection.lm_head`` with
float32 logits and ``c`` a seeded standard normal:

* ``split``: the shipped derivative (``kernels._dot._split_dot_ad``: the sum over N in chunks);
* ``plain``: the forward's own transpose, as before (``oracles.mutants.projection.grad_summed_sequentially``).

Per shape: the median time of each over ``--rounds`` rounds (in turns, one blocked call each per
round) and their ratio, and grad(x)'s max error against the float64 truth as a multiple of
torch's float32 ``c @ w^T`` (the same measure as ``parity gradients``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from kernels._dot import host_has_avx512_fp16
from kernels.projection import lm_head
from oracles.mutants.projection import grad_summed_sequentially

# (rows, D, V, w_layout): a 4-row 0.5B head (the fuzzed one's D), a decode row of the 7B head,
# a 7B MLP down projection's shape as a [D, V] weight (grad through the F -> D matmul).
SHAPES = ((4, 896, 4096, "VD"), (4, 896, 151936, "VD"), (1, 3584, 152064, "VD"), (4, 18944, 3584, "DV"))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return platform.processor() or "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for r, d, v, layout in SHAPES:
        x = rng.standard_normal((r, d)).astype(np.float32)
        w = (rng.standard_normal((v, d) if layout == "VD" else (d, v)) / np.sqrt(d)).astype(np.float32)
        c = rng.standard_normal((r, v)).astype(np.float32)
        wd = w.T if layout == "VD" else w  # [D, V]
        truth = c.astype(np.float64) @ wd.T.astype(np.float64)  # [rows, D]
        ref = (torch.from_numpy(c) @ torch.from_numpy(np.ascontiguousarray(wd.T))).double().numpy()
        scale = np.abs(truth).max()
        e_torch = np.abs(ref - truth).max() / scale
        sides = {
            "split": lambda x, w: lm_head(x, w, logits_dtype="float32", w_layout=layout),
            "plain": lambda x, w: grad_summed_sequentially(x, w, recipe="lm_head_f32", w_layout=layout),
        }
        fns = {k: jax.jit(lambda x, w, c, f=f: jax.vjp(lambda x: f(x, w), x)[1](c)[0]) for k, f in sides.items()}
        xj, wj, cj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(c)
        row = {"rows": r, "D": d, "V": v, "w_layout": layout}
        for k, f in fns.items():
            g = np.asarray(f(xj, wj, cj), np.float64)  # compiled, and warm
            row[f"{k}_err_vs_torch"] = float(np.abs(g - truth).max() / scale / e_torch)
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f(xj, wj, cj).block_until_ready()
                times[k].append(time.perf_counter() - t0)
        for k in fns:
            row[f"{k}_ms"] = statistics.median(times[k]) * 1e3
        row["split_over_plain_time"] = row["split_ms"] / row["plain_ms"]
        print(json.dumps(row))
        rows.append(row)
    out = {"cpu": _cpu_name(), "avx512_fp16": host_has_avx512_fp16(), "cpus": os.cpu_count(), "jax": jax.__version__,
           "torch": torch.__version__, "rounds": args.rounds, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
