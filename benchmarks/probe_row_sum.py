"""What the compensated float32 row sums cost on this CPU (kernels._twofloat.sum_axis).

    .venv/bin/python benchmarks/probe_row_sum.py --out benchmarks/results/probe_row_sum_cpu.json

``kernels.softmax`` on float32 input against the same recipe with a plain float32 sum
(``oracles.mutants.softmax.plain_f32_sum``, the kernel before the change), and
``kernels.rms_norm`` (its sum of squares, session 17) against
``oracles.mutants.rms_norm.plain_f32_mean``; each pair jitted, timed in turns (one call
each per round, blocked), medians over the rounds; bf16 input is timed too (it keeps the
plain sum: the ratio there is the noise floor).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.rms_norm import rms_norm
from kernels.softmax import softmax
from oracles.mutants.rms_norm import plain_f32_mean
from oracles.mutants.softmax import plain_f32_sum

SHAPES = ((1, 152064), (16, 4096), (14, 512, 512))  # a vocabulary row, rows of 4096, 0.5B-like scores
RMS_SHAPES = ((512, 896), (512, 3584), (1, 3584))  # 0.5B / 7B hidden rows (prefill), one decode row


def _sides(op: str):
    """The kernel and its plain-sum twin, each taking the one array argument."""
    if op == "softmax":
        return {"kernel": softmax, "plain_sum": plain_f32_sum}

    def kern(x):
        return rms_norm(x, jnp.ones(x.shape[-1], x.dtype))

    def plain(x):
        return plain_f32_mean(x, jnp.ones(x.shape[-1], x.dtype))

    return {"kernel": kern, "plain_sum": plain}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for op, shape in [("softmax", s) for s in SHAPES] + [("rms_norm", s) for s in RMS_SHAPES]:
        for dt in (jnp.float32, jnp.bfloat16):
            x = jnp.asarray(rng.standard_normal(shape) * 4.0, dt)
            sides = {k: jax.jit(f) for k, f in _sides(op).items()}
            times = {k: [] for k in sides}
            for f in sides.values():
                f(x).block_until_ready()  # compile
            for _ in range(args.rounds):
                for k, f in sides.items():
                    t0 = time.perf_counter()
                    f(x).block_until_ready()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"op": op, "shape": list(shape), "dtype": jnp.dtype(dt).name,
                         "kernel_ms": med["kernel"] * 1e3, "plain_sum_ms": med["plain_sum"] * 1e3,
                         "ratio": med["kernel"] / med["plain_sum"]})
            print(f"{op:8s} {str(shape):18s} {jnp.dtype(dt).name:8s} kernel {med['kernel'] * 1e3:8.3f} ms  "
                  f"plain sum {med['plain_sum'] * 1e3:8.3f} ms  x{rows[-1]['ratio']:.2f}")
    with open(args.out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "cpus": jax.device_count(),
                   "jax": jax.__version__, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
